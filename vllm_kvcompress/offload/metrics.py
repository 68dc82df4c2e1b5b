"""Prometheus metrics of compressed offloading.

They ride on vLLM's offloading-connector metrics: the spec declares them
(:func:`metric_definitions`), the scheduler-side manager fills an
``OffloadingConnectorStats`` each step, and ``vllm serve`` exports them with the
engine's labels. Counters count events since the previous step; gauges are
snapshots of the host cache. Transfer bytes and times (compression and
decompression included) are vLLM's own ``vllm:kv_offload_{store,load}_{bytes,time}``,
fed from each job's ``TransferResult``.
"""

from vllm.v1.kv_offload.base import (
    OffloadingCounterMetadata,
    OffloadingGaugeMetadata,
    OffloadingMetricMetadata,
)


class CompressionMetrics:
    COMPRESSION_RATIO = "vllm:kv_offload_compression_ratio"
    STORED_BYTES = "vllm:kv_offload_compressed_stored_bytes"
    RAW_BYTES = "vllm:kv_offload_compressed_raw_bytes"
    ARENA_USAGE = "vllm:kv_offload_arena_usage_perc"
    ARENA_FRAGMENTATION = "vllm:kv_offload_arena_fragmentation"
    CACHED_BLOCKS = "vllm:kv_offload_cached_blocks"
    BLOCKS_STORED = "vllm:kv_offload_blocks_stored"
    BLOCKS_EVICTED = "vllm:kv_offload_blocks_evicted"
    BLOCKS_LOADED = "vllm:kv_offload_blocks_loaded"
    RAW_PAGES = "vllm:kv_offload_raw_pages"
    STORES_SKIPPED_FULL = "vllm:kv_offload_stores_skipped_arena_full"
    STORES_FAILED = "vllm:kv_offload_stores_failed"
    STORES_OVERSIZED = "vllm:kv_offload_stores_oversized"
    LOADS_FAILED = "vllm:kv_offload_loads_failed"
    SHORT_HITS_RECOMPUTED = "vllm:kv_offload_short_hits_recomputed"
    UNCOMPRESSED_BYTES_STORED = "vllm:kv_offload_uncompressed_bytes_stored"
    COMPRESSED_BYTES_STORED = "vllm:kv_offload_compressed_bytes_stored"


def metric_definitions() -> dict[str, OffloadingMetricMetadata]:
    m = CompressionMetrics
    gauge = OffloadingGaugeMetadata
    counter = OffloadingCounterMetadata
    return {
        m.COMPRESSION_RATIO: gauge(
            "Uncompressed over stored bytes of the blocks now in the host cache."),
        m.STORED_BYTES: gauge("Host-arena bytes holding cached KV blocks (one TP rank)."),
        m.RAW_BYTES: gauge("Bytes the cached KV blocks would take uncompressed (one rank)."),
        m.ARENA_USAGE: gauge("Fraction of the host arena allocated, in-flight stores included."),
        m.ARENA_FRAGMENTATION: gauge(
            "1 - largest free range / free bytes of the host arena (0 = one free range)."),
        m.CACHED_BLOCKS: gauge("KV blocks held in the host cache."),
        m.BLOCKS_STORED: counter("KV blocks stored to the host cache."),
        m.BLOCKS_EVICTED: counter("KV blocks evicted from the host cache (LRU) to make room."),
        m.BLOCKS_LOADED: counter("KV blocks loaded back from the host cache."),
        m.RAW_PAGES: counter(
            "KV pages stored uncompressed because they held NaN/Inf, their error bound "
            "was not attainable in the KV dtype, or compression did not make them smaller."),
        m.STORES_SKIPPED_FULL: counter(
            "KV blocks not stored because the host arena was full of blocks in use."),
        m.STORES_FAILED: counter("KV blocks whose store failed on a worker (dropped)."),
        m.STORES_OVERSIZED: counter(
            "KV blocks not stored because they compressed to more than the arena range "
            "reserved for them (which then grows)."),
        m.LOADS_FAILED: counter(
            "KV blocks whose reload failed its checks (checksum, format); they were "
            "recomputed and dropped from the host cache."),
        m.SHORT_HITS_RECOMPUTED: counter(
            "KV blocks found in the host cache but recomputed: a hit of fewer blocks past "
            "the GPU prefix than a load is worth (connector.MIN_LOAD_BLOCKS)."),
        m.UNCOMPRESSED_BYTES_STORED: counter("Uncompressed KV bytes of the blocks stored."),
        m.COMPRESSED_BYTES_STORED: counter("Bytes written to the host arena by stores."),
    }
