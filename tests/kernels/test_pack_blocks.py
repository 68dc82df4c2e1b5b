"""kvcompress::pack_blocks: a store chunk's blocks of records, as the codec laid
them out in staging, each moved to its destination cut at the bytes the block may
take, with the checksums of its record headers summed. Checked against a plain
reference on random tables (records anywhere, headers cut off at the buffer's end,
blocks larger than their room, destinations out of range); on CUDA also into
pinned host memory, and byte-identical to the CPU kernel."""

import numpy as np
import pytest
import torch

from vllm_kvcompress import _custom_ops as ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CHECKSUM_AT = 28  # of a record's 32-byte header (docs/format.md)


def reference(records: np.ndarray, table: np.ndarray, room: np.ndarray, dst: np.ndarray,
              dst_offsets: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    out = dst.copy()
    status, sums = [], []
    for rows, limit, at in zip(table, room, dst_offsets):
        total = 0
        for offset, _, _ in rows:
            if 0 <= offset <= len(records) - 32:
                total += int(records[offset + CHECKSUM_AT:offset + CHECKSUM_AT + 4].view("<u4")[0])
        sums.append(total)
        n = min(int(rows[:, 1].sum()), int(limit))
        start = int(rows[0, 0])
        ok = n >= 0 and start >= 0 and at >= 0 and start + n <= len(records) and at + n <= len(dst)
        status.append(0 if ok else 1)
        if ok:
            out[at:at + n] = records[start:start + n]
    return out, status, sums


def random_chunk(seed: int, blocks: int, pages: int) -> tuple[np.ndarray, ...]:
    """Blocks of records laid out back to back from offset 0 as the codec writes
    them; then some damage: a block that needs more than its room, a destination
    out of range, a page row pointing past the buffer."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 40, (blocks, pages)) * 16
    starts = (np.cumsum(sizes.ravel()) - sizes.ravel()).reshape(blocks, pages)
    table = np.stack([starts, sizes, np.zeros_like(sizes)], 2).astype(np.int64)
    records = rng.integers(0, 256, int(sizes.sum()), dtype=np.uint8)
    needs = sizes.sum(1)
    room = needs + rng.integers(0, 3, blocks) * 16
    room[0] = needs[0] - 48  # cut: a block larger than its reservation
    # Disjoint destinations, some shifted off the packed layout by 16 bytes.
    slot = room + 16
    dst_offsets = np.cumsum(slot) - slot + 16 * rng.integers(0, 2, blocks)
    dst_offsets[-1] = -1  # refused
    table[1, -1, 0] = len(records) - 8  # a header that does not fit the buffer
    dst = np.zeros(int(slot.sum()) + 64, dtype=np.uint8)
    return records, table, room.astype(np.int64), dst, dst_offsets.astype(np.int64)


def run(records: np.ndarray, table: np.ndarray, room: np.ndarray, dst: torch.Tensor,
        dst_offsets: np.ndarray, device: str) -> tuple[list[int], list[int]]:
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    blocks = len(table)
    status = torch.full((blocks,), 7, dtype=torch.int32, device=device)
    checksums = torch.zeros(blocks, dtype=torch.int64, device=device)
    ops.pack_blocks(t(records), t(table), t(room), dst, t(dst_offsets), status, checksums)
    return status.tolist(), checksums.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pages", [1, 32, 45])
def test_random_chunks_match_reference(device: str, seed: int, pages: int) -> None:
    records, table, room, dst, dst_offsets = random_chunk(seed, 6, pages)
    expected, expected_status, expected_sums = reference(records, table, room, dst,
                                                         dst_offsets)
    out = torch.from_numpy(dst.copy()).to(device)
    status, sums = run(records, table, room, out, dst_offsets, device)
    assert status == expected_status
    assert sums == expected_sums
    assert np.array_equal(out.cpu().numpy(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(3))
def test_cuda_into_pinned_host_memory_matches_cpu(seed: int) -> None:
    records, table, room, dst, dst_offsets = random_chunk(seed, 9, 32)
    host = torch.from_numpy(dst.copy()).pin_memory()
    cpu = torch.from_numpy(dst.copy())
    assert run(records, table, room, host, dst_offsets, "cuda") == run(
        records, table, room, cpu, dst_offsets, "cpu")
    torch.cuda.synchronize()
    assert torch.equal(host, cpu)


def test_bad_arguments_raise() -> None:
    records = torch.zeros(64, dtype=torch.uint8)
    table = torch.zeros(2, 3, 3, dtype=torch.int64)
    one = torch.zeros(2, dtype=torch.int64)
    status = torch.empty(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="uint8"):
        ops.pack_blocks(records.float(), table, one, records, one, status, one)
    with pytest.raises(ValueError, match="shape"):
        ops.pack_blocks(records, table[:, :, :2], one, records, one, status, one)
    with pytest.raises(ValueError, match="pages >= 1"):
        ops.pack_blocks(records, table[:, :0], one, records, one, status, one)
    with pytest.raises(ValueError, match="room must have 2 elements"):
        ops.pack_blocks(records, table, one[:1], records, one, status, one)
    with pytest.raises(TypeError, match="status must be Int"):
        ops.pack_blocks(records, table, one, records, one, status.long(), one)
    # No blocks: nothing to do, nothing raised.
    ops.pack_blocks(records, table[:0], one[:0], records, one[:0], status[:0], one[:0])


@pytest.mark.parametrize("device", DEVICES)
def test_damaged_sizes_are_refused_not_overflowed(device: str) -> None:
    """Sizes summing past int64 saturate and the block is refused; a negative size
    adds nothing."""
    records = torch.arange(256, dtype=torch.uint8).to(device)
    table = torch.tensor([[[0, 2**62, 0], [16, 2**62, 0]], [[32, -16, 0], [48, 32, 0]]],
                         device=device)
    room = torch.tensor([2**62, 2**62], device=device)
    dst = torch.zeros(256, dtype=torch.uint8, device=device)
    status = torch.empty(2, dtype=torch.int32, device=device)
    checksums = torch.empty(2, dtype=torch.int64, device=device)
    ops.pack_blocks(records, table, room, dst, torch.tensor([0, 100], device=device), status,
                    checksums)
    assert status.tolist() == [1, 0]
    assert torch.equal(dst[100:132].cpu(), torch.arange(32, 64, dtype=torch.uint8))
    assert (dst[:100] == 0).all() and (dst[132:] == 0).all()
