"""benchmarks/benchmark_codec.py's page shapes: the synthetic pages it times have the
shape asked for, and a malformed shape is refused when the arguments are parsed (the
timing itself needs a GPU and runs on the GPU host)."""

import argparse
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
