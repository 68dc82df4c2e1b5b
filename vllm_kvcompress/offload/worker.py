"""Worker-side transfers of compressed offloading: GPU KV cache <-> host arena.

Store: on a side stream that first waits for the model's stream, the pages of a
chunk of blocks (every layer in the blocks' KV group, K and V) are compressed in
one launch into a GPU staging buffer. A block-packing kernel, reading the record
sizes on the device, then moves each block's records to a second staging region
laid out like the blocks' arena ranges, summing their checksums on the way, and
the copy engines write that region to the pinned host arena with one copy per run
of adjacent ranges (usually one per chunk). Where the ranges are fragmented, the
kernel writes the records straight into the arena instead. The codec's page table
comes back in a pinned buffer that :meth:`CompressedOffloadingWorker.get_finished`
reads once the job's event has fired, and the per-block sizes and raw-page counts
are worked out from it on the host; nothing here waits on the model's stream.

Load: a chunk's blocks are copied from the arena into one half of a GPU staging
buffer and decompressed from there straight into the destination blocks of the
paged KV cache. The copy engines move each run of blocks lying together in the
arena with one copy (gaps and all), on a copy stream of their own, so the next
chunk crosses PCIe into the other half while this one decodes; where the blocks are
scattered over too many runs, the segment-copy kernel copies each block's records
instead. A page that fails its checks (bad magic, checksum, sizes) is not written;
its GPU block is reported as a load error, so vLLM recomputes it, and its arena
offset goes back to the scheduler, which drops the damaged block.

The worker remembers each stored block's record sizes (keyed by arena offset) in
host memory, so that a load needs no header parsing and no device round trip to
locate pages. KV caches whose dtype the codec does not take (e.g. fp8) are copied
raw through the same path. Runs on CPU tensors too (synchronously), which is how
CI exercises it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm_kvcompress import _custom_ops as ops
from vllm_kvcompress.codec import (
    MAX_VIEWS,
    SUPPORTED_DTYPES,
    CodecConfig,
    CompressStatus,
    DecodeStatus,
    record_bound,
)
from vllm_kvcompress.logger import init_logger
from vllm_kvcompress.offload.arena_allocator import align_up
from vllm_kvcompress.offload.manager import ArenaLoadStoreSpec

logger = init_logger(__name__)

# GPU staging is bounded so that a long prompt's store does not claim memory vLLM's
# profiler never saw; larger jobs run as several chunks through the same buffer.
DEFAULT_STAGING_BYTES = 64 << 20
# A store chunk goes to the arena by the copy engines when its blocks' ranges form at
# most this many runs of adjacent ranges, else by the block-packing kernel. Each copy
# costs the engine's step ~10 us of host time to issue and the copy engine a fixed
# setup (one copy per block measured ~13 us each on an H100), so 8 copies add ~0.1 ms
# to a chunk the kernel writes in ~0.5 ms and the copy engines, at their faster rate
# but with the reservations' tails, in ~0.4 ms (an 8192-token prompt, 8 chunks, on
# an H100): about where the kernel becomes the faster one. Below that the copy
# engines win, and they leave the SMs to the model's kernels.
MAX_DMA_RUNS = 8
# A load chunk goes from the arena to staging by the copy engines when its blocks
# form at most this many runs, else by the segment-copy kernel: the same trade as a
# store's (a fixed cost per copy against the kernel's SM-bound PCIe read), not yet
# measured apart for loads.
MAX_LOAD_DMA_RUNS = MAX_DMA_RUNS
_RAW_REASONS = (CompressStatus.RAW_NON_FINITE, CompressStatus.RAW_BOUND_UNATTAINABLE,
                CompressStatus.RAW_NO_GAIN)


@dataclass(frozen=True)
class PageLayout:
    """How the blocks of one canonical KV tensor split into codec pages.

    ``pages`` is a 2-D view in the KV dtype whose row ``block * pages_per_block + j``
    is page ``j`` of ``block`` (``None`` when the codec cannot take the dtype);
    ``raw`` is the tensor's whole storage as flat bytes, with block ``b`` at
    ``raw_offset + b * raw_stride``, for the uncompressed fallback.
    """

    pages: torch.Tensor | None
    pages_per_block: int
    raw: torch.Tensor
    raw_offset: int
    raw_stride: int
    block_bytes: int

    @property
    def reserve_bytes(self) -> int:
        """Worst-case arena bytes of one block."""
        if self.pages is None:
            return self.block_bytes
        return self.pages_per_block * record_bound(self.pages.shape[1], self.pages.dtype)


def make_page_layout(block_tensor: torch.Tensor, page_size_bytes: int, kv_dtype: torch.dtype,
                     elems_per_page: int) -> PageLayout:
    """Views a ``(num_blocks, bytes)`` int8 tensor as codec pages of ``elems_per_page``.

    One codec page is one layer's K or V of one block when ``elems_per_page`` is
    ``block_size * num_kv_heads * head_size``, so each page's relative bound follows
    that tensor's own value range. When the block does not split evenly, or padded
    rows make a split impossible as a view, the whole block is one page.
    """
    raw = torch.empty(0, dtype=torch.uint8, device=block_tensor.device).set_(
        block_tensor.untyped_storage())
    itemsize = kv_dtype.itemsize
    pages = None
    per_block = 1
    aligned = (page_size_bytes % itemsize == 0 and block_tensor.stride(0) % itemsize == 0
               and block_tensor.storage_offset() % itemsize == 0)
    if kv_dtype in SUPPORTED_DTYPES and aligned:
        typed = block_tensor[:, :page_size_bytes].view(kv_dtype)
        elems = typed.shape[1]
        if elems % elems_per_page == 0 and typed.is_contiguous():
            per_block = elems // elems_per_page
        pages = typed.reshape(-1, elems // per_block) if per_block > 1 else typed
    return PageLayout(pages=pages, pages_per_block=per_block, raw=raw,
                      raw_offset=block_tensor.storage_offset(),
                      raw_stride=block_tensor.stride(0), block_bytes=page_size_bytes)


class _Device:
    """Streams and events on CUDA; immediate execution on the CPU."""

    def __init__(self, device: torch.device):
        self.is_cuda = device.type == "cuda"
        self.device = device

    def new_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.Stream(device=self.device) if self.is_cuda else None

    def event(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if stream is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def mark(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """An event after ``stream``'s work so far, for another stream to wait on."""
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @staticmethod
    def wait(stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
        """Holds ``stream``'s later work until ``event`` has fired; the host goes on."""
        if stream is not None and event is not None:
            stream.wait_event(event)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.is_cuda)


class _PinnedUpload:
    """Host metadata to the GPU through reused pinned buffers, one set per stream.

    A copy from pageable memory may first wait for the stream's earlier work (for a
    store, the model's pending kernels); one from pinned memory never does. Pinning a
    fresh buffer per job (``Tensor.pin_memory``) cost ~3 ms of the engine's step for
    one long prompt's load on the H100, so buffers are kept and reused once an event
    says the GPU has read them. A store's copy waits for the model's stream, so its
    buffer may still be queued at the next store: a few buffers take turns.
    """

    KEPT = 4

    def __init__(self, device: torch.device):
        self._device = device
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event]] = []

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        source = torch.from_numpy(np.ascontiguousarray(array)).view(-1)
        nbytes = source.numel() * source.element_size()
        free = [i for i, (buf, read) in enumerate(self._buffers)
                if buf.numel() >= nbytes and read.query()]
        if free:
            buffer, _ = self._buffers.pop(free[0])
        else:
            buffer = torch.empty(1 << max(nbytes - 1, 0).bit_length(), dtype=torch.uint8,
                                 pin_memory=True)
            if len(self._buffers) >= self.KEPT:
                # The dropped buffer's pending copy keeps it: torch's pinned-memory
                # cache reuses it only after that copy.
                self._buffers.pop(0)
        host = buffer[:nbytes].view(source.dtype)
        host.copy_(source)
        on_device = host.to(self._device, non_blocking=True)
        read = torch.cuda.Event()
        read.record()
        self._buffers.append((buffer, read))
        return on_device.view(array.shape)


@dataclass
class WorkerCounters:
    """Totals since start on this rank, for benchmarks and tests (read them with
    ``LLM.collective_rpc``); the scheduler's metrics are the per-step view."""

    blocks_stored: int = 0
    # not stored: compressed larger than the arena range the scheduler reserved
    blocks_oversized: int = 0
    bytes_stored: int = 0
    raw_bytes_stored: int = 0
    raw_pages: int = 0
    # Why pages went raw (CompressStatus 1..3); uncompressible dtypes count in raw_pages only.
    raw_pages_non_finite: int = 0
    raw_pages_bound_unattainable: int = 0
    raw_pages_no_gain: int = 0
    blocks_loaded: int = 0
    bytes_loaded: int = 0
    failed_loads: int = 0


@dataclass
class _Job:
    job_id: int
    start: torch.cuda.Event | None
    end: torch.cuda.Event | None
    # Reads the job's pinned report buffers once ``end`` has fired; holding them
    # in its closure also keeps them alive until then.
    finish: Callable[[], TransferResult]

    def done(self) -> bool:
        return self.end is None or self.end.query()

    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return self.start.elapsed_time(self.end) * 1e-3


@dataclass
class _StoreBatch:
    """One KV group's part of a store, read on the host once the job has finished."""

    offsets: np.ndarray
    # arena bytes reserved for each block; a block needing more is reported, not kept
    reserved: np.ndarray
    # (copies, blocks) pinned status of the segment copies into the arena
    copy_status: torch.Tensor
    # (blocks, records, 3) pinned page table of the codec; None when stored raw
    pages: torch.Tensor | None
    # record sizes of a block stored raw (one record per tensor)
    raw_sizes: np.ndarray | None
    # per block, pinned: the sum of its records' header checksums (pack_blocks);
    # None when stored raw
    checksums: torch.Tensor | None = None


@dataclass
class _LoadBatch:
    """One KV group's part of a load, read on the host once the job has finished."""

    block_ids: np.ndarray
    offsets: np.ndarray
    # blocks this rank never stored: failed loads that copy nothing
    missing: np.ndarray
    nbytes: int = 0
    # (copies, present blocks) pinned status of the copies out of the arena
    copy_status: torch.Tensor | None = None
    # (present blocks, records) pinned decode status of every page
    page_status: torch.Tensor | None = None

    def failed(self) -> np.ndarray:
        failed = self.missing.copy()
        if self.copy_status is not None:
            bad = (self.copy_status.numpy() != 0).any(0)
            if self.page_status is not None:
                bad |= (self.page_status.numpy() != DecodeStatus.OK).any(1)
            failed[~self.missing] = bad
        return failed


class CompressedOffloadingWorker(OffloadingWorker):
    """Compresses KV blocks into, and restores them from, a pinned host arena."""

    def __init__(
        self,
        kv_caches: CanonicalKVCaches,
        kv_dtype: torch.dtype,
        elems_per_page: int,
        codec: CodecConfig,
        arena_bytes: int,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ):
        device = kv_caches.tensors[0].tensor.device
        self._dev = _Device(device)
        self.codec = codec
        self.layouts = [
            make_page_layout(t.tensor, t.page_size_bytes, kv_dtype, elems_per_page)
            for t in kv_caches.tensors
        ]
        # One codec launch covers a chunk's pages in all tensors, which it takes as
        # views of one shape; vLLM gives one KV group uniform layers.
        self.compressible = (
            all(layout.pages is not None for layout in self.layouts)
            and len(self.layouts) <= MAX_VIEWS
            and len({(layout.pages.shape, layout.pages.stride(), layout.pages_per_block)
                     for layout in self.layouts}) == 1)
        if not self.compressible:
            logger.warning("KV cache dtype %s (or its layout) is not one the codec takes "
                           "(fp16, bf16, fp32 in tensors that split into equal pages): "
                           "offloaded blocks are stored uncompressed", kv_dtype)
        # Which canonical tensors hold each KV group's pages (one entry per tensor).
        self.group_tensors = [sorted({ref.tensor_idx for ref in refs})
                              for refs in kv_caches.group_data_refs]
        self._page_bases = ([self._page_base(tensors) for tensors in self.group_tensors]
                            if self.compressible else [])
        self.arena = self._dev.host_buffer((arena_bytes,), torch.uint8)
        self._staging_bytes = staging_bytes
        # The benchmark sets these to 0 to time the kernels that write the arena or
        # read it themselves on the same stores and loads.
        self.max_dma_runs = MAX_DMA_RUNS
        self.max_load_dma_runs = MAX_LOAD_DMA_RUNS
        self._store_stream = self._dev.new_stream()
        # A load decodes on the load stream while its next chunk is copied into the
        # other staging half on the copy stream.
        self._load_stream = self._dev.new_stream()
        self._load_copy_stream = self._dev.new_stream()
        # A load chunk spans at most this many staged bytes (16-aligned, so that both
        # halves, and the records in them, start 16-aligned).
        self._load_chunk_bytes = align_up(max(staging_bytes // 2, 1))
        # Per staging half: which half the next load chunk takes (chunks alternate
        # across groups and jobs too), and the load stream's event after the last
        # decode that read each half, which a copy into that half must wait for.
        self._next_half = 0
        self._half_read: list[torch.cuda.Event | None] = [None, None]
        self._uploads = ({store: _PinnedUpload(device) for store in (True, False)}
                         if self._dev.is_cuda else None)
        # GPU staging per direction (True = store), taken now at the size the chunks
        # use, so that no store or load fails later for GPU memory vLLM's profiler
        # never saw; the store's grows only for a single block larger than
        # staging_bytes, the load's never (its halves hold any chunk). Each is
        # allocated on the stream that uses it, as a grown one is, so the caching
        # allocator never hands it to other work while that stream reads it; the
        # load's copy stream writes its halves, but they are never freed.
        self._staging_buffers = {}
        for store, nbytes in self._staging_sizes().items():
            with _on(self._store_stream if store else self._load_stream):
                self._staging_buffers[store] = self._reserve_staging(nbytes)
        # arena offset -> record sizes of the block's pages on this rank, and the same
        # offsets sorted, to find the entries a new store's ranges overwrite
        self._records: dict[int, np.ndarray] = {}
        self._record_offsets = np.empty(0, dtype=np.int64)
        self._max_reserve_bytes = max(map(self.reserve_bytes, range(len(self.group_tensors))))
        self._jobs: deque[_Job] = deque()
        # Reports for the scheduler, drained by the connector each step:
        # job id -> {arena offset: (bytes written, raw pages, checksum)}; bytes 0 = failed,
        # -n = needed n bytes, more than reserved (not written).
        self.store_reports: dict[int, dict[int, tuple[int, int, int]]] = {}
        # job id -> arena offsets of blocks whose reload failed its checks
        self.failed_loads: dict[int, list[int]] = {}
        self.failed_load_block_ids: set[int] = set()
        self.counters = WorkerCounters()
        self._warned_unattainable = False
        self._raw_bytes_per_block = self.raw_block_bytes(0)

    def _staging_sizes(self) -> dict[bool, int]:
        """Staging bytes per direction: a store chunk holds as many worst-case blocks
        as fit in staging_bytes, twice (the codec's output, then the slots laid out
        like the arena). A load's staging is two halves that take turns, so the same
        budget is split between them rather than doubled: a load chunk takes the
        blocks that start within the next staging_bytes / 2 of staged span, so each
        half is that plus one worst-case block, which the chunk's last block may run
        past it (64 MiB and two blocks in all by default). Blocks stored raw need
        none."""
        if not self.compressible:
            return {True: 0, False: 0}
        groups = range(len(self.group_tensors))
        store = max(2 * self._store_region(g) for g in groups)
        half = self._load_chunk_bytes + max(map(self.reserve_bytes, groups))
        return {True: store, False: 2 * half}

    def _store_chunk_blocks(self, group: int) -> int:
        """Blocks of ``group`` per store chunk: as many worst cases as staging_bytes
        holds. The slots take as much again rather than halving the chunk: each chunk
        costs the engine's step a fixed handful of launches on the host."""
        return max(1, self._staging_bytes // self.reserve_bytes(group))

    def _store_region(self, group: int) -> int:
        """Bytes of each of a store chunk's two staging regions."""
        return self._store_chunk_blocks(group) * self.reserve_bytes(group)

    def _reserve_staging(self, nbytes: int) -> torch.Tensor:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=self._dev.device)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"compressed KV offloading needs {nbytes / 2**20:.0f} MiB of GPU memory "
                "for a staging buffer; lower --gpu-memory-utilization to leave it free"
            ) from e

    def reserve_bytes(self, group: int) -> int:
        """Worst-case arena bytes of one block of ``group`` on this rank."""
        return sum(self.layouts[t].reserve_bytes for t in self.group_tensors[group])

    def raw_block_bytes(self, group: int) -> int:
        return sum(self.layouts[t].block_bytes for t in self.group_tensors[group])

    # --- OffloadingWorker ---

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: LoadStoreSpec) -> bool:
        assert isinstance(dst_spec, ArenaLoadStoreSpec)
        stream = self._store_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self._dev.device))
        with _on(stream), _nvtx("kvcompress.store"):
            start = self._dev.event(stream)
            batches = [self._store_group(group, block_ids, offsets, reserved)
                       for group, block_ids, offsets, reserved
                       in self._groups(src_spec, dst_spec)]
            end = self._dev.event(stream)

        def finish() -> TransferResult:
            reports = self.store_reports.setdefault(job_id, {})
            stored = sum(self._collect_store(batch, reports) for batch in batches)
            self.counters.bytes_stored += stored
            return TransferResult(job_id=job_id, success=True, transfer_size=stored,
                                  transfer_time=job.seconds())

        job = _Job(job_id, start, end, finish)
        self._jobs.append(job)
        return True

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        assert isinstance(src_spec, ArenaLoadStoreSpec)
        stream = self._load_stream
        with _on(stream), _nvtx("kvcompress.load"):
            start = self._dev.event(stream)
            batches = [self._load_group(group, block_ids, offsets)
                       for group, block_ids, offsets, _ in self._groups(dst_spec, src_spec)]
            # The load stream has waited for each chunk's copy before decoding it, so
            # this event covers the copy stream's work too: once it fires, the KV
            # cache is written and the report buffers are filled.
            end = self._dev.event(stream)
        loaded = sum(batch.nbytes for batch in batches)

        def finish() -> TransferResult:
            self.counters.bytes_loaded += loaded
            for batch in batches:
                failed = batch.failed()
                self.counters.blocks_loaded += int((~failed).sum())
                self.counters.failed_loads += int(failed.sum())
                if failed.any():
                    self.failed_load_block_ids.update(int(b) for b in batch.block_ids[failed])
                    self.failed_loads.setdefault(job_id, []).extend(
                        int(o) for o in batch.offsets[failed])
                    logger.warning("%d offloaded KV blocks failed their checks on reload; "
                                   "they will be recomputed", int(failed.sum()))
            return TransferResult(job_id=job_id, success=True, transfer_size=loaded,
                                  transfer_time=job.seconds())

        job = _Job(job_id, start, end, finish)
        self._jobs.append(job)
        return True

    def get_finished(self) -> list[TransferResult]:
        finished = []
        while self._jobs and self._jobs[0].done():
            finished.append(self._jobs.popleft().finish())
        return finished

    def wait(self, job_ids: set[int]) -> None:
        for job in self._jobs:
            if job.job_id in job_ids and job.end is not None:
                job.end.synchronize()

    def shutdown(self) -> None:
        for job in self._jobs:
            if job.end is not None:
                job.end.synchronize()
        self._jobs.clear()
        self._records.clear()
        self._record_offsets = np.empty(0, dtype=np.int64)

    # --- store ---
    # The host issues these launches while the engine's next step waits for it, so
    # a group costs a fixed handful of launches per chunk; everything the scheduler
    # needs is worked out on the host from one copy of the page table.

    def _store_group(self, group: int, block_ids: np.ndarray, offsets: np.ndarray,
                     reserved: np.ndarray) -> _StoreBatch:
        """Compresses the blocks ``block_ids`` of ``group`` into their arena
        reservations (``reserved`` bytes at ``offsets``), a chunk at a time through
        the staging buffer. Nothing is written outside a block's reservation: the
        next range may already hold another block."""
        n = len(block_ids)
        device = self._dev.device
        tensors = self.group_tensors[group]
        if not self.compressible:
            return self._store_raw(tensors, block_ids, offsets, reserved)
        step = self._store_chunk_blocks(group)
        region = self._store_region(group)
        # A block whose range is not wholly inside the arena gets destination -1,
        # which the block packing refuses and reports, so the block fails unwritten.
        inside = self._inside_arena(offsets, reserved)
        plans = [_plan_chunk(offsets[lo:lo + step], reserved[lo:lo + step],
                             inside[lo:lo + step], region, self.max_dma_runs)
                 for lo in range(0, n, step)]
        packed = self._to_device(np.concatenate([block_ids, reserved,
                                                 *(plan.dst for plan in plans)]), store=True)
        ids, room, dst = packed[:n], packed[n:2 * n], packed[2 * n:]
        per_block = self._page_bases[group].numel()
        page_ids = self._page_ids(group, ids)
        views = [self.layouts[t].pages for t in tensors]
        table = torch.empty((n, per_block, 3), dtype=torch.int64, device=device)
        checksums = torch.empty(n, dtype=torch.int64, device=device)
        status = torch.empty(n, dtype=torch.int32, device=device)
        worst = self.reserve_bytes(group)
        staging = self._store_staging(2 * region)
        records, slots = staging[:region], staging[region:]
        for lo, plan in zip(range(0, n, step), plans):
            hi = min(lo + step, n)
            part = table[lo:hi]
            with _nvtx("kvcompress.compress"):
                ops.compress(views, page_ids[lo * per_block:hi * per_block],
                             self.codec.error_bound, self.codec.relative, int(self.codec.mode),
                             self.codec.rows, records[:(hi - lo) * worst], part.view(-1, 3))
            # A block's records lie together in staging: one segment per block, cut
            # at the reservation's end (an oversized block is then reported, not
            # recorded: its cut copy is never read); its record checksums are summed
            # on the way, where the host would miss its caches reading them.
            with _nvtx("kvcompress.copy"):
                ops.pack_blocks(records, part, room[lo:hi],
                                self.arena if plan.runs is None else slots, dst[lo:hi],
                                status[lo:hi], checksums[lo:hi])
                # Each run copies its blocks' whole reservations: past a block's
                # records that is stale staging, but the reservation is the block's
                # own and readers go by the recorded sizes, so one copy per run can
                # stand in for one per block without writing any other block's bytes.
                for at, slot, nbytes in plan.runs or ():
                    self.arena[at:at + nbytes].copy_(slots[slot:slot + nbytes],
                                                     non_blocking=True)
        return _StoreBatch(offsets, reserved, self._to_host(status[None]),
                           self._to_host(table), None, self._to_host(checksums))

    def _store_raw(self, tensors: list[int], block_ids: np.ndarray, offsets: np.ndarray,
                   reserved: np.ndarray) -> _StoreBatch:
        """Copies each tensor's part of the blocks into the arena as it is."""
        n = len(block_ids)
        sizes = np.array([self.layouts[t].block_bytes for t in tensors], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        fits = (sizes.sum() <= reserved).astype(np.int64)
        packed = self._to_device(np.concatenate([block_ids, offsets, fits]), store=True)
        ids, dst, fit = packed[:n], packed[n:2 * n], packed[2 * n:]
        status = torch.empty((len(tensors), n), dtype=torch.int32, device=ids.device)
        with _nvtx("kvcompress.copy"):
            for i, t in enumerate(tensors):
                layout = self.layouts[t]
                ops.copy_segments(layout.raw, layout.raw_offset + ids * layout.raw_stride,
                                  self.arena, dst + int(starts[i]), fit * layout.block_bytes,
                                  status[i])
        return _StoreBatch(offsets, reserved, self._to_host(status), None, sizes)

    def _page_base(self, tensors: list[int]) -> torch.Tensor:
        """Codec page ids of block 0's pages in ``tensors``' views, ordered tensor,
        page; block ``b``'s are these plus ``b * pages_per_block``."""
        layout = self.layouts[tensors[0]]
        k, per_view = layout.pages_per_block, layout.pages.shape[0]
        base = (torch.arange(len(tensors))[:, None] * per_view + torch.arange(k)[None, :])
        return base.reshape(-1).to(self._dev.device)

    def _page_ids(self, group: int, ids: torch.Tensor) -> torch.Tensor:
        """Codec page ids of every page of blocks ``ids`` in ``group``, ordered block,
        tensor, page, so that a block's records lie together in staging."""
        k = self.layouts[self.group_tensors[group][0]].pages_per_block
        return (ids[:, None] * k + self._page_bases[group][None, :]).reshape(-1)

    def _collect_store(self, batch: _StoreBatch, reports: dict[int, tuple[int, int, int]],
                       ) -> int:
        """Records one group's store once its job has finished; returns the bytes
        it wrote."""
        n = len(batch.offsets)
        ok = (batch.copy_status.numpy() == 0).all(0)
        if batch.pages is not None:
            table = batch.pages.numpy()
            sizes, status = table[:, :, 1], table[:, :, 2]
            ok &= (status != CompressStatus.BAD_SOURCE_INDEX).all(1)
            reasons = np.stack([(status == r).sum(1) for r in _RAW_REASONS], 1)
            raw_pages = reasons.sum(1)
        else:
            sizes = np.broadcast_to(batch.raw_sizes, (n, len(batch.raw_sizes)))
            reasons = np.zeros((n, len(_RAW_REASONS)), dtype=np.int64)
            raw_pages = np.full(n, sizes.shape[1])
        needed = sizes.sum(1)
        fits = needed <= batch.reserved
        # Report per block: bytes written, 0 for a failed store, or minus the bytes
        # needed for a block its reservation could not hold (the scheduler drops it
        # and reserves more from then on).
        reported = np.where(ok & ~fits, -needed, needed * (ok & fits))
        ok &= fits
        checksums = ((batch.checksums.numpy() & 0xFFFFFFFF) * ok if batch.checksums is not None
                     else np.zeros(n, dtype=np.int64))
        # This runs on the engine's step thread: whole-array work, and one compact
        # copy of the record sizes whose rows the stored blocks keep.
        offsets = batch.offsets.tolist()
        reports.update(zip(offsets, zip(reported.tolist(), raw_pages.tolist(),
                                        checksums.tolist())))
        kept = reported > 0
        self._replace_records(batch.offsets, batch.reserved, kept,
                              np.array(sizes[kept], dtype=np.int32))
        c = self.counters
        c.blocks_oversized += int((~fits).sum())
        c.blocks_stored += int(ok.sum())
        c.raw_bytes_stored += int(ok.sum()) * self._raw_bytes_per_block
        c.raw_pages += int(raw_pages[ok].sum())
        per_reason = reasons[ok].sum(0)
        c.raw_pages_non_finite += int(per_reason[0])
        c.raw_pages_bound_unattainable += int(per_reason[1])
        c.raw_pages_no_gain += int(per_reason[2])
        if per_reason[1] and not self._warned_unattainable:
            # The usual cause is a bound finer than the dtype's own rounding (bf16 keeps
            # 8 significant bits), which silently turns compression off.
            self._warned_unattainable = True
            logger.warning(
                "Some KV pages are stored uncompressed because the error bound %g%s is "
                "finer than %s can represent for their values; raise "
                "--compression-error-bound (docs/tuning.md) to compress them",
                self.codec.error_bound, " (relative)" if self.codec.relative else "",
                self.layouts[0].pages.dtype)
        return int(needed[ok].sum())

    def _inside_arena(self, offsets: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Which ranges of ``nbytes`` at ``offsets`` lie wholly inside the arena."""
        return (offsets >= 0) & (nbytes >= 0) & (offsets <= self.arena.numel() - nbytes)

    def _replace_records(self, offsets: np.ndarray, reserved: np.ndarray, kept: np.ndarray,
                         sizes: np.ndarray) -> None:
        """Records the sizes of the blocks ``kept`` of a store and forgets every
        earlier block whose records overlap one of the store's ranges. The scheduler
        reserved those ranges free, so a block there was evicted or dropped; the
        worker is not told of evictions, and without this its table would keep an
        entry for every offset ever used, growing with a long-running server's
        traffic rather than with the arena."""
        known = self._record_offsets
        # A range outside the arena is the scheduler's error, not a freed range.
        valid = self._inside_arena(offsets, reserved)
        order = np.argsort(offsets[valid])
        starts = offsets[valid][order]
        ends = starts + np.maximum(reserved[valid][order], 1)
        if not len(starts):
            return
        new = np.sort(offsets[kept & valid])
        # Only entries from a worst-case block before the first range to the end of
        # the last can overlap (a block's records never span more than the worst
        # case); on a full arena that window is a few blocks more than the store,
        # whatever the number of blocks held.
        lo = np.searchsorted(known, starts[0] - self._max_reserve_bytes)
        hi = np.searchsorted(known, ends[-1])
        window = known[lo:hi]
        # The ranges of one store are disjoint: an entry lies inside the last one
        # starting at or before it, or, if its records reach that far, runs into the
        # first one starting after it, which only those few entries' sizes can tell.
        at = np.searchsorted(starts, window, "right") - 1
        stale = (at >= 0) & (window < ends[np.maximum(at, 0)])
        nxt = at + 1
        near = np.flatnonzero(~stale & (nxt < len(starts)))
        near = near[window[near] >= starts[nxt[near]] - self._max_reserve_bytes]
        record_ends = window[near] + np.array(
            [int(self._records[o].sum()) for o in window[near].tolist()], dtype=np.int64)
        stale[near[record_ends > starts[nxt[near]]]] = True
        for offset in window[stale].tolist():
            del self._records[offset]
        # The new blocks start inside the store's ranges, so inside the window, where
        # every earlier entry was just found stale.
        self._record_offsets = np.concatenate(
            [known[:lo], np.sort(np.concatenate([window[~stale], new])), known[hi:]])
        self._records.update(zip(offsets[kept & valid].tolist(), sizes[valid[kept]]))

    # --- load ---

    def _load_group(self, group: int, block_ids: np.ndarray,
                    offsets: np.ndarray) -> _LoadBatch:
        """Copies one group's blocks to the GPU and decodes them into the KV cache."""
        device = self._dev.device
        tensors = self.group_tensors[group]
        # Records per block: every page of every tensor, or one raw copy per tensor.
        k = self.layouts[tensors[0]].pages_per_block if self.compressible else 1
        per_block = k * len(tensors)
        missing = np.zeros(len(block_ids), dtype=bool)
        sizes = np.zeros((len(block_ids), per_block), dtype=np.int64)
        for i, offset in enumerate(offsets.tolist()):
            rec = self._records.get(offset)
            if rec is None or len(rec) != per_block:
                missing[i] = True  # never stored by this rank: treat as a failed load
            else:
                sizes[i] = rec
        batch = _LoadBatch(block_ids, offsets, missing)
        present = ~missing
        sizes = sizes[present]
        m = len(sizes)
        if m == 0:
            return batch
        batch.nbytes = int(sizes.sum())
        if not self.compressible:
            both = self._to_device(np.concatenate([block_ids[present], offsets[present]]),
                                   store=False)
            batch.copy_status = self._to_host(self._load_raw(tensors, both[:m], both[m:]))
            return batch
        totals = sizes.sum(1)
        plan = _plan_load(offsets[present], totals, self.arena.numel(), self._load_chunk_bytes,
                          self.max_load_dma_runs)
        # Each page's record in its chunk's staging half. A block outside the arena is
        # copied by no run and points the decoder at no record (-1): its pages fail
        # unwritten (BAD_RECORD) rather than decode whatever the half held before.
        rec_starts = plan.seg[:, None] + np.cumsum(sizes, 1) - sizes
        rec_starts[~plan.inside] = -1
        packed = self._to_device(np.concatenate([
            block_ids[present], offsets[present], plan.seg, totals,
            np.stack([rec_starts, sizes], 2).ravel()]), store=False)
        ids, src, seg, tot = (packed[i * m:(i + 1) * m] for i in range(4))
        records = packed[4 * m:].view(m, per_block, 2)
        page_ids = self._page_ids(group, ids)
        views = [self.layouts[t].pages for t in tensors]
        # Zeros for the chunks the copy engines copy; the kernel writes its own.
        copy_status = torch.zeros((1, m), dtype=torch.int32, device=device)
        page_status = torch.empty((m, per_block), dtype=torch.int32, device=device)
        buffer = self._staging_buffers[False]
        halves = (buffer[:buffer.numel() // 2], buffer[buffer.numel() // 2:])
        load_stream, copy_stream = self._load_stream, self._load_copy_stream
        # The copies start after the job's start event, so its GPU time covers them,
        # and after the metadata above has reached the GPU, which the kernel path
        # reads. Those tensors (and copy_status, which the kernel writes) belong to
        # the load stream's pool: the caching allocator reuses their memory only for
        # later work of the load stream, which by then has waited for every copy
        # below, so they need no record_stream.
        self._dev.wait(copy_stream, self._dev.mark(load_stream))
        for chunk in plan.chunks:
            lo, hi = chunk.lo, chunk.hi
            half = self._next_half
            self._next_half ^= 1
            staging = halves[half][:int(plan.seg[hi - 1] + totals[hi - 1])]
            with _on(copy_stream), _nvtx("kvcompress.copy"):
                # The half may still be read by the decode of the chunk before last
                # (of this job or an earlier one): overwrite it only after that.
                self._dev.wait(copy_stream, self._half_read[half])
                if chunk.runs is None:
                    ops.copy_segments(self.arena, src[lo:hi], staging, seg[lo:hi],
                                      tot[lo:hi], copy_status[0, lo:hi])
                else:
                    for at, into, nbytes in chunk.runs:
                        staging[into:into + nbytes].copy_(self.arena[at:at + nbytes],
                                                          non_blocking=True)
                copied = self._dev.mark(copy_stream)
            # The decode reads what the copy wrote; the copy of the next chunk, into
            # the other half, goes on meanwhile.
            self._dev.wait(load_stream, copied)
            with _nvtx("kvcompress.decompress"):
                ops.decompress(staging, records[lo:hi].view(-1, 2), views,
                               page_ids[lo * per_block:hi * per_block],
                               page_status[lo:hi].view(-1))
            self._half_read[half] = self._dev.mark(load_stream)
        batch.copy_status = self._to_host(copy_status)
        batch.page_status = self._to_host(page_status)
        return batch

    def _load_raw(self, tensors: list[int], ids: torch.Tensor, src: torch.Tensor,
                  ) -> torch.Tensor:
        """Copies blocks stored as they are from the arena into each tensor; returns
        the per-tensor copy status."""
        n = ids.numel()
        status = torch.empty((len(tensors), n), dtype=torch.int32, device=ids.device)
        start = 0
        with _nvtx("kvcompress.copy"):
            for i, t in enumerate(tensors):
                layout = self.layouts[t]
                length = torch.full((n,), layout.block_bytes, dtype=torch.int64,
                                    device=ids.device)
                ops.copy_segments(self.arena, src + start, layout.raw,
                                  layout.raw_offset + ids * layout.raw_stride, length, status[i])
                start += layout.block_bytes
        return status

    # --- helpers ---

    def _to_device(self, array: np.ndarray, store: bool) -> torch.Tensor:
        """Host metadata to the GPU, on the current (store or load) stream, without
        blocking the host."""
        if self._uploads is None:
            return torch.from_numpy(array)
        return self._uploads[store](array)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = self._dev.host_buffer(tuple(t.shape), t.dtype)
        host.copy_(t, non_blocking=True)
        return host

    def _store_staging(self, nbytes: int) -> torch.Tensor:
        # Grown on the store stream, which uses it, so the caching allocator only
        # recycles the old buffer after that stream's earlier work.
        nbytes = max(nbytes, 16)
        buf = self._staging_buffers[True]
        if buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self._dev.device)
            self._staging_buffers[True] = buf
        return buf[:nbytes]

    def _groups(self, gpu_spec: GPULoadStoreSpec, arena_spec: ArenaLoadStoreSpec,
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(group, GPU block ids, arena offsets, arena bytes)`` of each KV group
        with blocks in the transfer; the specs list the same blocks in the same order."""
        blocks = _split_groups(gpu_spec, len(self.group_tensors))
        assert sum(len(b) for b in blocks) == len(arena_spec), (
            "compressed offloading needs one GPU block per offloaded block "
            "(blocks_per_chunk = 1)")
        first = 0
        for group, block_ids in enumerate(blocks):
            span = slice(first, first + len(block_ids))
            first += len(block_ids)
            if len(block_ids):
                yield group, block_ids, arena_spec.offsets[span], arena_spec.nbytes[span]


@dataclass
class _ChunkPlan:
    """How one store chunk's records reach the arena."""

    # per block, where the block packing puts its records: a slot (copy-engine path)
    # or the arena offset (kernel path); -1 for a range outside the arena
    dst: np.ndarray
    # (arena offset, slot offset, bytes) of each copy-engine copy; None: the kernel
    # writes the records into the arena itself
    runs: list[tuple[int, int, int]] | None


def _plan_chunk(offsets: np.ndarray, reserved: np.ndarray, inside: np.ndarray,
                region: int, max_runs: int) -> _ChunkPlan:
    """Splits a chunk's arena ranges (those ``inside`` the arena) into maximal runs
    of adjacent ranges and lays the runs back to back in a slot region, each block's
    slot where its range lies within its run; the copy engines then write each run
    with one copy. Past ``max_runs`` runs, or when the ranges do not fit the
    ``region`` bytes of slots (reservations larger than the worst case), the chunk
    takes the kernel path."""
    width = np.where(inside, reserved, 0)
    slots = np.cumsum(width) - width
    follows = np.zeros(len(offsets), dtype=bool)
    follows[1:] = inside[:-1] & (offsets[1:] == offsets[:-1] + reserved[:-1])
    starts = np.flatnonzero(inside & ~follows)
    total = int(width.sum())
    if len(starts) > max_runs or total > region:
        return _ChunkPlan(np.where(inside, offsets, -1), None)
    # Blocks outside the arena take no room, so a run ends where the next one starts.
    ends = np.append(slots[starts[1:]], total)
    runs = list(zip(offsets[starts].tolist(), slots[starts].tolist(),
                    (ends - slots[starts]).tolist()))
    return _ChunkPlan(np.where(inside, slots, -1), runs)


@dataclass
class _LoadChunk:
    """Blocks ``lo:hi`` of a load, staged together in one staging half."""

    lo: int
    hi: int
    # (arena offset, staging offset, bytes) of each copy-engine copy; None: the
    # segment-copy kernel copies each block's records
    runs: list[tuple[int, int, int]] | None


@dataclass
class _LoadPlan:
    """Where a load's blocks go in staging and how they get there."""

    # per block, where its records start in its chunk's staging half
    seg: np.ndarray
    # per block, whether its records lie wholly inside the arena
    inside: np.ndarray
    chunks: list[_LoadChunk]


def _plan_load(offsets: np.ndarray, totals: np.ndarray, arena_bytes: int, chunk_bytes: int,
               max_runs: int) -> _LoadPlan:
    """Splits a load's blocks (records of ``totals`` bytes at ``offsets``) into runs
    that lie together in the arena and into chunks of at most ``chunk_bytes`` of
    staged span (a chunk's last block may run past that, by at most its records).

    A block continues the previous block's run when it starts at or after that
    block's records end and at most the load's largest block's records past them.
    The worker knows the records, not the reservations, so this is what stands for
    "the next reservation": the scheduler reserves blocks stored together back to
    back, each 1/8 over the largest recent block, and gives a tail back only where it
    could hold another block, so the tails left behind records are below about one
    block's records and reservations made together stay one run. Copying such a gap
    costs about what one more copy would: a block of an 8192-token prompt (~300 KB)
    crosses PCIe in ~6 us at the H100's 55 GB/s, and issuing a copy costs the
    engine's step ~10 us. Wider gaps (a first store's worst-case reservations,
    blocks stored apart) start a new run.

    Each run's whole span (gaps included) is staged with one copy, the runs of a
    chunk back to back, so a block's records sit in staging where they sat in the
    arena relative to its run. The kernel path stages the blocks at the same places,
    so the decoder's record table does not depend on the way a chunk is copied. A
    chunk of more than ``max_runs`` runs takes the kernel path; blocks outside the
    arena join no run and are copied by neither.
    """
    n = len(offsets)
    inside = (offsets >= 0) & (offsets <= arena_bytes - totals)
    follows = np.zeros(n, dtype=bool)
    gaps = offsets[1:] - (offsets[:-1] + totals[:-1])
    follows[1:] = inside[:-1] & inside[1:] & (gaps >= 0) & (gaps <= totals.max())
    # A block's staged width reaches the next block of its run, else ends with its records.
    width = totals.copy()
    width[:-1] = np.where(follows[1:], offsets[1:] - offsets[:-1], totals[:-1])
    pos = np.cumsum(width) - width
    chunk = pos // chunk_bytes
    firsts = np.flatnonzero(np.diff(chunk, prepend=-1))
    seg = pos - pos[firsts][np.searchsorted(firsts, np.arange(n), "right") - 1]
    # A chunk's first block starts a run of its own, and its last ends one.
    follows[firsts] = False
    begins = inside & ~follows
    lasts = inside & ~np.append(follows[1:], False)
    chunks = []
    for lo, hi in zip(firsts.tolist(), [*firsts[1:].tolist(), n]):
        starts = lo + np.flatnonzero(begins[lo:hi])
        if len(starts) > max_runs:
            chunks.append(_LoadChunk(lo, hi, None))
            continue
        ends = lo + np.flatnonzero(lasts[lo:hi])
        chunks.append(_LoadChunk(lo, hi, list(zip(
            offsets[starts].tolist(), seg[starts].tolist(),
            (seg[ends] + totals[ends] - seg[starts]).tolist()))))
    return _LoadPlan(seg, inside, chunks)


def _split_groups(spec: GPULoadStoreSpec, num_groups: int) -> list[np.ndarray]:
    block_ids = np.asarray(spec.block_ids, dtype=np.int64)
    sizes = list(spec.group_sizes) if spec.group_sizes is not None else [len(block_ids)]
    assert len(sizes) == num_groups
    bounds = np.cumsum([0] + sizes)
    return [block_ids[bounds[g]:bounds[g + 1]] for g in range(num_groups)]


class _on:
    """``torch.cuda.stream(stream)`` that is a no-op without a stream (CPU)."""

    def __init__(self, stream: torch.cuda.Stream | None):
        self._ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


class _nvtx:
    """An NVTX range when CUDA is available, for Nsight timelines of the offload path:
    ``kvcompress.store`` / ``kvcompress.load`` around a job's launches, and inside
    them ``kvcompress.compress``, ``kvcompress.copy`` and ``kvcompress.decompress``
    around each chunk's kernels."""

    # Decided at first use, once: importing this module must not initialise CUDA
    # (vLLM forks its workers from processes that have not).
    enabled: bool | None = None

    def __init__(self, name: str):
        self._name = name

    def __enter__(self) -> None:
        if _nvtx.enabled is None:
            _nvtx.enabled = torch.cuda.is_available()
        if _nvtx.enabled:
            torch.cuda.nvtx.range_push(self._name)

    def __exit__(self, *exc: object) -> None:
        if _nvtx.enabled:
            torch.cuda.nvtx.range_pop()
