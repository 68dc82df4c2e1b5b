"""Tests for the host arena allocator and the block-metadata table."""
