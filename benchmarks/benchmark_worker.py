"""Where the time of one prompt's offload goes, without vLLM around it.

Drives ``CompressedOffloadingWorker`` directly over KV tensors laid out as vLLM 0.26
hands them to an offloading worker (``--layout flash``: one K and one V tensor per
layer, as FLASH_ATTN's ``(2, num_blocks, ...)`` cache is split; ``--layout
cross``: one cross-layer tensor, as TRITON_ATTN's), stores one prompt's blocks to
the host arena and loads them back into other blocks, and reports per direction:

* *submit*: host time of ``submit_store`` / ``submit_load``: the launches, which run
  on the engine's step thread while the step waits;
* *GPU*: from the job's start event to its end event on the side stream;
* *wall*: submit until the job is done;
* the same prompt's raw bytes copied GPU <-> pinned host with one ``copy_`` each way
  (the PCIe roofline the compressed path should beat by its ratio), and one copy per
  block and tensor (what a naive per-block path costs).

The end-to-end benchmark (benchmark_offload.py) shows *that* the offload path costs
time; this one says whether launches, kernels or PCIe are to blame. It also times
the *contention* a store causes: a stand-in for the next prompt's prefill (a run of
bf16 GEMMs, ``--gemms`` of ``--gemm-size``) alone, while the compressed store runs
on its side stream, and while the same prompt's raw bytes go to pinned memory by DMA
(what vLLM's native offloading does); the differences are what a cold prefill pays
for the store on the GPU. Each store measurement runs once per ``--store-copies``
way of writing a chunk's records into the arena: ``dma`` (arena-shaped staging
slots, then the copy engines, the worker's default) and ``kernel`` (the
segment-copy kernel straight into the arena); each load once per ``--load-copies``
way of moving a chunk's records to GPU staging: ``dma`` (the copy engines, one copy
per run of blocks lying together, the worker's default) and ``kernel`` (the
segment-copy kernel), both overlapping the next chunk's copy with this one's decode.
The prompt's blocks get one run of adjacent reservations, each sized as the
scheduler sizes them once it has seen a store (the largest block plus its margin),
so the copy engines copy what they would in a server. ``--profile`` adds a torch
profiler table of the store and load, and a Python profile of one store's and one
load's submit (where the host time that the engine's step waits for goes). Runs on
CPU tensors too (slowly, synchronously), which is how CI smoke-tests it. JSON out::

    python benchmarks/benchmark_worker.py --out results/worker
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
)
from vllm_kvcompress.codec import CodecConfig, CodecMode
from vllm_kvcompress.offload.config import DEFAULT_ERROR_BOUND, DEFAULT_MODE, MODE_NAMES
from vllm_kvcompress.offload.manager import ArenaLoadStoreSpec
from vllm_kvcompress.offload.reservation import ReservationSize
from vllm_kvcompress.offload.worker import (
    MAX_DMA_RUNS,
    MAX_LOAD_DMA_RUNS,
    CompressedOffloadingWorker,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# How a store chunk reaches the arena: the worker's run threshold for each way.
STORE_COPIES = {"dma": MAX_DMA_RUNS, "kernel": 0}
# How a load chunk reaches GPU staging: the worker's run threshold for each way.
LOAD_COPIES = {"dma": MAX_LOAD_DMA_RUNS, "kernel": 0}


def kv_values(shape: tuple[int, ...], token_dim: int, device: torch.device,
              dtype: torch.dtype, seed: int) -> torch.Tensor:
    """KV-like values: per-channel scale, smooth along tokens (``token_dim``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    walk = torch.randn(shape, generator=g, device=device).cumsum(token_dim) * 0.05
    scale = torch.rand(shape[-1], generator=g, device=device) * 2 + 0.1
    return ((torch.randn(shape[-1], generator=g, device=device) + walk) * scale).to(dtype)


def build_caches(args: argparse.Namespace, device: torch.device
                 ) -> tuple[CanonicalKVCaches, int]:
    """Canonical block tensors (int8 views, one row per block) over real KV memory,
    and the elements of one page."""
    dtype = DTYPES[args.dtype]
    page_elems = args.block_size * args.kv_heads * args.head_dim
    views = []
    if args.layout == "flash":
        for layer in range(args.layers):
            kv = kv_values((2, args.num_blocks, args.block_size, args.kv_heads, args.head_dim),
                           2, device, dtype, seed=layer)
            views += [kv[i].view(torch.int8).view(args.num_blocks, -1) for i in range(2)]
    else:
        kv = kv_values((args.num_blocks, args.layers, args.block_size, args.kv_heads,
                        2 * args.head_dim), 2, device, dtype, seed=0)
        views.append(kv.view(torch.int8).view(args.num_blocks, -1))
    tensors = [CanonicalKVCacheTensor(v, v.shape[1]) for v in views]
    refs = [[CanonicalKVCacheRef(i, v.shape[1]) for i, v in enumerate(views)]]
    return CanonicalKVCaches(tensors=tensors, group_data_refs=refs), page_elems


def run_job(worker: CompressedOffloadingWorker, submit, job_id: int, sync) -> dict[str, float]:
    sync()
    start = time.perf_counter()
    assert submit(job_id)
    submitted = time.perf_counter()
    results = []
    while not results:
        results = worker.get_finished()
    done = time.perf_counter()
    (result,) = results
    assert result.job_id == job_id and result.success
    return {"submit_ms": 1e3 * (submitted - start), "wall_ms": 1e3 * (done - start),
            "gpu_ms": 1e3 * result.transfer_time if result.transfer_time else float("nan"),
            "bytes": float(result.transfer_size)}


def prompt_bytes(caches: CanonicalKVCaches, blocks: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's raw KV bytes gathered on its device, and a host buffer as large
    (pinned on CUDA), for copies standing in for uncompressed offloading."""
    device = caches.tensors[0].tensor.device
    flat = torch.cat([t.tensor[torch.as_tensor(blocks, device=device)].reshape(-1)
                      for t in caches.tensors])
    return flat, torch.empty(flat.numel(), dtype=torch.int8, pin_memory=flat.is_cuda)


def raw_copies(caches: CanonicalKVCaches, blocks: np.ndarray, sync) -> dict[str, float]:
    """The prompt's raw bytes GPU -> pinned host -> GPU in one copy each way, and
    GPU -> host with one copy per block and tensor."""
    flat, pinned = prompt_bytes(caches, blocks)
    out: dict[str, float] = {"raw_bytes": float(flat.numel())}
    sync()
    start = time.perf_counter()
    pinned.copy_(flat, non_blocking=True)
    sync()
    out["d2h_one_copy_ms"] = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    flat.copy_(pinned, non_blocking=True)
    sync()
    out["h2d_one_copy_ms"] = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    at = 0
    for t in caches.tensors:
        width = t.tensor.shape[1]
        for b in blocks:
            pinned[at:at + width].copy_(t.tensor[int(b)], non_blocking=True)
            at += width
    sync()
    out["d2h_per_block_ms"] = 1e3 * (time.perf_counter() - start)
    return out


def contention(worker: CompressedOffloadingWorker, store, caches: CanonicalKVCaches,
               blocks: np.ndarray, args: argparse.Namespace, sync) -> dict[str, Any]:
    """GEMM time alone, with a compressed store (each ``--store-copies`` way) and
    with a raw DMA copy of the same prompt running beside it (medians of
    ``--repeats``), and the store's own GPU time while the GEMMs run."""
    device = caches.tensors[0].tensor.device
    a = torch.randn(args.gemm_size, args.gemm_size, device=device).to(torch.bfloat16)
    b = torch.randn_like(a)
    flat, pinned = prompt_bytes(caches, blocks)
    dma_stream = torch.cuda.Stream(device) if flat.is_cuda else None

    def gemms() -> float:
        start = time.perf_counter()
        for _ in range(args.gemms):
            torch.mm(a, b)
        sync()
        return 1e3 * (time.perf_counter() - start)

    def with_dma() -> float:
        if dma_stream is not None:
            dma_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(dma_stream):
                pinned.copy_(flat, non_blocking=True)
        else:
            pinned.copy_(flat)
        return gemms()

    samples: dict[str, list[float]] = {"alone": [], "with_raw_dma": []}
    per_copy = {way: {"with_store": [], "store_gpu": []} for way in args.store_copies}
    job_ids = itertools.count(1_000_000)  # after the measurement loop's ids
    gemms()  # the first GEMMs pick their kernels
    for _ in range(args.repeats):
        sync()
        samples["alone"].append(gemms())
        for way, runs in per_copy.items():
            worker.max_dma_runs = STORE_COPIES[way]
            sync()
            assert store(next(job_ids))
            runs["with_store"].append(gemms())
            finished = []
            while not finished:
                finished = worker.get_finished()
            runs["store_gpu"].append(1e3 * (finished[0].transfer_time or float("nan")))
            worker.store_reports.clear()
        sync()
        samples["with_raw_dma"].append(with_dma())
    worker.max_dma_runs = MAX_DMA_RUNS
    alone = statistics.median(samples["alone"])
    raw_dma = statistics.median(samples["with_raw_dma"])
    by_copy = {}
    for way, runs in per_copy.items():
        with_store = statistics.median(runs["with_store"])
        by_copy[way] = {"gemm_with_store_ms": with_store,
                        "store_slowdown_ms": with_store - alone,
                        "store_gpu_ms_beside_gemms": statistics.median(runs["store_gpu"])}
    return {"gemm_alone_ms": alone, "gemm_with_raw_dma_ms": raw_dma,
            "raw_dma_slowdown_ms": raw_dma - alone, "by_store_copy": by_copy}


def max_error_over_bound(worker: CompressedOffloadingWorker, src: np.ndarray, dst: np.ndarray,
                         rel_eb: float) -> float:
    """Largest |reloaded - stored| over each page's relative bound, for every page
    of every tensor: the round trip must put the right values in the right blocks."""
    worst = 0.0
    for layout in worker.layouts:
        k = layout.pages_per_block
        offsets = torch.arange(k, device=layout.pages.device)
        stored = layout.pages[(torch.as_tensor(src, device=offsets.device)[:, None] * k
                               + offsets).reshape(-1)].double()
        loaded = layout.pages[(torch.as_tensor(dst, device=offsets.device)[:, None] * k
                               + offsets).reshape(-1)].double()
        bound = rel_eb * (stored.amax(1) - stored.amin(1))
        ratio = (loaded - stored).abs().amax(1) / bound.clamp_min(1e-30)
        worst = max(worst, float(ratio.max()))
    return worst


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    caches, page_elems = build_caches(args, device)
    blocks_per_prompt = args.tokens // args.block_size
    codec = CodecConfig(args.error_bound, True, CodecMode[args.mode.upper()], args.rows)
    # The worker sizes a block's worst case from the layout it derives, so it is
    # built first and given an arena of exactly one prompt's worst cases after.
    worker = CompressedOffloadingWorker(caches, DTYPES[args.dtype], page_elems, codec,
                                        arena_bytes=0)
    worst_case = worker.reserve_bytes(0)
    worker.arena = torch.empty(worst_case * blocks_per_prompt, dtype=torch.uint8,
                               pin_memory=device.type == "cuda")
    src = np.arange(blocks_per_prompt)
    dst = src + blocks_per_prompt
    job_ids = itertools.count()

    def arena_spec(reserve: int) -> ArenaLoadStoreSpec:
        """The prompt's blocks in one run of ``reserve``-byte ranges."""
        return ArenaLoadStoreSpec([int(i) * reserve for i in src], [reserve] * len(src))

    def submit_store(job_id: int, spec: ArenaLoadStoreSpec) -> bool:
        return worker.submit_store(
            job_id, GPULoadStoreSpec(src.tolist(), group_sizes=[len(src)], block_indices=[0]),
            spec)

    # One store at the worst case, as the scheduler's first, to learn the sizes its
    # later reservations follow.
    first = next(job_ids)
    run_job(worker, lambda job_id: submit_store(job_id, arena_spec(worst_case)), first, sync)
    reservation = ReservationSize(worst_case)
    reservation.observe(max(r[0] for r in worker.store_reports.pop(first).values()))
    reserve = reservation.nbytes
    spec = arena_spec(reserve)

    def store_job(job_id: int) -> bool:
        """The prompt's blocks into the arena."""
        return submit_store(job_id, spec)

    def load_job(job_id: int) -> bool:
        """The prompt back from the arena, into other GPU blocks."""
        return worker.submit_load(
            job_id, spec,
            GPULoadStoreSpec(dst.tolist(), group_sizes=[len(dst)], block_indices=[0]))

    stores: dict[str, list[dict[str, float]]] = {way: [] for way in args.store_copies}
    loads: dict[str, list[dict[str, float]]] = {way: [] for way in args.load_copies}
    profiler = None
    for rep in range(args.warmup + args.repeats):
        if args.profile and rep == args.warmup + args.repeats - 1:
            profiler = torch.profiler.profile(record_shapes=False)
            profiler.__enter__()
        for way, rows in stores.items():
            worker.max_dma_runs = STORE_COPIES[way]
            job_id = next(job_ids)
            store = run_job(worker, store_job, job_id, sync)
            assert all(r[0] > 0 for r in worker.store_reports.pop(job_id).values()), (
                "every block must fit its reservation")
            if rep >= args.warmup:
                rows.append(store)
        for way, rows in loads.items():
            worker.max_load_dma_runs = LOAD_COPIES[way]
            load = run_job(worker, load_job, next(job_ids), sync)
            assert not worker.failed_load_block_ids, "every block must decode"
            if rep >= args.warmup:
                rows.append(load)
    worker.max_dma_runs = MAX_DMA_RUNS
    if profiler is not None:
        profiler.__exit__(None, None, None)
    host_profiles = {}
    if args.profile:
        host_profiles["store"] = host_profile(worker, store_job, next(job_ids))
        host_profiles["load"] = host_profile(worker, load_job, next(job_ids))
    # Each way loads once more into destination blocks cleared first, so that its
    # own round trip, not an earlier one's, is held to the bound.
    errors = {}
    for way in args.load_copies:
        for t in caches.tensors:
            t.tensor[torch.as_tensor(dst, device=device)] = 0
        worker.max_load_dma_runs = LOAD_COPIES[way]
        run_job(worker, load_job, next(job_ids), sync)
        errors[way] = max_error_over_bound(worker, src, dst, args.error_bound)
    worker.max_load_dma_runs = MAX_LOAD_DMA_RUNS
    worst = max(errors.values())
    beside = contention(worker, store_job, caches, src, args, sync)
    if worst > 1.0:
        raise SystemExit(f"reloaded KV breaks the error bound: max error {worst:.3f} x bound")
    result: dict[str, Any] = {
        "max_error_over_bound": worst,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "args": {k: str(v) for k, v in vars(args).items()},
        "tensors": len(caches.tensors), "blocks": blocks_per_prompt,
        "raw_prompt_bytes": worker.raw_block_bytes(0) * blocks_per_prompt,
        "reserved_per_block": reserve, "worst_case_per_block": worst_case,
        "counters": vars(worker.counters),
        "contention": beside,
        "store": {way: medians(rows) for way, rows in stores.items()},
        "load": {way: medians(rows) for way, rows in loads.items()},
    }
    result["ratio"] = result["raw_prompt_bytes"] / next(iter(result["load"].values()))["bytes"]
    result["raw_copy"] = raw_copies(caches, src, sync)
    if profiler is not None:
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        result["profile"] = profiler.key_averages().table(sort_by=sort, row_limit=25)
    for direction, text in host_profiles.items():
        result[f"submit_{direction}_host_profile"] = text
    return result


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def host_profile(worker: CompressedOffloadingWorker, submit, job_id: int) -> str:
    """The Python profile of one submit (functions by their own time), then waits
    for the job so the next measurement starts from an idle worker."""
    profile = cProfile.Profile()
    profile.enable()
    assert submit(job_id)
    profile.disable()
    while not worker.get_finished():
        pass
    worker.store_reports.clear()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
    return out.getvalue()


def print_report(r: dict[str, Any]) -> None:
    print(f"{r['device']}: {r['blocks']} blocks x {r['tensors']} tensors, "
          f"{r['raw_prompt_bytes'] / 2**20:.0f} MiB raw, ratio {r['ratio']:.2f}, "
          f"max error {r['max_error_over_bound']:.3f} x bound")
    print(f"{'':<14}{'submit ms':>10}{'GPU ms':>9}{'wall ms':>9}{'MiB moved':>11}")
    rows = ({f"store {way}": d for way, d in r["store"].items()}
            | {f"load {way}": d for way, d in r["load"].items()})
    for name, d in rows.items():
        print(f"{name:<14}{d['submit_ms']:>10.2f}{d['gpu_ms']:>9.2f}{d['wall_ms']:>9.2f}"
              f"{d['bytes'] / 2**20:>11.1f}")
    c = r["raw_copy"]
    print(f"raw copy of the prompt: GPU->host {c['d2h_one_copy_ms']:.2f} ms, host->GPU "
          f"{c['h2d_one_copy_ms']:.2f} ms, GPU->host per block and tensor "
          f"{c['d2h_per_block_ms']:.2f} ms")
    c = r["contention"]
    print(f"GEMMs standing in for a prefill: {c['gemm_alone_ms']:.2f} ms alone, "
          f"{c['raw_dma_slowdown_ms']:+.2f} ms beside a raw DMA copy of the prompt")
    for way, e in c["by_store_copy"].items():
        print(f"  beside the store by {way}: {e['store_slowdown_ms']:+.2f} ms (the store "
              f"takes {e['store_gpu_ms_beside_gemms']:.2f} ms GPU there)")
    for key in ("profile", "submit_store_host_profile", "submit_load_host_profile"):
        if key in r:
            print(r[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json")
    parser.add_argument("--layout", choices=["flash", "cross"], default="flash")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8192, help="one prompt's tokens")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--error-bound", type=float, default=DEFAULT_ERROR_BOUND,
                        help="relative")
    parser.add_argument("--mode", choices=list(MODE_NAMES),
                        default=DEFAULT_MODE)
    parser.add_argument("--rows", type=int, default=1, help="codec stream order")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gemms", type=int, default=250,
                        help="GEMMs of the prefill stand-in (about 50 ms on an H100)")
    parser.add_argument("--gemm-size", type=int, default=4096)
    parser.add_argument("--store-copies", nargs="+", choices=list(STORE_COPIES),
                        default=list(STORE_COPIES),
                        help="ways a store's records reach the arena, each measured")
    parser.add_argument("--load-copies", nargs="+", choices=list(LOAD_COPIES),
                        default=list(LOAD_COPIES),
                        help="ways a load's records reach GPU staging, each measured")
    parser.add_argument("--profile", action="store_true", help="torch profiler table")
    parser.add_argument("--cpu", action="store_true", help="run on CPU tensors")
    args = parser.parse_args()
    args.num_blocks = 2 * (args.tokens // args.block_size)
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print_report(result)


if __name__ == "__main__":
    main()
