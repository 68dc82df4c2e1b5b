"""Drives the CUDA codec, and the block packing of its output, through damaged input
for compute-sanitizer memcheck.

Not a pytest module: benchmarks/run_gpu_host.sh runs it under
``compute-sanitizer --tool memcheck`` so that any out-of-bounds access in the
kernels, on valid or corrupted streams, fails the run. The codec's launches run once
for each CTA size of its kernels (KVCOMPRESS_CODEC_WARPS; the arguments, if any, name
the sizes to run, e.g. ``memcheck_codec.py 2`` for a shorter racecheck).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.kernels.test_codec_cuda import (  # noqa: E402
    FORGED_KINDS, constant_blocks, forge, mixed_widths, runs_of_32)
from vllm_kvcompress.codec import CodecConfig, CodecMode, CompressedPages, compress_pages, \
    decompress_pages


def flipped(buffer: torch.Tensor, used: int, count: int, g: torch.Generator) -> torch.Tensor:
    """A copy of ``buffer`` with ``count`` random bytes among its first ``used`` changed."""
    buf = buffer.clone()
    at = torch.randint(used, (count,), generator=g)
    buf[at.cuda()] ^= torch.randint(1, 256, (count,), generator=g, dtype=torch.uint8).cuda()
    return buf


def main() -> None:
    for warps in sys.argv[1:] or ["2", "4", "8"]:
        os.environ["KVCOMPRESS_CODEC_WARPS"] = warps
        codec_launches(torch.Generator().manual_seed(0))
        print(f"codec launches with CTAs of {warps} warps finished", flush=True)
    pack_damaged_tables(torch.Generator().manual_seed(1))
    torch.cuda.synchronize()
    print("memcheck driver finished")


def codec_launches(g: torch.Generator) -> None:
    """Compression and decompression of valid, damaged and forged streams, with the
    CTA size KVCOMPRESS_CODEC_WARPS sets: the per-page work that strides by the CTA's
    threads or splits blocks between its warps differs between sizes."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for mode in CodecMode:
            base = torch.randn(64, 1031, generator=g).cumsum(1).to(dtype).cuda()
            # Aligned rows padded in shared memory, unaligned rows, odd page sizes; rows
            # that divide a block's 32 positions (8, 1) and rows that do not (48), which
            # take different block loops.
            for pages, rows in ((base[:, :1024].contiguous(), 8), (base[:, :1024], 8),
                                (base[:, 1:1000], 1), (base[:, :960].contiguous(), 48)):
                n = pages.shape[1]
                ids = torch.arange(64, device="cuda")
                ids[5] = 1000
                c = compress_pages(pages, ids, CodecConfig(1e-2, True, mode, rows))
                dst = torch.empty(64, n, dtype=dtype, device="cuda")
                decompress_pages(c, dst, torch.arange(64))
                used = c.used_bytes()
                for trial in range(20):
                    buf = flipped(c.buffer, used, 8, g)
                    table = c.table.clone()
                    table[trial % 64, 1] -= 16 * (trial % 3)
                    table[(trial + 7) % 64, 0] = used - 32
                    decompress_pages(CompressedPages(buf[:used], table), dst,
                                     torch.arange(64))
                # Garbage that is not a stream at all.
                junk = torch.randint(0, 256, (used,), generator=g, dtype=torch.uint8).cuda()
                decompress_pages(CompressedPages(junk, c.table), dst, torch.arange(64))
    # Blocks of every width class side by side (groups of four coded with one, two or
    # four bit transposes), last groups with padding blocks (33 and 71 blocks), rows
    # that divide 32 and rows that do not; valid and damaged streams.
    for dtype, top in ((torch.float32, 19), (torch.float16, 9)):
        for mode in CodecMode:
            for n, rows in ((1056, 3), (2245, 1), (4096, 16)):
                blocks = -(-n // 32)
                bits = torch.randint(top + 1, (32, blocks, 1), generator=g).double()
                amp = torch.where(bits < 1, 0.0, 2.0 ** bits * 0.01)
                values = (torch.rand(32, blocks, 32, generator=g, dtype=torch.float64) * 2 - 1)
                pages = (values * amp).reshape(32, -1)[:, :n].to(dtype).cuda()
                c = compress_pages(pages, torch.arange(32, device="cuda"),
                                   CodecConfig(0.01, False, mode, rows))
                dst = torch.empty_like(pages)
                decompress_pages(c, dst, torch.arange(32))
                used = c.used_bytes()
                for _ in range(10):
                    decompress_pages(CompressedPages(flipped(c.buffer, used, 4, g)[:used],
                                                     c.table), dst, torch.arange(32))
    # Pages whose narrow groups keep their plane words in shared memory during
    # compression, half of them going RAW afterwards (a value whose quantised magnitude
    # is over 2^22): the RAW copy reads the source page or stages it again (unaligned).
    for mode in CodecMode:
        for n, rows in ((4096, 16), (2245, 1), (1056, 3)):
            pages = (torch.rand(16, n + 1, generator=g) * 2 - 1) * 0.05
            pages[1::2] *= 1000
            pages[::2, n - 1 - n // 7] = 2.0 ** 21 - 2.0 ** 10
            for view in (pages[:, :n].contiguous(), pages[:, 1:]):
                c = compress_pages(view.cuda(), torch.arange(16, device="cuda"),
                                   CodecConfig(1.0, False, mode, rows))
                dst = torch.empty(16, n, device="cuda")
                decompress_pages(c, dst, torch.arange(16))
    # Blocks coded one a lane: column pairs of 16 rows padded in shared memory or not
    # (keeping plane words in a block's rows), 16-bit values with an odd row pitch
    # (value by value), last blocks that are half a column pair, wide blocks among
    # narrow ones (the warp's path), blocks of one value (outlier bytes only).
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for mode in CodecMode:
            for n, rows in ((16 * 600, 16), (16 * 601, 16), (9616, 1)):
                wide = mixed_widths(2, n, rows, torch.float32, 0.01, seed=n).clamp(-2.4, 2.4)
                pages = torch.cat([constant_blocks(2, n, rows, dtype, 0.01, seed=n),
                                   wide.to(dtype)])
                pages = torch.cat([pages[:, :1], pages], 1)
                for view in (pages[:, 1:].contiguous(), pages[:, 1:]):
                    c = compress_pages(view.cuda(), torch.arange(4, device="cuda"),
                                       CodecConfig(0.01, False, mode, rows))
                    dst = torch.empty(4, n, dtype=dtype, device="cuda")
                    decompress_pages(c, dst, torch.arange(4))
    # Several views in one launch, with ids past the last view and damaged records.
    views = [torch.randn(8, 2048, generator=g).cumsum(1).to(torch.bfloat16).cuda()
             for _ in range(3)]
    ids = torch.tensor([23, 0, 24, 11, -3, 16], device="cuda")
    c = compress_pages(views, ids, CodecConfig(1e-2, True, CodecMode.PLAIN, 16))
    dst = [torch.empty_like(v) for v in views]
    buf = c.buffer.clone()
    buf[torch.randint(c.used_bytes(), (16,), generator=g).cuda()] ^= 0x41
    decompress_pages(CompressedPages(buf, c.table), dst,
                     torch.tensor([5, 24, 23, -1, 9, 0], device="cuda"))
    # Width sections forged behind valid checksums: the widths parsed from the
    # checksum pass's registers, the warps' run offsets from their counts, width bytes
    # moved between blocks (pages that decode from other offsets) and lengths that do
    # not add up; pages of 512, 71 and 4 blocks.
    for mode in CodecMode:
        for dtype, n, rows in ((torch.bfloat16, 16384, 16), (torch.float32, 2245, 1),
                               (torch.float32, 100, 1)):
            pages = mixed_widths(8, n, rows, dtype, 0.01, seed=n)
            pages[6] = 0
            for kind in FORGED_KINDS:
                c = compress_pages(pages, torch.arange(8), CodecConfig(0.01, False, mode, rows))
                for page in range(8):
                    if int(c.table[page, 2]) == 0:
                        forge(c, page, kind, g)
                dst = torch.empty(8, n, dtype=dtype, device="cuda")
                decompress_pages(CompressedPages(c.buffer.cuda(), c.table.cuda()), dst,
                                 torch.arange(8, device="cuda"))
    # Runs of 32 blocks decoded a lane a block (rows 1 and 16) beside runs left to the
    # warp path, staged in memory order (rows 1, lanes storing their chunks in a
    # lane-dependent order) or in column pairs (rows 16) and copied out by the CTA;
    # last runs ending before the last lane, partial last blocks, unaligned
    # destinations; valid, forged and damaged records.
    for dtype in (torch.bfloat16, torch.float32):
        for mode in CodecMode:
            for n, rows in ((16384, 1), (2272, 16), (16390, 1), (16400, 16)):
                pages = runs_of_32(8, n, rows, dtype, 0.01, seed=n)
                c = compress_pages(pages, torch.arange(8), CodecConfig(0.01, False, mode, rows))
                for offset in (0, 1):
                    dst = torch.empty(8, n + 8, dtype=dtype, device="cuda")[:, offset:offset + n]
                    for kind in [None] + FORGED_KINDS:
                        copy = CompressedPages(c.buffer.clone(), c.table.clone())
                        for page in range(8):
                            if kind is not None and int(copy.table[page, 2]) == 0:
                                forge(copy, page, kind, g)
                        buf = copy.buffer.cuda()
                        decompress_pages(CompressedPages(buf, copy.table.cuda()), dst,
                                         torch.arange(8, device="cuda"))
                        damaged = flipped(buf, copy.used_bytes(), 4, g)
                        decompress_pages(CompressedPages(damaged, copy.table.cuda()), dst,
                                         torch.arange(8, device="cuda"))
    torch.cuda.synchronize()


def pack_damaged_tables(g: torch.Generator) -> None:
    """pack_blocks on page tables holding anything: offsets and sizes negative,
    huge or past the buffer, into device and pinned host buffers."""
    from vllm_kvcompress import _custom_ops as ops

    records = torch.randint(0, 256, (1 << 16,), generator=g, dtype=torch.uint8).cuda()
    for dst in (torch.zeros(1 << 16, dtype=torch.uint8, device="cuda"),
                torch.zeros(1 << 16, dtype=torch.uint8).pin_memory()):
        for trial in range(8):
            table = torch.randint(-(1 << 17), 1 << 17, (16, 33, 3), generator=g)
            table[trial, :, 1] = 1 << 62
            table[trial + 1, 0, 0] = (1 << 16) - 4
            room = torch.randint(-64, 1 << 14, (16,), generator=g)
            dst_offsets = torch.randint(-64, 1 << 16, (16,), generator=g)
            status = torch.empty(16, dtype=torch.int32, device="cuda")
            checksums = torch.empty(16, dtype=torch.int64, device="cuda")
            ops.pack_blocks(records, table.cuda(), room.cuda(), dst, dst_offsets.cuda(), status,
                            checksums)


if __name__ == "__main__":
    main()
