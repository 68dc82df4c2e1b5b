"""Throughput, ratio and error of the KV page codec on the GPU.

For each source of pages (real K and V pages captured by extract_kv_pages.py,
and synthetic vLLM-shaped pages), dtype, mode, stream layout and relative error
bound, it measures in one run: compression and decompression throughput in GB/s
of uncompressed KV, a plain device-to-device copy of the same bytes (the
roofline a codec that reads and writes every byte cannot beat), the compression
ratio, the fraction of pages stored raw, and the largest error relative to the
promised bound. Prints a table and writes JSON and a PNG plot.

Rates are over the GPU time of one call, the host's work to make it hidden behind a
GPU spin and L2 emptied before it (time_call); beside them, the host microseconds of
a call and the rate of a call made on an idle GPU, host work included.

Example::

    python benchmarks/benchmark_codec.py --kv-pages .gpu/kv_pages.pt --out results/codec

``--codec-warps 2 4 8`` times every configuration once per CTA size of the codec
kernels (KVCOMPRESS_CODEC_WARPS, docs/tuning.md; 0 is the automatic size).
"""

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_kvcompress.codec import (CodecConfig, CodecMode, DecodeStatus, compress_pages,
                                   decompress_pages)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CODEC_WARPS = "KVCOMPRESS_CODEC_WARPS"


@dataclass
class Row:
    source: str
    dtype: str
    mode: str
    rows: int
    rel_eb: float
    codec_warps: int  # KVCOMPRESS_CODEC_WARPS during the run, 0: the automatic CTA size
    num_pages: int
    page_bytes: int
    ratio: float
    raw_fraction: float
    max_err_over_bound: float
    bound_violations: int
    # GB/s of uncompressed KV over the GPU time of one call (time_call)
    compress_gbps: float
    decompress_gbps: float
    copy_gbps: float
    compress_pct_of_copy: float
    decompress_pct_of_copy: float
    # Host microseconds of one call, and GB/s over the time a call takes on an idle GPU,
    # host work included: what a caller that waits on every call would see.
    compress_host_us: float
    decompress_host_us: float
    compress_idle_gbps: float
    decompress_idle_gbps: float
    copy_idle_gbps: float


# Host work of a timed call (Python, argument checks, the op's dispatch, the launch)
# happens while the GPU runs a spin of this many cycles (about 1 ms on an H100), so the
# events around the call time the GPU's work alone. Timed on an idle GPU instead, the
# host's part lands between the start event and the kernel and varies from process to
# process.
HOST_COVER_CYCLES = 2_000_000
# Bytes written between timed calls so that no call finds its pages in L2 (50 MiB on an
# H100): KV pages are compressed long after they were written.
L2_FLUSH_BYTES = 256 << 20


@dataclass
class Timing:
    """Medians of one call: its GPU time (host work hidden behind a spin), the host time
    of the call itself, and the time between events around it on an idle GPU, which
    includes the host work (how this benchmark timed before 2026-11-24, fifth session)."""

    gpu_ms: float
    host_ms: float
    idle_gpu_ms: float


def time_call(fn: Callable[[], object], warmup: int, iters: int, flush: torch.Tensor) -> Timing:
    """Times fn() both ways, `iters` times after `warmup` calls; `flush` is zeroed
    before each call to empty L2."""
    for _ in range(warmup):
        fn()
    gpu, host, idle = [], [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        torch.cuda._sleep(HOST_COVER_CYCLES)
        start.record()
        began = time.perf_counter()
        fn()
        host.append((time.perf_counter() - began) * 1e3)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))

        flush.zero_()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        idle.append(start.elapsed_time(end))
    return Timing(statistics.median(gpu), statistics.median(host), statistics.median(idle))


def synthetic_pages(num_pages: int, tokens: int, channels: int, seed: int) -> torch.Tensor:
    """KV-like pages: per-channel scales, a few outlier channels, smooth along tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.rand(channels, generator=g, device="cuda") * 2 + 0.1
    scale[torch.randint(channels, (channels // 64,), generator=g, device="cuda")] *= 10
    base = torch.randn(num_pages, 1, channels, generator=g, device="cuda")
    walk = torch.randn(num_pages, tokens, channels, generator=g, device="cuda").cumsum(1) * 0.05
    return ((base + walk) * scale).reshape(num_pages, tokens * channels)


def parse_shape(shape: str) -> tuple[int, int, int]:
    """'16x8x128' -> (16, 8, 128); a clear error for anything else."""
    parts = shape.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"a synthetic shape is TOKENSxHEADSxHEAD_SIZE of positive integers, got {shape!r}")
    tokens, heads, head_size = (int(p) for p in parts)
    return tokens, heads, head_size


@contextlib.contextmanager
def codec_warps(warps: int) -> Iterator[None]:
    """KVCOMPRESS_CODEC_WARPS set to `warps` (0: the automatic CTA size) while the
    block runs; the kernels read it at every launch. The previous value afterwards."""
    before = os.environ.get(CODEC_WARPS)
    os.environ[CODEC_WARPS] = str(warps)
    try:
        yield
    finally:
        if before is None:
            del os.environ[CODEC_WARPS]
        else:
            os.environ[CODEC_WARPS] = before


def current_codec_warps() -> int:
    """The CTA size KVCOMPRESS_CODEC_WARPS asks for as it is set now, 0 when unset."""
    return int(os.environ.get(CODEC_WARPS) or 0)


def tiled(pages: torch.Tensor, num_pages: int) -> torch.Tensor:
    """Repeats real pages up to num_pages so the batch fills the GPU."""
    reps = -(-num_pages // pages.shape[0])
    return pages.repeat(reps, 1)[:num_pages].contiguous()


def measure(source: str, pages: torch.Tensor, unique: int, config: CodecConfig, dtype: str,
            warps: int, warmup: int, iters: int) -> Row:
    num = pages.shape[0]
    ids = torch.arange(num, device="cuda")
    nbytes = pages.numel() * pages.element_size()
    compressed = compress_pages(pages, ids, config)
    out = compressed.buffer
    dst = torch.empty_like(pages)
    status = decompress_pages(compressed, dst, ids)
    assert bool((status == DecodeStatus.OK).all()), "a page failed to decode"

    # Ratio and error over the unique pages only (tiling repeats them).
    table = compressed.table[:unique]
    ratio = unique * pages.shape[1] * pages.element_size() / table[:, 1].sum().item()
    x, y = pages[:unique].double(), dst[:unique].double()
    bound = config.error_bound * (x.amax(1) - x.amin(1)) if config.relative else \
        torch.full((unique,), config.error_bound, device="cuda", dtype=torch.float64)
    err = (x - y).abs().amax(1)
    over = torch.where(bound > 0, err / bound, torch.where(err > 0, torch.inf, 0.0))

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    t_c = time_call(lambda: compress_pages(pages, ids, config, out=out), warmup, iters, flush)
    t_d = time_call(lambda: decompress_pages(compressed, dst, ids), warmup, iters, flush)
    copy_dst = torch.empty_like(pages)
    t_copy = time_call(lambda: copy_dst.copy_(pages), warmup, iters, flush)
    gbps = lambda ms: nbytes / ms / 1e6  # noqa: E731
    return Row(
        source=source, dtype=dtype, mode=config.mode.name.lower(), rows=config.rows,
        rel_eb=config.error_bound, codec_warps=warps, num_pages=num,
        page_bytes=pages.shape[1] * pages.element_size(),
        ratio=ratio, raw_fraction=(table[:, 2] != 0).float().mean().item(),
        max_err_over_bound=over.max().item(), bound_violations=int((err > bound).sum().item()),
        compress_gbps=gbps(t_c.gpu_ms), decompress_gbps=gbps(t_d.gpu_ms),
        copy_gbps=gbps(t_copy.gpu_ms), compress_pct_of_copy=100 * t_copy.gpu_ms / t_c.gpu_ms,
        decompress_pct_of_copy=100 * t_copy.gpu_ms / t_d.gpu_ms,
        compress_host_us=1e3 * t_c.host_ms, decompress_host_us=1e3 * t_d.host_ms,
        compress_idle_gbps=gbps(t_c.idle_gpu_ms), decompress_idle_gbps=gbps(t_d.idle_gpu_ms),
        copy_idle_gbps=gbps(t_copy.idle_gpu_ms))


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({r.source for r in rows})
    fig, axes = plt.subplots(2, len(sources), figsize=(5 * len(sources), 8), squeeze=False)
    for col, source in enumerate(sources):
        for mode in CodecMode:
            sel = sorted((r for r in rows if r.source == source and r.dtype == "bf16"
                          and r.mode == mode.name.lower() and r.rows == max(
                              x.rows for x in rows if x.source == source)),
                         key=lambda r: r.rel_eb)
            if not sel:
                continue
            ebs = [r.rel_eb for r in sel]
            axes[0][col].plot(ebs, [r.ratio for r in sel], marker="o", label=mode.name.lower())
            axes[1][col].plot(ebs, [r.compress_gbps for r in sel], marker="o",
                              label=f"{mode.name.lower()} compress")
            axes[1][col].plot(ebs, [r.decompress_gbps for r in sel], marker="s", linestyle="--",
                              label=f"{mode.name.lower()} decompress")
        copy = [r.copy_gbps for r in rows if r.source == source and r.dtype == "bf16"]
        if copy:
            axes[1][col].axhline(statistics.median(copy), color="k", linestyle=":",
                                 label="device copy")
        for ax, ylabel in ((axes[0][col], "compression ratio"),
                           (axes[1][col], "GB/s of bf16 KV")):
            ax.set_xscale("log")
            ax.set_xlabel("relative error bound")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][col].set_title(source)
    fig.suptitle(f"KV page codec on {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-pages", type=Path, help="output of extract_kv_pages.py")
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json/.png")
    parser.add_argument("--num-pages", type=int, default=8192)
    parser.add_argument("--synthetic-shapes", nargs="+", type=parse_shape, default=[(16, 8, 128)],
                        help="synthetic page shapes, block size x KV heads x head size "
                             "(16x8x128 is one layer's K or V block of Llama-3-8B)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=[m.name.lower() for m in CodecMode])
    parser.add_argument("--rel-ebs", nargs="+", type=float, default=[1e-1, 1e-2, 1e-3, 1e-4])
    parser.add_argument("--codec-warps", nargs="+", type=int, choices=[0, 2, 4, 8],
                        help="CTA sizes (warps) of the codec kernels to time each configuration "
                             "with, 0 for the automatic size; sets KVCOMPRESS_CODEC_WARPS per "
                             "run (default: as the environment sets it). The plot shows the "
                             "first")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    sources: list[tuple[str, torch.Tensor, int, list[int]]] = []
    for tokens, heads, head_size in args.synthetic_shapes:
        synthetic = synthetic_pages(args.num_pages, tokens, heads * head_size, seed=0)
        sources.append((f"synthetic {tokens}x{heads}x{head_size}", synthetic, args.num_pages,
                        [1, tokens]))
    if args.kv_pages:
        real = torch.load(args.kv_pages)
        for kind in ("key", "value"):
            pages = real[kind].cuda().float()
            name = f"{real['architecture']} {kind}"
            sources.append((name, tiled(pages, args.num_pages), pages.shape[0],
                            [1, real["block_size"]]))

    warps_list = args.codec_warps or [current_codec_warps()]
    plan = [(s, d, m, r, eb, w) for s in sources for d in args.dtypes for m in args.modes
            for r in s[3] for eb in args.rel_ebs for w in warps_list]
    results: list[Row] = []
    started = time.time()
    for (name, pages, unique, _), dtype, mode, rows, eb, warps in tqdm(plan, desc="codec configs"):
        config = CodecConfig(eb, True, CodecMode[mode.upper()], rows)
        with codec_warps(warps):
            results.append(measure(name, pages.to(DTYPES[dtype]), unique, config, dtype, warps,
                                   args.warmup, args.iters))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "seconds": time.time() - started, "num_pages": args.num_pages}
    Path(f"{args.out}.json").write_text(json.dumps(
        {"meta": meta, "rows": [asdict(r) for r in results]}, indent=1))
    plot([r for r in results if r.codec_warps == warps_list[0]], Path(f"{args.out}.png"))
    header = (f"{'source':<22}{'dt':<5}{'mode':<8}{'rows':>4}{'eb':>8}{'w':>2}{'ratio':>7}"
              f"{'raw%':>6}{'err/eb':>7}{'comp GB/s':>10}{'dec GB/s':>9}{'copy':>7}{'c%':>5}"
              f"{'d%':>5}{'host us c/d':>13}{'idle GB/s c/d':>14}")
    print(header)
    for r in results:
        print(f"{r.source[:21]:<22}{r.dtype:<5}{r.mode:<8}{r.rows:>4}{r.rel_eb:>8.0e}"
              f"{r.codec_warps:>2}{r.ratio:>7.2f}{100 * r.raw_fraction:>6.0f}"
              f"{r.max_err_over_bound:>7.3f}"
              f"{r.compress_gbps:>10.0f}{r.decompress_gbps:>9.0f}{r.copy_gbps:>7.0f}"
              f"{r.compress_pct_of_copy:>5.0f}{r.decompress_pct_of_copy:>5.0f}"
              f"{r.compress_host_us:>7.0f}/{r.decompress_host_us:<5.0f}"
              f"{r.compress_idle_gbps:>8.0f}/{r.decompress_idle_gbps:<5.0f}")
    violations = sum(r.bound_violations for r in results)
    print(f"bound violations: {violations}")
    if violations:
        raise SystemExit("error bound exceeded")


if __name__ == "__main__":
    main()
