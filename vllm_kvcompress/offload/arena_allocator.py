"""Variable-size allocator for one preallocated host arena.

Compressed KV blocks have data-dependent sizes, so the pinned CPU arena cannot be
cut into fixed slots the way vLLM's own CPU offloading does. This module hands out
byte ranges of ``[0, capacity)``; the arena tensor itself is owned elsewhere and is
never touched here, which keeps the allocator pure Python, GPU-free and cheap to test.

Design (two-level segregated fit, TLSF):

* Every range is a multiple of :data:`ALIGNMENT` (16) bytes and starts at a multiple
  of 16, because the codec's records are 16-aligned (docs/format.md). Requests are
  rounded up to 16; the rounded size is what is reserved and counted in
  :attr:`ArenaAllocator.allocated_bytes`.
* Free ranges are binned by size into classes: a first level by power of two and a
  second level splitting each power of two into 16 linear sub-ranges (sizes below
  256 bytes get one exact class per 16 bytes). Two bitmaps record which classes are
  non-empty, so finding a class that is guaranteed to fit is a couple of bit tricks.
* Free ranges are indexed by start and by end (boundary tags kept in dicts), so a
  freed range merges with both neighbours in O(1): no two free ranges are ever
  adjacent.

``allocate`` is O(1) in the common case. To keep the promise "``allocate`` succeeds
whenever :attr:`largest_free_block` is large enough" (which eviction relies on), a
failed good-fit search falls back to scanning the one size class that holds the
request's exact size; that scan is O(ranges in that class).

The allocator is not thread-safe; in vLLM it is driven from the scheduler only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vllm_kvcompress.logger import init_logger

logger = init_logger(__name__)

ALIGNMENT = 16
"""Every offset and every reserved size is a multiple of this (the codec's record alignment)."""

_ALIGN_LOG2 = 4
_SL_LOG2 = 4  # 16 second-level classes per power of two: worst-case waste in a class ~6 %
_SL_COUNT = 1 << _SL_LOG2


def align_up(nbytes: int) -> int:
    """Round ``nbytes`` up to a multiple of :data:`ALIGNMENT`."""
    return (nbytes + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def _mapping(units: int) -> tuple[int, int]:
    """Size class ``(fl, sl)`` of a free range of ``units`` 16-byte units (``units >= 1``).

    Classes ordered lexicographically by ``(fl, sl)`` are ordered by size, which is
    what lets a bitmap search for "the first non-empty class at or above" work.
    """
    if units < _SL_COUNT:
        return 0, units
    shift = units.bit_length() - 1 - _SL_LOG2
    return shift + 1, (units >> shift) - _SL_COUNT


def _search_class(units: int) -> tuple[int, int]:
    """Smallest class whose every member holds ``units``: round up to the next class start."""
    if units >= _SL_COUNT:
        units += (1 << (units.bit_length() - 1 - _SL_LOG2)) - 1
    return _mapping(units)


def _lowest_bit(x: int) -> int:
    return (x & -x).bit_length() - 1


def _check_size(nbytes: int, what: str) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"{what} must be an int, got {type(nbytes).__name__}")
    if nbytes <= 0:
        raise ValueError(f"{what} must be > 0, got {nbytes}")


@dataclass(frozen=True)
class ArenaStats:
    """A snapshot of the arena's occupancy, for logging and metrics."""

    capacity: int
    """Bytes managed, ``[0, capacity)``."""
    allocated_bytes: int
    """Bytes reserved by live allocations (each rounded up to 16)."""
    requested_bytes: int
    """Bytes the callers asked for (after any shrink); ``allocated - requested`` is padding."""
    free_bytes: int
    """``capacity - allocated_bytes``."""
    largest_free_block: int
    """Largest request that :meth:`ArenaAllocator.allocate` can satisfy right now."""
    num_allocations: int
    num_free_ranges: int
    fragmentation: float
    """``1 - largest_free_block / free_bytes``; 0 when nothing is free."""


class ArenaAllocator:
    """Hands out 16-aligned byte ranges of a host arena of ``capacity`` bytes.

    Offsets returned by :meth:`allocate` identify allocations: :meth:`free` and
    :meth:`shrink` take them back. ``capacity`` must be a multiple of 16 so that
    ``allocated_bytes + free_bytes == capacity`` holds exactly.
    """

    def __init__(self, capacity: int) -> None:
        _check_size(capacity, "capacity")
        if capacity % ALIGNMENT:
            raise ValueError(f"capacity must be a multiple of {ALIGNMENT}, got {capacity}")
        self._capacity = capacity
        num_fl = _mapping(capacity >> _ALIGN_LOG2)[0] + 1
        self._fl_bitmap = 0
        self._sl_bitmaps = [0] * num_fl
        # Per class: start -> size. Dicts give O(1) removal of any range (needed when a
        # neighbour is coalesced) and O(1) LIFO pop via popitem().
        self._classes: list[list[dict[int, int]]] = [
            [{} for _ in range(_SL_COUNT)] for _ in range(num_fl)
        ]
        self._free_by_start: dict[int, int] = {}  # start -> size
        self._free_by_end: dict[int, int] = {}  # end -> start
        self._allocs: dict[int, tuple[int, int]] = {}  # offset -> (reserved, requested)
        self._allocated_bytes = 0
        self._requested_bytes = 0
        self._insert_free(0, capacity)
        logger.debug("ArenaAllocator: %d bytes, %d first-level classes", capacity, num_fl)

    # ------------------------------------------------------------------ properties

    @property
    def capacity(self) -> int:
        """Bytes managed, ``[0, capacity)``."""
        return self._capacity

    @property
    def allocated_bytes(self) -> int:
        """Bytes reserved by live allocations, each rounded up to a multiple of 16."""
        return self._allocated_bytes

    @property
    def requested_bytes(self) -> int:
        """Bytes asked for by live allocations (after shrinking), before rounding."""
        return self._requested_bytes

    @property
    def free_bytes(self) -> int:
        """Bytes in free ranges: every byte is either free or reserved."""
        return self._capacity - self._allocated_bytes

    @property
    def num_allocations(self) -> int:
        return len(self._allocs)

    @property
    def num_free_ranges(self) -> int:
        return len(self._free_by_start)

    @property
    def largest_free_block(self) -> int:
        """Size of the largest free range (0 if none).

        :meth:`allocate` succeeds exactly when ``align_up(nbytes)`` is at most this.
        Cost: O(ranges in the highest non-empty size class).
        """
        if not self._fl_bitmap:
            return 0
        fl = self._fl_bitmap.bit_length() - 1
        sl = self._sl_bitmaps[fl].bit_length() - 1
        return max(self._classes[fl][sl].values())

    def fragmentation(self) -> float:
        """``1 - largest_free_block / free_bytes``: 0 when all free space is one range
        (or nothing is free), approaching 1 when free space is scattered in small holes."""
        free = self.free_bytes
        return 0.0 if free == 0 else 1.0 - self.largest_free_block / free

    def stats(self) -> ArenaStats:
        return ArenaStats(
            capacity=self._capacity,
            allocated_bytes=self._allocated_bytes,
            requested_bytes=self._requested_bytes,
            free_bytes=self.free_bytes,
            largest_free_block=self.largest_free_block,
            num_allocations=len(self._allocs),
            num_free_ranges=len(self._free_by_start),
            fragmentation=self.fragmentation(),
        )

    # ------------------------------------------------------------------ operations

    def allocate(self, nbytes: int) -> int | None:
        """Reserve ``align_up(nbytes)`` bytes; return the 16-aligned offset, or ``None``
        when no free range is large enough (a full arena is a normal condition, the
        caller evicts or skips the store)."""
        _check_size(nbytes, "nbytes")
        size = align_up(nbytes)
        if size > self._capacity:
            return None
        units = size >> _ALIGN_LOG2
        block = self._pop_good_fit(units)
        if block is None:
            block = self._pop_exact_class_fit(units, size)
            if block is None:
                return None
        start, bsize = block
        if bsize > size:
            # The remainder cannot touch another free range: the range was coalesced.
            self._insert_free(start + size, bsize - size)
        self._allocs[start] = (size, nbytes)
        self._allocated_bytes += size
        self._requested_bytes += nbytes
        return start

    def allocate_run(self, nbytes: int, count: int) -> list[int] | None:
        """Reserve ``count`` consecutive allocations of ``align_up(nbytes)`` bytes each
        with one search, or nothing (``None``) when no free range holds them all.

        A long prompt's store asks for hundreds of same-sized blocks in one scheduler
        step; one search instead of one per block keeps that step short. The
        allocations are independent afterwards (each freed or shrunk on its own).
        """
        _check_size(nbytes, "nbytes")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        size = align_up(nbytes)
        start = self.allocate(size * count)
        if start is None:
            return None
        offsets = list(range(start, start + size * count, size))
        self._allocs.update((offset, (size, nbytes)) for offset in offsets)
        self._requested_bytes += count * nbytes - size * count
        return offsets

    def free(self, offset: int) -> None:
        """Return the allocation at ``offset`` to the free ranges, merging with neighbours.

        Raises ``ValueError`` for an offset that is not the start of a live
        allocation, naming double frees as such. (A double free of an offset that has
        since been handed out again cannot be told apart from a legitimate free.)
        """
        entry = self._allocs.pop(offset, None)
        if entry is None:
            raise ValueError(self._describe_bad_offset(offset))
        size, requested = entry
        self._allocated_bytes -= size
        self._requested_bytes -= requested
        self._release(offset, size)

    def free_many(self, offsets: Iterable[int]) -> None:
        """Free several allocations; the free ranges end up as after freeing them one
        by one, but allocations side by side join before they reach the free index.

        Eviction frees a whole prompt's blocks, which were reserved as one run, so
        this costs one free-range insertion per run instead of one per block. Every
        offset is checked first: on a bad or repeated one this raises ``ValueError``
        and frees nothing.
        """
        ordered = sorted(offsets)
        for i, offset in enumerate(ordered):
            if offset not in self._allocs:
                raise ValueError(self._describe_bad_offset(offset))
            if i and ordered[i - 1] == offset:
                raise ValueError(f"offset {offset} is given twice")
        run_start = run_end = -1
        for offset in ordered:
            size, requested = self._allocs.pop(offset)
            self._allocated_bytes -= size
            self._requested_bytes -= requested
            if offset != run_end:
                if run_end > run_start:
                    self._release(run_start, run_end - run_start)
                run_start = run_end = offset
            run_end += size
        if run_end > run_start:
            self._release(run_start, run_end - run_start)

    def shrink(self, offset: int, new_nbytes: int) -> int:
        """Trim the allocation at ``offset`` to ``new_nbytes`` in place; return the bytes
        released (``0`` when the 16-rounded size does not change).

        Lets a store reserve a block's raw size before the codec has run, then give
        back the tail once the compressed size is known. ``new_nbytes`` must be > 0
        and not larger than the allocation's current requested size.
        """
        entry = self._allocs.get(offset)
        if entry is None:
            raise ValueError(self._describe_bad_offset(offset))
        _check_size(new_nbytes, "new_nbytes")
        size, requested = entry
        if new_nbytes > requested:
            raise ValueError(
                f"cannot shrink the allocation at {offset} from {requested} to "
                f"{new_nbytes} bytes: shrink only makes allocations smaller"
            )
        new_size = align_up(new_nbytes)
        tail = size - new_size
        self._allocs[offset] = (new_size, new_nbytes)
        self._allocated_bytes -= tail
        self._requested_bytes -= requested - new_nbytes
        if tail:
            self._release(offset + new_size, tail)
        return tail

    def size_of(self, offset: int) -> int:
        """Requested size (after any shrink) of the live allocation at ``offset``."""
        entry = self._allocs.get(offset)
        if entry is None:
            raise ValueError(self._describe_bad_offset(offset))
        return entry[1]

    def is_allocated(self, offset: int) -> bool:
        """Whether ``offset`` is the start of a live allocation."""
        return offset in self._allocs

    def plan_fit(self, nbytes: int, candidate_offsets: Iterable[int]) -> int | None:
        """How many leading candidates must be freed before ``allocate(nbytes)`` fits.

        Simulates freeing the live allocations at ``candidate_offsets`` one by one
        (with coalescing, on a private overlay: nothing is changed) and returns the
        smallest ``k`` such that freeing the first ``k`` makes a large enough range,
        ``0`` if it fits already, or ``None`` if freeing all of them is not enough.
        The iterable is consumed lazily and only up to the answer, so an LRU walk can
        be passed directly. O(k). Raises ``ValueError`` for a candidate that is not a
        live allocation or appears twice.
        """
        _check_size(nbytes, "nbytes")
        need = align_up(nbytes)
        if need > self._capacity:
            return None
        if self.largest_free_block >= need:
            return 0
        # Simulated free ranges, each the union of freed candidates and real free
        # ranges they touch. A real free range adjacent to a candidate can only be
        # absorbed through that candidate's boundary, so checking the overlay before
        # the real index never double counts. The range grown last is kept apart, in
        # ``run``: the LRU walk of an eviction mostly meets the blocks of one store
        # in order, each starting where the last ended, and those extend it without
        # touching the overlay's dicts. No other simulated or real free range starts
        # at its end (it would have been absorbed), so a candidate there is new.
        sim_by_start: dict[int, int] = {}
        sim_by_end: dict[int, int] = {}
        seen: set[int] = set()
        allocs, free_by_start, free_by_end = self._allocs, self._free_by_start, self._free_by_end
        run_start = run_end = -1
        count = 0
        for offset in candidate_offsets:
            entry = allocs.get(offset)
            if entry is None:
                raise ValueError(f"candidate {offset} is not a live allocation")
            count += 1
            if offset == run_end:
                seen.add(offset)
                end = offset + entry[0]
            else:
                if offset in seen:
                    raise ValueError(f"candidate {offset} given twice")
                seen.add(offset)
                if run_end > run_start:
                    sim_by_start[run_start] = run_end - run_start
                    sim_by_end[run_end] = run_start
                start, end = offset, offset + entry[0]
                if start in sim_by_end:
                    left = sim_by_end.pop(start)
                    del sim_by_start[left]
                    start = left
                elif start in free_by_end:
                    start = free_by_end[start]
                run_start = start
            if end in sim_by_start:
                right = sim_by_start.pop(end)
                del sim_by_end[end + right]
                end += right
            elif end in free_by_start:
                end += free_by_start[end]
            run_end = end
            if run_end - run_start >= need:
                return count
        return None

    # ------------------------------------------------------------------ introspection

    def free_ranges(self) -> list[tuple[int, int]]:
        """Free ``(start, size)`` ranges sorted by start. O(n log n); for tests and debugging."""
        return sorted(self._free_by_start.items())

    def allocations(self) -> list[tuple[int, int]]:
        """Live ``(offset, reserved size)`` pairs sorted by offset. For tests and debugging."""
        return sorted((off, size) for off, (size, _) in self._allocs.items())

    # ------------------------------------------------------------------ internals

    def _insert_free(self, start: int, size: int) -> None:
        fl, sl = _mapping(size >> _ALIGN_LOG2)
        self._classes[fl][sl][start] = size
        self._sl_bitmaps[fl] |= 1 << sl
        self._fl_bitmap |= 1 << fl
        self._free_by_start[start] = size
        self._free_by_end[start + size] = start

    def _unlink_free(self, start: int, size: int, fl: int, sl: int) -> None:
        """Drop a range (already removed from its class dict) from the other indexes."""
        if not self._classes[fl][sl]:
            self._sl_bitmaps[fl] &= ~(1 << sl)
            if not self._sl_bitmaps[fl]:
                self._fl_bitmap &= ~(1 << fl)
        del self._free_by_start[start]
        del self._free_by_end[start + size]

    def _remove_free(self, start: int, size: int) -> None:
        fl, sl = _mapping(size >> _ALIGN_LOG2)
        del self._classes[fl][sl][start]
        self._unlink_free(start, size, fl, sl)

    def _pop_good_fit(self, units: int) -> tuple[int, int] | None:
        """Take any range from the first non-empty class whose every member fits."""
        fl, sl = _search_class(units)
        if fl >= len(self._sl_bitmaps):
            return None
        sl_map = self._sl_bitmaps[fl] & (-1 << sl)
        if not sl_map:
            fl_map = self._fl_bitmap & (-1 << (fl + 1))
            if not fl_map:
                return None
            fl = _lowest_bit(fl_map)
            sl_map = self._sl_bitmaps[fl]
        sl = _lowest_bit(sl_map)
        start, size = self._classes[fl][sl].popitem()
        self._unlink_free(start, size, fl, sl)
        return start, size

    def _pop_exact_class_fit(self, units: int, size: int) -> tuple[int, int] | None:
        """Fallback: a range in the request's own class that happens to be big enough.

        The good-fit search skips this class because not all its members fit; without
        this scan ``allocate`` could fail while ``largest_free_block`` says it fits.
        """
        fl, sl = _mapping(units)
        if fl >= len(self._sl_bitmaps) or not (self._sl_bitmaps[fl] >> sl) & 1:
            return None
        members = self._classes[fl][sl]
        for start, bsize in members.items():
            if bsize >= size:
                break
        else:
            return None
        del members[start]
        self._unlink_free(start, bsize, fl, sl)
        return start, bsize

    def _release(self, start: int, size: int) -> None:
        """Make ``[start, start + size)`` free, merging it with free neighbours."""
        end = start + size
        right = self._free_by_start.get(end)
        if right is not None:
            self._remove_free(end, right)
            size += right
        left = self._free_by_end.get(start)
        if left is not None:
            self._remove_free(left, start - left)
            size += start - left
            start = left
        self._insert_free(start, size)

    def _describe_bad_offset(self, offset: object) -> str:
        """Explain why ``offset`` is not a live allocation (error path only: O(n))."""
        if isinstance(offset, bool) or not isinstance(offset, int):
            return f"offset must be an int, got {type(offset).__name__}"
        if not 0 <= offset < self._capacity:
            return f"unknown offset {offset}: outside the arena [0, {self._capacity})"
        for start, size in self._free_by_start.items():
            if start <= offset < start + size:
                return f"double free or unknown offset {offset}: it lies in a free range"
        for start, (size, _) in self._allocs.items():
            if start < offset < start + size:
                return (f"unknown offset {offset}: inside the allocation at {start}, "
                        "not its start")
        return f"unknown offset {offset}"  # pragma: no cover - every byte is free or allocated

    def __repr__(self) -> str:
        return (f"ArenaAllocator(capacity={self._capacity}, allocated={self._allocated_bytes}, "
                f"free={self.free_bytes}, allocations={len(self._allocs)}, "
                f"free_ranges={len(self._free_by_start)})")

