"""vLLM's OffloadingConnector, extended with what compressed blocks need.

Two things the stock connector cannot carry: the compressed size of every stored
block (workers learn it, the scheduler's arena accounting needs it), and loads
that fail their checks (the stock worker asserts every transfer succeeds). Both
travel in :class:`CompressedWorkerMetadata`, the worker-to-scheduler metadata of
each step; failed blocks also go to vLLM through
:meth:`CompressedOffloadingConnector.get_block_ids_with_load_errors`, so with
``kv_load_failure_policy="recompute"`` vLLM recomputes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import (
    build_offloading_config,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import (
    OffloadingConnectorScheduler,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.worker import (
    OffloadingConnectorWorker,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.kv_offload.factory import OffloadingSpecFactory
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request
from vllm_kvcompress.logger import init_logger
from vllm_kvcompress.offload.manager import BlockStoreReport, CompressedCPUOffloadingManager
from vllm_kvcompress.offload.spec import CompressedCPUOffloadingSpec, KVGeometry

logger = init_logger(__name__)


@dataclass
class CompressedWorkerMetadata(OffloadingWorkerMetadata):
    """Per-step worker -> scheduler metadata, summed over TP ranks by vLLM.

    ``store_reports``: job id -> {arena offset: (bytes, raw pages, checksum)};
    ``failed_loads``: job id -> arena offsets whose reload failed on some rank.
    Plain tuples and ints, so the metadata serialises cheaply between processes.
    """

    store_reports: dict[int, dict[int, tuple[int, int, int]]] = field(default_factory=dict)
    failed_loads: dict[int, list[int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, OffloadingWorkerMetadata)
        completed = dict(self.completed_jobs)
        for job_id, count in other.completed_jobs.items():
            completed[job_id] = completed.get(job_id, 0) + count
        merged = CompressedWorkerMetadata(
            completed_jobs=completed,
            transfer_stats=self.transfer_stats.aggregate(other.transfer_stats),
            store_reports={job: dict(r) for job, r in self.store_reports.items()},
            failed_loads={job: list(o) for job, o in self.failed_loads.items()},
        )
        if isinstance(other, CompressedWorkerMetadata):
            for job_id, reports in other.store_reports.items():
                mine = merged.store_reports.setdefault(job_id, {})
                for offset, report in reports.items():
                    mine[offset] = (_merge(mine[offset], report)
                                    if offset in mine else report)
            for job_id, offsets in other.failed_loads.items():
                merged.failed_loads.setdefault(job_id, []).extend(offsets)
        return merged


def _merge(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[int, int, int]:
    merged = BlockStoreReport(*a).merge(BlockStoreReport(*b))
    return merged.nbytes, merged.raw_pages, merged.checksum


class CompressedOffloadingConnectorWorker(OffloadingConnectorWorker):
    """Adds the compressed-store reports and failed loads to the step metadata."""

    def take_load_errors(self) -> set[int]:
        worker = self.worker
        if worker is None:
            return set()
        errors, worker.failed_load_block_ids = worker.failed_load_block_ids, set()
        return errors

    def build_connector_worker_meta(self) -> OffloadingWorkerMetadata | None:
        base = super().build_connector_worker_meta()
        worker = self.worker
        reports = getattr(worker, "store_reports", {})
        failed = getattr(worker, "failed_loads", {})
        if base is None and not reports and not failed:
            return None
        base = base or OffloadingWorkerMetadata()
        meta = CompressedWorkerMetadata(
            completed_jobs=base.completed_jobs,
            transfer_stats=base.transfer_stats,
            store_reports=reports,
            failed_loads=failed,
        )
        if worker is not None:
            worker.store_reports, worker.failed_loads = {}, {}
        return meta


# A host hit must reach this many blocks past the GPU prefix to be loaded; a shorter
# one is recomputed. A prompt whose every full block sits in the GPU cache still has
# its last block looked up on the host (vLLM recomputes at least the last token), and
# that one-block load waited for the decompression and the step that reports it: GPU
# prefix hits took 34-57 ms against native offloading's 27-30 and 21 without
# offloading (docs/results/2026-11-24-h100-4). Recomputing a block's tokens rides in
# the step that computes the last token anyway.
MIN_LOAD_BLOCKS = 2


def worth_loading(hit_tokens: int, block_tokens: int) -> bool:
    """Whether ``hit_tokens`` found in the host cache past the GPU prefix, in blocks
    of ``block_tokens``, are loaded rather than recomputed."""
    return hit_tokens >= MIN_LOAD_BLOCKS * block_tokens


class CompressedOffloadingConnectorScheduler(OffloadingConnectorScheduler):
    """Feeds worker reports to the manager before vLLM completes their jobs, so a
    store is trimmed to its real size and a bad block is dropped as its load ends;
    recomputes host hits too short to be worth a load (:func:`worth_loading`)."""

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        hit_tokens, load_async = super().get_num_new_matched_tokens(request,
                                                                    num_computed_tokens)
        if not hit_tokens:
            return hit_tokens, load_async
        block_tokens = min(g.tokens_per_chunk for g in self.config.kv_group_configs)
        if worth_loading(hit_tokens, block_tokens):
            return hit_tokens, load_async
        manager = self.manager
        assert isinstance(manager, CompressedCPUOffloadingManager)
        manager.record_short_hit(cdiv(hit_tokens, block_tokens))
        return 0, False

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        manager = self.manager
        if isinstance(meta, CompressedWorkerMetadata):
            assert isinstance(manager, CompressedCPUOffloadingManager)
            live = self._stale_job_threshold
            for job_id, reports in meta.store_reports.items():
                if job_id >= live:
                    make = BlockStoreReport._make
                    manager.record_store_reports(
                        {offset: make(r) for offset, r in reports.items()})
            for job_id, offsets in meta.failed_loads.items():
                if job_id >= live:
                    manager.record_failed_loads(offsets)
        super().update_connector_output(connector_output)


class CompressedOffloadingConnector(OffloadingConnector):
    """``kv_connector="CompressedOffloadingConnector"``: vLLM's offloading connector
    with the compressed spec, size reporting and a failed-load path."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        KVConnectorBase_V1.__init__(self, vllm_config, role, kv_cache_config)
        spec = OffloadingSpecFactory.create_spec(
            build_offloading_config(vllm_config, kv_cache_config))
        if not isinstance(spec, CompressedCPUOffloadingSpec):
            raise ValueError(
                "CompressedOffloadingConnector needs spec_name='CompressedCPUOffloadingSpec' "
                "and spec_module_path='vllm_kvcompress.offload.spec' in "
                f"kv_connector_extra_config, got {type(spec).__name__}")
        spec.set_geometry(KVGeometry.from_kv_cache_config(kv_cache_config))
        self.connector_scheduler: OffloadingConnectorScheduler | None = None
        self.connector_worker: OffloadingConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = CompressedOffloadingConnectorScheduler(
                spec, vllm_config, kv_cache_config)
        elif role == KVConnectorRole.WORKER:
            self.connector_worker = CompressedOffloadingConnectorWorker(spec, kv_cache_config)

    def get_block_ids_with_load_errors(self) -> set[int]:
        worker = self.connector_worker
        if not isinstance(worker, CompressedOffloadingConnectorWorker):
            return set()
        return worker.take_load_errors()
