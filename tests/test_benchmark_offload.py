"""benchmarks/benchmark_offload.py counts the blocks the compressed host cache holds
only once it has filled and evicted (CPU; a stand-in engine, no model)."""

import argparse
import sys
from pathlib import Path

import pytest

from vllm.v1.metrics.reader import Counter, Gauge
from vllm_kvcompress.offload.metrics import CompressionMetrics as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
benchmark_offload = pytest.importorskip("benchmark_offload")


class FakeEngine:
    """Stores ``per_prompt`` blocks per prompt into a cache of ``capacity`` blocks,
    evicting the oldest beyond it, and reports the plugin's metrics."""

    def __init__(self, per_prompt: int, capacity: int):
        self.per_prompt, self.capacity = per_prompt, capacity
        self.cached = self.evicted = self.prompts = 0

    def generate(self, prompts: list[dict], params: object, use_tqdm: bool = False) -> None:
        self.prompts += 1
        self.cached += self.per_prompt
        overflow = max(0, self.cached - self.capacity)
        self.evicted += overflow
        self.cached -= overflow

    def get_metrics(self) -> list:
        return [Counter(M.BLOCKS_EVICTED, {}, self.evicted),
                Gauge(M.CACHED_BLOCKS, {}, float(self.cached)),
                Gauge(M.ARENA_USAGE, {}, 0.9), Gauge(M.ARENA_FRAGMENTATION, {}, 0.1),
                Counter(M.STORES_OVERSIZED, {}, 2)]


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # the stand-in's n-th prompt "takes" n seconds
    monkeypatch.setattr(benchmark_offload, "timed",
                        lambda llm, prompt: llm.generate([prompt], None) or float(llm.prompts))
    monkeypatch.setattr(benchmark_offload, "settle", lambda llm, seconds=1.0: None)


def args(max_prompts: int) -> argparse.Namespace:
    return argparse.Namespace(fill_max_prompts=max_prompts, fill_extra_prompts=3,
                              prompt_tokens=32)


def evicted(engine: FakeEngine):
    return lambda: benchmark_offload.metrics(engine).get(M.BLOCKS_EVICTED, 0) > 0


def test_fill_counts_blocks_after_the_cache_has_been_evicting(no_gpu: None) -> None:
    engine = FakeEngine(per_prompt=10, capacity=25)
    fill = benchmark_offload.fill_host_cache(engine, args(50), evicted(engine))
    # Prompt 3 is the first to evict; three more follow before counting.
    assert fill["prompts"] == engine.prompts == 6
    assert fill["evicting"]
    # prompts 4 to 6 were stored while the cache evicted (prompt 3 made it evict)
    assert fill["cold_evicting_ms"] == 5000.0
    held = benchmark_offload.compressed_cache_held(engine)
    assert held["cached_blocks"] == 25 and held["stores_oversized"] == 2


def test_native_cache_evicts_once_its_blocks_are_exceeded(no_gpu: None) -> None:
    # 4 prompts stored before; 10 blocks each into 55: the 6th prompt evicts.
    engine = FakeEngine(per_prompt=10, capacity=55)
    engine.prompts = 4
    is_evicting = benchmark_offload.native_evicting(4, 10, 55)
    fill = benchmark_offload.fill_host_cache(engine, args(50), is_evicting)
    assert fill["evicting"] and fill["prompts"] == 5
    # fill prompts 3 to 5 (engine prompts 7 to 9) were stored while it evicted
    assert fill["cold_evicting_ms"] == 8000.0


def test_summary_compares_cold_prefill_while_evicting_with_no_offloading() -> None:
    results = {"configs": {
        "none": {"cold": 100.0, "gpu_hit": 20.0, "cpu_hit": 100.0},
        "native": {"cold": 102.0, "gpu_hit": 20.0, "cpu_hit": 44.0, "host_tokens": 1000,
                   "fill": {"cold_evicting_ms": 103.0}},
        "compressed": {"cold": 104.0, "gpu_hit": 21.0, "cpu_hit": 32.0, "host_tokens": 3300,
                       "fill": {"cold_evicting_ms": 110.0}}}}
    benchmark_offload.summarize(results)
    summary = results["summary"]
    assert summary["cold_slowdown_compressed"] == pytest.approx(0.04)
    assert summary["cold_slowdown_compressed_evicting"] == pytest.approx(0.10)
    assert summary["cold_slowdown_native_evicting"] == pytest.approx(0.03)
    assert summary["reload_overhead_vs_native"] == pytest.approx(11 / 24)
    assert summary["reload_overhead_vs_native_over_none_gpu_hit"] == pytest.approx(12 / 24)
    assert summary["host_tokens_vs_native"] == pytest.approx(3.3)


def test_fill_says_so_when_the_cache_never_filled(no_gpu: None) -> None:
    engine = FakeEngine(per_prompt=1, capacity=100)
    fill = benchmark_offload.fill_host_cache(engine, args(5), evicted(engine))
    assert fill["prompts"] == 5 and not fill["evicting"]
