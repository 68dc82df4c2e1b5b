"""Scheduler-side bookkeeping of the compressed host cache.

The manager decides where every offloaded block lives in the host arena. Each TP
rank owns an arena of the same capacity, and a block sits at the same offset in
every rank's arena, so one allocator here describes them all.

A block's compressed size is unknown when the scheduler prepares its store, so
:meth:`prepare_store` reserves a predicted size (:mod:`.reservation`: the worst case
at first, then a margin over the largest block recently stored). Each worker reports
the bytes it actually wrote, or the size it needed when the block did not fit its
reservation, through the connector's worker-to-scheduler metadata;
:meth:`record_store_reports` keeps the largest report per block over the ranks, and
:meth:`complete_store`, which vLLM calls once every rank has finished the job, trims
the reservation to that size (or drops an oversized block). Eviction is
LRU over whole blocks and stops as soon as a reservation fits
(:meth:`BlockTable.evict_for`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

import numpy as np
from typing_extensions import override

from vllm.distributed.kv_events import MEDIUM_CPU
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import (
    LoadStoreSpec,
    LookupResult,
    OffloadingEvent,
    OffloadingManager,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
)
from vllm_kvcompress.logger import init_logger
from vllm_kvcompress.offload.arena_allocator import ArenaAllocator
from vllm_kvcompress.offload.block_table import BlockRecord, BlockTable
from vllm_kvcompress.offload.config import CompressionConfig
from vllm_kvcompress.offload.metrics import CompressionMetrics
from vllm_kvcompress.offload.reservation import ReservationSize

logger = init_logger(__name__)


class ArenaLoadStoreSpec(LoadStoreSpec):
    """Arena ranges of the blocks of one transfer, in the order of its keys.

    For a store, ``nbytes`` is each block's reservation; for a load, the largest
    size any rank wrote (each worker knows its own exact record sizes).
    """

    def __init__(self, offsets: Iterable[int], nbytes: Iterable[int]):
        self.offsets = np.fromiter(offsets, dtype=np.int64)
        self.nbytes = np.fromiter(nbytes, dtype=np.int64)
        assert self.offsets.shape == self.nbytes.shape

    def __len__(self) -> int:
        return len(self.offsets)

    def __repr__(self) -> str:
        return f"ArenaLoadStoreSpec(offsets={self.offsets!r}, nbytes={self.nbytes!r})"


class BlockStoreReport(NamedTuple):
    """What one or more ranks wrote for one block; merged over ranks. A named tuple:
    the scheduler's step builds one per stored block from the worker's tuples."""

    nbytes: int
    raw_pages: int
    checksum: int

    def merge(self, other: BlockStoreReport) -> BlockStoreReport:
        # A size of 0 marks a failed store on some rank: the block must be dropped.
        # A negative size -n marks a block that needed n bytes and did not fit its
        # reservation: dropped too, and the largest need over the ranks is kept.
        if self.nbytes == 0 or other.nbytes == 0:
            nbytes = 0
        elif self.nbytes < 0 or other.nbytes < 0:
            nbytes = -max(abs(self.nbytes), abs(other.nbytes))
        else:
            nbytes = max(self.nbytes, other.nbytes)
        return BlockStoreReport(
            nbytes=nbytes,
            raw_pages=self.raw_pages + other.raw_pages,
            checksum=(self.checksum + other.checksum) & 0xFFFFFFFF,
        )


@dataclass(slots=True)
class _PendingStore:
    offset: int
    reserved: int
    report: BlockStoreReport | None = None


class CompressedCPUOffloadingManager(OffloadingManager):
    """LRU host cache of variable-size compressed blocks in one arena per rank."""

    def __init__(
        self,
        capacity: int,
        reserve_bytes: int,
        raw_block_bytes: int,
        compression: CompressionConfig,
        kv_dtype: str,
        enable_events: bool = False,
    ):
        if reserve_bytes <= 0 or reserve_bytes > capacity:
            raise ValueError(
                f"the host arena ({capacity} bytes per rank) cannot hold even one KV block "
                f"({reserve_bytes} bytes reserved per block); raise --kv-offloading-size")
        self.medium = MEDIUM_CPU
        self.capacity = capacity
        self.reservation = ReservationSize(reserve_bytes)
        self.raw_block_bytes = raw_block_bytes
        self.compression = compression
        self.kv_dtype = kv_dtype
        self._mode = int(compression.codec.mode)
        self.allocator = ArenaAllocator(capacity)
        self.table = BlockTable()
        self._pending: dict[OffloadKey, _PendingStore] = {}
        # Both directions, for every live block (pending or cached): workers name
        # blocks by arena offset, eviction by key.
        self._key_at_offset: dict[int, OffloadKey] = {}
        self._offset_of_key: dict[OffloadKey, int] = {}
        self._readers: dict[OffloadKey, int] = {}
        self._failed: set[OffloadKey] = set()
        self.events: list[OffloadingEvent] | None = [] if enable_events else None
        self._stats = OffloadingConnectorStats()

    # --- worker reports (through the connector's worker metadata) ---

    def record_store_reports(self, reports: dict[int, BlockStoreReport]) -> None:
        """Merges per-block store reports keyed by arena offset."""
        for offset, report in reports.items():
            key = self._key_at_offset.get(offset)
            pending = self._pending.get(key) if key is not None else None
            if pending is None or pending.offset != offset:
                continue  # a store discarded by reset_cache
            pending.report = report if pending.report is None else pending.report.merge(report)

    def record_failed_loads(self, offsets: Iterable[int]) -> None:
        """Marks blocks whose reload failed its checks; they are dropped once no
        transfer reads them, so a damaged block is never served twice."""
        for offset in offsets:
            key = self._key_at_offset.get(offset)
            if key is not None and key in self.table:
                self._failed.add(key)
                self._stats.increase_counter(CompressionMetrics.LOADS_FAILED)
                if key not in self._readers:
                    self._drop(key)

    def record_short_hit(self, blocks: int) -> None:
        """Counts host-cache blocks the scheduler chose to recompute rather than load."""
        self._stats.increase_counter(CompressionMetrics.SHORT_HITS_RECOMPUTED, blocks)

    # --- OffloadingManager ---

    @override
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    @override
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self._pending:
            return LookupResult.HIT_PENDING
        if key in self.table and key not in self._failed:
            return LookupResult.HIT
        return LookupResult.MISS

    @override
    def prepare_load(self, keys: Collection[OffloadKey],
                     req_context: ReqContext) -> LoadStoreSpec:
        offsets, sizes = [], []
        for key in keys:
            record = self.table.get(key)
            assert record is not None, f"block {key!r} is not in the host cache"
            self._readers[key] = self._readers.get(key, 0) + 1
            offsets.append(record.offset)
            sizes.append(record.nbytes)
        self._stats.increase_counter(CompressionMetrics.BLOCKS_LOADED, len(offsets))
        return ArenaLoadStoreSpec(offsets, sizes)

    @override
    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.table.touch(keys)

    @override
    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:
            count = self._readers.get(key, 0)
            assert count > 0, f"block {key!r} was not being loaded"
            if count > 1:
                self._readers[key] = count - 1
                continue
            del self._readers[key]
            if key in self._failed:
                self._drop(key)

    @override
    def prepare_store(self, keys: Collection[OffloadKey],
                      req_context: ReqContext) -> PrepareStoreOutput | None:
        pending = self._pending
        keys_to_store = [k for k in self.table.absent(keys) if k not in pending]
        if not keys_to_store:
            return PrepareStoreOutput([], ArenaLoadStoreSpec([], []), [])
        size = self.reservation.nbytes
        protected = set(keys) | self._readers.keys()
        # The whole run in one free range, made by evicting the least recently used
        # blocks if they lie together (blocks stored together are freed together),
        # is the common case and costs one search; otherwise block by block.
        offsets = self.allocator.allocate_run(size, len(keys_to_store))
        evicted: list[OffloadKey] = []
        if offsets is None:
            victims = self.table.evict_for(size * len(keys_to_store), self.allocator,
                                           protected, max_victims=2 * len(keys_to_store))
            if victims:
                self._forget(victims)
                evicted.extend(victims)
                offsets = self.allocator.allocate_run(size, len(keys_to_store))
        if offsets is None:
            placed = self._allocate_evicting(len(keys_to_store), size, protected, evicted)
            if placed is None:
                self._announce_evicted(evicted)
                self._stats.increase_counter(CompressionMetrics.STORES_SKIPPED_FULL,
                                             len(keys_to_store))
                return None
            offsets = placed
        self._announce_evicted(evicted)
        # Per stored block this is the scheduler's cost: whole-list updates.
        pending.update(zip(keys_to_store, map(_PendingStore, offsets, repeat(size))))
        self._key_at_offset.update(zip(offsets, keys_to_store))
        self._offset_of_key.update(zip(keys_to_store, offsets))
        return PrepareStoreOutput(
            keys_to_store=keys_to_store,
            store_spec=ArenaLoadStoreSpec(offsets, [size] * len(offsets)),
            evicted_keys=evicted,
        )

    def _allocate_evicting(self, count: int, size: int, protected: set[OffloadKey],
                           evicted: list[OffloadKey]) -> list[int] | None:
        """``count`` ranges of ``size`` bytes, evicting LRU blocks (appended to
        ``evicted``) where the arena is full; ``None``, with nothing kept reserved,
        when blocks in use leave no room."""
        offsets: list[int] = []
        for _ in range(count):
            offset = self.allocator.allocate(size)
            if offset is None:
                victims = self.table.evict_for(size, self.allocator, protected)
                if victims is not None:
                    self._forget(victims)
                    evicted.extend(victims)
                    offset = self.allocator.allocate(size)
                if offset is None:
                    for taken in offsets:
                        self.allocator.free(taken)
                    return None
            offsets.append(offset)
        return offsets

    @override
    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext,
                       success: bool = True) -> None:
        stored: list[OffloadKey] = []
        records: list[BlockRecord] = []
        raw_pages = stored_bytes = oversized = 0
        # The sizes of this store set the next reservations; a block's unused tail is
        # given back only if it could hold a block at that size. A smaller tail would
        # be a hole no reservation fits (it returns with the block on eviction), and
        # trimming every block costs the scheduler's step a free-list insertion each.
        self.reservation.observe(max(
            (abs(p.report.nbytes) for key in keys
             if (p := self._pending.get(key)) is not None and p.report is not None),
            default=0) if success else 0)
        worth_trimming = self.reservation.nbytes
        # Per stored block this loop is the scheduler's cost: constants hoisted.
        pending_stores = self._pending
        raw_block, mode = self.raw_block_bytes, self._mode
        error_bound, dtype = self.compression.error_bound, self.kv_dtype
        for key in keys:
            pending = pending_stores.pop(key, None)
            if pending is None:
                continue
            report = pending.report
            if not success or report is None or report.nbytes <= 0:
                self.allocator.free(pending.offset)
                self._forget([key])
                if success and report is not None and report.nbytes < 0:
                    oversized += 1
                else:
                    self._stats.increase_counter(CompressionMetrics.STORES_FAILED)
                continue
            nbytes = min(report.nbytes, pending.reserved)
            if pending.reserved - nbytes >= worth_trimming:
                self.allocator.shrink(pending.offset, nbytes)
            records.append(BlockRecord(pending.offset, nbytes, raw_block, mode, error_bound,
                                       dtype, report.checksum, report.raw_pages > 0))
            stored.append(key)
            raw_pages += report.raw_pages
            stored_bytes += nbytes
        self.table.insert_many(zip(stored, records))
        self._stats.increase_counter(CompressionMetrics.STORES_OVERSIZED, oversized)
        self._stats.increase_counter(CompressionMetrics.RAW_PAGES, raw_pages)
        self._stats.increase_counter(CompressionMetrics.COMPRESSED_BYTES_STORED, stored_bytes)
        self._stats.increase_counter(CompressionMetrics.UNCOMPRESSED_BYTES_STORED,
                                     len(stored) * self.raw_block_bytes)
        self._stats.increase_counter(CompressionMetrics.BLOCKS_STORED, len(stored))
        if stored and self.events is not None:
            self.events.append(OffloadingEvent(keys=stored, medium=self.medium, removed=False))

    @override
    def reset_cache(self) -> None:
        self.allocator = ArenaAllocator(self.capacity)
        self.table = BlockTable()
        self._pending.clear()
        self._key_at_offset.clear()
        self._offset_of_key.clear()
        self._readers.clear()
        self._failed.clear()

    @override
    def take_events(self) -> Iterable[OffloadingEvent]:
        if self.events is not None:
            yield from self.events
            self.events.clear()

    @override
    def get_stats(self) -> OffloadingConnectorStats:
        stats, self._stats = self._stats, OffloadingConnectorStats()
        m = CompressionMetrics
        arena = self.allocator.stats()
        stats.set_gauge(m.COMPRESSION_RATIO, self.table.compression_ratio)
        stats.set_gauge(m.STORED_BYTES, self.table.stored_bytes)
        stats.set_gauge(m.RAW_BYTES, self.table.raw_bytes)
        stats.set_gauge(m.ARENA_USAGE, arena.allocated_bytes / self.capacity)
        stats.set_gauge(m.ARENA_FRAGMENTATION, arena.fragmentation)
        stats.set_gauge(m.CACHED_BLOCKS, len(self.table))
        return stats

    # --- helpers ---

    def _forget(self, keys: Collection[OffloadKey]) -> None:
        key_at_offset, offset_of_key = self._key_at_offset, self._offset_of_key
        for key in keys:
            del key_at_offset[offset_of_key.pop(key)]
        if self._failed:
            self._failed.difference_update(keys)

    def _announce_evicted(self, evicted: list[OffloadKey]) -> None:
        if not evicted:
            return
        self._stats.increase_counter(CompressionMetrics.BLOCKS_EVICTED, len(evicted))
        if self.events is not None:
            self.events.append(OffloadingEvent(keys=evicted, medium=self.medium, removed=True))

    def _drop(self, key: OffloadKey) -> None:
        self.allocator.free(self.table.remove(key).offset)
        self._forget([key])
        if self.events is not None:
            self.events.append(OffloadingEvent(keys=[key], medium=self.medium, removed=True))
