"""The compiled CPU kernels (torch.ops.kvcompress on CPU): the error bound on
random and adversarial pages, byte-identity with the NumPy reference, corruption
handling and argument validation. These run in CI."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kernels import reference_codec as ref
from vllm_kvcompress.codec import (CodecConfig, CodecMode, CompressedPages, CompressStatus,
                                   DecodeStatus, compress_bound, compress_pages,
                                   decompress_pages)

DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
MODES = list(CodecMode)


def requested_bound(x: torch.Tensor, config: CodecConfig) -> torch.Tensor:
    """Per-page bound the caller asked for, in float64."""
    x = x.double()
    if config.relative:
        return config.error_bound * (x.amax(1) - x.amin(1))
    return torch.full((x.shape[0],), config.error_bound, dtype=torch.float64)


def round_trip(pages: torch.Tensor, config: CodecConfig) -> tuple[CompressedPages, torch.Tensor]:
    ids = torch.arange(pages.shape[0])
    compressed = compress_pages(pages, ids, config)
    out = torch.full_like(pages, 12345.0)
    status = decompress_pages(compressed, out, ids)
    assert (status == DecodeStatus.OK).all(), status
    return compressed, out


def assert_within_bound(pages: torch.Tensor, out: torch.Tensor, compressed: CompressedPages,
                        config: CodecConfig) -> None:
    finite = torch.isfinite(pages.float()).all(1)
    bound = requested_bound(pages, config)
    err = (pages.double() - out.double()).abs()
    for i in range(pages.shape[0]):
        status = int(compressed.table[i, 2])
        if status == CompressStatus.COMPRESSED:
            assert finite[i]
            assert (err[i] <= bound[i]).all(), (i, err[i].max().item(), bound[i].item())
        else:
            # Raw pages come back bit for bit, NaN and Inf included.
            assert torch.equal(pages[i].view(torch.uint8), out[i].view(torch.uint8))


@st.composite
def pages_and_config(draw):
    dtype = draw(st.sampled_from(list(DTYPES)))
    rows = draw(st.sampled_from([1, 2, 4, 16]))
    cols = draw(st.integers(1, 80))
    num = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 30.0, 1e3]))
    shape = draw(st.sampled_from(["normal", "walk", "uniform", "sparse", "spiky"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    x = torch.randn(num, n, generator=g, dtype=torch.float64)
    if shape == "walk":
        x = x.cumsum(1) * 0.1
    elif shape == "uniform":
        x = torch.rand(num, n, generator=g, dtype=torch.float64) * 2 - 1
    elif shape == "sparse":
        x = x * (torch.rand(num, n, generator=g) < 0.05)
    elif shape == "spiky":
        x[:, ::7] *= 100
    pages = (x * scale).to(dtype)
    relative = draw(st.booleans())
    eb = draw(st.sampled_from([1e-1, 1e-2, 1e-3, 1e-4])) if relative else \
        draw(st.sampled_from([1e-3, 1e-2, 0.5])) * scale
    mode = draw(st.sampled_from(MODES))
    return pages, CodecConfig(eb, relative, mode, rows)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages_and_config())
def test_bound_holds_element_wise(case):
    pages, config = case
    compressed, out = round_trip(pages, config)
    assert_within_bound(pages, out, compressed, config)


def adversarial_pages(dtype: torch.dtype, n: int = 256) -> torch.Tensor:
    big = {torch.float16: 6.5e4, torch.bfloat16: 3.3e38, torch.float32: 3.4e38}[dtype]
    tiny = {torch.float16: 6e-8, torch.bfloat16: 1e-40, torch.float32: 1e-44}[dtype]
    rows = [
        torch.zeros(n),
        torch.full((n,), -3.75),
        torch.tensor([1e3, -1e3]).repeat(n // 2),
        torch.zeros(n).index_fill_(0, torch.tensor([100]), 5e4),
        torch.linspace(-big, big, n),
        torch.full((n,), big),
        torch.arange(n) * tiny,
        torch.randn(n).index_fill_(0, torch.tensor([3]), float("nan")),
        torch.randn(n).index_fill_(0, torch.tensor([7]), float("inf")),
        torch.randn(n).index_fill_(0, torch.tensor([9]), float("-inf")),
        torch.rand(n) * 1e-3 + 1.0,
    ]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("relative,eb", [(True, 1e-1), (True, 1e-2), (True, 1e-4), (False, 1e-2),
                                         (False, 1.0)])
def test_bound_on_adversarial_pages(dtype, mode, relative, eb):
    pages = adversarial_pages(dtype)
    config = CodecConfig(eb, relative, mode, 16)
    compressed, out = round_trip(pages, config)
    assert_within_bound(pages, out, compressed, config)
    status = compressed.table[:, 2]
    assert (status[7:10] == CompressStatus.RAW_NON_FINITE).all()
    assert status[0] == CompressStatus.COMPRESSED  # an all-zero page always compresses


def test_zero_page_costs_one_byte_per_block():
    pages = torch.zeros(1, 1024, dtype=torch.bfloat16)
    compressed = compress_pages(pages, [0], CodecConfig())
    # 32 width bytes (one per 32-value block) after the 32-byte header.
    assert compressed.used_bytes() == 64


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("relative,eb", [(True, 1e-2), (True, 1e-3), (False, 0.02)])
def test_byte_identical_to_reference(dtype, mode, rows, relative, eb):
    g = torch.Generator().manual_seed(hash((str(dtype), int(mode), rows)) % 2**31)
    smooth = torch.randn(4, 8 * 40, generator=g).cumsum(1) * 0.2
    pages = torch.cat([smooth, adversarial_pages(torch.float32, 320)]).to(dtype)
    ids = [3, 0, 14, 2, 5, 99, 1, 7, 8, 12]
    config = CodecConfig(eb, relative, mode, rows)
    compressed = compress_pages(pages, ids, config)
    storage = pages.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 \
        else pages.numpy()
    ref_buf, ref_table = ref.encode_batch(storage, ids, DTYPES[dtype], mode.name.lower(), eb,
                                          relative, rows)
    assert compressed.table.numpy().tolist() == np.asarray(ref_table).tolist()
    used = compressed.used_bytes()
    assert bytes(compressed.buffer[:used].numpy()) == ref_buf


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reference_decodes_cpu_stream(dtype):
    pages = (torch.randn(3, 640).cumsum(1)).to(dtype)
    compressed = compress_pages(pages, [0, 1, 2], CodecConfig(1e-2, True, CodecMode.OUTLIER, 16))
    out = torch.empty_like(pages)
    decompress_pages(compressed, out, [0, 1, 2])
    buf = bytes(compressed.buffer.numpy())
    for i in range(3):
        status, values = ref.decode_record(buf, int(compressed.table[i, 0]),
                                           int(compressed.table[i, 1]), DTYPES[dtype], 640)
        assert status == 0
        expected = out[i].view(torch.int16).numpy().view(np.uint16) \
            if dtype == torch.bfloat16 else out[i].numpy()
        assert np.array_equal(values, expected)


def test_every_bit_flip_is_caught_and_nothing_is_written():
    pages = torch.randn(2, 96).cumsum(1).to(torch.float16)
    compressed = compress_pages(pages, [0, 1], CodecConfig(1e-2, True, CodecMode.OUTLIER, 1))
    payload_len = int(np.frombuffer(bytes(compressed.buffer[24:28].numpy()), "<u4")[0])
    # Every bit of record 0 but its zero padding, which carries no data.
    for byte in range(32 + payload_len):
        for bit in range(8):
            buf = compressed.buffer.clone()
            buf[byte] ^= 1 << bit
            dst = torch.full_like(pages, 7.0)
            status = decompress_pages(CompressedPages(buf, compressed.table), dst, [0, 1])
            assert status[0] != DecodeStatus.OK, (byte, bit)
            assert (dst[0] == 7.0).all()
            assert status[1] == DecodeStatus.OK


def test_truncated_and_misplaced_records():
    pages = torch.randn(4, 512).cumsum(1).to(torch.bfloat16)
    compressed = compress_pages(pages, range(4), CodecConfig())
    table = compressed.table.clone()
    table[0, 1] = 31                      # shorter than a header
    table[1, 1] -= 16                     # payload cut short
    table[2, 0] = compressed.buffer.numel()  # past the end of the buffer
    table[3, 0] += 8                      # not 16-byte aligned
    used = compressed.used_bytes()
    dst = torch.zeros_like(pages)
    status = decompress_pages(CompressedPages(compressed.buffer[:used], table), dst, range(4))
    assert status.tolist() == [DecodeStatus.BAD_RECORD] * 4
    assert (dst == 0).all()


def test_garbage_and_mismatch():
    pages = torch.randn(2, 256)
    compressed = compress_pages(pages, [0, 1], CodecConfig())
    junk = torch.randint(0, 256, compressed.buffer.shape, dtype=torch.uint8)
    dst = torch.zeros_like(pages)
    status = decompress_pages(CompressedPages(junk, compressed.table), dst, [0, 1])
    assert (status != DecodeStatus.OK).all() and (dst == 0).all()
    wrong_dtype = torch.zeros(2, 256, dtype=torch.float16)
    assert (decompress_pages(compressed, wrong_dtype, [0, 1]) == DecodeStatus.MISMATCH).all()
    wrong_size = torch.zeros(2, 128)
    assert (decompress_pages(compressed, wrong_size, [0, 1]) == DecodeStatus.MISMATCH).all()
    assert decompress_pages(compressed, dst, [0, 2]).tolist() == [DecodeStatus.OK,
                                                                  DecodeStatus.BAD_INDEX]


def test_bad_source_index_is_reported():
    pages = torch.randn(3, 64)
    compressed = compress_pages(pages, [0, 3, -1, 2], CodecConfig())
    assert compressed.table[:, 2].tolist() == [0, CompressStatus.BAD_SOURCE_INDEX,
                                               CompressStatus.BAD_SOURCE_INDEX, 0]
    assert compressed.table[1:3, 1].tolist() == [0, 0]


def test_empty_batch_is_a_no_op():
    pages = torch.randn(3, 64)
    compressed = compress_pages(pages, torch.empty(0, dtype=torch.long), CodecConfig())
    assert compressed.used_bytes() == 0
    status = decompress_pages(compressed, pages, torch.empty(0, dtype=torch.long))
    assert status.numel() == 0


def test_pages_inside_a_larger_kv_tensor():
    # A (2, num_blocks, block, heads, dim) cache: K pages are rows of kv[0] viewed 2-D.
    kv = torch.randn(2, 5, 16, 2, 8).to(torch.bfloat16)
    k_pages = kv[0].reshape(5, -1)
    compressed = compress_pages(k_pages, [4, 1], CodecConfig(1e-2, True, CodecMode.PLAIN, 16))
    restored = torch.zeros_like(kv)
    decompress_pages(compressed, restored[1].view(5, -1), [0, 3])
    bound = requested_bound(k_pages[[4, 1]], CodecConfig())
    err = (restored[1].view(5, -1)[[0, 3]].double() - k_pages[[4, 1]].double()).abs().amax(1)
    assert (err <= bound).all()
    assert (restored[0] == 0).all()


@pytest.mark.parametrize("bad,exc,match", [
    (dict(pages=torch.zeros(2, 8, dtype=torch.float64)), TypeError, "float16, bfloat16 or float32"),
    (dict(pages=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "float16, bfloat16 or float32"),
    (dict(pages=torch.zeros(16)), ValueError, "2-D"),
    (dict(pages=torch.zeros(8, 4).t()), ValueError, "contiguous"),
    (dict(pages=torch.zeros(2, 0)), ValueError, "between 1 and"),
    (dict(ids=torch.tensor([0.5])), TypeError, "integers"),
    (dict(rows=3), ValueError, "divide"),
])
def test_bad_arguments_raise(bad, exc, match):
    pages = bad.get("pages", torch.zeros(2, 8))
    ids = bad.get("ids", torch.tensor([0, 1]))
    config = CodecConfig(rows=bad.get("rows", 1))
    with pytest.raises(exc, match=match):
        compress_pages(pages, ids, config)


@pytest.mark.parametrize("eb", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_error_bound(eb):
    with pytest.raises(ValueError, match="error_bound"):
        CodecConfig(error_bound=eb)
    with pytest.raises(ValueError, match="error bound"):
        torch.ops.kvcompress.compress([torch.zeros(1, 8)], torch.tensor([0]), eb, True, 1, 1,
                                      torch.empty(64, dtype=torch.uint8),
                                      torch.empty(1, 3, dtype=torch.long))


def test_bad_mode_and_small_output():
    with pytest.raises(ValueError, match="mode"):
        CodecConfig(mode=7)
    pages = torch.zeros(2, 64)
    small = torch.empty(compress_bound(2, 64, torch.float32) - 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="compress_bound"):
        compress_pages(pages, [0, 1], CodecConfig(), out=small)
    with pytest.raises(ValueError, match="mode"):
        torch.ops.kvcompress.compress([pages], torch.tensor([0]), 0.1, True, 3, 1,
                                      torch.empty(1024, dtype=torch.uint8),
                                      torch.empty(1, 3, dtype=torch.long))


def test_ops_pass_opcheck():
    pages = torch.randn(3, 64).to(torch.bfloat16)
    ids = torch.tensor([2, 0])
    out = torch.empty(compress_bound(2, 64, torch.bfloat16), dtype=torch.uint8)
    table = torch.empty(2, 3, dtype=torch.long)
    torch.library.opcheck(torch.ops.kvcompress.compress.default,
                          ([pages], ids, 1e-2, True, 1, 1, out, table))
    status = torch.empty(2, dtype=torch.int32)
    dst = torch.empty_like(pages)
    torch.library.opcheck(torch.ops.kvcompress.decompress.default,
                          (out, table, [dst], ids, status))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_damaged_streams_get_the_reference_status(dtype):
    """Random multi-byte damage: the C++ decoder and the reference agree page by page."""
    g = torch.Generator().manual_seed(11)
    pages = (torch.randn(6, 320, generator=g).cumsum(1)).to(dtype)
    rng = np.random.default_rng(12)
    for mode in MODES:
        compressed = compress_pages(pages, range(6), CodecConfig(1e-2, True, mode, 8))
        used = compressed.used_bytes()
        for _ in range(40):
            buf = compressed.buffer[:used].clone()
            where = torch.from_numpy(rng.integers(0, used, size=int(rng.integers(1, 4))))
            buf[where] ^= torch.from_numpy(rng.integers(1, 256, size=where.numel()).astype(np.uint8))
            dst = torch.zeros_like(pages)
            status = decompress_pages(CompressedPages(buf, compressed.table), dst, range(6))
            raw = bytes(buf.numpy())
            for i in range(6):
                ref_status, ref_page = ref.decode_record(raw, int(compressed.table[i, 0]),
                                                         int(compressed.table[i, 1]),
                                                         DTYPES[dtype], 320)
                assert int(status[i]) == ref_status
                if ref_status == 0:
                    mine = dst[i].view(torch.int16).numpy().view(np.uint16) \
                        if dtype == torch.bfloat16 else dst[i].numpy()
                    assert np.array_equal(mine, ref_page)


def test_overflowing_step_is_stored_raw():
    """An absolute bound near float32's maximum makes the step infinite: never store it."""
    pages = torch.randn(2, 64)
    compressed = compress_pages(pages, [0, 1], CodecConfig(3e38, False, CodecMode.PLAIN, 1))
    assert (compressed.table[:, 2] == CompressStatus.RAW_BOUND_UNATTAINABLE).all()
    out = torch.empty_like(pages)
    assert (decompress_pages(compressed, out, [0, 1]) == DecodeStatus.OK).all()
    assert torch.equal(out, pages)


def views_of(num_views: int, pages: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Page views of one shape in separate allocations, like vLLM's per-layer caches."""
    g = torch.Generator().manual_seed(num_views)
    return [(torch.randn(pages, n, generator=g).cumsum(1) * (v + 1)).to(dtype)
            for v in range(num_views)]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_many_views_in_one_call_code_each_page_as_alone(dtype):
    """Page id i names page i % P of view i // P; each record is the one the page
    gets when compressed on its own, and decoding scatters across views."""
    views = views_of(3, 4, 256, dtype)
    ids = torch.tensor([9, 0, 4, 11, 6])
    config = CodecConfig(1e-2, True, CodecMode.PLAIN, 1)
    batch = compress_pages(views, ids, config)
    for row, i in enumerate(ids.tolist()):
        alone = compress_pages(views[i // 4], [i % 4], config)
        off, size = batch.table[row, :2].tolist()
        assert torch.equal(batch.buffer[off:off + size], alone.buffer[:size])
    dst = [torch.zeros_like(v) for v in views]
    targets = torch.tensor([1, 2, 8, 7, 10])
    assert (decompress_pages(batch, dst, targets) == DecodeStatus.OK).all()
    restored = torch.cat(dst)
    expected = torch.zeros_like(restored)
    single = torch.zeros(5, 256, dtype=dtype)
    decompress_pages(batch, single, torch.arange(5))
    expected[targets] = single
    assert torch.equal(restored, expected)


def test_page_ids_beyond_every_view_are_reported():
    views = views_of(2, 3, 64, torch.bfloat16)
    batch = compress_pages(views, torch.tensor([5, 6, -1]), CodecConfig())
    assert batch.table[:, 2].tolist() == [CompressStatus.COMPRESSED,
                                          CompressStatus.BAD_SOURCE_INDEX,
                                          CompressStatus.BAD_SOURCE_INDEX]
    dst = [torch.zeros_like(v) for v in views]
    status = decompress_pages(compress_pages(views, [0, 1], CodecConfig()), dst,
                              torch.tensor([6, 5]))
    assert status.tolist() == [DecodeStatus.BAD_INDEX, DecodeStatus.OK]


@pytest.mark.parametrize("other", [
    torch.zeros(3, 32, dtype=torch.bfloat16),
    torch.zeros(4, 64, dtype=torch.bfloat16),
    torch.zeros(3, 64, dtype=torch.float16),
    torch.zeros(3, 80, dtype=torch.bfloat16)[:, :64],
])
def test_views_of_another_shape_dtype_or_stride_are_refused(other):
    views = [torch.zeros(3, 64, dtype=torch.bfloat16), other]
    with pytest.raises((ValueError, TypeError), match="must share"):
        compress_pages(views, [0], CodecConfig())
    with pytest.raises((ValueError, TypeError), match="must share"):
        decompress_pages(compress_pages(views[0], [0], CodecConfig()), views, [0])


def test_view_count_is_bounded():
    from vllm_kvcompress.codec import MAX_VIEWS

    views = views_of(1, 1, 8, torch.float32) * (MAX_VIEWS + 1)
    with pytest.raises(ValueError, match="page views"):
        compress_pages(views, [0], CodecConfig())
    with pytest.raises(ValueError, match="page views"):
        torch.ops.kvcompress.compress(views, torch.tensor([0]), 0.1, True, 1, 1,
                                      torch.empty(1024, dtype=torch.uint8),
                                      torch.empty(1, 3, dtype=torch.long))
