"""benchmarks/benchmark_eviction.py times the plugin's scheduler-side and
worker-side calls inside the engine; its tracing must count and time each call it
wraps and tally the worker's copy plans, without changing what the calls do."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
benchmark_eviction = pytest.importorskip("benchmark_eviction")

from vllm.v1.kv_offload.base import OffloadKey, ReqContext

from vllm_kvcompress.offload import worker as worker_module
from vllm_kvcompress.offload.config import CompressionConfig
from vllm_kvcompress.offload.manager import (
    BlockStoreReport,
    CompressedCPUOffloadingManager,
)


def test_trace_times_each_wrapped_call_and_tallies_copy_plans(
        monkeypatch: pytest.MonkeyPatch) -> None:
    trace = benchmark_eviction.PluginTrace()
    trace.install(monkeypatch.setattr)
    manager = CompressedCPUOffloadingManager(
        capacity=1 << 20, reserve_bytes=4096, raw_block_bytes=4096,
        compression=CompressionConfig(cpu_bytes=1 << 20), kv_dtype="bfloat16")
    ctx = ReqContext(req_id="r")
    keys = [OffloadKey(i.to_bytes(8, "big")) for i in range(4)]
    manager.touch(keys, ctx)
    out = manager.prepare_store(keys, ctx)
    manager.record_store_reports({int(o): BlockStoreReport(1024, 0, 0)
                                  for o in out.store_spec.offsets})
    manager.complete_store(out.keys_to_store, ctx)
    assert len(manager.table) == 4, "the wrapped calls still do their work"
    for name in ("touch", "prepare_store", "complete_store"):
        assert trace.calls[f"CompressedCPUOffloadingManager.{name}"] == 1
        assert trace.seconds[f"CompressedCPUOffloadingManager.{name}"] > 0
    worker_module._plan_chunk(np.array([0, 100, 500]), np.array([100, 100, 100]),
                              np.ones(3, dtype=bool), region=1000, max_runs=8)
    worker_module._plan_chunk(np.array([0, 300, 600]), np.array([100, 100, 100]),
                              np.ones(3, dtype=bool), region=1000, max_runs=2)
    assert trace.chunks == {"dma, 2 runs": 1, "kernel": 1}
    trace.clear()
    assert not trace.calls and not trace.seconds and not trace.chunks
