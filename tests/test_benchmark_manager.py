"""benchmarks/benchmark_manager.py runs both managers through prompts that fill and
then evict a small arena, and reports the capacity the compressed one reaches."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
benchmark_manager = pytest.importorskip("benchmark_manager")


def test_manager_benchmark_times_both_managers_and_measures_capacity() -> None:
    args = argparse.Namespace(out=Path("unused"), arena_gib=64 * 4096 / 2**30, blocks=8,
                              worst_bytes=4096, block_bytes=1024, spread=0.03, prompts=40,
                              seed=0)
    result = benchmark_manager.measure(args)
    for key in ("ms_per_prompt", "native_ms_per_prompt"):
        assert set(result[key]) == {"filling", "evicting"}
        assert set(result[key]["evicting"]) == set(benchmark_manager.CALLS)
    assert result["uncompressed_blocks"] == 64
    # 4x smaller blocks, less the reservations' 1/8 margin
    assert 3.0 < result["capacity_vs_uncompressed"] <= result["ideal_vs_uncompressed"] == 4.0
