"""NumPy reference implementation of the compressed KV page format, version 1.

This module pins docs/format.md: the C++ and CUDA codecs must produce streams that
are byte-identical to the ones built here, so every step follows the specification
literally and favours readability over speed. Each function names the section of the
specification it implements. All floating-point work is done on ``np.float32`` values
(binary32, round-to-nearest-even, no fused multiply-add) or Python floats (binary64)
exactly where the specification asks for that precision.

Pages are passed in their storage representation: ``np.float16`` arrays for fp16,
``np.float32`` arrays for fp32, and ``np.uint16`` arrays of bf16 bit patterns for
bf16, because NumPy has no bf16 type.
"""

from __future__ import annotations

import struct

import numpy as np

DTYPES = {"fp16": 1, "bf16": 2, "fp32": 3}  # header dtype codes
MODES = {"fixed": 0, "plain": 1, "outlier": 2}  # header mode codes

MAGIC = 0x315A564B  # the bytes "KVZ1" read as a little-endian u32
VERSION = 1
HEADER_BYTES = 32
RECORD_ALIGN = 16
BLOCK = 32
MAX_WIDTH = 24
MAX_QUANT = np.float32(2**22)

FLAG_RAW = 0x01
FLAG_RELATIVE = 0x08
FLAG_RESERVED = 0xF0
REASON_SHIFT = 1

# Compression statuses (page table column 2); 1..3 are also the RAW reasons.
COMPRESSED, RAW_NON_FINITE, RAW_BOUND, RAW_NO_GAIN, BAD_SOURCE_INDEX = range(5)
# Decode statuses.
OK, BAD_INDEX, BAD_RECORD, BAD_MAGIC, BAD_CHECKSUM, MISMATCH, MALFORMED = range(7)

_STORAGE = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp32": np.dtype("<f4")}
# (u, v) of the headroom formula, "Choosing the page bound" step 3.
_HEADROOM = {"fp16": (2.0**-11, 2.0**-25), "bf16": (2.0**-8, 0.0), "fp32": (2.0**-21, 0.0)}
# magic, version, dtype, mode, flags, n, rows, reserved, eb, step, payload_len, checksum
_HEADER = struct.Struct("<IBBBBIHHffII")
_MASK32 = 0xFFFFFFFF
_LANES = np.arange(BLOCK, dtype=np.uint64)
_PLANE_SLOTS = np.arange(MAX_WIDTH + 1)  # slot 0: sign word, slot 1 + b: magnitude bit b


# ---------------------------------------------------------------------------
# Storage conversions
# ---------------------------------------------------------------------------


def bf16_bits_from_f32(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bf16 bit patterns, nearest-even.

    bf16 is the top half of a binary32, so rounding adds just under half of the
    dropped half-word, plus one when the kept half is odd (ties to even); a carry
    into the exponent gives the next binade or infinity, which is what RNE requires.
    Inputs must not be NaN (the codec never rounds a NaN).
    """
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def f32_from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns to float32; exact, bf16 is a truncated binary32."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def page_to_f32(page: np.ndarray, dtype: str) -> np.ndarray:
    """Return a page's values as float32, exactly (the spec's `x_s`)."""
    if dtype == "bf16":
        return f32_from_bf16_bits(page)
    with np.errstate(invalid="ignore"):  # signalling NaNs are merely detected later
        return np.asarray(page).astype(np.float32)


def f32_to_dtype(y: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to the page dtype's storage representation, nearest-even.

    NumPy's float32 -> float16 cast rounds to nearest-even, so only bf16 needs
    hand-written rounding. Overflow to infinity is the correctly rounded result.
    """
    y = np.asarray(y, dtype=np.float32)
    if dtype == "bf16":
        return bf16_bits_from_f32(y)
    with np.errstate(over="ignore"):
        return y.astype(_STORAGE[dtype].newbyteorder("="))


def rd32(v: float) -> np.float32:
    """Round a binary64 value down (towards -inf) to binary32.

    The nearest binary32 is taken first; if it lies above v, the next binary32 below
    it is the answer. Values beyond the binary32 range round to its largest finite.
    """
    with np.errstate(over="ignore"):
        r = np.float32(v)
    if float(r) > v:
        r = np.nextafter(r, np.float32(-np.inf))
    return r


# ---------------------------------------------------------------------------
# Checksum
# ---------------------------------------------------------------------------


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on uint64 arrays holding 32-bit values.

    Products of two 32-bit values fit in 64 bits, so masking after each product
    gives the modulo-2^32 arithmetic of the specification without overflow.
    """
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(_MASK32)
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(_MASK32)
    return h ^ (h >> np.uint64(16))


def checksum(header28: bytes, payload: bytes) -> int:
    """Checksum of a record: header bytes 0..27 and the payload (section "Checksum").

    `payload_len` is len(payload). A trailing partial word (only possible in a forged
    record whose payload_len is not a multiple of 4) is not summed: the
    specification sums `payload_len / 4` words, read here as integer division.
    """
    if len(header28) != HEADER_BYTES - 4:
        raise ValueError("header28 must be 28 bytes")
    whole = len(payload) // 4 * 4
    words = np.frombuffer(bytes(header28) + bytes(payload[:whole]), dtype="<u4").astype(np.uint64)
    index = np.arange(1, words.size + 1, dtype=np.uint64)
    terms = _fmix32((words + index * np.uint64(0x9E3779B9)) & np.uint64(_MASK32))
    total = int(terms.sum(dtype=np.uint64)) & _MASK32
    return int(_fmix32(np.array([total ^ (len(payload) & _MASK32)], dtype=np.uint64))[0])


# ---------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------


def _round_up(v: int, m: int) -> int:
    """Smallest multiple of m that is >= v."""
    return -(-v // m) * m


def _pad(data: bytes, m: int) -> bytes:
    """Zero-pad data to a multiple of m bytes."""
    return data + bytes(_round_up(len(data), m) - len(data))


def stream_index(n: int, rows: int) -> np.ndarray:
    """Memory index m(s) of every stream position s (section "Terms").

    The page is a row-major rows x (n / rows) matrix coded column by column, so the
    stream is the transposed matrix read row-major.
    """
    return np.arange(n).reshape(rows, n // rows).T.reshape(-1)


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2^25 (0 for 0)."""
    powers = np.int64(1) << np.arange(MAX_WIDTH + 1, dtype=np.int64)
    return (np.asarray(v, dtype=np.int64)[:, None] >= powers[None, :]).sum(axis=1)


def _pack_lanes(bits: np.ndarray) -> np.ndarray:
    """Pack 0/1 values along the last axis (32 lanes) into words, lane i -> bit i."""
    return (bits.astype(np.uint64) << _LANES).sum(axis=-1, dtype=np.uint64)


def _unpack_lanes(words: np.ndarray) -> np.ndarray:
    """Inverse of _pack_lanes: a trailing axis of 32 bits, bit i of each word."""
    return ((words.astype(np.uint64)[..., None] >> _LANES) & np.uint64(1)).astype(np.int64)


def _plane_slots(widths: np.ndarray) -> np.ndarray:
    """Mask (B, 25) of the plane words present per block: sign + F_j magnitudes.

    Read row-major, the set slots give the order of the planes section.
    """
    return (widths[:, None] > 0) & (_PLANE_SLOTS[None, :] <= widths[:, None])


def _outlier_slots(nbytes: np.ndarray) -> np.ndarray:
    """Mask (B, 4) of the outlier bytes present per block: the K_j low bytes."""
    return np.arange(4)[None, :] < nbytes[:, None]


# ---------------------------------------------------------------------------
# Header and records
# ---------------------------------------------------------------------------


def parse_header(record: bytes) -> dict:
    """Header fields by name (section "Header"), plus the decoded flag bits.

    eb and step are returned as Python floats holding the binary32 values exactly.
    Raises struct.error when the record is shorter than 32 bytes.
    """
    (magic, version, dtype, mode, flags, n, rows, reserved, eb, step, payload_len,
     check) = _HEADER.unpack_from(bytes(record[:HEADER_BYTES]))
    return {
        "magic": magic, "version": version, "dtype": dtype, "mode": mode, "flags": flags,
        "raw": bool(flags & FLAG_RAW), "raw_reason": (flags >> REASON_SHIFT) & 3,
        "relative": bool(flags & FLAG_RELATIVE), "n": n, "rows": rows,
        "reserved": reserved, "eb": eb, "step": step, "payload_len": payload_len,
        "checksum": check,
    }


def _record(dtype: str, mode: str, flags: int, n: int, rows: int, eb: np.float32,
            step: np.float32, payload: bytes) -> bytes:
    """Header + payload + zero padding to the record alignment, with its checksum."""
    header28 = _HEADER.pack(MAGIC, VERSION, DTYPES[dtype], MODES[mode], flags, n, rows, 0,
                            eb, step, len(payload), 0)[:HEADER_BYTES - 4]
    check = struct.pack("<I", checksum(header28, payload))
    return _pad(header28 + check + payload, RECORD_ALIGN)


def _raw_record(page: np.ndarray, dtype: str, mode: str, relative_flag: int,
                reason: int) -> tuple[bytes, int]:
    """A RAW record (section "Raw pages"): the page bytes in memory order, exact.

    The mode field keeps the requested mode and bit 3 the requested bound kind:
    the specification does not say otherwise for raw pages.
    """
    payload = _pad(page.astype(_STORAGE[dtype]).tobytes(), 4)
    flags = FLAG_RAW | (reason << REASON_SHIFT) | relative_flag
    record = _record(dtype, mode, flags, page.size, 1, np.float32(0), np.float32(0), payload)
    return record, reason


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _page_bound(x: np.ndarray, dtype: str, eb: float,
                relative: bool) -> tuple[np.float32, np.float32 | None]:
    """Header bound eb and quantisation step (section "Choosing the page bound").

    The step is None when step 4 already makes the page RAW with reason 2. It may be
    0 (rd32(t) underflows) or inf (2 * rd32(t) overflows) exactly as the specified
    binary32 arithmetic gives; quantisation then rejects the page.
    """
    mx, mn = x.max(), x.min()
    amax = max(abs(float(mx)), abs(float(mn)))
    eb32 = rd32(eb * (float(mx) - float(mn)) if relative else eb)
    u, v = _HEADROOM[dtype]
    e = float(eb32)
    t = (e - u * (amax + e)) - v
    if t > 0:
        with np.errstate(over="ignore"):
            return eb32, np.float32(2) * rd32(t)
    if mx == mn:
        return eb32, abs(mx) if mx != 0 else np.float32(1)
    return eb32, None


def _reconstruct(q: np.ndarray, step: np.float32, dtype: str) -> np.ndarray:
    """The decoder's value y = dtype(f32(f32(q) * step)), in storage representation."""
    with np.errstate(over="ignore", invalid="ignore"):
        return f32_to_dtype(q.astype(np.float32) * step, dtype)


def _quantise(x: np.ndarray, dtype: str, eb32: np.float32,
              step: np.float32) -> np.ndarray | None:
    """Quantised integers q, or None when the page must be RAW with reason 2.

    Follows "Quantisation and verification". A NaN p (0 * inf, when step is 0 or
    so small that 1/step overflows) is rejected like |p| > 2^22: the specification
    leaves that case open and no integer q exists for it.
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(1) / step
        p = x * inv
    if not np.all(np.abs(p) <= MAX_QUANT):
        return None
    q = np.rint(p).astype(np.int64)
    y = page_to_f32(_reconstruct(q, step, dtype), dtype)
    with np.errstate(invalid="ignore"):
        err = np.abs(x.astype(np.float64) - y.astype(np.float64))
    if not np.all(err <= float(eb32)):
        return None
    return q


def _residuals(q: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-block residuals d (B, 32) and outliers o (B,) (section "Residuals").

    q is in stream order; padding positions get d = 0 in every mode.
    """
    n = q.size
    blocks = np.zeros(_round_up(n, BLOCK), dtype=np.int64)
    blocks[:n] = q
    blocks = blocks.reshape(-1, BLOCK)
    d = blocks.copy()
    if mode != "fixed":
        d[:, 1:] = blocks[:, 1:] - blocks[:, :-1]
    outliers = np.zeros(blocks.shape[0], dtype=np.int64)
    if mode == "outlier":
        outliers = blocks[:, 0].copy()
        d[:, 0] = 0
    d.reshape(-1)[n:] = 0
    return d, outliers


def _zigzag(o: np.ndarray) -> np.ndarray:
    """zigzag(o) = (o << 1) ^ (o >> 31) on 32-bit two's complement."""
    o32 = o.astype(np.int32)
    return ((o32 << 1) ^ (o32 >> 31)).view(np.uint32).astype(np.int64)


def _compressed_payload(q: np.ndarray, mode: str) -> bytes:
    """Widths, outliers and planes sections, each zero-padded to 4 bytes."""
    d, outliers = _residuals(q, mode)
    mag = np.abs(d)
    widths = _bit_length(mag.max(axis=1))
    z = _zigzag(outliers)
    nbytes = (_bit_length(z) + 7) // 8
    width_bytes = (widths | (nbytes << 5)).astype(np.uint8).tobytes()
    z_bytes = z.astype("<u4").view(np.uint8).reshape(-1, 4)
    outlier_bytes = z_bytes[_outlier_slots(nbytes)].tobytes()
    magnitude_bits = (mag[:, None, :] >> np.arange(MAX_WIDTH)[None, :, None]) & 1
    words = np.concatenate([_pack_lanes(d < 0)[:, None], _pack_lanes(magnitude_bits)], axis=1)
    plane_bytes = words[_plane_slots(widths)].astype("<u4").tobytes()
    return _pad(width_bytes, 4) + _pad(outlier_bytes, 4) + plane_bytes


def _check_encode_args(page: np.ndarray, dtype: str, mode: str, eb: float, rows: int) -> None:
    """Reject calls the format cannot express (caller errors, not page statuses)."""
    if dtype not in DTYPES or mode not in MODES:
        raise ValueError(f"unknown dtype {dtype!r} or mode {mode!r}")
    if page.ndim != 1 or page.dtype.newbyteorder("<") != _STORAGE[dtype]:
        raise ValueError(f"{dtype} page must be 1-D of {_STORAGE[dtype]}, got {page.dtype}")
    if not 1 <= page.size < 2**32:
        raise ValueError("page must hold 1 .. 2^32-1 values")
    if not (1 <= rows < 2**16 and page.size % rows == 0):
        raise ValueError("rows must be in 1..65535 and divide n")
    if not (np.isfinite(eb) and eb >= 0):
        raise ValueError("eb must be finite and non-negative")


def encode_page(page: np.ndarray, dtype: str, mode: str, eb: float, relative: bool,
                rows: int) -> tuple[bytes, int]:
    """Encode one page into a record padded to 16 bytes; returns (record, status).

    `eb` is the absolute bound, or the factor `rel` of max - min when `relative`.
    The status is 0 when compressed, else the RAW reason (1, 2 or 3).
    """
    page = np.asarray(page)
    _check_encode_args(page, dtype, mode, eb, rows)
    relative_flag = FLAG_RELATIVE if relative else 0
    x = page_to_f32(page, dtype)
    if not np.all(np.isfinite(x)):
        return _raw_record(page, dtype, mode, relative_flag, RAW_NON_FINITE)
    eb32, step = _page_bound(x, dtype, eb, relative)
    q = None if step is None else _quantise(x, dtype, eb32, step)
    if q is None:
        return _raw_record(page, dtype, mode, relative_flag, RAW_BOUND)
    payload = _compressed_payload(q[stream_index(page.size, rows)], mode)
    if len(payload) >= _round_up(page.size * _STORAGE[dtype].itemsize, 4):
        return _raw_record(page, dtype, mode, relative_flag, RAW_NO_GAIN)
    record = _record(dtype, mode, relative_flag, page.size, rows, eb32, step, payload)
    return record, COMPRESSED


def encode_batch(pages: np.ndarray, page_ids: list[int], dtype: str, mode: str, eb: float,
                 relative: bool, rows: int) -> tuple[bytes, np.ndarray]:
    """Encode the listed pages into one buffer (section "Buffer and page table").

    Returns the buffer and the int64 table of (offset, nbytes, status) per id. An id
    outside 0..num_pages-1 stores nothing: nbytes 0, status 4, and its offset is
    where the next record starts, so offset[i+1] == offset[i] + nbytes[i] throughout.
    """
    pages = np.asarray(pages)
    if pages.ndim != 2:
        raise ValueError("pages must be 2-D (num_pages, n)")
    table = np.zeros((len(page_ids), 3), dtype=np.int64)
    records: list[bytes] = []
    offset = 0
    for i, page_id in enumerate(page_ids):
        if not 0 <= page_id < pages.shape[0]:
            table[i] = (offset, 0, BAD_SOURCE_INDEX)
            continue
        record, status = encode_page(pages[page_id], dtype, mode, eb, relative, rows)
        table[i] = (offset, len(record), status)
        records.append(record)
        offset += len(record)
    return b"".join(records), table


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _header_malformed(h: dict, n: int) -> bool:
    """MALFORMED checks on the header: reserved bits, and for compressed pages rows,
    the mode value and step.

    Reserved bits are flags bits 4-7 and the reserved u16. The step check applies to
    compressed pages only, a raw page's step being 0 by definition. An unknown mode
    value (not in the specification's list) is malformed for a compressed page, which
    has no decoding for it; a raw page's decoding does not depend on its mode.
    """
    if h["flags"] & FLAG_RESERVED or h["reserved"] != 0:
        return True
    if h["raw"]:
        return False
    return (h["rows"] == 0 or n % h["rows"] != 0 or h["mode"] not in MODES.values()
            or not (np.isfinite(h["step"]) and h["step"] > 0))


def _split_sections(payload: bytes, mode: int,
                    n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Zigzagged outliers z (B,) and plane words (B, 25) of a compressed payload.

    Plane word slot 0 is the sign word, slot 1 + b magnitude bit b; absent words are 0.
    Returns None for any MALFORMED condition of the payload: width byte bit 7 set,
    a width over 24, K_j > 0 outside outlier mode, or section lengths that do not
    add up to payload_len.
    """
    nblocks = _round_up(n, BLOCK) // BLOCK
    widths_len = _round_up(nblocks, 4)
    if len(payload) < widths_len:
        return None
    width_bytes = np.frombuffer(payload, dtype=np.uint8, count=nblocks).astype(np.int64)
    widths, nbytes = width_bytes & 0x1F, (width_bytes >> 5) & 3
    if np.any(width_bytes & 0x80) or np.any(widths > MAX_WIDTH):
        return None
    if mode != MODES["outlier"] and np.any(nbytes > 0):
        return None
    outliers_len = _round_up(int(nbytes.sum()), 4)
    slots = _plane_slots(widths)
    if widths_len + outliers_len + 4 * int(slots.sum()) != len(payload):
        return None
    z_bytes = np.zeros((nblocks, 4), dtype=np.uint8)
    z_bytes[_outlier_slots(nbytes)] = np.frombuffer(payload, np.uint8, int(nbytes.sum()),
                                                    widths_len)
    words = np.zeros(slots.shape, dtype=np.uint64)
    words[slots] = np.frombuffer(payload, "<u4", offset=widths_len + outliers_len)
    return z_bytes.view("<u4").reshape(-1).astype(np.int64), words


def _unzigzag(z: np.ndarray) -> np.ndarray:
    """Inverse of zigzag: o = (z >> 1) ^ -(z & 1)."""
    return (z >> 1) ^ -(z & 1)


def _quantised_from_sections(z: np.ndarray, words: np.ndarray, mode: int) -> np.ndarray:
    """Rebuild q (B, 32) from outliers and plane words by inverting "Residuals".

    In outlier mode q_0 = o and the coded d_0 (0 from a conforming encoder) is not used.
    """
    magnitude_bits = _unpack_lanes(words[:, 1:])  # (B, 24, 32)
    mag = (magnitude_bits << np.arange(MAX_WIDTH)[None, :, None]).sum(axis=1)
    d = np.where(_unpack_lanes(words[:, 0]) == 1, -mag, mag)
    if mode == MODES["fixed"]:
        return d
    if mode == MODES["outlier"]:
        d[:, 0] = _unzigzag(z)
    return np.cumsum(d, axis=1)


def _decode_compressed(h: dict, payload: bytes, dtype: str, n: int) -> np.ndarray | None:
    """Decoded page in memory order, or None when the payload is malformed."""
    sections = _split_sections(payload, h["mode"], n)
    if sections is None:
        return None
    q = _quantised_from_sections(*sections, h["mode"]).reshape(-1)[:n]
    y = _reconstruct(q, np.float32(h["step"]), dtype)
    page = np.empty(n, dtype=y.dtype)
    page[stream_index(n, h["rows"])] = y
    return page


def _decode_raw(payload: bytes, dtype: str, n: int) -> np.ndarray | None:
    """The stored page of a raw record, or None when payload_len is not round4(n * size)."""
    size = n * _STORAGE[dtype].itemsize
    if len(payload) != _round_up(size, 4):
        return None
    return np.frombuffer(payload, _STORAGE[dtype], n).astype(_STORAGE[dtype].newbyteorder("="))


def decode_record(buf: bytes, offset: int, nbytes: int, dtype: str,
                  n: int) -> tuple[int, np.ndarray | None]:
    """Validate and decode the record at buf[offset:offset+nbytes] (section "Decoding").

    Returns (status, page): page is the decoded page in storage representation when
    status is OK, else None. Checks run in the specification's order and stop at the
    first failure; BAD_INDEX (1) is the caller's check and never returned here.
    Never raises on any bytes.
    """
    if (offset < 0 or nbytes < HEADER_BYTES or offset % RECORD_ALIGN != 0
            or offset + nbytes > len(buf)):
        return BAD_RECORD, None
    record = bytes(buf[offset:offset + nbytes])
    h = parse_header(record)
    if h["magic"] != MAGIC or h["version"] != VERSION:
        return BAD_MAGIC, None
    if h["payload_len"] % 4 != 0 or HEADER_BYTES + h["payload_len"] > nbytes:
        return BAD_RECORD, None
    payload = record[HEADER_BYTES:HEADER_BYTES + h["payload_len"]]
    if checksum(record[:HEADER_BYTES - 4], payload) != h["checksum"]:
        return BAD_CHECKSUM, None
    if h["dtype"] != DTYPES[dtype] or h["n"] != n:
        return MISMATCH, None
    if _header_malformed(h, n):
        return MALFORMED, None
    if h["raw"]:
        page = _decode_raw(payload, dtype, n)
    else:
        page = _decode_compressed(h, payload, dtype, n)
    return (MALFORMED, None) if page is None else (OK, page)
