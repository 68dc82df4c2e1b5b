"""Tests for the block-metadata table: LRU bookkeeping, byte totals and eviction."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.offload.arena_allocator import ArenaAllocator, align_up
from vllm_kvcompress.offload.block_table import BlockRecord, BlockTable

from .test_arena_allocator import check_invariants


def record(offset: int, nbytes: int, raw_nbytes: int | None = None) -> BlockRecord:
    raw = raw_nbytes if raw_nbytes is not None else 2 * nbytes
    return BlockRecord(offset=offset, nbytes=nbytes, raw_nbytes=raw, mode=1,
                       error_bound=1e-2, dtype="float16", checksum=0xDEADBEEF,
                       is_raw=raw == nbytes)


def filled(num_blocks: int, block_bytes: int, capacity: int | None = None
           ) -> tuple[ArenaAllocator, BlockTable]:
    """An arena holding ``num_blocks`` blocks keyed 0.. in LRU order 0 (oldest) first."""
    alloc = ArenaAllocator(capacity if capacity is not None else num_blocks * block_bytes)
    table = BlockTable()
    for key in range(num_blocks):
        offset = alloc.allocate(block_bytes)
        assert offset is not None
        table.insert(key, record(offset, block_bytes))
    return alloc, table


def snapshot(alloc: ArenaAllocator, table: BlockTable):
    return (alloc.allocations(), alloc.free_ranges(), list(table.lru_keys()),
            table.stored_bytes, table.raw_bytes)


# ---------------------------------------------------------------------- record and table


def test_block_record_is_frozen_and_validated() -> None:
    r = record(0, 64)
    with pytest.raises(AttributeError):
        r.offset = 16  # type: ignore[misc]
    with pytest.raises(ValueError):
        record(-16, 64)
    with pytest.raises(ValueError):
        record(0, 0)
    with pytest.raises(ValueError):
        BlockRecord(0, 64, 128, 1, float("nan"), "float16", 0, False)


def test_insert_get_peek_remove_and_lru_order() -> None:
    table = BlockTable()
    for key, offset in ((b"a", 0), (b"b", 64), (b"c", 128)):
        table.insert(key, record(offset, 64, 200))
    assert list(table.lru_keys()) == [b"a", b"b", b"c"]
    assert len(table) == 3 and b"b" in table and b"z" not in table
    assert table.peek(b"a") == record(0, 64, 200)
    assert list(table.lru_keys()) == [b"a", b"b", b"c"]  # peek does not touch
    assert table.get(b"a") == record(0, 64, 200)
    assert list(table.lru_keys()) == [b"b", b"c", b"a"]  # get does
    assert table.get(b"z") is None and table.peek(b"z") is None
    assert table.stored_bytes == 192 and table.raw_bytes == 600
    assert table.compression_ratio == pytest.approx(600 / 192)
    with pytest.raises(ValueError, match="already in the table"):
        table.insert(b"b", record(256, 64))
    assert table.remove(b"c") == record(128, 64, 200)
    assert list(table.lru_keys()) == [b"b", b"a"]
    assert table.stored_bytes == 128 and table.raw_bytes == 400
    with pytest.raises(KeyError):
        table.remove(b"c")
    table.remove(b"a")
    table.remove(b"b")
    assert table.stored_bytes == 0 and table.raw_bytes == 0
    assert table.compression_ratio == 1.0


def test_lru_keys_is_a_live_view() -> None:
    table = BlockTable()
    table.insert(1, record(0, 16))
    table.insert(2, record(16, 16))
    it = table.lru_keys()
    assert next(it) == 1
    table.remove(2)
    with pytest.raises(RuntimeError):
        next(it)


# ---------------------------------------------------------------------- eviction


def test_evict_nothing_when_it_fits() -> None:
    alloc, table = filled(4, 128, capacity=1024)
    before = snapshot(alloc, table)
    assert table.evict_for(512, alloc) == []
    assert snapshot(alloc, table) == before
    with pytest.raises(ValueError):
        table.evict_for(0, alloc)


def test_evict_lru_order_skips_protected_and_stops_when_it_fits() -> None:
    alloc, table = filled(8, 128)  # full arena: 8 x 128 bytes
    table.get(0)  # LRU order now 1, 2, ..., 7, 0
    evicted = table.evict_for(256, alloc, protected={1})
    # 2 alone frees 128 bytes; 2 + 3 make 256 contiguous bytes: stop there.
    assert evicted == [2, 3]
    assert 1 in table and 0 in table and 4 in table
    assert list(table.lru_keys()) == [1, 4, 5, 6, 7, 0]
    assert alloc.largest_free_block == 256
    assert alloc.allocate(256) == 256
    assert table.stored_bytes == 6 * 128
    check_invariants(alloc)


def test_evict_needs_contiguous_space() -> None:
    """Freeing scattered LRU blocks is not enough; eviction goes on until two freed
    blocks (or a freed block and an existing hole) touch."""
    alloc, table = filled(8, 128)
    for key in (1, 3, 5, 7, 0, 2, 4, 6):  # LRU order 1, 3, 5, 7, 0, 2, ...
        table.get(key)
    evicted = table.evict_for(256, alloc)
    assert evicted == [1, 3, 5, 7, 0]  # 0 joins 1: [0, 256)
    assert alloc.largest_free_block == 256
    assert alloc.free_bytes == 5 * 128
    check_invariants(alloc)


def test_evict_merges_with_existing_hole() -> None:
    alloc, table = filled(8, 128)
    alloc.free(table.remove(4).offset)  # a hole at [512, 640)
    for key in (0, 1, 2, 3):  # LRU order: 5, 6, 7, 0, 1, 2, 3
        table.get(key)
    assert table.evict_for(300, alloc) == [5, 6]  # hole + 5 + 6 = 384 >= 304
    check_invariants(alloc)


def test_evict_returns_none_and_changes_nothing_when_impossible() -> None:
    alloc, table = filled(8, 128)
    protected = {1, 3, 5, 7}  # every other block pinned: at most 128 contiguous bytes
    before = snapshot(alloc, table)
    assert table.evict_for(256, alloc, protected=protected) is None
    assert snapshot(alloc, table) == before
    # Larger than the whole arena.
    assert table.evict_for(8 * 128 + 1, alloc) is None
    assert snapshot(alloc, table) == before
    # Without protection the same request succeeds.
    assert table.evict_for(256, alloc) == [0, 1]


def test_evict_gives_up_beyond_max_victims_and_changes_nothing() -> None:
    alloc, table = filled(8, 128)
    before = snapshot(alloc, table)
    assert table.evict_for(3 * 128, alloc, max_victims=2) is None
    assert snapshot(alloc, table) == before
    assert table.evict_for(3 * 128, alloc, max_victims=3) == [0, 1, 2]


def test_evict_everything_exactly() -> None:
    alloc, table = filled(4, 100, capacity=4 * 112)
    assert table.evict_for(4 * 112, alloc) == [0, 1, 2, 3]
    assert len(table) == 0 and table.stored_bytes == 0
    assert alloc.free_ranges() == [(0, 4 * 112)]


def test_evict_detects_inconsistent_table() -> None:
    alloc, table = filled(2, 128)
    alloc.free(table.peek(0).offset)  # the table still claims the freed block
    with pytest.raises(ValueError, match="not a live allocation"):
        table.evict_for(256, alloc)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_evict_for_matches_brute_force(data: st.DataObject) -> None:
    """evict_for evicts exactly the shortest LRU prefix of unprotected blocks after
    which the request fits, or nothing (None) if no prefix does."""
    capacity = 16 * data.draw(st.integers(4, 256), label="units")
    alloc, table = ArenaAllocator(capacity), BlockTable()
    key = 0
    while True:  # fill with random-sized blocks
        n = data.draw(st.integers(1, max(16, capacity // 4)), label="size")
        offset = alloc.allocate(n)
        if offset is None:
            break
        table.insert(key, record(offset, n))
        key += 1
    for k in data.draw(st.lists(st.sampled_from(range(key))), label="free") if key else []:
        if k in table:  # holes
            alloc.free(table.remove(k).offset)
    for k in data.draw(st.lists(st.sampled_from(range(key))), label="touch") if key else []:
        table.get(k)
    protected = set(data.draw(st.lists(st.sampled_from(range(key)))) if key else [])
    nbytes = data.draw(st.integers(1, capacity + 32), label="nbytes")

    candidates = [k for k in table.lru_keys() if k not in protected]
    reserved = dict(alloc.allocations())

    def largest_after(prefix: int) -> int:
        ranges = sorted(alloc.free_ranges()
                        + [(table.peek(k).offset, reserved[table.peek(k).offset])
                           for k in candidates[:prefix]])
        best, start, end = 0, None, None
        for off, size in ranges:
            if start is not None and off == end:
                end += size
            else:
                start, end = off, off + size
            best = max(best, end - start)
        return best

    need = align_up(nbytes)
    expected = next((p for p in range(len(candidates) + 1) if largest_after(p) >= need), None)
    before = snapshot(alloc, table)
    evicted = table.evict_for(nbytes, alloc, protected=protected)
    if expected is None:
        assert evicted is None
        assert snapshot(alloc, table) == before
    else:
        assert evicted == candidates[:expected]
        assert alloc.largest_free_block >= nbytes
        assert alloc.allocate(nbytes) is not None
        assert all(k in table for k in protected if k in before[2])
        assert list(table.lru_keys()) == [k for k in before[2] if k not in evicted]
    check_invariants(alloc)
    assert table.stored_bytes == sum(table.peek(k).nbytes for k in table.lru_keys())
