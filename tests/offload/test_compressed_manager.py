"""Scheduler-side accounting of the compressed host cache: reservations trimmed
to reported sizes, LRU eviction by bytes, protected blocks, failed stores and
loads, and a hypothesis state machine checking the arena never double-books."""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vllm.v1.kv_offload.base import LookupResult, OffloadKey, ReqContext
from vllm_kvcompress.offload.config import CompressionConfig
from vllm_kvcompress.offload.manager import (
    ArenaLoadStoreSpec,
    BlockStoreReport,
    CompressedCPUOffloadingManager,
)
from vllm_kvcompress.offload.metrics import CompressionMetrics

RESERVE = 1024
RAW = 960
CTX = ReqContext(req_id="r")


def key(i: int) -> OffloadKey:
    return OffloadKey(i.to_bytes(8, "big"))


def manager(capacity: int = 4 * RESERVE) -> CompressedCPUOffloadingManager:
    return CompressedCPUOffloadingManager(
        capacity=capacity, reserve_bytes=RESERVE, raw_block_bytes=RAW,
        compression=CompressionConfig(cpu_bytes=capacity), kv_dtype="bfloat16")


def store(m: CompressedCPUOffloadingManager, ids: list[int], size: int = 320,
          raw_pages: int = 0) -> ArenaLoadStoreSpec:
    out = m.prepare_store([key(i) for i in ids], CTX)
    assert out is not None
    spec = out.store_spec
    assert isinstance(spec, ArenaLoadStoreSpec)
    m.record_store_reports({int(o): BlockStoreReport(size, raw_pages, 7) for o in spec.offsets})
    m.complete_store(out.keys_to_store, CTX)
    return spec


def stat(m: CompressedCPUOffloadingManager, name: str) -> float:
    data = m.get_stats().data["data"].get(name, {})
    return data.get((), 0)


def test_store_reserves_worst_case_then_trims_tails_that_could_hold_a_block() -> None:
    """Once the sizes are known, a block gives back its reservation's tail if the tail
    could hold a block at the next reservation size (1/8 above the largest, 576); a
    smaller tail stays with the block, where no reservation could use it anyway."""
    m = manager()
    out = m.prepare_store([key(1), key(2)], CTX)
    assert out is not None and list(out.store_spec.nbytes) == [RESERVE, RESERVE]
    assert m.lookup(key(1), CTX) == LookupResult.HIT_PENDING
    assert m.allocator.allocated_bytes == 2 * RESERVE
    offsets = out.store_spec.offsets
    m.record_store_reports({int(offsets[0]): BlockStoreReport(300, 0, 1),
                            int(offsets[1]): BlockStoreReport(500, 2, 2)})
    m.complete_store(out.keys_to_store, CTX)
    assert m.lookup(key(1), CTX) == LookupResult.HIT
    assert m.reservation.nbytes == 576
    assert RESERVE - 300 >= 576 > RESERVE - 500
    assert m.allocator.allocated_bytes == 304 + RESERVE
    assert m.table.peek(key(2)).nbytes == 500, "the record keeps the stored size"
    assert m.table.peek(key(2)).is_raw and not m.table.peek(key(1)).is_raw
    assert abs(m.table.compression_ratio - 2 * RAW / 800) < 1e-12
    assert stat(m, CompressionMetrics.RAW_PAGES) == 2


def test_reports_from_ranks_merge_to_the_largest_size() -> None:
    m = manager()
    out = m.prepare_store([key(1)], CTX)
    offset = int(out.store_spec.offsets[0])
    m.record_store_reports({offset: BlockStoreReport(300, 1, 5)})
    m.record_store_reports({offset: BlockStoreReport(420, 0, 6)})
    m.complete_store(out.keys_to_store, CTX)
    record = m.table.peek(key(1))
    assert record.nbytes == 420 and record.checksum == 11 and record.is_raw


def test_a_rank_that_failed_drops_the_block() -> None:
    m = manager()
    out = m.prepare_store([key(1)], CTX)
    offset = int(out.store_spec.offsets[0])
    m.record_store_reports({offset: BlockStoreReport(300, 0, 0)})
    m.record_store_reports({offset: BlockStoreReport(0, 0, 0)})
    m.complete_store(out.keys_to_store, CTX)
    assert m.lookup(key(1), CTX) == LookupResult.MISS
    assert m.allocator.allocated_bytes == 0
    assert stat(m, CompressionMetrics.STORES_FAILED) == 1


def test_trimmed_blocks_leave_room_for_more_than_raw_blocks_would() -> None:
    m = manager(capacity=4 * RESERVE)
    for i in range(10):
        store(m, [i], size=320)
    assert len(m.table) == 10, "3x compression holds 10 blocks where 4 raw ones fit"


def test_eviction_is_lru_and_spares_blocks_being_loaded() -> None:
    m = manager(capacity=3 * RESERVE)
    store(m, [0, 1, 2], size=RESERVE)
    m.prepare_load([key(0)], CTX)
    m.touch([key(1)], CTX)
    out = m.prepare_store([key(3)], CTX)
    assert out is not None and out.evicted_keys == [key(2)]
    assert m.lookup(key(0), CTX) == LookupResult.HIT
    assert stat(m, CompressionMetrics.BLOCKS_EVICTED) == 1


def test_full_arena_of_busy_blocks_skips_the_store_and_keeps_state() -> None:
    m = manager(capacity=2 * RESERVE)
    store(m, [0, 1], size=RESERVE)
    m.prepare_load([key(0), key(1)], CTX)
    before = (m.allocator.allocations(), len(m.table))
    assert m.prepare_store([key(2), key(3)], CTX) is None
    assert (m.allocator.allocations(), len(m.table)) == before
    assert stat(m, CompressionMetrics.STORES_SKIPPED_FULL) == 2


def test_failed_load_drops_block_after_its_readers_finish() -> None:
    m = manager()
    spec = store(m, [0, 1])
    m.prepare_load([key(0)], CTX)
    m.prepare_load([key(0)], CTX)
    m.record_failed_loads([int(spec.offsets[0])])
    assert m.lookup(key(0), CTX) == LookupResult.MISS, "never served again"
    m.complete_load([key(0)], CTX)
    assert key(0) in m.table
    m.complete_load([key(0)], CTX)
    assert key(0) not in m.table and key(1) in m.table
    assert m.allocator.allocated_bytes == 320
    assert stat(m, CompressionMetrics.LOADS_FAILED) == 1


def test_already_stored_keys_are_not_stored_again() -> None:
    m = manager()
    store(m, [0])
    out = m.prepare_store([key(0), key(1)], CTX)
    assert out.keys_to_store == [key(1)]


def test_reset_clears_everything() -> None:
    m = manager()
    store(m, [0, 1])
    m.prepare_store([key(2)], CTX)
    m.reset_cache()
    assert len(m.table) == 0 and m.allocator.allocated_bytes == 0
    assert m.lookup(key(2), CTX) == LookupResult.MISS


def test_gauges_report_ratio_and_usage() -> None:
    m = manager()
    store(m, [0, 1], size=320)
    data = m.get_stats().data["data"]
    assert data[CompressionMetrics.COMPRESSION_RATIO][()] == RAW / 320
    assert data[CompressionMetrics.CACHED_BLOCKS][()] == 2
    assert data[CompressionMetrics.ARENA_USAGE][()] == 640 / (4 * RESERVE)


def test_reservation_follows_the_blocks_stored_and_grows_on_an_oversized_one() -> None:
    m = manager(capacity=64 * RESERVE)
    first = store(m, [0, 1], size=320)
    assert list(first.nbytes) == [RESERVE, RESERVE], "the worst case until a size is known"
    second = m.prepare_store([key(2), key(3)], CTX)
    assert list(second.store_spec.nbytes) == [368, 368]  # 320 * 9/8, 16-aligned
    offsets = second.store_spec.offsets
    m.record_store_reports({int(offsets[0]): BlockStoreReport(350, 0, 1),
                            int(offsets[1]): BlockStoreReport(-600, 0, 0)})
    m.complete_store(second.keys_to_store, CTX)
    assert m.lookup(key(2), CTX) == LookupResult.HIT
    assert m.lookup(key(3), CTX) == LookupResult.MISS, "an oversized block is not cached"
    assert stat(m, CompressionMetrics.STORES_OVERSIZED) == 1
    assert stat(m, CompressionMetrics.STORES_FAILED) == 0
    # the first two trimmed from the worst case; key(2) keeps its 368 (a tail of 18
    # could hold no block)
    assert m.allocator.allocated_bytes == 2 * 320 + 368
    third = m.prepare_store([key(3)], CTX)
    assert list(third.store_spec.nbytes) == [688], "600 * 9/8, 16-aligned"


def test_oversized_reports_merge_to_the_largest_need() -> None:
    merged = BlockStoreReport(300, 1, 5).merge(BlockStoreReport(-500, 0, 0))
    assert merged.nbytes == -500
    assert BlockStoreReport(-700, 0, 0).merge(BlockStoreReport(-500, 0, 0)).nbytes == -700
    assert BlockStoreReport(0, 0, 0).merge(BlockStoreReport(-500, 0, 0)).nbytes == 0


def test_compressed_blocks_fill_the_arena_not_their_worst_case() -> None:
    """Blocks compressed to about a quarter of their worst case: once the arena is
    full and evicting, it must hold far more of them than it holds worst-case
    blocks (what an uncompressed cache of the same bytes holds)."""
    capacity = 256 * RESERVE
    m = manager(capacity=capacity)
    sizes = iter([250 + (i * 37) % 30 for i in range(10_000)])
    for prompt in range(40):
        ids = list(range(prompt * 32, prompt * 32 + 32))
        out = m.prepare_store([key(i) for i in ids], CTX)
        assert out is not None
        m.record_store_reports({int(o): BlockStoreReport(next(sizes), 0, 0)
                                for o in out.store_spec.offsets})
        m.complete_store(out.keys_to_store, CTX)
    assert stat(m, CompressionMetrics.BLOCKS_EVICTED) > 0, "the arena must have filled up"
    resident = len(m.table)
    assert resident >= 2.5 * (capacity // RESERVE), (resident, m.allocator.stats())


class ManagerMachine(RuleBasedStateMachine):
    """Random stores, loads, failures and touches; the arena's allocations must
    always be exactly the cached and pending blocks, each at its own range."""

    def __init__(self) -> None:
        super().__init__()
        self.m = manager(capacity=6 * RESERVE)
        self.pending: list[tuple[list[OffloadKey], ArenaLoadStoreSpec]] = []
        self.loading: list[OffloadKey] = []

    @rule(ids=st.lists(st.integers(0, 20), min_size=1, max_size=4, unique=True),
          sizes=st.lists(st.integers(0, RESERVE), min_size=4, max_size=4))
    def prepare_store(self, ids: list[int], sizes: list[int]) -> None:
        out = self.m.prepare_store([key(i) for i in ids], CTX)
        if out is None or not out.keys_to_store:
            return
        spec = out.store_spec
        # As a worker reports it: a block larger than its reservation is not
        # written, and its report carries the size it needed, negated.
        self.m.record_store_reports({int(o): BlockStoreReport(s if s <= n else -s, 0, 0)
                                     for o, n, s in zip(spec.offsets, spec.nbytes, sizes)})
        self.pending.append((out.keys_to_store, spec))

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def complete_store(self, data: st.DataObject) -> None:
        keys, _ = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
        self.m.complete_store(keys, CTX)

    @rule(i=st.integers(0, 20))
    def load(self, i: int) -> None:
        if self.m.lookup(key(i), CTX) == LookupResult.HIT:
            self.m.prepare_load([key(i)], CTX)
            self.loading.append(key(i))

    @precondition(lambda self: self.loading)
    @rule(fail=st.booleans())
    def finish_load(self, fail: bool) -> None:
        k = self.loading.pop(0)
        if fail and k in self.m.table:
            self.m.record_failed_loads([self.m.table.peek(k).offset])
        self.m.complete_load([k], CTX)

    @rule(ids=st.lists(st.integers(0, 20), max_size=3))
    def touch(self, ids: list[int]) -> None:
        self.m.touch([key(i) for i in ids if key(i) in self.m.table], CTX)

    @invariant()
    def arena_holds_exactly_the_live_blocks(self) -> None:
        live = {r.offset for r in (self.m.table.peek(k) for k in self.m.table.lru_keys())}
        live |= {int(o) for _, spec in self.pending for o in spec.offsets
                 if int(o) in self.m._key_at_offset}
        assert {o for o, _ in self.m.allocator.allocations()} == live
        ranges = sorted(self.m.allocator.allocations())
        assert all(a + n <= b for (a, n), (b, _) in zip(ranges, ranges[1:]))
        assert all(k in self.m.table for k in self.loading if self.m._readers.get(k))


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
