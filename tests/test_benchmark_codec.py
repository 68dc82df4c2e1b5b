"""benchmarks/benchmark_codec.py's page shapes are parsed or refused with a clear
error, its CTA-size setting is set around each run and restored, and
benchmarks/compare_codec.py pairs two builds' runs by configuration (the timing
itself needs a GPU and runs on the GPU host)."""

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
benchmark_codec = pytest.importorskip("benchmark_codec")


@pytest.mark.parametrize("text, shape", [("16x8x128", (16, 8, 128)), ("32X1X64", (32, 1, 64))])
def test_shapes_parse(text: str, shape: tuple[int, int, int]) -> None:
    assert benchmark_codec.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["16x8", "16x0x128", "16x8x-1", "axbxc", "16x8x128x2", ""])
def test_malformed_shapes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="TOKENSxHEADSxHEAD_SIZE"):
        benchmark_codec.parse_shape(text)


def test_compare_pairs_configurations_and_takes_medians(tmp_path: Path) -> None:
    compare_codec = pytest.importorskip("compare_codec")

    def run(name: str, compress: float, decompress: float, copy: float = 1000.0) -> Path:
        rows = [{"source": "synthetic 16x8x128", "dtype": "bf16", "mode": "plain", "rows": 1,
                 "rel_eb": 1e-2, "compress_gbps": compress, "decompress_gbps": decompress,
                 "copy_gbps": copy},
                {"source": "only in base", "dtype": "bf16", "mode": "plain", "rows": 1,
                 "rel_eb": 1e-2, "compress_gbps": 1.0, "decompress_gbps": 1.0, "copy_gbps": 1.0}]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"rows": rows if name.startswith("base") else rows[:1]}))
        return path

    base_runs = [run("base_a", 900, 1400), run("base_b", 1000, 1500), run("base_c", 1100, 1300)]
    base = compare_codec.median_rates(base_runs)
    # How far apart one build's runs sit: the noise a ratio must clear.
    spreads = compare_codec.run_spreads(base_runs)
    assert spreads["compress_gbps"][0] == pytest.approx(1100 / 900 - 1)
    assert spreads["decompress_gbps"][0] == pytest.approx(1500 / 1300 - 1)
    assert spreads["copy_gbps"] == [0.0, 0.0]
    assert compare_codec.run_spreads([run("variant_alone", 1200, 1500)]) == {}
    variant = compare_codec.median_rates([run("variant_a", 1200, 1500, 800)])
    (row,) = compare_codec.compare(base, variant)
    assert row["base_compress_gbps"] == 1000 and row["base_decompress_gbps"] == 1400
    assert row["compress_ratio"] == pytest.approx(1.2)
    assert row["decompress_ratio"] == pytest.approx(1500 / 1400)
    assert row["copy_ratio"] == pytest.approx(0.8)
    assert "compress_ratio_net" not in row
    # The variant left decompression alone: its ratio is what moved both builds' runs.
    (net,) = compare_codec.compare(base, variant, unchanged="decompress")
    assert net["compress_ratio_net"] == pytest.approx(1.2 / (1500 / 1400))
    (net,) = compare_codec.compare(base, variant, unchanged="compress")
    assert net["decompress_ratio_net"] == pytest.approx((1500 / 1400) / 1.2)
    # A build that names its automatic CTA size (0) pairs with one that predates it.
    named = tmp_path / "variant_named.json"
    row = json.loads(run("variant_b", 1100, 1400).read_text())["rows"][0]
    named.write_text(json.dumps({"rows": [{**row, "codec_warps": 0}]}))
    (paired,) = compare_codec.compare(base, compare_codec.median_rates([named]))
    assert paired["compress_ratio"] == pytest.approx(1.1)
    with pytest.raises(SystemExit, match="share no configuration"):
        compare_codec.compare(base, {("other",): variant[next(iter(variant))]})


def test_codec_warps_is_set_for_a_run_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """--codec-warps sets KVCOMPRESS_CODEC_WARPS around each timed configuration and
    leaves the environment as it found it, set or not."""
    monkeypatch.delenv(benchmark_codec.CODEC_WARPS, raising=False)
    assert benchmark_codec.current_codec_warps() == 0
    with benchmark_codec.codec_warps(4):
        assert os.environ[benchmark_codec.CODEC_WARPS] == "4"
        assert benchmark_codec.current_codec_warps() == 4
    assert benchmark_codec.CODEC_WARPS not in os.environ
    monkeypatch.setenv(benchmark_codec.CODEC_WARPS, "8")
    with benchmark_codec.codec_warps(0):
        assert benchmark_codec.current_codec_warps() == 0
    assert os.environ[benchmark_codec.CODEC_WARPS] == "8"


def test_size_plot_takes_medians_of_synthetic_pages_per_cta_size() -> None:
    plot_codec_sizes = pytest.importorskip("plot_codec_sizes")

    def row(source: str, warps: int, page_bytes: int, gbps: float) -> dict:
        return {"source": source, "dtype": "bf16", "codec_warps": warps,
                "page_bytes": page_bytes, "compress_gbps": gbps, "decompress_gbps": 2 * gbps}

    rows = [row("synthetic 16x8x128", 4, 32768, g) for g in (1200, 1300, 1400)]
    rows += [row("synthetic 16x8x128", 0, 32768, 1350), row("synthetic 16x2x64", 2, 4096, 600),
             row("BertModel key", 2, 12288, 900)]
    curves = plot_codec_sizes.medians(rows, "compress")
    assert curves[("bf16", 4)] == {32: 1300}
    assert curves[("bf16", 0)] == {32: 1350}
    # Real pages are left out: a page size would then mix shapes.
    assert curves[("bf16", 2)] == {4: 600}
    assert plot_codec_sizes.medians(rows, "decompress")[("bf16", 4)] == {32: 2600}
