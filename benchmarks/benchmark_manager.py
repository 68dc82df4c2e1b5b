"""Host time of the scheduler-side manager for long prompts, and the capacity it reaches.

The manager runs inside vLLM's scheduler step, so its per-block Python work adds to
the time to first token of the next request. This drives
``CompressedCPUOffloadingManager`` alone (no GPU, no vLLM engine) through the life of
many prompts of ``--blocks`` blocks each: ``prepare_store``, the workers' reports,
``complete_store``, lookups and a load, with block sizes drawn around
``--block-bytes`` (a compressed block) and a worst case of ``--worst-bytes``, until
the ``--arena-gib`` arena has filled and evicted for a while. It reports the median
and maximum milliseconds per prompt of each call, apart for prompts stored while the
arena still had room and once it evicts, beside the same for vLLM's own CPU
offloading manager over the same arena in uncompressed blocks, and how many blocks
the full arena holds against an uncompressed cache of the same size. JSON out::

    python benchmarks/benchmark_manager.py --out results/manager
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm.v1.kv_offload.base import LookupResult, OffloadingManager, OffloadKey, ReqContext
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager
from vllm_kvcompress.offload.config import CompressionConfig
from vllm_kvcompress.offload.manager import BlockStoreReport, CompressedCPUOffloadingManager

CALLS = ("prepare_store", "complete_store", "lookup", "load")


def run_prompts(manager: OffloadingManager, args: argparse.Namespace, label: str,
                reported_sizes: bool) -> tuple[dict[str, list[float]], list[bool], list[int]]:
    """Times each manager call per prompt; returns the times, whether each prompt's
    store evicted, and how many blocks the cache held after it."""
    ctx = ReqContext(req_id="bench")
    rng = random.Random(args.seed)
    times: dict[str, list[float]] = {call: [] for call in CALLS}
    evicting: list[bool] = []
    resident: list[int] = []
    held = 0
    for prompt in tqdm(range(args.prompts), desc=f"{label} prompts"):
        keys = [OffloadKey((prompt * args.blocks + i).to_bytes(8, "big"))
                for i in range(args.blocks)]
        start = time.perf_counter()
        out = manager.prepare_store(keys, ctx)
        times["prepare_store"].append(time.perf_counter() - start)
        if out is None:
            raise SystemExit("the arena cannot take a prompt's blocks; raise --arena-gib")
        evicting.append(bool(out.evicted_keys))
        if reported_sizes:
            spread = args.block_bytes * args.spread
            reports = {int(offset): BlockStoreReport(
                int(args.block_bytes + rng.uniform(-spread, spread)), 0, 0)
                for offset in out.store_spec.offsets}
        start = time.perf_counter()
        if reported_sizes:
            manager.record_store_reports(reports)
        manager.complete_store(out.keys_to_store, ctx)
        times["complete_store"].append(time.perf_counter() - start)
        start = time.perf_counter()
        found = [manager.lookup(key, ctx) for key in keys]
        times["lookup"].append(time.perf_counter() - start)
        cached = [key for key, hit in zip(keys, found) if hit == LookupResult.HIT]
        start = time.perf_counter()
        manager.prepare_load(cached, ctx)
        manager.complete_load(cached, ctx)
        times["load"].append(time.perf_counter() - start)
        held += len(out.keys_to_store) - len(out.evicted_keys)
        resident.append(held)
    return times, evicting, resident


def per_prompt_ms(times: dict[str, list[float]], evicting: list[bool]
                  ) -> dict[str, dict[str, dict[str, float]]]:
    """Median and maximum ms of each call, apart for prompts stored while the cache
    had room and once it evicts."""
    return {phase: {call: {"median": 1e3 * statistics.median(t), "max": 1e3 * max(t)}
                    for call, t in ((c, [x for x, e in zip(ts, evicting) if e == evicts])
                                    for c, ts in times.items()) if t}
            for phase, evicts in (("filling", False), ("evicting", True))}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    capacity = int(args.arena_gib * 2**30)
    manager = CompressedCPUOffloadingManager(
        capacity=capacity, reserve_bytes=args.worst_bytes, raw_block_bytes=args.worst_bytes,
        compression=CompressionConfig(cpu_bytes=capacity), kv_dtype="bfloat16")
    times, evicting, resident = run_prompts(manager, args, "compressed", reported_sizes=True)
    # vLLM's own CPU offloading manager over the same arena in uncompressed blocks,
    # through the same prompts: what the scheduler pays without compression.
    native = CPUOffloadingManager(num_blocks=capacity // args.worst_bytes)
    native_times, native_evicting, _ = run_prompts(native, args, "native",
                                                   reported_sizes=False)
    stats = manager.allocator.stats()
    steady = resident[len(resident) // 2:]
    return {
        "args": vars(args) | {"out": str(args.out)},
        "ms_per_prompt": per_prompt_ms(times, evicting),
        "native_ms_per_prompt": per_prompt_ms(native_times, native_evicting),
        "resident_blocks": statistics.median(steady),
        "uncompressed_blocks": capacity // args.worst_bytes,
        "capacity_vs_uncompressed": statistics.median(steady) / (capacity // args.worst_bytes),
        "ideal_vs_uncompressed": args.worst_bytes / args.block_bytes,
        "arena": {"allocated_bytes": stats.allocated_bytes,
                  "requested_bytes": stats.requested_bytes,
                  "fragmentation": stats.fragmentation},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json")
    parser.add_argument("--arena-gib", type=float, default=8)
    parser.add_argument("--blocks", type=int, default=512, help="blocks per prompt")
    parser.add_argument("--worst-bytes", type=int, default=1_064_960,
                        help="worst case of one block (16 layers x K/V x 32 KiB + headers)")
    parser.add_argument("--block-bytes", type=int, default=280_000,
                        help="mean compressed block size (3.74x on the H100 benchmark)")
    parser.add_argument("--spread", type=float, default=0.03,
                        help="block sizes vary uniformly by this fraction")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"{'':<25}{'compressed':>22}{'native':>22}")
    print(f"{'ms per prompt':<25}{'median':>11}{'max':>11}{'median':>11}{'max':>11}")
    for phase, calls in result["ms_per_prompt"].items():
        for call, t in calls.items():
            n = result["native_ms_per_prompt"].get(phase, {}).get(call)
            native = f"{n['median']:>11.2f}{n['max']:>11.2f}" if n else f"{'-':>11}{'-':>11}"
            print(f"{phase + ' ' + call:<25}{t['median']:>11.2f}{t['max']:>11.2f}{native}")
    print(f"full arena holds {result['resident_blocks']:.0f} blocks, "
          f"{result['capacity_vs_uncompressed']:.2f}x an uncompressed cache "
          f"(ideal {result['ideal_vs_uncompressed']:.2f}x)")


if __name__ == "__main__":
    main()
