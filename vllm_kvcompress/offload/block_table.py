"""Metadata of the blocks offloaded to the host arena, in LRU order.

One entry per offloaded KV block (keyed by whatever the connector uses to name a
block, in vLLM a block hash: bytes or int). A block's pages (layers x K/V) are stored
as codec records in one contiguous arena allocation, so the entry describes that
allocation plus what the loader needs to check before trusting it.

The table keeps recency itself (an ``OrderedDict``, oldest first) so that eviction
can walk victims in LRU order without a separate structure, and it keeps running
byte totals so the achieved compression ratio is O(1) to report.

The table does not own the arena: :meth:`BlockTable.remove` hands the record back
and the caller frees ``record.offset``. Only :meth:`BlockTable.evict_for` frees
allocations itself, because choosing victims and freeing them must agree.
Not thread-safe; in vLLM it is driven from the scheduler only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Hashable, Iterable, Iterator
from typing import NamedTuple, Self

from vllm_kvcompress.logger import init_logger
from vllm_kvcompress.offload.arena_allocator import ArenaAllocator

logger = init_logger(__name__)


class _BlockRecordFields(NamedTuple):
    offset: int
    nbytes: int
    raw_nbytes: int
    mode: int
    error_bound: float
    dtype: str
    checksum: int
    is_raw: bool


class BlockRecord(_BlockRecordFields):
    """Where one offloaded block lives in the arena and how it was stored.

    ``nbytes`` is the size of the stored data; the allocation at ``offset`` is at
    least that, rounded up to 16 (a reservation's tail too small to hold another
    block stays with it). ``raw_nbytes`` is the size the block
    has uncompressed, so ``raw_nbytes / nbytes`` is its compression ratio.
    ``mode``, ``error_bound`` and ``dtype`` record the codec settings used (a loader
    can refuse a block written under a looser bound than it now requires);
    ``checksum`` is a whole-block check (e.g. over the record checksums);
    ``is_raw`` is true when the block was stored uncompressed.

    Immutable, since the table's byte totals follow ``nbytes``. A validated named
    tuple rather than a frozen dataclass: the scheduler's step builds one per stored
    block, and a frozen dataclass takes three times as long to build.
    """

    __slots__ = ()

    def __new__(cls, offset: int, nbytes: int, raw_nbytes: int, mode: int,
                error_bound: float, dtype: str, checksum: int, is_raw: bool) -> Self:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        if raw_nbytes <= 0:
            raise ValueError(f"raw_nbytes must be > 0, got {raw_nbytes}")
        if not error_bound >= 0:  # also rejects NaN
            raise ValueError(f"error_bound must be >= 0, got {error_bound}")
        return tuple.__new__(cls, (offset, nbytes, raw_nbytes, mode, error_bound, dtype,
                                   checksum, is_raw))


class BlockTable:
    """Block key -> :class:`BlockRecord`, least recently used first."""

    def __init__(self) -> None:
        self._records: OrderedDict[Hashable, BlockRecord] = OrderedDict()
        self._stored_bytes = 0
        self._raw_bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._records

    @property
    def stored_bytes(self) -> int:
        """Sum of ``nbytes`` over the table: arena bytes holding block data
        (excluding the allocator's 16-byte rounding)."""
        return self._stored_bytes

    @property
    def raw_bytes(self) -> int:
        """Sum of ``raw_nbytes``: what the same blocks would take uncompressed."""
        return self._raw_bytes

    @property
    def compression_ratio(self) -> float:
        """``raw_bytes / stored_bytes`` (1.0 for an empty table)."""
        return self._raw_bytes / self._stored_bytes if self._stored_bytes else 1.0

    def insert(self, key: Hashable, record: BlockRecord) -> None:
        """Add a block as the most recently used.

        Raises ``ValueError`` if ``key`` is present: silently replacing it would leak
        the old record's arena allocation, which only the caller can free.
        """
        if key in self._records:
            raise ValueError(f"block {key!r} is already in the table; remove it first")
        self._records[key] = record
        self._stored_bytes += record.nbytes
        self._raw_bytes += record.raw_nbytes

    def absent(self, keys: Iterable[Hashable]) -> list[Hashable]:
        """The ``keys`` not in the table, in order (one scheduler call asks this of
        every block of a long prompt)."""
        records = self._records
        return [key for key in keys if key not in records]

    def touch(self, keys: Iterable[Hashable]) -> None:
        """Marks the ``keys`` present as the most recently used, in order."""
        records = self._records
        move_to_end = records.move_to_end
        for key in keys:
            if key in records:
                move_to_end(key)

    def insert_many(self, items: Iterable[tuple[Hashable, BlockRecord]]) -> None:
        """:meth:`insert` for each ``(key, record)``, in order: one scheduler call
        adds a whole prompt's blocks. Raises ``ValueError`` at the first key present,
        with the blocks before it inserted."""
        records = self._records
        for key, record in items:
            if key in records:
                raise ValueError(f"block {key!r} is already in the table; remove it first")
            records[key] = record
            self._stored_bytes += record.nbytes
            self._raw_bytes += record.raw_nbytes

    def get(self, key: Hashable) -> BlockRecord | None:
        """The block's record, marking it most recently used; ``None`` if absent."""
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
        return record

    def peek(self, key: Hashable) -> BlockRecord | None:
        """The block's record without changing recency; ``None`` if absent."""
        return self._records.get(key)

    def remove(self, key: Hashable) -> BlockRecord:
        """Drop the block and return its record; the caller frees ``record.offset``.

        Raises ``KeyError`` if absent.
        """
        record = self._records.pop(key)
        self._stored_bytes -= record.nbytes
        self._raw_bytes -= record.raw_nbytes
        return record

    def lru_keys(self) -> Iterator[Hashable]:
        """Keys from least to most recently used.

        A live view: mutating the table while iterating raises ``RuntimeError``;
        collect (e.g. ``list(...)``) first if you need to remove while walking.
        """
        return iter(self._records)

    def evict_for(
        self,
        nbytes: int,
        allocator: ArenaAllocator,
        protected: Container[Hashable] = frozenset(),
        max_victims: int | None = None,
    ) -> list[Hashable] | None:
        """Free least recently used blocks until ``allocator.allocate(nbytes)`` fits.

        Keys in ``protected`` (blocks being loaded or stored) are skipped, never
        evicted. Returns the evicted keys, oldest first: ``[]`` if it fits already,
        and the shortest LRU prefix of unprotected blocks otherwise (eviction stops as
        soon as ``allocator.largest_free_block >= nbytes``). Returns ``None`` when even
        evicting every unprotected block would not make a large enough contiguous
        range, or more than ``max_victims`` blocks; the table and allocator are then
        left unchanged, so a hopeless store does not throw away cached blocks.

        Victims are chosen by simulating the frees first
        (:meth:`ArenaAllocator.plan_fit`), then freed, so the cost is O(blocks
        walked), not one ``largest_free_block`` query per victim.
        """
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        if allocator.largest_free_block >= nbytes:
            return []
        walked: list[Hashable] = []

        def candidates() -> Iterator[int]:
            for key, record in self._records.items():
                if max_victims is not None and len(walked) >= max_victims:
                    return
                if key not in protected:
                    walked.append(key)
                    yield record.offset

        count = allocator.plan_fit(nbytes, candidates())
        if count is None:
            logger.debug("evict_for(%d): cannot fit even after evicting %d unprotected "
                         "blocks", nbytes, len(walked))
            return None
        victims = walked[:count]
        records = self._records
        removed = [records.pop(key) for key in victims]
        self._stored_bytes -= sum(r.nbytes for r in removed)
        self._raw_bytes -= sum(r.raw_nbytes for r in removed)
        allocator.free_many([r.offset for r in removed])
        logger.debug("evict_for(%d): evicted %d blocks", nbytes, len(victims))
        return victims

    def __repr__(self) -> str:
        return (f"BlockTable(blocks={len(self._records)}, stored_bytes={self._stored_bytes}, "
                f"raw_bytes={self._raw_bytes})")
