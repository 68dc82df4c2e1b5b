"""The CUDA kernels against the CPU kernels: byte-identical streams, same decodes.

Runs on the GPU host (benchmarks/run_gpu_host.sh); skipped where CUDA is absent.
"""

import struct

import pytest
import torch

from tests.kernels import reference_codec as ref
from vllm_kvcompress.codec import (CodecConfig, CodecMode, CompressedPages, DecodeStatus,
                                   compress_pages, decompress_pages)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# The CTA sizes (warps) the kernels are built for, forced through KVCOMPRESS_CODEC_WARPS;
# the other tests run the size each launch chooses for its pages.
CTA_WARPS = [2, 4, 8]
CODEC_WARPS = "KVCOMPRESS_CODEC_WARPS"


def kv_like(num_pages: int, tokens: int, channels: int, dtype: torch.dtype,
            seed: int) -> torch.Tensor:
    """Pages smooth along tokens with per-channel scales and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(channels, generator=g) * 2 + 0.1
    scale[torch.randint(channels, (4,), generator=g)] *= 20
    walk = torch.randn(num_pages, tokens, channels, generator=g).cumsum(1) * 0.1
    base = torch.randn(num_pages, 1, channels, generator=g)
    return ((base + walk) * scale).reshape(num_pages, -1).to(dtype)


def adversarial(num_pages: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Constant, spiky, alternating, non-finite and white-noise pages."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_pages, n, generator=g) * 3
    x[0] = 0
    x[1] = 7.25
    x[2, ::2], x[2, 1::2] = 1e3, -1e3
    x[3, 17] = 5e4 if dtype != torch.float16 else 6e4
    x[4, 5] = float("nan")
    x[5, 9] = float("inf")
    x[6] = torch.rand(n, generator=g) * 1e-3
    return x.to(dtype)


def in_memory_order(stream: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Pages in `dtype` whose values, read in the codec's stream order for `rows`,
    are the rows of `stream` (float64)."""
    pages = torch.empty_like(stream)
    pages[:, torch.from_numpy(ref.stream_index(stream.shape[1], rows))] = stream
    return pages.to(dtype)


def mixed_widths(num_pages: int, n: int, rows: int, dtype: torch.dtype, eb: float,
                 seed: int) -> torch.Tensor:
    """Pages whose 32-value blocks, in stream order, each have their own amplitude,
    from zero to 2^19 (fp32), 2^9 (fp16) or 2^6 (bf16) times the absolute bound
    `eb`: at that bound the blocks' widths range from 0 to about 20, drawn per block
    so that the kernels' groups of four blocks mix every case they code differently
    (all widths at most 7, some from 8 to 15, some above 15, all-zero blocks)."""
    g = torch.Generator().manual_seed(seed)
    top = {torch.float32: 19, torch.float16: 9, torch.bfloat16: 6}[dtype]
    blocks = -(-n // 32)
    bits = torch.randint(top + 1, (num_pages, blocks), generator=g).double()
    amp = torch.where(bits < 1, 0.0, 2.0 ** bits * eb)
    stream = (torch.rand(num_pages, blocks, 32, generator=g, dtype=torch.float64) * 2 - 1)
    stream = (stream * amp[:, :, None]).reshape(num_pages, -1)[:, :n]
    return in_memory_order(stream, rows, dtype)


def constant_blocks(num_pages: int, n: int, rows: int, dtype: torch.dtype, eb: float,
                    seed: int) -> torch.Tensor:
    """Pages whose 32-value blocks, in stream order, each hold one value, a multiple
    of `eb` up to the amplitudes of mixed_widths (a quarter of the blocks zero): in
    outlier mode every block has width 0 and an outlier of 0 to 3 bytes, in plain
    mode only its first residual is nonzero, in fixed mode all 32 are equal."""
    g = torch.Generator().manual_seed(seed)
    top = {torch.float32: 19, torch.float16: 9, torch.bfloat16: 6}[dtype]
    blocks = -(-n // 32)
    level = torch.randint(-2 ** top, 2 ** top + 1, (num_pages, blocks, 1), generator=g)
    level[torch.rand(num_pages, blocks, 1, generator=g) < 0.25] = 0
    stream = (level.double() * eb).expand(-1, -1, 32).reshape(num_pages, -1)[:, :n]
    return in_memory_order(stream, rows, dtype)


def runs_of_32(num_pages: int, n: int, rows: int, dtype: torch.dtype, eb: float,
               seed: int) -> torch.Tensor:
    """Pages whose runs of 32 blocks (stream order, the runs the decoder's lanes take a
    block each) are, drawn per run, all narrow (amplitudes up to 2^4 times the absolute
    bound `eb`: widths at most 7 in every mode, one lane a block), all zero, or narrow
    but for one block of alternating signs at the widest amplitude the dtype allows
    (2^19, 2^9, 2^7 times `eb` for fp32, fp16, bf16: widths over 7 in most modes, the
    whole run decoded a group of four blocks at a time)."""
    g = torch.Generator().manual_seed(seed)
    top = {torch.float32: 19, torch.float16: 9, torch.bfloat16: 7}[dtype]
    runs = -(-n // (32 * 32))
    bits = torch.randint(5, (num_pages, runs, 32), generator=g).double()
    amp = torch.where(bits < 1, 0.0, 2.0 ** bits * eb)
    kind = torch.randint(3, (num_pages, runs), generator=g)
    amp[kind == 1] = 0.0
    stream = torch.rand(num_pages, runs, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    stream = stream * amp[..., None]
    wide = torch.randint(32, (num_pages, runs), generator=g)
    signs = torch.tensor([1.0, -1.0]).repeat(16)
    for p, r in (kind == 2).nonzero().tolist():
        stream[p, r, wide[p, r]] = signs * (2.0 ** top * eb) * (0.75 + 0.25 * torch.rand(
            32, generator=g, dtype=torch.float64))
    stream = stream.reshape(num_pages, -1)[:, :n]
    return in_memory_order(stream, rows, dtype)


def both_devices(pages: torch.Tensor, ids: torch.Tensor,
                 config: CodecConfig) -> tuple[CompressedPages, CompressedPages]:
    cpu = compress_pages(pages, ids, config)
    gpu = compress_pages(pages.cuda(), ids.cuda(), config)
    torch.cuda.synchronize()
    return cpu, gpu


def assert_same_stream(cpu: CompressedPages, gpu: CompressedPages) -> None:
    assert torch.equal(cpu.table, gpu.table.cpu())
    used = cpu.used_bytes()
    assert used == gpu.used_bytes()
    assert torch.equal(cpu.buffer[:used], gpu.buffer[:used].cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("relative,eb", [(True, 1e-2), (True, 1e-3), (False, 0.05)])
def test_byte_identical_to_cpu(dtype, mode, rows, relative, eb):
    pages = torch.cat([kv_like(24, 16, 256, dtype, seed=1), adversarial(8, 16 * 256, dtype, 2)])
    ids = torch.randperm(pages.shape[0], generator=torch.Generator().manual_seed(3))
    cpu, gpu = both_devices(pages, ids, CodecConfig(eb, relative, mode, rows))
    assert_same_stream(cpu, gpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 31, 33, 1000, 6144])
def test_odd_page_sizes_and_unaligned_rows(dtype, n):
    base = torch.randn(9, n + 3).to(dtype)
    pages = base[:, 1:n + 1]  # rows not 16-byte aligned
    ids = torch.tensor([8, 0, 3, 3, 5])
    cpu, gpu = both_devices(pages, ids, CodecConfig(1e-2, True, CodecMode.OUTLIER, 1))
    assert_same_stream(cpu, gpu)
    dst = torch.full((5, n), -1.0, dtype=dtype, device="cuda")
    status = decompress_pages(gpu, dst, torch.arange(5))
    assert (status == DecodeStatus.OK).all()
    dst_cpu = torch.full((5, n), -1.0, dtype=dtype)
    decompress_pages(cpu, dst_cpu, torch.arange(5))
    assert torch.equal(dst.cpu(), dst_cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("n,rows", [(421, 1), (288, 3), (288, 9), (229, 1), (480, 5),
                                    (544, 17)])
@pytest.mark.parametrize("aligned", [True, False])
def test_block_counts_that_split_unevenly_over_warps(dtype, mode, n, rows, aligned):
    """Pages whose count of 32-value blocks is not a multiple of the CTA's warps
    (14, 9, 8, 15, 17 blocks), with partial last blocks and rows > 1: every warp's
    share of a page, and the page's tail, must code as on the CPU."""
    base = kv_like(6, 1, n + 1, dtype, seed=n + rows).reshape(6, -1)
    pages = base[:, :n].contiguous() if aligned else base[:, 1:n + 1]
    ids = torch.tensor([5, 0, 2, 4])
    cpu, gpu = both_devices(pages, ids, CodecConfig(1e-2, True, mode, rows))
    assert_same_stream(cpu, gpu)
    dst = torch.zeros(4, n, dtype=dtype, device="cuda")
    assert (decompress_pages(gpu, dst, torch.arange(4)) == DecodeStatus.OK).all()
    dst_cpu = torch.zeros(4, n, dtype=dtype)
    decompress_pages(cpu, dst_cpu, torch.arange(4))
    assert torch.equal(dst.cpu(), dst_cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("tokens,channels,rows", [(16, 1024, 16), (16, 1024, 1), (16, 46, 16),
                                                  (48, 96, 48), (5, 96, 5)])
def test_decode_matches_cpu_in_every_mode(dtype, mode, tokens, channels, rows):
    """The decoder's block loop in each mode: every warp decodes a run of groups of
    four blocks and fetches the next group ahead, past the last block too (23 and 15
    blocks end in a group with padding blocks); rows dividing a block's 32 positions
    (1, 16) take a loop whose cursor never wraps, rows 48 and 5 the one that does.
    Full-size KV pages (16 x 1024) and raw pages among them, decoded into scattered
    pages."""
    pages = torch.cat([kv_like(9, tokens, channels, dtype, seed=tokens + channels),
                       adversarial(7, tokens * channels, dtype, seed=rows)])
    ids = torch.randperm(16, generator=torch.Generator().manual_seed(rows))
    cpu, gpu = both_devices(pages, ids, CodecConfig(1e-2, True, mode, rows))
    assert_same_stream(cpu, gpu)
    targets = torch.randperm(16, generator=torch.Generator().manual_seed(channels))
    expected = torch.zeros_like(pages)
    assert (decompress_pages(cpu, expected, targets) == DecodeStatus.OK).all()
    dst = torch.zeros_like(pages).cuda()
    assert (decompress_pages(gpu, dst, targets.cuda()) == DecodeStatus.OK).all()
    # Bit equality: the raw pages carry NaN, which compares unequal to itself.
    assert torch.equal(dst.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("n,rows", [(16384, 16), (16384, 1), (1056, 3), (2245, 1), (4608, 48)])
def test_groups_of_every_width_class_match_cpu(dtype, mode, n, rows):
    """Both kernels code four blocks at a time: one bit transpose for a group whose
    widths are all at most 7, one per pair for widths up to 15, one per block above.
    Pages with every mix of those in a group, all-zero blocks, a last group with one
    to three padding blocks (1056 and 2245 values: 33 and 71 blocks), rows that
    divide 32 and rows that do not (3, 48): the same stream as the CPU kernels and
    the same decode, bit for bit."""
    pages = mixed_widths(12, n, rows, dtype, eb=0.01, seed=n + rows)
    ids = torch.randperm(12, generator=torch.Generator().manual_seed(rows))
    cpu, gpu = both_devices(pages, ids, CodecConfig(0.01, False, mode, rows))
    assert_same_stream(cpu, gpu)
    assert (cpu.table[:, 2] == 0).sum() >= 6  # mostly compressed, not raw
    expected = torch.zeros_like(pages)
    assert (decompress_pages(cpu, expected, torch.arange(12)) == DecodeStatus.OK).all()
    dst = torch.zeros_like(pages).cuda()
    assert (decompress_pages(gpu, dst, torch.arange(12, device="cuda")) == DecodeStatus.OK).all()
    assert torch.equal(dst.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("n,rows", [(9600, 1), (9616, 1), (16 * 600, 16), (16 * 601, 16),
                                    (16 * 75, 16), (9600, 48)])
@pytest.mark.parametrize("aligned", [True, False])
def test_lane_coded_blocks_match_cpu(dtype, mode, n, rows, aligned):
    """Compression codes each block in one lane, 32 blocks a warp at a time, and
    sends blocks wider than 7 to a path the whole warp codes: rounds of 32 that mix
    narrow, wide and all-zero blocks, runs that end in a partial round (300 blocks:
    runs of 36 and 40), a last block with padding (9616 values, and 16 x 601 or
    16 x 75, whose last block is half a column pair), blocks of one value (outlier
    mode: width 0 and outlier bytes only). Each way a lane finds its block: memory
    order (rows 1), column pairs whose rows are padded in shared memory (aligned
    rows 16 of 600 columns) or not (unaligned views; fp32 also with 601 columns), and
    value by value (16-bit values with an odd row pitch, rows 48). Byte-identical
    streams and bit-identical decodes against the CPU kernels. The fp32 pages of
    mixed_widths, clipped to +-2.4, give every dtype blocks wider than 7 (bf16's own
    mixed_widths pages have none)."""
    wide = mixed_widths(2, n, rows, torch.float32, eb=0.01, seed=n).clamp(-2.4, 2.4)
    pages = torch.cat([mixed_widths(6, n, rows, dtype, eb=0.01, seed=n + rows),
                       constant_blocks(4, n, rows, dtype, eb=0.01, seed=n - rows),
                       wide.to(dtype)])
    if not aligned:
        pages = torch.cat([pages[:, :1], pages], 1)[:, 1:]
    ids = torch.randperm(12, generator=torch.Generator().manual_seed(n))
    cpu, gpu = both_devices(pages, ids, CodecConfig(0.01, False, mode, rows))
    assert_same_stream(cpu, gpu)
    assert (cpu.table[:, 2] == 0).sum() >= 8
    expected = torch.zeros_like(pages)
    assert (decompress_pages(cpu, expected, torch.arange(12)) == DecodeStatus.OK).all()
    dst = torch.zeros_like(pages).cuda()
    assert (decompress_pages(gpu, dst, torch.arange(12, device="cuda")) == DecodeStatus.OK).all()
    assert torch.equal(dst.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("n,rows", [(9616, 1), (9600, 1), (16 * 601, 16), (4608, 48)])
def test_checksums_split_around_the_look_back_match_cpu(dtype, mode, n, rows):
    """Compression hashes a record's widths and the plane words pass 1 kept before
    its look-back's wait, the words of the blocks it codes again (a last block with
    padding, other row counts) and of blocks wider than 7 as it stores them, and the
    outlier section as it copies it out: pages that hold all of these at once (thirds
    of narrow, wide and one-value blocks), among RAW pages and bad source indices in
    one launch. Byte-identical streams (the checksum among them) and GPU decodes that
    pass their checksum."""
    third = n // 3
    narrow = mixed_widths(4, n, rows, dtype, eb=0.01, seed=n + 1)
    wide = mixed_widths(4, n, rows, torch.float32, eb=0.01, seed=n + 2).clamp(-2.4, 2.4)
    single = constant_blocks(4, n, rows, dtype, eb=0.01, seed=n + 3)
    pages = torch.cat([narrow[:, :third], wide.to(dtype)[:, third:2 * third],
                       single[:, 2 * third:]], 1)
    pages = torch.cat([pages, adversarial(8, n, dtype, seed=n + 4)[4:6]])  # NaN, Inf: RAW
    ids = torch.tensor([0, 4, 1, -1, 2, 5, 3])
    cpu, gpu = both_devices(pages, ids, CodecConfig(0.01, False, mode, rows))
    assert_same_stream(cpu, gpu)
    ok = cpu.table[:, 2] == 0
    assert ok.sum() >= 4
    dst = torch.zeros(ids.numel(), n, dtype=dtype).cuda()
    status = decompress_pages(gpu, dst, torch.arange(ids.numel(), device="cuda"))
    assert (status.cpu()[ids >= 0] == DecodeStatus.OK).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("n,rows", [(16384, 1), (16384, 16), (2272, 1), (2272, 16), (16390, 1),
                                    (16400, 16), (1024, 1), (1024, 16)])
def test_lane_per_block_runs_match_cpu(dtype, mode, n, rows):
    """The decoder's lane-per-block path (rows 1 and 16) beside the warp path it leaves
    runs of 32 blocks to: runs all narrow, all zero, or with one wide block
    (runs_of_32); a last run that ends before the last lane (2272 values: 71 blocks,
    the lanes past them store nothing); a partial last block in rows 1 (16390) and, for
    fp32, in rows 16 with an odd row length (16400: 16-bit pages of that shape go
    through the warp path); a page of one run (1024: one warp decodes, the CTA's
    others have no blocks). Destinations 16-byte aligned and not (the copy-out of the
    staged page stores 16 bytes at a time or one value at a time): bit-identical to
    the CPU decoder, and nothing written outside the pages."""
    pages = runs_of_32(6, n, rows, dtype, 0.01, seed=n + rows)
    ids = torch.tensor([4, 0, 5, 2, 1, 3])
    cpu, gpu = both_devices(pages, ids, CodecConfig(0.01, False, mode, rows))
    assert_same_stream(cpu, gpu)
    expected = torch.zeros(6, n, dtype=dtype)
    assert (decompress_pages(cpu, expected, torch.arange(6)) == DecodeStatus.OK).all()
    for offset in (0, 1):
        # Row stride n + 8 elements: at offset 0 every page is 16-byte aligned when that
        # stride is a multiple of 16 bytes, otherwise only some are (16390 values).
        full = torch.full((6, n + 8), 3.0, dtype=dtype, device="cuda")
        dst = full[:, offset:offset + n]
        status = decompress_pages(gpu, dst, torch.arange(6, device="cuda"))
        assert (status == DecodeStatus.OK).all()
        got = dst.cpu().contiguous()
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), offset
        outside = torch.cat([full[:, :offset], full[:, offset + n:]], 1)
        assert (outside == 3.0).all(), offset


def lane_and_warp_runs(pages: CompressedPages, page: int) -> tuple[int, int]:
    """How many of a compressed page's runs of 32 blocks the rows-1 and rows-16
    decoder gives a lane a block (every width at most 7, no partial last block) and
    how many it leaves to the warp path."""
    offset = int(pages.table[page, 0])
    header = ref.parse_header(bytes(pages.buffer[offset:offset + ref.HEADER_BYTES].tolist()))
    n, blocks = header["n"], -(-header["n"] // 32)
    widths = pages.buffer[offset + ref.HEADER_BYTES:offset + ref.HEADER_BYTES + blocks] & 31
    lane = warp = 0
    for j0 in range(0, blocks, 32):
        run = widths[j0:j0 + 32]
        partial = n % 32 != 0 and j0 + len(run) == blocks
        if partial or int(run.max()) > 7:
            warp += 1
        else:
            lane += 1
    return lane, warp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("n", [16384, 16390, 2272])
def test_staged_rows_1_pages_land_among_untouched_pages(dtype, mode, n):
    """Rows 1 pages are staged in shared memory (runs of 32 blocks a lane a block, in
    a lane-dependent chunk order, beside runs left to the warp path) and copied out
    by the whole CTA. Pages that mix both kinds of run (checked on the CPU stream),
    a partial last block (16390 values, whose byte count is not a multiple of 16: the
    copy-out's value-by-value tail) and a last run that ends before the last lane
    (2272), decoded into scattered pages of a larger destination, 16-byte aligned
    (all pages at 16384 values, some at 16390) and not: bit-identical to the CPU
    decoder, every other page and the gaps between pages untouched."""
    pages = runs_of_32(6, n, 1, dtype, 0.01, seed=n + 5)
    ids = torch.tensor([3, 1, 5, 0, 4, 2])
    cpu, gpu = both_devices(pages, ids, CodecConfig(0.01, False, mode, 1))
    assert_same_stream(cpu, gpu)
    runs = [lane_and_warp_runs(cpu, p) for p in range(6) if int(cpu.table[p, 2]) == 0]
    assert any(lane > 0 and warp > 0 for lane, warp in runs)
    targets = torch.tensor([9, 2, 14, 5, 11, 0])
    expected = torch.full((16, n), 3.0, dtype=dtype)
    assert (decompress_pages(cpu, expected, targets) == DecodeStatus.OK).all()
    for offset in (0, 1):
        full = torch.full((16, n + 8), 3.0, dtype=dtype, device="cuda")
        dst = full[:, offset:offset + n]
        status = decompress_pages(gpu, dst, targets.cuda())
        assert (status == DecodeStatus.OK).all()
        got = dst.cpu().contiguous()
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), offset
        outside = torch.cat([full[:, :offset], full[:, offset + n:]], 1)
        assert (outside == 3.0).all(), offset

def narrow_with_spike(num_pages: int, n: int, seed: int) -> torch.Tensor:
    """fp32 pages whose groups are all narrow at an absolute bound of 1, so that
    compression keeps their plane words in the staged page in place of values: odd
    pages of values up to 50 (step 2, residuals up to 50), even pages of values up
    to 0.05 and one value of 2^21 - 2^10 near the end. That value leaves the bound
    attainable (step about 1e-3, residuals up to 100) but its quantised magnitude
    exceeds 2^22, so an even page goes RAW only after the first coding pass."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.rand(num_pages, n, generator=g) * 2 - 1
    pages[1::2] *= 50
    pages[::2] *= 0.05
    pages[::2, n - 1 - n // 7] = 2.0 ** 21 - 2.0 ** 10
    return pages


@pytest.mark.parametrize("warps", CTA_WARPS)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("n,rows,aligned", [(4096, 1, True), (4096, 1, False), (4096, 16, True),
                                            (1056, 3, True), (2245, 1, False)])
def test_raw_pages_after_kept_plane_words_match_cpu(warps, mode, n, rows, aligned, monkeypatch):
    """A page that goes RAW after pass 1 kept plane words in its staged copy (fixed
    and plain modes) must still store its values: copied from the source page
    (aligned, padded in shared memory or not) or staged again (unaligned rows), by
    CTAs of every size. Compressed pages of the same launch keep using the kept words;
    outlier mode, which keeps none, is the control. Byte-identical to the CPU kernels."""
    monkeypatch.setenv(CODEC_WARPS, str(warps))
    pages = narrow_with_spike(12, n, seed=n + rows)
    if not aligned:
        pages = torch.cat([pages[:, :1], pages], 1)[:, 1:]
    ids = torch.randperm(12, generator=torch.Generator().manual_seed(n))
    cpu, gpu = both_devices(pages, ids, CodecConfig(1.0, False, mode, rows))
    assert_same_stream(cpu, gpu)
    reasons = cpu.table[:, 2]
    assert (reasons == 2).sum() == 6 and (reasons == 0).sum() == 6
    expected = torch.zeros(12, n)
    assert (decompress_pages(cpu, expected, torch.arange(12)) == DecodeStatus.OK).all()
    dst = torch.zeros(12, n, device="cuda")
    assert (decompress_pages(gpu, dst, torch.arange(12, device="cuda")) == DecodeStatus.OK).all()
    assert torch.equal(dst.cpu(), expected)


FORGED_KINDS = ["padding", "permuted", "too_wide", "bit7", "outlier_bytes", "wider", "shorter"]


def forge(pages: CompressedPages, page: int, kind: str, g: torch.Generator) -> None:
    """Damages the width section (or payload_len) of one compressed record of a CPU
    batch in place, then signs it again with a valid checksum, so that the damage
    reaches the decoder's width and section-length checks (docs/format.md,
    "Decoding") instead of stopping at BAD_CHECKSUM."""
    offset = int(pages.table[page, 0])
    rec = pages.buffer[offset:offset + int(pages.table[page, 1])]
    header = ref.parse_header(bytes(rec[:ref.HEADER_BYTES].tolist()))
    blocks = -(-header["n"] // 32)
    widths = rec[ref.HEADER_BYTES:ref.HEADER_BYTES + blocks]
    narrower = (widths & 31 < 24).nonzero().flatten()
    at = int(narrower[torch.randint(len(narrower), (1,), generator=g)])
    if kind == "padding":  # the width section's zero padding is not checked
        rec[ref.HEADER_BYTES + blocks:ref.HEADER_BYTES + -(-blocks // 4) * 4] = 0xA5
    elif kind == "permuted":  # the same section lengths, blocks in other places
        widths.copy_(widths[torch.randperm(blocks, generator=g)])
    elif kind == "too_wide":
        widths[at] = (widths[at] & 0x60) | int(torch.randint(25, 32, (1,), generator=g))
    elif kind == "bit7":
        widths[at] |= 0x80
    elif kind == "outlier_bytes":
        widths[at] |= 0x20
    elif kind == "wider":  # one more plane word than the payload holds
        widths[at] = (widths[at] & 0x60) | min(int(widths[at] & 31) + 1, 24)
    elif kind == "shorter":
        header["payload_len"] -= 4
    rec[24:28] = torch.tensor(list(struct.pack("<I", header["payload_len"])),
                                  dtype=torch.uint8)
    payload = bytes(rec[ref.HEADER_BYTES:ref.HEADER_BYTES + header["payload_len"]].tolist())
    check = ref.checksum(bytes(rec[:28].tolist()), payload)
    rec[28:32] = torch.tensor(list(struct.pack("<I", check)), dtype=torch.uint8)


def decode_forged_batch(mode: CodecMode, kinds: list[str], dtype: torch.dtype, n: int,
                        rows: int, g: torch.Generator):
    """Eight pages of mixed widths (a zero page and a half-zero one among them),
    compressed on the CPU, page i's record forged as kinds[i] where it is not RAW,
    then decoded by both devices into pages of 3.0. Returns the CPU stream, the GPU
    and CPU statuses, and the GPU and CPU destinations (both on the CPU)."""
    pages = mixed_widths(8, n, rows, dtype, 0.01, seed=n)
    pages[6] = 0
    pages[7, : n // 2] = 0
    ids = torch.arange(8)
    cpu = compress_pages(pages, ids, CodecConfig(0.01, False, mode, rows))
    for page, kind in enumerate(kinds):
        if int(cpu.table[page, 2]) == 0:
            forge(cpu, page, kind, g)
    expected = torch.full_like(pages, 3.0)
    status_cpu = decompress_pages(cpu, expected, ids)
    gpu = CompressedPages(cpu.buffer.cuda(), cpu.table.cuda())
    dst = torch.full_like(pages, 3.0).cuda()
    status = decompress_pages(gpu, dst, ids.cuda()).cpu()
    return cpu, status, status_cpu, dst.cpu(), expected


@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("kind", FORGED_KINDS)
@pytest.mark.parametrize("dtype,n,rows", [(torch.bfloat16, 16384, 16), (torch.float32, 2245, 1),
                                          (torch.float16, 1056, 3), (torch.float32, 100, 1),
                                          (torch.bfloat16, 16384, 1)])
def test_forged_width_sections_match_cpu(mode, kind, dtype, n, rows):
    """Records with valid checksums whose width bytes or payload length were forged:
    the decoder parses the width bytes from the checksum pass's registers (thread t
    holds blocks 16t .. 16t + 15), checks them, and gives each warp the first plane
    word and outlier byte of its run from the counts of the blocks before it. Every
    status and every decoded bit must match the CPU decoder: malformed widths,
    section lengths that do not add up, nonzero padding after the last width byte
    (ignored), and width bytes moved between blocks (valid lengths, so the page
    decodes, from offsets only a correct count finds). Pages of 512, 71, 33 and 4
    blocks; zero pages among them have payloads shorter than one 16-byte vector. The
    bf16 pages of 512 narrow blocks are decoded a lane a block, staged in column pairs
    (rows 16) and in memory order (rows 1)."""
    cpu, status, status_cpu, dst, expected = decode_forged_batch(
        mode, [kind] * 8, dtype, n, rows, torch.Generator().manual_seed(n + rows))
    assert torch.equal(status, status_cpu)
    if kind in ("too_wide", "bit7", "wider", "shorter"):
        assert (status[cpu.table[:, 2] == 0] == DecodeStatus.MALFORMED).all()
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, 3, 8, 32, 48, 96, 6144])
@pytest.mark.parametrize("aligned", [True, False])
def test_every_stream_order_and_alignment_matches_cpu(dtype, rows, aligned):
    """Rows padded in shared memory (aligned views whose rows are long enough) and
    not, divisors of every kind for the stream-order index, decoded into aligned and
    unaligned destinations: all byte-identical to the CPU kernels."""
    pages = kv_like(8, 96, 64, dtype, seed=rows)
    if not aligned:
        pages = torch.cat([pages[:, :1], pages], 1)[:, 1:]
    ids = torch.tensor([7, 0, 3, 5])
    config = CodecConfig(1e-2, True, CodecMode.PLAIN, rows)
    cpu, gpu = both_devices(pages, ids, config)
    assert_same_stream(cpu, gpu)
    expected = torch.zeros(4, pages.shape[1], dtype=dtype)
    assert (decompress_pages(cpu, expected, torch.arange(4)) == DecodeStatus.OK).all()
    for offset in (0, 1):
        # Row stride n + 8 keeps rows 16-byte aligned at offset 0, not at offset 1.
        dst = torch.zeros(4, pages.shape[1] + 8, dtype=dtype, device="cuda")[:, offset:]
        dst = dst[:, :pages.shape[1]]
        status = decompress_pages(gpu, dst, torch.arange(4, device="cuda"))
        assert (status == DecodeStatus.OK).all()
        assert torch.equal(dst.cpu(), expected), offset


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
def test_gpu_round_trip_within_bound(dtype, mode):
    pages = kv_like(64, 16, 512, dtype, seed=4).cuda()
    rel = 1e-2
    compressed = compress_pages(pages, torch.arange(64), CodecConfig(rel, True, mode, 16))
    dst = torch.empty_like(pages)
    scatter = torch.randperm(64, device="cuda")
    status = decompress_pages(compressed, dst, scatter)
    assert (status == DecodeStatus.OK).all()
    x = pages.double()
    bound = rel * (x.amax(1) - x.amin(1))
    err = (dst[scatter].double() - x).abs().amax(1)
    assert (err <= bound).all()


@pytest.mark.parametrize("warps", [0] + CTA_WARPS)
def test_gpu_detects_corruption_and_writes_nothing(warps, monkeypatch):
    """Damaged records and a destination out of range, decompressed by CTAs of the
    automatic size (0) and of each size."""
    monkeypatch.setenv(CODEC_WARPS, str(warps))
    pages = kv_like(16, 16, 256, torch.bfloat16, seed=5).cuda()
    compressed = compress_pages(pages, torch.arange(16), CodecConfig())
    table = compressed.table.cpu()
    buf = compressed.buffer.clone()
    flipped = int(table[3, 0]) + 40
    buf[flipped] ^= 0x10
    table_bad = table.clone()
    table_bad[5, 1] = 16  # truncated record
    table_bad[6, 0] += 16  # misaligned into the middle of a record
    damaged = CompressedPages(buf, table_bad.cuda())
    sentinel = torch.full_like(pages, 3.0)
    ids = torch.arange(16, device="cuda")
    ids[7] = 99  # destination out of range
    status = decompress_pages(damaged, sentinel, ids).cpu()
    assert status[3] == DecodeStatus.BAD_CHECKSUM
    assert status[5] == DecodeStatus.BAD_RECORD
    assert status[6] in (DecodeStatus.BAD_MAGIC, DecodeStatus.BAD_RECORD)
    assert status[7] == DecodeStatus.BAD_INDEX
    for i in (3, 5, 6):
        assert (sentinel[i] == 3.0).all()
    ok = [i for i in range(16) if i not in (3, 5, 6, 7)]
    assert (status[ok] == DecodeStatus.OK).all()


def test_gpu_wrong_dtype_is_a_mismatch():
    pages = kv_like(4, 16, 64, torch.float16, seed=6).cuda()
    compressed = compress_pages(pages, torch.arange(4), CodecConfig())
    dst = torch.zeros(4, pages.shape[1], dtype=torch.bfloat16, device="cuda")
    status = decompress_pages(compressed, dst, torch.arange(4))
    assert (status.cpu() == DecodeStatus.MISMATCH).all()
    assert (dst == 0).all()


def test_gpu_bad_source_index_stores_nothing():
    pages = kv_like(4, 16, 64, torch.float32, seed=7)
    ids = torch.tensor([0, 4, -1, 2])
    cpu, gpu = both_devices(pages, ids, CodecConfig())
    assert_same_stream(cpu, gpu)
    assert gpu.table[1, 1].item() == 0 and gpu.table[1, 2].item() == 4


@pytest.mark.parametrize("warps", CTA_WARPS)
@pytest.mark.parametrize("repeat", range(3))
def test_long_batches_place_every_record_like_the_cpu(repeat, warps, monkeypatch):
    """Thousands of small pages in one launch, so that thousands of CTAs run their
    look-back at once and most find only aggregates in their first windows of 32
    predecessors: every record's offset, as the CPU places them one after another.
    Records of several sizes (compressed, RAW, empty for a bad source index) make a
    wrong sum over a window show up as a shifted offset. CTAs of every size: the
    smaller, the more of them an SM runs at once."""
    monkeypatch.setenv(CODEC_WARPS, str(warps))
    g = torch.Generator().manual_seed(40 + repeat)
    pages = torch.cat([kv_like(2000, 4, 64, torch.bfloat16, seed=41 + repeat),
                       adversarial(400, 256, torch.bfloat16, seed=42 + repeat)])
    ids = torch.randint(pages.shape[0], (6000,), generator=g)
    ids[torch.randint(6000, (50,), generator=g)] = -1
    cpu, gpu = both_devices(pages, ids, CodecConfig(1e-2, True, CodecMode.PLAIN, 1))
    assert len(set(cpu.table[:, 1].tolist())) > 3
    assert_same_stream(cpu, gpu)


def test_runs_on_the_current_stream():
    pages = kv_like(32, 16, 256, torch.bfloat16, seed=8).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compressed = compress_pages(pages, torch.arange(32, device="cuda"), CodecConfig())
        dst = torch.empty_like(pages)
        status = decompress_pages(compressed, dst, torch.arange(32, device="cuda"))
    side.synchronize()
    assert (status == DecodeStatus.OK).all()


def test_compiles_under_torch_compile():
    pages = kv_like(8, 16, 64, torch.bfloat16, seed=9).cuda()
    ids = torch.arange(8, device="cuda")
    out = torch.empty(8 * 4096, dtype=torch.uint8, device="cuda")
    table = torch.empty(8, 3, dtype=torch.int64, device="cuda")

    @torch.compile(fullgraph=True)
    def store(p, i, o, t):
        torch.ops.kvcompress.compress([p], i, 1e-2, True, 1, 16, o, t)
        return t[:, 1].sum()

    total = store(pages, ids, out, table)
    reference = compress_pages(pages, ids, CodecConfig(1e-2, True, CodecMode.PLAIN, 16))
    assert total.item() == reference.table[:, 1].sum().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16])
def test_many_views_match_cpu(dtype, rows):
    """One launch over several separately allocated views (vLLM's per-layer caches):
    the same stream as the CPU kernels, decoded into the same pages of the views."""
    views = [kv_like(6, 16, 128, dtype, seed=20 + v) for v in range(5)]
    ids = torch.tensor([29, 0, 7, 14, 22, 5, 30, -1])
    config = CodecConfig(1e-2, True, CodecMode.OUTLIER, rows)
    cpu = compress_pages(views, ids, config)
    gpu = compress_pages([v.cuda() for v in views], ids.cuda(), config)
    assert_same_stream(cpu, gpu)
    targets = torch.tensor([3, 12, 27, 0, 18, 9, 24, 2])
    dst_cpu = [torch.zeros_like(v) for v in views]
    dst_gpu = [torch.zeros_like(v).cuda() for v in views]
    status_cpu = decompress_pages(cpu, dst_cpu, targets)
    status_gpu = decompress_pages(gpu, dst_gpu, targets.cuda())
    assert torch.equal(status_cpu, status_gpu.cpu())
    for a, b in zip(dst_cpu, dst_gpu):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("warps", CTA_WARPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("n,rows,aligned", [(9616, 1, True), (6144, 16, True),
                                            (16 * 601, 16, False), (4608, 48, True),
                                            (1000, 1, False)])
def test_every_cta_size_matches_cpu(warps, dtype, mode, n, rows, aligned, monkeypatch):
    """Both kernels with CTAs of each size (KVCOMPRESS_CODEC_WARPS), whatever size the
    pages would get: the per-page work that strides by the CTA's threads or loops over
    its warps (staging, padded or not, and its range reduction; the warps' runs of
    blocks; the checksums; the RAW copy; the decoder's checksum pass, which hands each
    thread 16 width bytes; the copy-out). Pages of narrow, wide, one-value and
    runs-of-32 blocks, a zero page and non-finite pages (RAW), a bad source index;
    rows 1 (a lane a block, a partial last block at 9616 values), rows 16 padded in
    shared memory (6144 values: 12 KiB in 16-bit types) and not (unaligned, a last
    block that is half a column pair), rows 48 (the decoder's warp path), an odd page
    size; decoded into scattered destination pages, aligned or not. Byte-identical
    streams and bit-identical decodes against the CPU kernels."""
    monkeypatch.setenv(CODEC_WARPS, str(warps))
    wide = mixed_widths(2, n, rows, torch.float32, eb=0.01, seed=n).clamp(-2.4, 2.4)
    pages = torch.cat([mixed_widths(3, n, rows, dtype, eb=0.01, seed=n + rows),
                       constant_blocks(2, n, rows, dtype, eb=0.01, seed=n - rows),
                       wide.to(dtype), runs_of_32(2, n, rows, dtype, 0.01, seed=n + 1),
                       adversarial(8, n, dtype, seed=n)[[0, 4, 5]]])
    if not aligned:
        pages = torch.cat([pages[:, :1], pages], 1)[:, 1:]
    ids = torch.randperm(12, generator=torch.Generator().manual_seed(n + warps))
    ids = torch.cat([ids[:5], torch.tensor([-1]), ids[5:]])
    cpu, gpu = both_devices(pages, ids, CodecConfig(0.01, False, mode, rows))
    assert_same_stream(cpu, gpu)
    assert (cpu.table[:, 2] == 0).sum() >= 8
    targets = torch.randperm(13, generator=torch.Generator().manual_seed(rows))
    expected = torch.full((13, n), 3.0, dtype=dtype)
    status_cpu = decompress_pages(cpu, expected, targets)
    offset = 0 if aligned else 1
    full = torch.full((13, n + 8), 3.0, dtype=dtype, device="cuda")
    dst = full[:, offset:offset + n]
    status = decompress_pages(gpu, dst, targets.cuda()).cpu()
    assert torch.equal(status, status_cpu)
    assert (status[ids >= 0] == DecodeStatus.OK).all()
    assert torch.equal(dst.cpu().contiguous().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("warps", CTA_WARPS)
@pytest.mark.parametrize("mode", list(CodecMode))
@pytest.mark.parametrize("dtype,n,rows", [(torch.bfloat16, 16384, 16), (torch.float32, 2245, 1),
                                          (torch.float16, 1056, 3), (torch.bfloat16, 16384, 1)])
def test_forged_width_sections_match_cpu_in_every_cta_size(warps, mode, dtype, n, rows,
                                                           monkeypatch):
    """test_forged_width_sections_match_cpu's forgeries, a different kind in each page
    of one batch, decoded by CTAs of each size: which thread holds a warp's first
    width byte, and the counts before it, depend on the CTA's size."""
    monkeypatch.setenv(CODEC_WARPS, str(warps))
    kinds = [FORGED_KINDS[page % len(FORGED_KINDS)] for page in range(8)]
    _, status, status_cpu, dst, expected = decode_forged_batch(
        mode, kinds, dtype, n, rows, torch.Generator().manual_seed(n + rows + warps))
    assert torch.equal(status, status_cpu)
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("value", ["1", "16", "auto", "4 "])
def test_invalid_codec_warps_is_refused(value, monkeypatch):
    """KVCOMPRESS_CODEC_WARPS other than unset, empty, 0, 2, 4 or 8: both ops refuse
    to launch and name the variable."""
    pages = kv_like(2, 16, 64, torch.bfloat16, seed=10).cuda()
    ids = torch.arange(2, device="cuda")
    compressed = compress_pages(pages, ids, CodecConfig())
    monkeypatch.setenv(CODEC_WARPS, value)
    with pytest.raises(ValueError, match="KVCOMPRESS_CODEC_WARPS must be 0"):
        compress_pages(pages, ids, CodecConfig())
    with pytest.raises(ValueError, match="KVCOMPRESS_CODEC_WARPS must be 0"):
        decompress_pages(compressed, torch.empty_like(pages), ids)
    monkeypatch.setenv(CODEC_WARPS, "")
    assert (decompress_pages(compressed, torch.empty_like(pages), ids) == DecodeStatus.OK).all()


def test_two_warp_ctas_decompress_pages_up_to_1016_blocks(monkeypatch):
    """Decompression's checksum pass hands each thread 16 width bytes and the block
    loop reads 8 past the last block, so CTAs of 2 warps (64 threads) decode pages of
    at most 1016 blocks: at that size the same values as the CPU; one block more
    (forced to 2 warps) is a ValueError naming the variable, and decodes with 4.
    Compression holds any page in any size."""
    for blocks, holds in ((1016, True), (1017, False)):
        n = 32 * blocks - 5  # a partial last block
        pages = kv_like(3, 1, n, torch.bfloat16, seed=blocks)
        ids = torch.tensor([2, 0, 1])
        monkeypatch.setenv(CODEC_WARPS, "2")
        cpu, gpu = both_devices(pages, ids, CodecConfig(1e-2, True, CodecMode.PLAIN, 1))
        assert_same_stream(cpu, gpu)
        expected = torch.zeros(3, n, dtype=torch.bfloat16)
        assert (decompress_pages(cpu, expected, torch.arange(3)) == DecodeStatus.OK).all()
        dst = torch.zeros(3, n, dtype=torch.bfloat16, device="cuda")
        if not holds:
            with pytest.raises(ValueError, match="KVCOMPRESS_CODEC_WARPS=2"):
                decompress_pages(gpu, dst, torch.arange(3, device="cuda"))
            monkeypatch.setenv(CODEC_WARPS, "4")
        assert (decompress_pages(gpu, dst, torch.arange(3, device="cuda")) == DecodeStatus.OK).all()
        assert torch.equal(dst.cpu().view(torch.uint8), expected.view(torch.uint8))
