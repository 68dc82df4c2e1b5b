"""Host-side bookkeeping for compressed KV offloading: arena allocation and block metadata."""
