"""Compares two builds of the codec timed alternately on one GPU.

``run_gpu_host.sh compare`` times the working tree ("base") and a patched copy of it
("variant") in ABBA order, so that a GPU whose clocks drift during the call (it
warms up, another tenant comes and goes) weighs on both builds alike. This script
pairs the rows of those runs by configuration and reports variant / base for
compression, decompression and the device copy timed beside them (the copy's ratio
shows how much the GPU itself moved between runs).

Runs of one build are also compared with each other: how far apart they sit, per
configuration, is the noise a ratio must clear. Since the benchmark times the GPU's
work alone (2026-11-24, fifth session) they agree within about 1%; timed with the
host's part of each call, they had drifted 5-10% and more. When the patch leaves one
kernel's code alone, ``--unchanged decompress`` (or ``compress``) divides the other
kernel's ratio by that kernel's, configuration by configuration, which takes out
whatever moved both.

Example::

    python benchmarks/compare_codec.py --base out/base_1.json out/base_2.json \
        --variant out/variant_1.json out/variant_2.json --out out/compare.json
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

KEY_FIELDS = ("source", "dtype", "mode", "rows", "rel_eb", "codec_warps")
RATE_FIELDS = ("compress_gbps", "decompress_gbps", "copy_gbps")
# A build older than KVCOMPRESS_CODEC_WARPS writes no codec_warps: it ran the
# automatic CTA size (0).
KEY_DEFAULTS = {"codec_warps": 0}


def config_key(row: dict) -> tuple:
    return tuple(row.get(f, KEY_DEFAULTS.get(f)) for f in KEY_FIELDS)


def rate_samples(paths: list[Path]) -> dict[tuple, dict[str, list[float]]]:
    """Per configuration, each rate as the runs in ``paths`` measured it."""
    samples: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            for field in RATE_FIELDS:
                samples[config_key(row)][field].append(row[field])
    return samples


def median_rates(paths: list[Path]) -> dict[tuple, dict[str, float]]:
    """Per configuration, the median of each rate over the runs in ``paths``."""
    return {key: {f: statistics.median(v) for f, v in rates.items()}
            for key, rates in rate_samples(paths).items()}


def run_spreads(paths: list[Path]) -> dict[str, list[float]]:
    """Per rate, how far apart the runs in ``paths`` sit (largest over smallest, less
    one) for each configuration that more than one of them timed."""
    spreads: dict[str, list[float]] = defaultdict(list)
    for rates in rate_samples(paths).values():
        for field, values in rates.items():
            if len(values) > 1:
                spreads[field].append(max(values) / min(values) - 1)
    return dict(spreads)


KERNELS = ("compress", "decompress")


def compare(base: dict[tuple, dict[str, float]], variant: dict[tuple, dict[str, float]],
            unchanged: str | None = None) -> list[dict]:
    """One row per configuration timed in both builds, in the base runs' order; with
    ``unchanged`` (a kernel the variant did not change), also the other kernel's ratio
    over that one's, as ``<kernel>_ratio_net``."""
    rows = []
    for key, b in base.items():
        v = variant.get(key)
        if v is None:
            continue
        row = dict(zip(KEY_FIELDS, key))
        for field in RATE_FIELDS:
            row[f"base_{field}"] = b[field]
            row[f"variant_{field}"] = v[field]
            row[f"{field.removesuffix('_gbps')}_ratio"] = v[field] / b[field]
        if unchanged is not None:
            changed = next(k for k in KERNELS if k != unchanged)
            row[f"{changed}_ratio_net"] = row[f"{changed}_ratio"] / row[f"{unchanged}_ratio"]
        rows.append(row)
    if not rows:
        raise SystemExit("the base and variant runs share no configuration")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", nargs="+", type=Path, required=True)
    parser.add_argument("--variant", nargs="+", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    parser.add_argument("--unchanged", choices=KERNELS,
                        help="a kernel the variant leaves as it is: the other kernel's "
                        "ratio is also reported over this one's")
    args = parser.parse_args()

    rows = compare(median_rates(args.base), median_rates(args.variant), args.unchanged)
    spreads = {"base": run_spreads(args.base), "variant": run_spreads(args.variant)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base": [str(p) for p in args.base],
                                    "variant": [str(p) for p in args.variant],
                                    "run_spreads": spreads, "rows": rows}, indent=1))
    print(f"{'source':<22}{'mode':<8}{'rows':>4}{'eb':>8}{'warps':>6}"
          f"{'compress GB/s':>17}{'decompress GB/s':>17}{'x comp':>8}{'x dec':>7}{'x copy':>8}")
    for r in rows:
        print(f"{r['source'][:21]:<22}{r['mode']:<8}{r['rows']:>4}{r['rel_eb']:>8.0e}"
              f"{r['codec_warps'] or 'auto':>6}"
              f"{r['base_compress_gbps']:>8.0f} ->{r['variant_compress_gbps']:>5.0f}"
              f"{r['base_decompress_gbps']:>9.0f} ->{r['variant_decompress_gbps']:>5.0f}"
              f"{r['compress_ratio']:>8.3f}{r['decompress_ratio']:>7.3f}{r['copy_ratio']:>8.3f}")
    fields = ["compress_ratio", "decompress_ratio", "copy_ratio"]
    fields += [f for f in ("compress_ratio_net", "decompress_ratio_net") if f in rows[0]]
    for field in fields:
        values = [r[field] for r in rows]
        print(f"{field}: median {statistics.median(values):.3f}, "
              f"range {min(values):.3f}-{max(values):.3f}")
    for build, by_field in spreads.items():
        for field, values in by_field.items():
            print(f"{build} runs apart, {field.removesuffix('_gbps')}: median "
                  f"{100 * statistics.median(values):.1f}%, max {100 * max(values):.1f}%")


if __name__ == "__main__":
    main()
