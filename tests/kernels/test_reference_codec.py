"""Tests of the NumPy reference codec against docs/format.md.

The golden tests derive bytes by hand from the specification, so they anchor the
reference independently of its own decoder; the property tests then check bounds,
statuses and robustness over random and adversarial pages.
"""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kernels import reference_codec as rc

DTYPE_NAMES = list(rc.DTYPES)
MODE_NAMES = list(rc.MODES)
STORAGE = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}
ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def as_page(values, dtype: str) -> np.ndarray:
    """Values (any float array) rounded to a page of dtype in storage representation."""
    return rc.f32_to_dtype(np.asarray(values, dtype=np.float32), dtype)


def as_f64(page: np.ndarray, dtype: str) -> np.ndarray:
    """A page's values in binary64, exactly."""
    with np.errstate(invalid="ignore"):  # NaN payloads are kept
        return rc.page_to_f32(page, dtype).astype(np.float64)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (NaN payloads and signed zeros included)."""
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def words(data: bytes) -> list[int]:
    """Little-endian u32 words of data (a trailing partial word is dropped)."""
    return list(struct.unpack(f"<{len(data) // 4}I", data[:len(data) // 4 * 4]))


def payload_of(record: bytes) -> bytes:
    """The payload bytes of a record."""
    return record[32:32 + rc.parse_header(record)["payload_len"]]


def fmix32(h: int) -> int:
    """Scalar fmix32, written independently of the reference's vectorised one."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def scalar_checksum(record: bytes) -> int:
    """Checksum of a record by a plain loop over its words (section "Checksum")."""
    payload_len = struct.unpack_from("<I", record, 24)[0]
    ws = words(record[:28]) + words(record[32:32 + payload_len])
    total = 0
    for i, w in enumerate(ws):
        total = (total + fmix32((w + (i + 1) * 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF
    return fmix32(total ^ payload_len)


def forge(dtype: int, mode: int, flags: int, n: int, rows: int, eb: float, step: float,
          payload: bytes, reserved: int = 0, payload_len: int | None = None) -> bytes:
    """A record with arbitrary fields and a correct checksum, padded to 16 bytes."""
    plen = len(payload) if payload_len is None else payload_len
    header28 = struct.pack("<IBBBBIHHffI", rc.MAGIC, 1, dtype, mode, flags, n, rows, reserved,
                           eb, step, plen)
    record = header28 + bytes(4) + payload
    record = record[:28] + struct.pack("<I", scalar_checksum(record)) + record[32:]
    return record + bytes(-len(record) % 16)


def scalar_payload(q: list[int], mode: str) -> bytes:
    """Payload of a compressed page from q in stream order, one value at a time."""
    widths, outliers, planes = bytearray(), bytearray(), []
    for j in range(0, len(q), 32):
        block = q[j:j + 32]
        d = [0] * 32
        for i, qi in enumerate(block):
            if mode == "fixed" or (i == 0 and mode == "plain"):
                d[i] = qi
            elif i > 0:
                d[i] = qi - block[i - 1]
        f = max(abs(v) for v in d).bit_length()
        k = 0
        if mode == "outlier":
            z = ((block[0] << 1) ^ (block[0] >> 31)) & 0xFFFFFFFF
            k = (z.bit_length() + 7) // 8
            outliers += z.to_bytes(4, "little")[:k]
        widths.append(f | (k << 5))
        if f:
            planes.append(sum(1 << i for i in range(32) if d[i] < 0))
            planes += [sum(((abs(d[i]) >> b) & 1) << i for i in range(32)) for b in range(f)]
    return pad4(widths) + pad4(outliers) + struct.pack(f"<{len(planes)}I", *planes)


def pad4(data: bytes) -> bytes:
    """data zero-padded to a multiple of 4 bytes."""
    return bytes(data) + bytes(-len(data) % 4)


def scalar_encode(page: np.ndarray, dtype: str, mode: str, eb: float, relative: bool,
                  rows: int) -> bytes:
    """A second encoder, a loop per value straight from the specification's text.

    It shares only the storage conversions and rd32 with the reference (tested above),
    so byte equality checks the reference's vectorised layout and quantisation.
    """
    n, size = page.size, ITEMSIZE[dtype]
    xs = [np.float32(v) for v in rc.page_to_f32(page, dtype)]
    reason, eb32, step, q = 0, np.float32(0), np.float32(0), []
    if not all(np.isfinite(v) for v in xs):
        reason = 1
    else:
        mx, mn = max(xs), min(xs)
        amax = max(abs(float(mx)), abs(float(mn)))
        eb32 = rc.rd32(eb * (float(mx) - float(mn)) if relative else eb)
        u, v = {"fp16": (2.0**-11, 2.0**-25), "bf16": (2.0**-8, 0.0),
                "fp32": (2.0**-21, 0.0)}[dtype]
        t = (float(eb32) - u * (amax + float(eb32))) - v
        with np.errstate(all="ignore"):
            if t > 0:
                step = np.float32(2) * rc.rd32(t)
            elif mx == mn:
                step = abs(mx) if mx != 0 else np.float32(1)
            else:
                reason = 2
            inv = np.float32(1) / step
            for s in range(n):
                x = xs[(s % rows) * (n // rows) + s // rows]
                p = x * inv
                if reason or not abs(p) <= 2**22:  # NaN p: see the reference's _quantise
                    reason = 2
                    break
                q.append(int(np.rint(p)))
                y = rc.page_to_f32(rc.f32_to_dtype(np.float32(q[-1]) * step, dtype), dtype)
                if not abs(float(x) - float(y)) <= float(eb32):
                    reason = 2
    payload = b"" if reason else scalar_payload(q, mode)
    if not reason and len(payload) >= -(-n * size // 4) * 4:
        reason = 3
    if reason:
        payload = pad4(page.astype(page.dtype.newbyteorder("<")).tobytes())
        eb32, step, rows = np.float32(0), np.float32(0), 1
    flags = (8 if relative else 0) | (1 | reason << 1 if reason else 0)
    record = struct.pack("<IBBBBIHHffII", rc.MAGIC, 1, rc.DTYPES[dtype], rc.MODES[mode], flags,
                         n, rows, 0, eb32, step, len(payload), 0) + payload
    record = record[:28] + struct.pack("<I", scalar_checksum(record)) + record[32:]
    return record + bytes(-len(record) % 16)


def check_roundtrip(page: np.ndarray, dtype: str, mode: str, eb: float, relative: bool,
                    rows: int) -> tuple[int, dict]:
    """Encode, decode and check every promise of the format; returns (status, header)."""
    record, status = rc.encode_page(page, dtype, mode, eb, relative, rows)
    assert rc.encode_page(page, dtype, mode, eb, relative, rows) == (record, status)
    n = page.size
    h = rc.parse_header(record)
    assert len(record) % 16 == 0 and len(record) - (32 + h["payload_len"]) < 16
    assert record[32 + h["payload_len"]:] == bytes(len(record) - 32 - h["payload_len"])
    assert (h["magic"], h["version"], h["dtype"], h["mode"]) == (rc.MAGIC, 1, rc.DTYPES[dtype],
                                                                 rc.MODES[mode])
    assert (h["n"], h["reserved"], h["flags"] & 0xF0, h["payload_len"] % 4) == (n, 0, 0, 0)
    assert h["relative"] == relative and h["raw"] == (status != 0)
    assert h["raw_reason"] == status and h["checksum"] == scalar_checksum(record)
    dec_status, out = rc.decode_record(record, 0, len(record), dtype, n)
    assert dec_status == rc.OK and out.dtype == page.dtype and out.shape == page.shape
    x, y = as_f64(page, dtype), as_f64(out, dtype)
    if status:
        assert (h["rows"], h["eb"], h["step"]) == (1, 0.0, 0.0)
        assert same_bits(out, page)
        assert h["payload_len"] == -(-n * ITEMSIZE[dtype] // 4) * 4
        return status, h
    requested = eb * (x.max() - x.min()) if relative else eb
    assert h["rows"] == rows and h["step"] > 0 and np.isfinite(h["step"])
    assert h["eb"] <= requested
    assert np.all(np.abs(x - y) <= requested)
    assert np.all(np.abs(x - y) <= h["eb"])
    assert h["payload_len"] < -(-n * ITEMSIZE[dtype] // 4) * 4
    return status, h


# ---------------------------------------------------------------------------
# Arithmetic building blocks
# ---------------------------------------------------------------------------


def test_bf16_rounding_is_nearest_even():
    """Midpoints between neighbouring bf16 values round to the even one."""
    lo = np.arange(0x0000, 0x7F7F, 97, dtype=np.uint32)  # finite positive bf16 patterns
    mid = ((lo << 16) | 0x8000).view(np.float32)
    expect = np.where(lo % 2 == 0, lo, lo + 1).astype(np.uint16)
    assert np.array_equal(rc.bf16_bits_from_f32(mid), expect)
    assert np.array_equal(rc.bf16_bits_from_f32(-mid), expect | 0x8000)
    above = ((lo << 16) | 0x8001).view(np.float32)
    assert np.array_equal(rc.bf16_bits_from_f32(above), (lo + 1).astype(np.uint16))
    below = ((lo << 16) | 0x7FFF).view(np.float32)
    assert np.array_equal(rc.bf16_bits_from_f32(below), lo.astype(np.uint16))
    assert rc.bf16_bits_from_f32(np.float32(3.4028235e38)) == 0x7F80  # rounds up to inf


def test_bf16_widening_is_exact_inverse():
    bits = np.arange(0, 0x10000, dtype=np.uint32).astype(np.uint16)
    finite = bits[(bits & 0x7F80) != 0x7F80]
    assert np.array_equal(rc.bf16_bits_from_f32(rc.f32_from_bf16_bits(finite)), finite)


def test_fp16_rounding_is_nearest_even():
    """NumPy's float32 -> float16 cast, used for fp16 pages, ties to even."""
    lo = np.arange(0x0000, 0x7BFF, dtype=np.uint16)  # finite positive fp16, each with a successor
    a = lo.view(np.float16).astype(np.float64)
    b = (lo + 1).view(np.float16).astype(np.float64)
    mid = ((a + b) / 2).astype(np.float32)  # exact: fp16 midpoints fit in binary32
    assert np.array_equal(mid.astype(np.float64), (a + b) / 2)
    expect = np.where(lo % 2 == 0, lo, lo + 1).astype(np.uint16)
    assert np.array_equal(rc.f32_to_dtype(mid, "fp16").view(np.uint16), expect)
    assert np.isinf(rc.f32_to_dtype(np.float32(65520.0), "fp16"))


@pytest.mark.parametrize("v", [0.1, 1 / 3, 2.0**-149 * 0.75, 1e-45, 5e-324, 0.5, 1e39, 3.4e38])
def test_rd32_rounds_down(v):
    r = rc.rd32(v)
    assert r.dtype == np.float32 and float(r) <= v
    with np.errstate(over="ignore"):
        assert float(np.nextafter(r, np.float32(np.inf))) > v


def test_stream_index_matches_formula():
    assert rc.stream_index(8, 4).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    n, rows = 96, 6
    assert rc.stream_index(n, rows).tolist() == [(s % rows) * (n // rows) + s // rows
                                                 for s in range(n)]
    assert rc.stream_index(5, 1).tolist() == list(range(5))


@given(st.binary(min_size=28, max_size=28), st.binary(max_size=200))
@settings(max_examples=50, deadline=None)
def test_checksum_matches_plain_loop(header28, payload):
    payload = payload[:len(payload) // 4 * 4]
    record = header28[:24] + struct.pack("<I", len(payload)) + bytes(4) + payload
    assert rc.checksum(record[:28], payload) == scalar_checksum(record)


# ---------------------------------------------------------------------------
# Golden records derived by hand from the specification
# ---------------------------------------------------------------------------


def test_golden_zero_bf16_page_plain():
    """64 zeros: widths section 2 bytes padded to 4, no outliers, no planes."""
    page = np.zeros(64, dtype=np.uint16)
    record, status = rc.encode_page(page, "bf16", "plain", 0.5, False, 1)
    assert status == 0 and len(record) == 48
    h = rc.parse_header(record)
    assert record[:4] == b"KVZ1"
    assert (h["version"], h["dtype"], h["mode"], h["flags"], h["n"], h["rows"]) == (1, 2, 1, 0,
                                                                                   64, 1)
    assert (h["reserved"], h["payload_len"]) == (0, 4)
    # t = 0.5 - 2^-8 * 0.5 = 0.498046875, exact in binary32; step = 2t.
    assert (h["eb"], h["step"]) == (0.5, 0.99609375)
    assert record[32:] == bytes(16)
    assert h["checksum"] == scalar_checksum(record)


def test_golden_fp16_step():
    """fp16: t = 0.5 - 2^-12 - 2^-25 is a binary32 (ulp 2^-25 below 0.5), so step = 2t."""
    record, status = rc.encode_page(np.zeros(32, np.float16), "fp16", "fixed", 0.5, False, 1)
    assert status == 0
    assert rc.parse_header(record)["step"] == 1 - 2.0**-11 - 2.0**-24


def test_golden_constant_zero_page_exact_bound():
    """eb = 0 on a zero page: t = 0 is not > 0, so the constant rule gives step 1."""
    record, status = rc.encode_page(np.zeros(32, np.float32), "fp32", "fixed", 0.0, False, 1)
    h = rc.parse_header(record)
    assert status == 0 and (h["eb"], h["step"], h["payload_len"]) == (0.0, 1.0, 4)


def test_golden_constant_page_uses_its_value_as_step():
    page = np.full(32, 3.0, dtype=np.float32)
    record, status = rc.encode_page(page, "fp32", "outlier", 0.0, True, 1)
    h = rc.parse_header(record)
    assert status == 0 and (h["eb"], h["step"], h["flags"]) == (0.0, 3.0, 0x08)
    # q = 1 everywhere: o = 1, zigzag 2, one byte; all d = 0.
    assert payload_of(record) == bytes([0x20, 0, 0, 0, 2, 0, 0, 0])


RAMP = np.arange(32, dtype=np.float32)


@pytest.mark.parametrize("mode, values, expected", [
    # x = 0..31 with step just under 1: q = 0..31.
    ("fixed", RAMP, [0x05, 0, 0xAAAAAAAA, 0xCCCCCCCC, 0xF0F0F0F0, 0xFF00FF00, 0xFFFF0000]),
    ("plain", RAMP, [0x01, 0, 0xFFFFFFFE]),
    ("outlier", RAMP, [0x01, 0, 0xFFFFFFFE]),
    # q = 100..131: plain d_0 = 100 = 0b1100100, then 1s; outlier o = 100, zigzag 200.
    ("plain", RAMP + 100, [0x07, 0, 0xFFFFFFFE, 0, 1, 0, 0, 1, 1]),
    ("outlier", RAMP + 100, [0x21, 0xC8, 0, 0xFFFFFFFE]),
    # q = -100..-131: o = -100, zigzag 199; every d = -1.
    ("outlier", -RAMP - 100, [0x21, 0xC7, 0xFFFFFFFE, 0xFFFFFFFE]),
])
def test_golden_payload_of_ramps(mode, values, expected):
    """Payload words of one full fp32 block (widths word, outlier word if any, planes)."""
    record, status = rc.encode_page(values, "fp32", mode, 0.5, False, 1)
    assert status == 0
    assert words(payload_of(record)) == expected


def test_golden_stream_order_transposes_rows():
    """rows = 2: the stream alternates the two rows (0 then 1), giving d = 0,1,0,1,..."""
    page = np.repeat(np.array([0.0, 1.0], np.float32), 32)
    record, status = rc.encode_page(page, "fp32", "fixed", 0.5, False, 2)
    assert status == 0 and rc.parse_header(record)["rows"] == 2
    assert words(payload_of(record)) == [0x0101, 0, 0xAAAAAAAA, 0, 0xAAAAAAAA]
    record, _ = rc.encode_page(page, "fp32", "fixed", 0.5, False, 1)
    assert words(payload_of(record)) == [0x0100, 0, 0xFFFFFFFF]


def test_golden_padding_positions_are_zero():
    """n = 33 of ones in plain mode: block 1 holds q_32 = 1 and 31 padding zeros."""
    record, status = rc.encode_page(np.ones(33, np.float32), "fp32", "plain", 0.5, False, 1)
    assert status == 0
    # Block 0: d = 1,0,...,0 -> F = 1; block 1: d_0 = 1 -> F = 1, padding d = 0 (not -1).
    assert words(payload_of(record)) == [0x0101, 0, 1, 0, 1]


def test_golden_raw_non_finite_fp16():
    page = np.array([1.0, np.nan, 2.0], dtype=np.float16)
    record, status = rc.encode_page(page, "fp16", "plain", 0.1, True, 3)
    h = rc.parse_header(record)
    assert status == 1 and len(record) == 48
    assert (h["flags"], h["rows"], h["eb"], h["step"], h["payload_len"]) == (0x0B, 1, 0.0, 0.0, 8)
    assert payload_of(record) == page.tobytes() + bytes(2)


def test_golden_raw_no_gain_single_value():
    """n = 1 fp32: the widths section alone is 4 bytes = round4(4), so RAW reason 3."""
    record, status = rc.encode_page(np.array([1.0], np.float32), "fp32", "fixed", 0.1, False, 1)
    h = rc.parse_header(record)
    assert status == 3 and (h["flags"], h["payload_len"], len(record)) == (0x07, 4, 48)


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("relative, eb", [(False, 0.05), (True, 1e-2)])
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_roundtrip_matrix(dtype, mode, relative, eb, rows):
    rng = np.random.default_rng([DTYPE_NAMES.index(dtype), MODE_NAMES.index(mode), relative, rows])
    # KV-like page: 16 tokens x 64 channels with per-channel scales.
    values = rng.standard_normal((16, 64)) * rng.uniform(0.2, 3.0, 64)
    page = as_page(values.reshape(-1), dtype)
    status, _ = check_roundtrip(page, dtype, mode, eb, relative, rows)
    assert status == 0


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_roundtrip_raw_is_exact(dtype):
    page = as_page(np.linspace(-5, 5, 37), dtype)
    status, _ = check_roundtrip(page, dtype, "plain", 0.0, False, 1)
    assert status == 2


@st.composite
def random_pages(draw, max_n: int = 600):
    """(dtype, page, rows) over sizes, magnitudes, subnormals and mixtures."""
    dtype = draw(st.sampled_from(DTYPE_NAMES))
    n = draw(st.integers(1, max_n))
    rows = draw(st.sampled_from([r for r in (1, 2, 3, 4, 8, 16, 32) if n % r == 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "uniform", "integers", "subnormal", "mixed"]))
    low_exp = {"fp16": -7, "bf16": -36, "fp32": -40}[dtype]
    high_exp = {"fp16": 4, "bf16": 36, "fp32": 36}[dtype]
    scale = 10.0 ** draw(st.integers(low_exp, high_exp))
    if kind == "normal":
        values = rng.standard_normal(n) * scale
    elif kind == "uniform":
        values = rng.uniform(-1, 1, n) * scale + rng.uniform(-1, 1) * scale
    elif kind == "integers":
        values = rng.integers(-50, 50, n).astype(np.float64)
    elif kind == "subnormal":
        tiny = {"fp16": 2.0**-24, "bf16": 2.0**-133, "fp32": 2.0**-149}[dtype]
        values = rng.integers(-127, 128, n) * tiny
    else:
        values = rng.standard_normal(n) * 10.0 ** rng.integers(low_exp, high_exp, n)
    return dtype, as_page(values, dtype), rows


@given(random_pages(), st.sampled_from(MODE_NAMES), st.booleans(),
       st.floats(-7, 0), st.floats(0, 1))
@PROPERTY
def test_roundtrip_random(case, mode, relative, log_eb, eb_fraction):
    dtype, page, rows = case
    x = as_f64(page, dtype)
    if relative:
        eb = 10.0**log_eb
    else:
        magnitude = float(np.max(np.abs(x))) if np.all(np.isfinite(x)) else 1.0
        eb = eb_fraction * 10.0**log_eb * magnitude
    check_roundtrip(page, dtype, mode, eb, relative, rows)


@given(random_pages(max_n=200), st.sampled_from(MODE_NAMES), st.booleans(), st.floats(-7, 0),
       st.floats(0, 1))
@PROPERTY
def test_reference_matches_scalar_encoder(case, mode, relative, log_eb, eb_fraction):
    dtype, page, rows = case
    x = as_f64(page, dtype)
    magnitude = float(np.max(np.abs(x))) if np.all(np.isfinite(x)) else 1.0
    eb = 10.0**log_eb * (1.0 if relative else eb_fraction * magnitude)
    record, _ = rc.encode_page(page, dtype, mode, eb, relative, rows)
    assert record == scalar_encode(page, dtype, mode, eb, relative, rows)


@given(st.sampled_from(DTYPE_NAMES), st.sampled_from(MODE_NAMES), st.integers(1, 300),
       st.floats(0, 1e3, allow_subnormal=True))
@settings(max_examples=40, deadline=None)
def test_roundtrip_arbitrary_absolute_bound(dtype, mode, n, eb):
    rng = np.random.default_rng(n)
    page = as_page(rng.standard_normal(n) * 100, dtype)
    check_roundtrip(page, dtype, mode, eb, False, 1)


# ---------------------------------------------------------------------------
# Adversarial pages
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("value", [0.0, -0.0, 3.0, -1e-3, 1000.0])
def test_constant_pages(dtype, mode, value):
    """Constant pages compress; with eb = 0 (absolute, or any relative) they are exact."""
    page = as_page(np.full(64, value), dtype)
    for relative, eb in [(False, 0.0), (True, 0.01), (False, 1e-3)]:
        assert check_roundtrip(page, dtype, mode, eb, relative, 4)[0] == 0


def test_constant_subnormal_page_with_zero_bound():
    """step = |mx| is subnormal, 1/step overflows to inf, |p| = inf > 2^22: RAW 2."""
    page = np.full(8, 1e-40, dtype=np.float32)
    assert check_roundtrip(page, "fp32", "plain", 0.0, False, 1)[0] == 2


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype, big", [("fp16", 60000.0), ("bf16", 1e38), ("fp32", 1e30)])
def test_alternating_large_values(dtype, mode, big):
    page = as_page(np.tile([big, -big], 64), dtype)
    status, _ = check_roundtrip(page, dtype, mode, 1e-2, True, 1)
    assert status == 0


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_single_spike(dtype, mode):
    values = np.zeros(256)
    values[77] = 1e4
    status, _ = check_roundtrip(as_page(values, dtype), dtype, mode, 1e-2, True, 4)
    assert status == 0


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype, top", [("fp16", 65504.0), ("bf16", 3.3895e38),
                                        ("fp32", 3.4028235e38)])
def test_values_near_dtype_max(dtype, mode, top):
    rng = np.random.default_rng(7)
    values = np.clip(rng.uniform(-1, 1, 128) * top, -top, top)
    values[:2] = [top, -top]
    for relative, eb in [(True, 1e-2), (True, 1e-6), (False, top / 100)]:
        check_roundtrip(as_page(values, dtype), dtype, mode, eb, relative, 1)


@pytest.mark.parametrize("dtype, bad", [
    ("fp16", [0x7E00, 0xFC00, 0x7C01, 0xFE55]),  # qNaN, -inf, sNaN, negative NaN payload
    ("bf16", [0x7FC0, 0x7F80, 0xFF81, 0xFFFF]),
    ("fp32", [0x7FC00000, 0xFF800000, 0x7F800001, 0xFFFFFFFF]),
])
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_non_finite_pages_are_raw_exact(dtype, bad, mode):
    page = as_page(np.linspace(-1, 1, 45), dtype)
    bits = page.view(np.uint32 if dtype == "fp32" else np.uint16)
    bits[[3, 10, 20, 44]] = bad
    for relative in (False, True):
        assert check_roundtrip(page, dtype, mode, 0.1, relative, 1)[0] == 1


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_huge_range_small_rel_is_raw_bound(dtype):
    """t = eb - u * (amax + eb) <= 0: the dtype cannot hold values that finely."""
    big = {"fp16": 6e4, "bf16": 1e30, "fp32": 1e30}[dtype]
    page = as_page(np.tile([big, -big, 1e-3, 0.0], 16), dtype)
    assert check_roundtrip(page, dtype, "plain", 1e-9, True, 1)[0] == 2


def test_quantised_range_over_2_22_is_raw_bound():
    """t > 0 but step < amax * 2^-22, so some |p| exceeds 2^22."""
    page = np.linspace(-1, 1, 64, dtype=np.float32)
    assert check_roundtrip(page, "fp32", "fixed", 1.1 * 2.0**-21, False, 1)[0] == 2


def test_step_overflow_is_raw_bound():
    """2 * rd32(t) overflows to inf: inv = 0, q = 0, y = 0 * inf = NaN fails verification."""
    page = np.linspace(-1, 1, 64, dtype=np.float32)
    assert check_roundtrip(page, "fp32", "plain", 3e38, False, 1)[0] == 2


def test_step_underflow_is_raw_bound():
    """eb = 2^-149: t > 0 but rd32(t) = 0, so step = 0 and p = 0 * inf = NaN (spec open)."""
    page = np.zeros(64, dtype=np.float32)
    assert check_roundtrip(page, "fp32", "plain", 2.0**-149, False, 1)[0] == 2


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_white_noise_at_tiny_bound_is_raw_no_gain(dtype, mode):
    """eb just above the headroom u * amax leaves a tiny step: ~20-bit residuals."""
    rng = np.random.default_rng(11)
    page = as_page(rng.uniform(-1, 1, 1024), dtype)
    u = {"fp16": 2.0**-11, "bf16": 2.0**-8}[dtype]
    eb = u * float(np.max(np.abs(as_f64(page, dtype)))) * (1 + 1e-2)
    assert check_roundtrip(page, dtype, mode, eb, False, 1)[0] == 3


@pytest.mark.parametrize("n", [1, 2, 3, 5, 31, 33])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_tiny_pages(dtype, n):
    page = as_page(np.arange(n) * 0.37 - 1, dtype)
    for mode in MODE_NAMES:
        check_roundtrip(page, dtype, mode, 0.1, False, 1)


# ---------------------------------------------------------------------------
# Damage detection
# ---------------------------------------------------------------------------


def _flip(record: bytes, bit: int) -> bytes:
    data = bytearray(record)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def _small_records() -> list[tuple[bytes, str, int]]:
    """(record, dtype, n) of a compressed outlier page and a raw page."""
    rng = np.random.default_rng(3)
    page = as_page(rng.standard_normal(40) * 10, "fp32")
    compressed, status = rc.encode_page(page, "fp32", "outlier", 0.01, False, 1)
    assert status == 0
    raw, status = rc.encode_page(as_page([1.0, np.inf, 3.0, 4.0, 5.0], "fp16"), "fp16",
                                 "plain", 0.1, False, 1)
    assert status == 1
    return [(compressed, "fp32", 40), (raw, "fp16", 5)]


def test_every_bit_flip_is_detected_small_pages():
    for record, dtype, n in _small_records():
        covered = 32 + rc.parse_header(record)["payload_len"]
        for bit in range(covered * 8):
            status, out = rc.decode_record(_flip(record, bit), 0, len(record), dtype, n)
            assert status != rc.OK and out is None, bit
            if bit < 40:
                assert status == rc.BAD_MAGIC
            elif 28 * 8 <= bit < 32 * 8:
                assert status == rc.BAD_CHECKSUM


def test_bit_flips_in_record_padding_are_not_covered():
    """Padding after the payload is outside the checksum (the spec covers only the payload)."""
    for record, dtype, n in _small_records():
        covered = 32 + rc.parse_header(record)["payload_len"]
        _, reference = rc.decode_record(record, 0, len(record), dtype, n)
        for bit in range(covered * 8, len(record) * 8):
            status, out = rc.decode_record(_flip(record, bit), 0, len(record), dtype, n)
            assert status == rc.OK and same_bits(out, reference)


def test_sampled_bit_flips_are_detected_large_page():
    rng = np.random.default_rng(5)
    page = as_page(rng.standard_normal(16384), "bf16")
    record, status = rc.encode_page(page, "bf16", "plain", 1e-2, True, 16)
    assert status == 0
    covered = 32 + rc.parse_header(record)["payload_len"]
    bits = np.concatenate([np.arange(256), rng.choice(covered * 8, 300, replace=False)])
    for bit in bits:
        assert rc.decode_record(_flip(record, int(bit)), 0, len(record), "bf16", 16384)[0] != 0


def test_truncation_is_bad_record():
    for record, dtype, n in _small_records():
        covered = 32 + rc.parse_header(record)["payload_len"]
        for nbytes in range(covered):
            assert rc.decode_record(record, 0, nbytes, dtype, n) == (rc.BAD_RECORD, None)
        for nbytes in range(covered, len(record) + 1):  # dropping padding only is harmless
            assert rc.decode_record(record, 0, nbytes, dtype, n)[0] == rc.OK
        assert rc.decode_record(record[:-1], 0, len(record), dtype, n)[0] == rc.BAD_RECORD
        assert rc.decode_record(record, -16, len(record), dtype, n)[0] == rc.BAD_RECORD
        assert rc.decode_record(record, 16, len(record), dtype, n)[0] == rc.BAD_RECORD
        assert rc.decode_record(record, 0, -1, dtype, n)[0] == rc.BAD_RECORD


def test_mismatched_dtype_or_n():
    for record, dtype, n in _small_records():
        other = "bf16" if dtype != "bf16" else "fp16"
        assert rc.decode_record(record, 0, len(record), other, n) == (rc.MISMATCH, None)
        assert rc.decode_record(record, 0, len(record), dtype, n + 1) == (rc.MISMATCH, None)


# ---------------------------------------------------------------------------
# Malformed records with valid checksums
# ---------------------------------------------------------------------------

FP32 = rc.DTYPES["fp32"]
PLAIN, OUTLIER = rc.MODES["plain"], rc.MODES["outlier"]


def test_forge_reproduces_encoder_output():
    record, _ = rc.encode_page(RAMP + 100, "fp32", "outlier", 0.5, False, 1)
    h = rc.parse_header(record)
    assert forge(FP32, OUTLIER, 0, 32, 1, h["eb"], h["step"], payload_of(record)) == record


def _ok_payload_f(width: int) -> bytes:
    """Plain-mode payload of one block (n = 32) with width F and all planes zero."""
    return bytes([width, 0, 0, 0]) + bytes(4 * (1 + width) if width else 0)


@pytest.mark.parametrize("name, record", [
    ("width over 24", forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, _ok_payload_f(25))),
    ("width bit 7", forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, bytes([0x81, 0, 0, 0, 0, 0, 0, 0,
                                                                   0, 0, 0, 0]))),
    ("flag bit 4", forge(FP32, PLAIN, 0x10, 32, 1, 0.5, 1.0, _ok_payload_f(0))),
    ("flag bit 7", forge(FP32, PLAIN, 0x80, 32, 1, 0.5, 1.0, _ok_payload_f(0))),
    ("reserved u16", forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, _ok_payload_f(0), reserved=1)),
    ("K in plain mode", forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, bytes([0x20, 0, 0, 0, 5, 0, 0,
                                                                      0]))),
    ("K in fixed mode", forge(FP32, 0, 0, 32, 1, 0.5, 1.0, bytes([0x20, 0, 0, 0, 5, 0, 0, 0]))),
    ("rows not dividing n", forge(FP32, PLAIN, 0, 32, 3, 0.5, 1.0, _ok_payload_f(0))),
    ("rows zero", forge(FP32, PLAIN, 0, 32, 0, 0.5, 1.0, _ok_payload_f(0))),
    ("step zero", forge(FP32, PLAIN, 0, 32, 1, 0.5, 0.0, _ok_payload_f(0))),
    ("step negative", forge(FP32, PLAIN, 0, 32, 1, 0.5, -1.0, _ok_payload_f(0))),
    ("step inf", forge(FP32, PLAIN, 0, 32, 1, 0.5, np.inf, _ok_payload_f(0))),
    ("step nan", forge(FP32, PLAIN, 0, 32, 1, 0.5, np.nan, _ok_payload_f(0))),
    ("sections too long", forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, _ok_payload_f(1) + bytes(4))),
    ("sections too short", forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, _ok_payload_f(2)[:-4])),
    ("widths missing", forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, b"")),
    ("unknown mode", forge(FP32, 3, 0, 32, 1, 0.5, 1.0, _ok_payload_f(0))),
    ("raw flag bit 5", forge(FP32, PLAIN, 0x21, 32, 1, 0.0, 0.0, bytes(128))),
    ("raw payload too short", forge(FP32, PLAIN, 1, 32, 1, 0.0, 0.0, bytes(124))),
    ("raw payload too long", forge(FP32, PLAIN, 1, 32, 1, 0.0, 0.0, bytes(132))),
])
def test_malformed_records(name, record):
    assert rc.decode_record(record, 0, len(record), "fp32", 32) == (rc.MALFORMED, None), name


def test_payload_len_not_whole_words_is_bad_record():
    record = forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, _ok_payload_f(0) + bytes(4), payload_len=6)
    assert rc.decode_record(record, 0, len(record), "fp32", 32) == (rc.BAD_RECORD, None)


def test_well_formed_forgeries_decode():
    """Controls for the malformed cases: the nearest valid records decode."""
    for record in [forge(FP32, PLAIN, 0, 32, 1, 0.5, 1.0, _ok_payload_f(24)),
                   forge(FP32, OUTLIER, 0, 32, 1, 0.5, 1.0, bytes([0x20, 0, 0, 0, 5, 0, 0, 0])),
                   forge(FP32, PLAIN, 0, 32, 4, 0.5, 1.0, _ok_payload_f(0)),
                   forge(FP32, PLAIN, 1, 32, 1, 0.0, 0.0, bytes(128)),
                   forge(FP32, PLAIN, 1, 32, 5, 0.0, 0.0, bytes(128)),  # a raw page ignores rows
                   forge(FP32, 3, 1, 32, 1, 0.0, 0.0, bytes(128))]:  # and mode
        status, out = rc.decode_record(record, 0, len(record), "fp32", 32)
        assert status == rc.OK and out.dtype == np.float32


def test_forged_outlier_values():
    """o = unzigzag(5) = -3; d_1 = +2 from the planes: q = -3, -1, -1, ..."""
    payload = bytes([0x22, 0, 0, 0, 5, 0, 0, 0]) + struct.pack("<3I", 0, 0, 0b10)
    record = forge(FP32, OUTLIER, 0, 32, 1, 0.5, 1.0, payload)
    status, out = rc.decode_record(record, 0, len(record), "fp32", 32)
    assert status == rc.OK and out.tolist() == [-3.0] + [-1.0] * 31


@given(st.binary(max_size=200), st.integers(-8, 220), st.integers(-8, 220),
       st.sampled_from(DTYPE_NAMES), st.integers(0, 70))
@settings(max_examples=200, deadline=None)
def test_garbage_never_raises(buf, offset, nbytes, dtype, n):
    status, out = rc.decode_record(buf, offset, nbytes, dtype, n)
    assert status in (rc.BAD_RECORD, rc.BAD_MAGIC, rc.BAD_CHECKSUM) and out is None


@given(st.sampled_from(DTYPE_NAMES), st.integers(0, 3), st.integers(0, 255), st.integers(1, 100),
       st.integers(0, 6), st.floats(width=32), st.binary(max_size=260))
@settings(max_examples=300, deadline=None)
def test_forged_records_never_raise(dtype, mode, flags, n, rows, step, payload):
    payload = payload[:len(payload) // 4 * 4]
    record = forge(rc.DTYPES[dtype], mode, flags, n, rows, 0.0, step, payload)
    status, out = rc.decode_record(record, 0, len(record), dtype, n)
    assert status in (rc.OK, rc.MALFORMED)
    if status == rc.OK:
        assert out.dtype == STORAGE[dtype] and out.shape == (n,)


@given(random_pages(), st.sampled_from(MODE_NAMES), st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_flipped_random_records_never_decode(case, mode, bit_seed):
    dtype, page, rows = case
    record, _ = rc.encode_page(page, dtype, mode, 1e-2, True, rows)
    covered = 32 + rc.parse_header(record)["payload_len"]
    bit = bit_seed % (covered * 8)
    assert rc.decode_record(_flip(record, bit), 0, len(record), dtype, page.size)[0] != rc.OK


# ---------------------------------------------------------------------------
# Batches and argument checks
# ---------------------------------------------------------------------------


def test_encode_batch_table_and_buffer():
    rng = np.random.default_rng(9)
    pages = as_page(rng.standard_normal((3, 256)), "fp16")
    pages[1, 5] = np.nan
    ids = [0, 7, 1, -1, 2, 2]
    buf, table = rc.encode_batch(pages, ids, "fp16", "outlier", 1e-2, True, 4)
    assert table.dtype == np.int64 and table.shape == (len(ids), 3)
    offsets, nbytes, statuses = table.T
    assert statuses.tolist() == [0, 4, 1, 4, 0, 0]
    assert np.all(offsets % 16 == 0) and np.all(nbytes % 16 == 0)
    assert np.all(nbytes[statuses == 4] == 0) and np.all(nbytes[statuses != 4] >= 48)
    assert offsets[0] == 0 and np.array_equal(offsets[1:], offsets[:-1] + nbytes[:-1])
    assert len(buf) == nbytes.sum()
    for (offset, size, status), page_id in zip(table.tolist(), ids, strict=True):
        if status == 4:
            continue
        assert buf[offset:offset + size] == rc.encode_page(pages[page_id], "fp16", "outlier",
                                                           1e-2, True, 4)[0]
        dec_status, out = rc.decode_record(buf, offset, size, "fp16", 256)
        assert dec_status == rc.OK
        if status:
            assert same_bits(out, pages[page_id])


def test_encode_batch_empty():
    buf, table = rc.encode_batch(np.zeros((2, 32), np.float32), [], "fp32", "plain", 0.1,
                                 False, 1)
    assert buf == b"" and table.shape == (0, 3)


@pytest.mark.parametrize("page, dtype, rows, eb", [
    (np.zeros(64, np.float32), "fp16", 1, 0.1),   # wrong storage type
    (np.zeros(64, np.uint16), "fp32", 1, 0.1),
    (np.zeros(64, np.float32), "fp32", 3, 0.1),   # rows does not divide n
    (np.zeros(64, np.float32), "fp32", 0, 0.1),
    (np.zeros(64, np.float32), "fp32", 1, -0.1),  # negative bound
    (np.zeros(64, np.float32), "fp32", 1, np.nan),
    (np.zeros(0, np.float32), "fp32", 1, 0.1),    # empty page
    (np.zeros((2, 32), np.float32), "fp32", 1, 0.1),
])
def test_encode_rejects_bad_arguments(page, dtype, rows, eb):
    with pytest.raises(ValueError):
        rc.encode_page(page, dtype, "plain", eb, False, rows)


def test_large_page_speed():
    page = as_page(np.random.default_rng(1).standard_normal(16384), "fp16")
    start = time.perf_counter()
    record, status = rc.encode_page(page, "fp16", "plain", 1e-2, True, 16)
    encode_s = time.perf_counter() - start
    assert status == 0 and encode_s < 1.0
    assert rc.decode_record(record, 0, len(record), "fp16", 16384)[0] == rc.OK
