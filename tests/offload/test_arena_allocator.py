"""Tests for the TLSF arena allocator: invariants under random use, errors, shrink,
fragmentation and the simulated-eviction planner."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vllm_kvcompress.offload.arena_allocator import ALIGNMENT, ArenaAllocator, ArenaStats, align_up


def gaps(allocations: list[tuple[int, int]], capacity: int) -> list[tuple[int, int]]:
    """The maximal unallocated ranges between sorted, non-overlapping allocations."""
    out, pos = [], 0
    for offset, size in allocations:
        if offset > pos:
            out.append((pos, offset - pos))
        pos = offset + size
    if pos < capacity:
        out.append((pos, capacity - pos))
    return out


def check_invariants(alloc: ArenaAllocator, model: dict[int, int] | None = None) -> None:
    """Everything the allocator promises about its state, checked from the outside.

    ``model`` (offset -> requested bytes) is the caller's view of the live allocations.
    Accounting: each allocation reserves ``align_up(requested)`` bytes, and
    ``allocated_bytes + free_bytes == capacity`` exactly (capacity is a multiple of 16).
    """
    cap = alloc.capacity
    allocs = alloc.allocations()
    free = alloc.free_ranges()
    for offset, size in allocs + free:
        assert offset % ALIGNMENT == 0 and size % ALIGNMENT == 0 and size > 0
        assert 0 <= offset and offset + size <= cap
    for (o1, s1), (o2, _) in zip(allocs, allocs[1:]):
        assert o1 + s1 <= o2, "live allocations overlap"
    # Free ranges are exactly the maximal gaps: disjoint from allocations, covering the
    # rest of the arena, and fully coalesced (no two free ranges touch).
    assert free == gaps(allocs, cap)
    for (o1, s1), (o2, _) in zip(free, free[1:]):
        assert o1 + s1 < o2, "adjacent free ranges were not coalesced"
    assert alloc.allocated_bytes == sum(s for _, s in allocs)
    assert alloc.free_bytes == sum(s for _, s in free)
    assert alloc.allocated_bytes + alloc.free_bytes == cap
    largest = max((s for _, s in free), default=0)
    assert alloc.largest_free_block == largest
    expected_frag = 0.0 if alloc.free_bytes == 0 else 1 - largest / alloc.free_bytes
    assert alloc.fragmentation() == pytest.approx(expected_frag)
    stats = alloc.stats()
    assert stats == ArenaStats(cap, alloc.allocated_bytes, alloc.requested_bytes,
                               alloc.free_bytes, largest, len(allocs), len(free),
                               stats.fragmentation)
    assert stats.fragmentation == pytest.approx(expected_frag)
    if model is not None:
        assert dict(allocs) == {off: align_up(n) for off, n in model.items()}
        assert alloc.requested_bytes == sum(model.values())
        for off, n in model.items():
            assert alloc.is_allocated(off) and alloc.size_of(off) == n


class ArenaMachine(RuleBasedStateMachine):
    """Random allocate / free / shrink against a model of the live allocations."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc: ArenaAllocator
        self.model: dict[int, int] = {}

    @initialize(units=st.one_of(st.integers(1, 40), st.sampled_from([256, 4096, 1 << 16])))
    def setup(self, units: int) -> None:
        self.alloc = ArenaAllocator(units * ALIGNMENT)
        self.model = {}

    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        cap = self.alloc.capacity
        nbytes = data.draw(st.one_of(st.integers(1, 80), st.integers(1, cap + 40),
                                     st.integers(1, max(1, cap // 8))), label="nbytes")
        fits = align_up(nbytes) <= max((s for _, s in self.alloc.free_ranges()), default=0)
        offset = self.alloc.allocate(nbytes)
        # Succeeds exactly when some free range is big enough: no false "full".
        assert (offset is not None) == fits
        if offset is not None:
            assert offset % ALIGNMENT == 0 and offset not in self.model
            self.model[offset] = nbytes

    @rule(nbytes=st.integers(1, 100), count=st.integers(1, 12))
    def allocate_run(self, nbytes: int, count: int) -> None:
        need = align_up(nbytes) * count
        fits = need <= max((s for _, s in self.alloc.free_ranges()), default=0)
        offsets = self.alloc.allocate_run(nbytes, count)
        assert (offsets is not None) == fits
        if offsets is not None:
            assert offsets == list(range(offsets[0], offsets[0] + need, align_up(nbytes)))
            self.model.update((o, nbytes) for o in offsets)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.model)), label="offset")
        self.alloc.free(offset)
        del self.model[offset]
        if data.draw(st.booleans(), label="double free"):
            with pytest.raises(ValueError, match="double free"):
                self.alloc.free(offset)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.model)), label="offset")
        old = self.model[offset]
        new = data.draw(st.integers(1, old), label="new_nbytes")
        assert self.alloc.shrink(offset, new) == align_up(old) - align_up(new)
        self.model[offset] = new

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free_many(self, data: st.DataObject) -> None:
        """Freeing several at once leaves the same free ranges as one by one."""
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1,
                                    unique=True), label="offsets")
        if data.draw(st.booleans(), label="a bad offset among them"):
            bad = data.draw(st.sampled_from([chosen[0], self.alloc.capacity + 16]))
            before = (self.alloc.free_ranges(), self.alloc.allocations())
            with pytest.raises(ValueError):
                self.alloc.free_many([*chosen, bad])
            assert (self.alloc.free_ranges(), self.alloc.allocations()) == before
        self.alloc.free_many(chosen)
        for offset in chosen:
            del self.model[offset]
        assert self.alloc.free_ranges() == gaps(
            [(o, align_up(n)) for o, n in sorted(self.model.items())], self.alloc.capacity)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free_all(self, data: st.DataObject) -> None:
        for offset in data.draw(st.permutations(sorted(self.model)), label="order"):
            self.alloc.free(offset)
        self.model.clear()
        assert self.alloc.free_ranges() == [(0, self.alloc.capacity)]
        assert self.alloc.largest_free_block == self.alloc.capacity

    @invariant()
    def consistent(self) -> None:
        check_invariants(self.alloc, self.model)

    def teardown(self) -> None:
        if not hasattr(self, "alloc"):
            return
        for offset in list(self.model):
            self.alloc.free(offset)
        assert self.alloc.free_ranges() == [(0, self.alloc.capacity)]
        assert self.alloc.allocated_bytes == 0 and self.alloc.requested_bytes == 0
        assert self.alloc.fragmentation() == 0.0


ArenaMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestArenaMachine = ArenaMachine.TestCase


def test_random_workload_large_arena() -> None:
    """Many operations on a realistic-sized arena (block-sized requests, then trims)."""
    rng = random.Random(1234)
    alloc = ArenaAllocator(64 << 20)
    model: dict[int, int] = {}
    for step in range(20000):
        r = rng.random()
        if r < 0.5 or not model:
            n = rng.choice([rng.randint(1, 4096), rng.randint(1, 1 << 20)])
            off = alloc.allocate(n)
            if off is not None:
                model[off] = n
                if rng.random() < 0.7:  # reserve raw size, then trim to "compressed" size
                    new = rng.randint(1, n)
                    alloc.shrink(off, new)
                    model[off] = new
        else:
            off = rng.choice(list(model))
            alloc.free(off)
            del model[off]
        if step % 2000 == 0:
            check_invariants(alloc, model)
    check_invariants(alloc, model)
    for off in list(model):
        alloc.free(off)
    assert alloc.free_ranges() == [(0, 64 << 20)]


# ---------------------------------------------------------------------- basic behaviour


def test_alignment_and_rounding() -> None:
    alloc = ArenaAllocator(1024)
    a = alloc.allocate(1)
    b = alloc.allocate(17)
    c = alloc.allocate(32)
    assert (a, b, c) == (0, 16, 48)
    assert alloc.allocated_bytes == 16 + 32 + 32
    assert alloc.requested_bytes == 1 + 17 + 32
    assert alloc.free_bytes == 1024 - 80
    check_invariants(alloc, {0: 1, 16: 17, 48: 32})


def test_full_arena_returns_none() -> None:
    alloc = ArenaAllocator(256)
    assert alloc.allocate(256) == 0
    assert alloc.allocate(1) is None
    assert alloc.free_bytes == 0 and alloc.largest_free_block == 0
    assert alloc.fragmentation() == 0.0
    alloc.free(0)
    assert alloc.allocate(257) is None  # larger than the arena
    assert alloc.allocate(10 ** 12) is None
    check_invariants(alloc, {})


def test_allocate_uses_range_in_its_own_size_class() -> None:
    """A free range in the request's own (multi-size) class that is big enough must be
    found even though the O(1) good-fit search only looks at classes above it."""
    alloc = ArenaAllocator(33 * 16 + 16)
    assert alloc.allocate(33 * 16) == 0
    assert alloc.allocate(16) == 33 * 16
    alloc.free(0)
    assert alloc.largest_free_block == 33 * 16
    assert alloc.allocate(33 * 16 - 5) == 0  # rounds to 528 = the free range exactly
    alloc.free(0)
    assert alloc.allocate(33 * 16 + 1) is None  # 544 does not fit in 528
    check_invariants(alloc, {33 * 16: 16})


def test_allocate_run_is_consecutive_independent_and_all_or_nothing() -> None:
    alloc = ArenaAllocator(64 * ALIGNMENT)
    first = alloc.allocate(10 * ALIGNMENT)
    run = alloc.allocate_run(3 * ALIGNMENT - 5, 4)
    assert run == [first + 10 * ALIGNMENT + i * 3 * ALIGNMENT for i in range(4)]
    assert alloc.allocated_bytes == 22 * ALIGNMENT
    assert alloc.requested_bytes == 10 * ALIGNMENT + 4 * (3 * ALIGNMENT - 5)
    check_invariants(alloc, {first: 10 * ALIGNMENT} | {o: 3 * ALIGNMENT - 5 for o in run})
    before = (alloc.allocations(), alloc.free_ranges())
    assert alloc.allocate_run(ALIGNMENT, 43) is None, "42 units are free, not 43"
    assert (alloc.allocations(), alloc.free_ranges()) == before
    alloc.free(run[1])
    alloc.shrink(run[2], ALIGNMENT)
    check_invariants(alloc, {first: 10 * ALIGNMENT, run[0]: 3 * ALIGNMENT - 5,
                             run[2]: ALIGNMENT, run[3]: 3 * ALIGNMENT - 5})
    with pytest.raises(ValueError):
        alloc.allocate_run(ALIGNMENT, 0)


def test_coalescing_both_sides() -> None:
    alloc = ArenaAllocator(16 * 5)
    offs = [alloc.allocate(16) for _ in range(5)]
    assert offs == [0, 16, 32, 48, 64]
    alloc.free(16)
    alloc.free(48)
    assert alloc.free_ranges() == [(16, 16), (48, 16)]
    alloc.free(32)  # merges left and right neighbours into one range
    assert alloc.free_ranges() == [(16, 48)]
    assert alloc.allocate(48) == 16
    check_invariants(alloc, {0: 16, 16: 48, 64: 16})


# ---------------------------------------------------------------------- errors


def test_constructor_errors() -> None:
    for bad in (0, -16, 100):
        with pytest.raises(ValueError):
            ArenaAllocator(bad)
    with pytest.raises(TypeError):
        ArenaAllocator(1024.0)  # type: ignore[arg-type]


def test_allocate_errors() -> None:
    alloc = ArenaAllocator(1024)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="must be > 0"):
            alloc.allocate(bad)
    with pytest.raises(TypeError):
        alloc.allocate(1.5)  # type: ignore[arg-type]
    check_invariants(alloc, {})


def test_free_errors() -> None:
    alloc = ArenaAllocator(1024)
    a = alloc.allocate(64)
    with pytest.raises(ValueError, match="double free|unknown offset"):
        alloc.free(512)  # never allocated (inside a free range)
    with pytest.raises(ValueError, match="not its start"):
        alloc.free(a + 16)
    with pytest.raises(ValueError, match="outside the arena"):
        alloc.free(4096)
    with pytest.raises(ValueError, match="outside the arena"):
        alloc.free(-16)
    alloc.free(a)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(a)
    check_invariants(alloc, {})


def test_shrink_errors() -> None:
    alloc = ArenaAllocator(1024)
    a = alloc.allocate(100)
    with pytest.raises(ValueError, match="only makes allocations smaller"):
        alloc.shrink(a, 101)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="must be > 0"):
            alloc.shrink(a, bad)
    with pytest.raises(ValueError, match="unknown offset"):
        alloc.shrink(a + 16, 10)
    alloc.shrink(a, 90)
    with pytest.raises(ValueError, match="only makes allocations smaller"):
        alloc.shrink(a, 95)  # larger than the current size, though within the rounding
    alloc.free(a)
    with pytest.raises(ValueError, match="double free"):
        alloc.shrink(a, 10)
    with pytest.raises(ValueError):
        alloc.size_of(a)
    check_invariants(alloc, {})


# ---------------------------------------------------------------------- shrink


def test_shrink_returns_tail_to_free_ranges() -> None:
    alloc = ArenaAllocator(4096)
    a = alloc.allocate(1000)  # reserves 1008
    b = alloc.allocate(100)  # 1008 .. 1120
    assert (a, b) == (0, 1008)
    assert alloc.shrink(a, 500) == 1008 - 512
    assert alloc.size_of(a) == 500
    assert alloc.free_ranges() == [(512, 496), (1120, 4096 - 1120)]
    # The tail is reusable.
    assert alloc.allocate(496) == 512
    check_invariants(alloc, {0: 500, 512: 496, 1008: 100})


def test_shrink_merges_with_following_free_range() -> None:
    alloc = ArenaAllocator(512)
    a = alloc.allocate(256)
    b = alloc.allocate(256)
    alloc.free(b)
    assert alloc.shrink(a, 100) == 256 - 112
    assert alloc.free_ranges() == [(112, 400)]
    assert alloc.largest_free_block == 400
    check_invariants(alloc, {0: 100})


def test_shrink_within_rounding_releases_nothing() -> None:
    alloc = ArenaAllocator(256)
    a = alloc.allocate(100)  # 112 reserved
    assert alloc.shrink(a, 97) == 0
    assert alloc.shrink(a, 97) == 0  # same size again is allowed
    assert alloc.allocated_bytes == 112 and alloc.requested_bytes == 97
    assert alloc.shrink(a, 1) == 96
    check_invariants(alloc, {0: 1})
    alloc.free(a)
    assert alloc.free_ranges() == [(0, 256)]


# ---------------------------------------------------------------------- fragmentation


def test_fragmentation_on_constructed_pattern() -> None:
    alloc = ArenaAllocator(16 * 10)
    offs = [alloc.allocate(16) for _ in range(10)]
    assert alloc.fragmentation() == 0.0  # nothing free
    for i in (0, 2, 4, 6, 8):  # five isolated 16-byte holes
        alloc.free(offs[i])
    assert alloc.free_bytes == 80 and alloc.largest_free_block == 16
    assert alloc.fragmentation() == pytest.approx(1 - 16 / 80)
    alloc.free(offs[1])  # holes 0, 1, 2 merge into 48 bytes
    assert alloc.largest_free_block == 48
    assert alloc.fragmentation() == pytest.approx(1 - 48 / 96)
    for i in (3, 5, 7, 9):
        alloc.free(offs[i])
    assert alloc.fragmentation() == 0.0
    assert alloc.stats().fragmentation == 0.0
    assert alloc.free_ranges() == [(0, 160)]


# ---------------------------------------------------------------------- plan_fit


def test_plan_fit() -> None:
    alloc = ArenaAllocator(16 * 8)
    offs = [alloc.allocate(16) for _ in range(8)]
    assert alloc.plan_fit(16, iter(())) is None
    alloc.free(offs[3])
    assert alloc.plan_fit(16, iter(())) == 0
    # Freeing 0 and 5 does not help a 48-byte request; freeing 2 (next to the hole at 3)
    # and 4 (other side) makes 2..4 contiguous.
    consumed: list[int] = []

    def cands():
        for i in (0, 5, 2, 4, 6, 7):
            consumed.append(i)
            yield offs[i]

    assert alloc.plan_fit(48, cands()) == 4
    assert consumed == [0, 5, 2, 4]  # consumed lazily, only up to the answer
    assert alloc.plan_fit(16 * 9, cands()) is None  # larger than the arena
    assert alloc.plan_fit(16 * 7, iter([offs[i] for i in (0, 1, 2, 4, 5, 6)])) == 6
    assert alloc.plan_fit(16 * 8, iter([offs[i] for i in (0, 1, 2, 4, 5, 6)])) is None
    assert alloc.plan_fit(16 * 8, iter([offs[i] for i in (7, 0, 1, 2, 4, 5, 6)])) == 7
    with pytest.raises(ValueError, match="not a live allocation"):
        alloc.plan_fit(64, iter([offs[3]]))
    with pytest.raises(ValueError, match="twice"):
        alloc.plan_fit(64, iter([offs[0], offs[0]]))
    # Planning changes nothing.
    check_invariants(alloc, {offs[i]: 16 for i in (0, 1, 2, 4, 5, 6, 7)})


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=40),
       freed=st.lists(st.integers(0, 39), max_size=12),
       order=st.randoms(use_true_random=False), need=st.integers(1, 60))
def test_plan_fit_is_the_shortest_prefix_that_fits(sizes: list[int], freed: list[int],
                                                   order: random.Random, need: int) -> None:
    """Against freeing the candidates one by one for real: runs of neighbours in
    order (as an eviction meets one store's blocks), in reverse, shuffled, next to
    real free ranges."""
    capacity = 16 * sum(sizes)
    alloc = ArenaAllocator(capacity)
    offsets = [alloc.allocate(16 * s) for s in sizes]
    for i in set(freed):
        if i < len(offsets):
            alloc.free(offsets[i])
    live = [o for i, o in enumerate(offsets) if i not in set(freed)]
    candidates = sorted(live, reverse=order.random() < 0.3)
    if order.random() < 0.3:
        order.shuffle(candidates)
    expected = None
    trial = ArenaAllocator(capacity)
    for o, s in zip(offsets, sizes):
        assert trial.allocate(16 * s) == o
    for i in set(freed):
        if i < len(offsets):
            trial.free(offsets[i])
    for k in range(len(candidates) + 1):
        if trial.largest_free_block >= 16 * need:
            expected = k
            break
        if k < len(candidates):
            trial.free(candidates[k])
    assert alloc.plan_fit(16 * need, iter(candidates)) == expected
