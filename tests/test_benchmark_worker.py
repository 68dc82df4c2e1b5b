"""benchmarks/benchmark_worker.py runs end to end on CPU tensors, for both KV
layouts, both ways a store reaches the arena and both ways a load reaches GPU
staging, and reports a round trip that really compressed (the GPU host runs it at
full size)."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
benchmark_worker = pytest.importorskip("benchmark_worker")


@pytest.mark.parametrize("layout", ["flash", "cross"])
def test_worker_benchmark_round_trip_on_cpu(layout: str) -> None:
    args = argparse.Namespace(layout=layout, layers=2, kv_heads=2, head_dim=32, block_size=16,
                              tokens=128, dtype="bf16", error_bound=1e-2, mode="plain", rows=1,
                              warmup=0, repeats=1, profile=False, cpu=True, num_blocks=16,
                              gemms=2, gemm_size=32, store_copies=["dma", "kernel"],
                              load_copies=["dma", "kernel"])
    result = benchmark_worker.measure(args)
    assert result["tensors"] == (4 if layout == "flash" else 1)
    assert result["blocks"] == 8
    assert result["ratio"] > 1.5
    assert result["reserved_per_block"] < result["worst_case_per_block"], (
        "reservations follow the first store's sizes, as the scheduler's do")
    # each way measured once, then once more checked against the bound
    assert result["counters"]["blocks_loaded"] == 2 * 2 * 8
    assert result["counters"]["failed_loads"] == 0
    assert set(result["store"]) == {"dma", "kernel"}
    assert all(s["submit_ms"] > 0 for s in result["store"].values())
    assert result["store"]["dma"]["bytes"] == result["store"]["kernel"]["bytes"]
    assert set(result["load"]) == {"dma", "kernel"}
    assert all(s["submit_ms"] > 0 for s in result["load"].values())
    assert result["load"]["dma"]["bytes"] == result["load"]["kernel"]["bytes"]
    assert result["raw_copy"]["raw_bytes"] > 0
    assert 0 < result["max_error_over_bound"] <= 1
    c = result["contention"]
    assert c["gemm_alone_ms"] > 0 and c["gemm_with_raw_dma_ms"] > 0
    assert set(c["by_store_copy"]) == {"dma", "kernel"}
    assert all(e["gemm_with_store_ms"] > 0 for e in c["by_store_copy"].values())
    # the first (worst-case) store, then each way once measured and once beside GEMMs
    assert result["counters"]["blocks_stored"] == (1 + 2 * 2) * 8


def test_worker_benchmark_profiles_the_host_side_of_a_submit() -> None:
    args = argparse.Namespace(layout="flash", layers=2, kv_heads=2, head_dim=32, block_size=16,
                              tokens=64, dtype="bf16", error_bound=1e-2, mode="plain", rows=1,
                              warmup=0, repeats=1, profile=True, cpu=True, num_blocks=8,
                              gemms=1, gemm_size=16, store_copies=["dma"],
                              load_copies=["dma"])
    result = benchmark_worker.measure(args)
    assert "kvcompress::compress" in result["profile"]
    assert "_store_group" in result["submit_store_host_profile"]
    assert "_load_group" in result["submit_load_host_profile"]
