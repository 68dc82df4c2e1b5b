"""The offloading spec vLLM's OffloadingConnector builds from
``kv_connector_extra_config`` (``spec_name`` / ``spec_module_path``): it pairs the
scheduler-side manager of the compressed host cache with the worker-side
transfers, and sizes both from the same KV geometry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    OffloadingManager,
    OffloadingMetricMetadata,
    OffloadingSpec,
    OffloadingWorker,
)
from vllm.v1.kv_offload.config import OffloadingConfig
from vllm_kvcompress.logger import init_logger
from vllm_kvcompress.offload.config import CompressionConfig
from vllm_kvcompress.offload.manager import CompressedCPUOffloadingManager
from vllm_kvcompress.offload.metrics import metric_definitions

logger = init_logger(__name__)

# Per codec page, at most a 32-byte header plus padding to 16 bytes.
_RECORD_OVERHEAD = 48


@dataclass(frozen=True)
class KVGeometry:
    """What the codec needs to know about the KV cache that vLLM's canonical
    (byte-typed) block tensors no longer say: the element dtype, and how many
    elements one layer's K (or V) of one block holds, which is one codec page."""

    dtype: torch.dtype
    elems_per_page: int

    @classmethod
    def from_kv_cache_config(cls, kv_cache_config: KVCacheConfig) -> KVGeometry:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(
                "compressed KV offloading supports models with one KV cache group "
                f"(uniform full attention); this model has {len(groups)}")
        spec = groups[0].kv_cache_spec
        if not isinstance(spec, AttentionSpec):
            raise ValueError("compressed KV offloading needs an attention KV cache, "
                             f"got {type(spec).__name__}")
        return cls(dtype=spec.dtype,
                   elems_per_page=spec.block_size * spec.num_kv_heads * spec.head_size)


class CompressedCPUOffloadingSpec(OffloadingSpec):
    """CPU offloading whose blocks are stored compressed in a pinned arena."""

    @classmethod
    @override
    def build_metric_definitions(
            cls, extra_config: dict[str, Any]) -> dict[str, OffloadingMetricMetadata]:
        return metric_definitions()

    def __init__(self, config: OffloadingConfig):
        super().__init__(config)
        self.compression = CompressionConfig.from_extra_config(self.extra_config)
        if self.blocks_per_chunk != 1:
            raise ValueError("compressed KV offloading stores one offloaded block per GPU "
                             f"block; got blocks_per_chunk={self.blocks_per_chunk} (drop "
                             "'block_size' / 'blocks_per_chunk' from the connector config)")
        world_size = max(config.parallel.world_size, 1)
        self.arena_bytes = self.compression.cpu_bytes // world_size // 16 * 16
        self.raw_block_bytes = config.worker_kv_bytes_per_block
        self.geometry: KVGeometry | None = None
        self._manager: CompressedCPUOffloadingManager | None = None
        self._worker: OffloadingWorker | None = None

    def set_geometry(self, geometry: KVGeometry) -> None:
        self.geometry = geometry

    def _require_geometry(self) -> KVGeometry:
        if self.geometry is None:
            raise RuntimeError(
                "CompressedCPUOffloadingSpec runs under kv_connector="
                "'CompressedOffloadingConnector'. Passing kv_offloading_size together "
                "with compressed_offload_kwargs(...) makes vLLM switch to its own "
                "OffloadingConnector: give the size only to compressed_offload_kwargs")
        return self.geometry

    @property
    def reserve_bytes(self) -> int:
        """Worst-case arena bytes of one block on one rank: every page raw."""
        geometry = self._require_geometry()
        page_bytes = geometry.elems_per_page * geometry.dtype.itemsize
        pages = -(-self.raw_block_bytes // page_bytes)
        return self.raw_block_bytes + pages * _RECORD_OVERHEAD

    @override
    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            geometry = self._require_geometry()
            self._manager = CompressedCPUOffloadingManager(
                capacity=self.arena_bytes,
                reserve_bytes=self.reserve_bytes,
                raw_block_bytes=self.raw_block_bytes,
                compression=self.compression,
                kv_dtype=str(geometry.dtype).removeprefix("torch."),
                enable_events=self.kv_events_config.enable_kv_cache_events,
            )
            logger.info(
                "Compressed KV offloading: %.2f GiB host arena per rank, error bound %g "
                "(%s), mode %s; %d bytes reserved per block until its size is known",
                self.arena_bytes / (1 << 30), self.compression.error_bound,
                "relative" if self.compression.relative else "absolute",
                self.compression.mode, self.reserve_bytes)
        return self._manager

    @override
    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            from vllm_kvcompress.offload.worker import CompressedOffloadingWorker

            geometry = self._require_geometry()
            worker = CompressedOffloadingWorker(
                kv_caches=kv_caches,
                kv_dtype=geometry.dtype,
                elems_per_page=geometry.elems_per_page,
                codec=self.compression.codec,
                arena_bytes=self.arena_bytes,
            )
            if worker.reserve_bytes(0) > self.reserve_bytes:
                raise RuntimeError(
                    f"a KV block needs up to {worker.reserve_bytes(0)} bytes on this rank but "
                    f"the scheduler reserves {self.reserve_bytes}; this KV layout is not "
                    "supported by compressed offloading")
            self._worker = worker
        return self._worker
