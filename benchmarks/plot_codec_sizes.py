"""Codec throughput by page size and CTA size, from a benchmark_codec.py run made with
``--codec-warps 0 2 4 8`` (``run_gpu_host.sh sizes``).

One panel per kernel and dtype: GB/s against page size for each forced CTA size and
for the automatic one, the median over modes and layouts at each size, with issue
#2's targets as dashed lines. Synthetic pages only, so that every size is one shape.

    python benchmarks/plot_codec_sizes.py results/codec_sizes.json --out results/sizes.png
"""

import argparse
import gzip
import json
import statistics
from collections import defaultdict
from pathlib import Path

TARGET_GBPS = {"compress": 1000.0, "decompress": 1500.0}
WARPS_LABEL = {0: "automatic", 2: "2 warps", 4: "4 warps", 8: "8 warps"}


def medians(rows: list[dict], kernel: str) -> dict[tuple[str, int], dict[int, float]]:
    """{(dtype, warps): {page KiB: median GB/s over modes and layouts}}."""
    samples: dict[tuple[str, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["source"].startswith("synthetic"):
            kib = row["page_bytes"] // 1024
            samples[(row["dtype"], row["codec_warps"])][kib].append(row[f"{kernel}_gbps"])
    return {key: {kib: statistics.median(v) for kib, v in by_size.items()}
            for key, by_size in samples.items()}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(2, len(dtypes), figsize=(5.5 * len(dtypes), 7.5), squeeze=False)
    for row_index, kernel in enumerate(("compress", "decompress")):
        curves = medians(rows, kernel)
        for col, dtype in enumerate(dtypes):
            ax = axes[row_index][col]
            for warps in sorted({w for d, w in curves if d == dtype}, key=lambda w: (w == 0, w)):
                by_size = curves[(dtype, warps)]
                sizes = sorted(by_size)
                style = {"color": "k", "linestyle": "none", "marker": "x", "markersize": 9} \
                    if warps == 0 else {"marker": "o"}
                ax.plot(sizes, [by_size[s] for s in sizes], label=WARPS_LABEL[warps], **style)
            ax.axhline(TARGET_GBPS[kernel], color="gray", linestyle="--", label="issue #2 target")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({s for (d, _), v in curves.items() if d == dtype for s in v}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("page size (KiB)")
            ax.set_ylabel(f"{kernel}, GB/s of {dtype} KV")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="benchmark_codec.py JSON (.json or .json.gz)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    run = json.loads(gzip.decompress(args.run.read_bytes()) if args.run.suffix == ".gz"
                     else args.run.read_text())
    title = f"Codec by page size and CTA size ({run['meta']['device']}, rel eb 1e-2)"
    plot(run["rows"], args.out, title)


if __name__ == "__main__":
    main()
