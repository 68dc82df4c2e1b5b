"""The worker's store and load paths on CPU tensors (the same code runs on CUDA
streams on the GPU host): round trips within the bound, exact raw fallback,
and damaged blocks reported as load errors instead of being written back. Store
tests run both ways a chunk's records reach the arena: through arena-shaped slots
and one copy per run of adjacent ranges (``dma``), and the block-packing kernel
straight into the arena (``kernel``). Load tests run both ways a chunk's records
reach GPU staging: one copy per run of blocks lying together in the arena
(``dma``), and the segment-copy kernel (``kernel``)."""

import numpy as np
import pytest
import torch

from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
)
from vllm_kvcompress.codec import CodecConfig, CodecMode
from vllm_kvcompress.offload.manager import ArenaLoadStoreSpec
from vllm_kvcompress.offload.worker import (
    MAX_DMA_RUNS,
    MAX_LOAD_DMA_RUNS,
    CompressedOffloadingWorker,
    _LoadPlan,
    _plan_chunk,
    _plan_load,
    make_page_layout,
)

BLOCK, HEADS, DIM, LAYERS, NUM_BLOCKS = 16, 2, 32, 3, 10
PAGE_ELEMS = BLOCK * HEADS * DIM
COPIES = ["dma", "kernel"]


def make_kv(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """One (num_blocks, 2, heads, block, dim) cache per layer, smooth along tokens."""
    gen = torch.Generator().manual_seed(seed)
    caches = []
    for _ in range(LAYERS):
        base = torch.randn(NUM_BLOCKS, 2, HEADS, 1, DIM, generator=gen)
        drift = 0.05 * torch.randn(NUM_BLOCKS, 2, HEADS, BLOCK, DIM, generator=gen).cumsum(3)
        caches.append((base + drift).to(dtype) if dtype.is_floating_point
                      else torch.randint(0, 255, (NUM_BLOCKS, 2, HEADS, BLOCK, DIM),
                                         generator=gen, dtype=dtype))
    return caches


def canonical(caches: list[torch.Tensor]) -> CanonicalKVCaches:
    page = caches[0][0].numel() * caches[0].element_size()
    tensors = [CanonicalKVCacheTensor(c.view(torch.int8).view(NUM_BLOCKS, page), page)
               for c in caches]
    refs = [[CanonicalKVCacheRef(i, page) for i in range(len(caches))]]
    return CanonicalKVCaches(tensors=tensors, group_data_refs=refs)


def make_worker(caches: list[torch.Tensor], codec: CodecConfig = CodecConfig(),
                arena_bytes: int = 1 << 22, staging_bytes: int = 1 << 20,
                copy: str = "dma", load_copy: str = "dma") -> CompressedOffloadingWorker:
    worker = CompressedOffloadingWorker(canonical(caches), caches[0].dtype, PAGE_ELEMS, codec,
                                        arena_bytes, staging_bytes=staging_bytes)
    if copy == "kernel":
        worker.max_dma_runs = 0
    if load_copy == "kernel":
        worker.max_load_dma_runs = 0
    return worker


def store(worker: CompressedOffloadingWorker, job_id: int, blocks: list[int],
          offsets: list[int]) -> dict[int, tuple[int, int, int]]:
    src = GPULoadStoreSpec(blocks, group_sizes=[len(blocks)], block_indices=[0])
    dst = ArenaLoadStoreSpec(offsets, [worker.reserve_bytes(0)] * len(offsets))
    assert worker.submit_store(job_id, src, dst)
    worker.wait({job_id})
    results = worker.get_finished()
    assert [r.job_id for r in results] == [job_id] and results[0].success
    return worker.store_reports.pop(job_id)


def load(worker: CompressedOffloadingWorker, job_id: int, offsets: list[int],
         blocks: list[int]) -> set[int]:
    src = ArenaLoadStoreSpec(offsets, [worker.reserve_bytes(0)] * len(offsets))
    dst = GPULoadStoreSpec(blocks, group_sizes=[len(blocks)], block_indices=[0])
    assert worker.submit_load(job_id, src, dst)
    worker.wait({job_id})
    assert [r.job_id for r in worker.get_finished()] == [job_id]
    errors, worker.failed_load_block_ids = worker.failed_load_block_ids, set()
    return errors


def reserve_offsets(worker: CompressedOffloadingWorker, n: int) -> list[int]:
    return [i * worker.reserve_bytes(0) for i in range(n)]


def assert_reloads_every_block(worker: CompressedOffloadingWorker, job_id: int,
                               caches: list[torch.Tensor], original: list[torch.Tensor],
                               offsets: list[int]) -> None:
    """Clears the KV cache, loads blocks 0.. back from ``offsets`` and compares."""
    for c in caches:
        c.zero_()
    assert load(worker, job_id, offsets, list(range(len(offsets)))) == set()
    for c, o in zip(caches, original):
        assert torch.allclose(c.float(), o.float(), atol=0.1)


@pytest.mark.parametrize("load_copy", COPIES)
@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", list(CodecMode))
def test_round_trip_within_bound(dtype: torch.dtype, mode: CodecMode, copy: str,
                                 load_copy: str) -> None:
    caches = make_kv(dtype)
    original = [c.clone() for c in caches]
    worker = make_worker(caches, CodecConfig(1e-2, True, mode), copy=copy, load_copy=load_copy)
    offsets = reserve_offsets(worker, 3)
    reports = store(worker, 0, [1, 4, 7], offsets)
    raw = sum(c[0].numel() * c.element_size() for c in caches)
    assert all(0 < reports[o][0] < raw for o in offsets), "blocks should shrink"
    for c in caches:
        c.zero_()
    assert load(worker, 1, offsets, [2, 5, 8]) == set()
    for layer, (c, o) in enumerate(zip(caches, original)):
        for src, dst in zip([1, 4, 7], [2, 5, 8]):
            for kv in range(2):
                x, y = o[src, kv].double(), c[dst, kv].double()
                bound = 1e-2 * (x.max() - x.min()).item()
                assert (y - x).abs().max().item() <= bound, (layer, src, kv)
        untouched = [b for b in range(NUM_BLOCKS) if b not in (2, 5, 8)]
        assert (c[untouched] == 0).all()


def test_one_page_per_layer_k_and_v() -> None:
    caches = make_kv(torch.bfloat16)
    worker = make_worker(caches)
    assert all(layout.pages_per_block == 2 for layout in worker.layouts)
    assert worker.layouts[0].pages.shape == (NUM_BLOCKS * 2, PAGE_ELEMS)


@pytest.mark.parametrize("copy", COPIES)
def test_large_jobs_run_in_chunks_through_small_staging(copy: str) -> None:
    caches = make_kv(torch.float16)
    original = [c.clone() for c in caches]
    worker = make_worker(caches, staging_bytes=worker_block_bytes(caches), copy=copy,
                         load_copy=copy)
    blocks = list(range(NUM_BLOCKS))
    offsets = reserve_offsets(worker, NUM_BLOCKS)
    store(worker, 0, blocks, offsets)
    assert_reloads_every_block(worker, 1, caches, original, offsets)


def test_staging_is_taken_at_start_and_reused() -> None:
    """The GPU staging is allocated when the worker starts, at the size its chunks
    use, and stores and loads run through those same buffers."""
    caches = make_kv(torch.bfloat16)
    worst = worker_block_bytes(caches)
    worker = make_worker(caches, staging_bytes=3 * worst + worst // 2)
    buffers = {store: (buf.data_ptr(), buf.numel())
               for store, buf in worker._staging_buffers.items()}
    assert buffers[True][1] == 2 * 3 * worst, "3 blocks' records, and their slots"
    assert buffers[False][1] == 3 * worst + worst // 2 + 2 * worst, (
        "staging_bytes split into two halves, and one block in each")
    offsets = reserve_offsets(worker, NUM_BLOCKS)
    store(worker, 0, list(range(NUM_BLOCKS)), offsets)
    assert load(worker, 1, offsets, list(range(NUM_BLOCKS))) == set()
    assert {store: (buf.data_ptr(), buf.numel())
            for store, buf in worker._staging_buffers.items()} == buffers


def test_staging_without_gpu_memory_is_a_clear_start_up_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_kvcompress.offload import worker as worker_module

    caches = make_kv(torch.bfloat16)
    real_empty = torch.empty

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        """No room for a staging buffer (a byte buffer on the KV cache's device)."""
        if "device" in kwargs and kwargs.get("dtype") == torch.uint8 and args[0] > 0:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(worker_module.torch, "empty", empty)
    with pytest.raises(RuntimeError, match="MiB of GPU memory .* --gpu-memory-utilization"):
        make_worker(caches, staging_bytes=1 << 20)


@pytest.mark.parametrize("blocks_per_chunk", [NUM_BLOCKS, 3])
def test_one_codec_launch_per_chunk_covers_every_layer(
        monkeypatch: pytest.MonkeyPatch, blocks_per_chunk: int) -> None:
    """The host issues launches while the engine's step waits, and a launch per
    layer would hold too few pages to fill a GPU: one per chunk and direction.
    A store's chunks are sized by each block's worst case, a load's by the bytes
    actually stored, so a load needs fewer."""
    from vllm_kvcompress.offload import worker as worker_module

    calls = {"compress": 0, "decompress": 0}

    def counting(name: str):
        op = getattr(worker_module.ops, name)

        def call(*args: object) -> None:
            calls[name] += 1
            assert len(args[0 if name == "compress" else 2]) == LAYERS
            op(*args)
        return call

    caches = make_kv(torch.bfloat16)
    staging = blocks_per_chunk * worker_block_bytes(caches)
    worker = make_worker(caches, staging_bytes=staging)
    monkeypatch.setattr(worker_module.ops, "compress", counting("compress"))
    monkeypatch.setattr(worker_module.ops, "decompress", counting("decompress"))
    offsets = reserve_offsets(worker, NUM_BLOCKS)
    reports = store(worker, 0, list(range(NUM_BLOCKS)), offsets)
    assert load(worker, 1, offsets, list(range(NUM_BLOCKS))) == set()
    stored = np.array([reports[o][0] for o in offsets])
    # Worst-case ranges leave gaps wider than a block's records: each block is a run
    # of its own, staged without its gap, in chunks of half the staging.
    load_chunks = len(np.unique((np.cumsum(stored) - stored) // (staging // 2)))
    assert calls == {"compress": -(-NUM_BLOCKS // blocks_per_chunk), "decompress": load_chunks}
    assert load_chunks < calls["compress"] or blocks_per_chunk == NUM_BLOCKS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_nvtx_ranges_mark_compress_copy_and_decompress(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Nsight timelines show a job's launches and, inside them, each chunk's
    compress, copy and decompress (raw blocks: copies only); ranges nest and close."""
    from vllm_kvcompress.offload import worker as worker_module

    events: list[str] = []
    monkeypatch.setattr(worker_module._nvtx, "enabled", True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: events.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: events.append("pop"))
    caches = make_kv(dtype)
    worker = make_worker(caches, staging_bytes=2 * worker_block_bytes(caches))
    offsets = reserve_offsets(worker, 4)
    store(worker, 0, list(range(4)), offsets)
    stored = events[:]
    events.clear()
    assert load(worker, 1, offsets, list(range(4))) == set()
    if dtype == torch.bfloat16:
        chunk = ["kvcompress.compress", "pop", "kvcompress.copy", "pop"]
        assert stored == ["kvcompress.store", *chunk, *chunk, "pop"]
        assert events[0] == "kvcompress.load" and events[-1] == "pop"
        assert events[1:-1] == ["kvcompress.copy", "pop", "kvcompress.decompress", "pop"] * (
            (len(events) - 2) // 4)
        assert len(events) > 2
    else:
        assert stored == ["kvcompress.store", "kvcompress.copy", "pop", "pop"]
        assert events == ["kvcompress.load", "kvcompress.copy", "pop", "pop"]


def worker_block_bytes(caches: list[torch.Tensor]) -> int:
    return make_worker(caches).reserve_bytes(0)


def test_unsupported_dtype_is_copied_raw_and_exact() -> None:
    caches = make_kv(torch.uint8)
    original = [c.clone() for c in caches]
    worker = make_worker(caches)
    assert not worker.compressible
    offsets = reserve_offsets(worker, 2)
    reports = store(worker, 0, [3, 9], offsets)
    assert all(r[1] == LAYERS for r in reports.values()), "each raw page is counted"
    for c in caches:
        c.zero_()
    assert load(worker, 1, offsets, [0, 3]) == set()
    for c, o in zip(caches, original):
        assert torch.equal(c[0], o[3]) and torch.equal(c[3], o[9])


def test_non_finite_pages_are_stored_raw_and_restored_exactly() -> None:
    caches = make_kv(torch.bfloat16)
    caches[1][2, 0, 0, 3, 5] = float("nan")
    original = [c.clone() for c in caches]
    worker = make_worker(caches)
    offsets = reserve_offsets(worker, 1)
    reports = store(worker, 0, [2], offsets)
    assert reports[offsets[0]][1] == 1, "exactly the NaN page is stored raw"
    assert worker.counters.raw_pages_non_finite == 1
    assert worker.counters.raw_pages_bound_unattainable == worker.counters.raw_pages_no_gain == 0
    for c in caches:
        c.zero_()
    assert load(worker, 1, offsets, [2]) == set()
    assert torch.equal(caches[1][2, 0].view(torch.int16), original[1][2, 0].view(torch.int16))


def test_bound_finer_than_the_dtype_stores_raw_counts_and_warns(
        caplog: pytest.LogCaptureFixture) -> None:
    caches = make_kv(torch.bfloat16)
    original = [c.clone() for c in caches]
    # bf16 rounds to 2^-8 of a value; 1e-4 of a page's range is below that.
    worker = make_worker(caches, CodecConfig(1e-4, True, CodecMode.PLAIN))
    offsets = reserve_offsets(worker, 2)
    with caplog.at_level("WARNING"):
        store(worker, 0, [3, 6], offsets)
    pages = 2 * LAYERS * 2
    assert worker.counters.raw_pages == worker.counters.raw_pages_bound_unattainable == pages
    assert "raise --compression-error-bound" in caplog.text
    for c in caches:
        c.zero_()
    assert load(worker, 1, offsets, [3, 6]) == set()
    for c, o in zip(caches, original):
        assert torch.equal(c[[3, 6]].view(torch.int16), o[[3, 6]].view(torch.int16))


@pytest.mark.parametrize("load_copy", COPIES)
@pytest.mark.parametrize("where", ["header", "payload", "last_byte"])
def test_damaged_block_is_a_load_error_not_wrong_kv(where: str, load_copy: str) -> None:
    caches = make_kv(torch.bfloat16)
    worker = make_worker(caches, load_copy=load_copy)
    offsets = reserve_offsets(worker, 3)
    reports = store(worker, 0, [0, 1, 2], offsets)
    victim = offsets[1]
    nbytes = reports[victim][0]
    pos = {"header": victim + 8, "payload": victim + nbytes // 2,
           "last_byte": victim + nbytes - 1}[where]
    if where == "last_byte":
        # the tail may be record padding, which no check covers; damage payload there
        pos = victim + nbytes - 17
    worker.arena[pos] ^= 0x5A
    for c in caches:
        c.fill_(7.0)
    assert load(worker, 1, offsets, [5, 6, 7]) == {6}
    assert worker.failed_loads == {1: [victim]}
    assert (worker.counters.blocks_loaded, worker.counters.failed_loads) == (2, 1)
    assert worker.counters.blocks_stored == 3
    for c in caches:
        assert (c[5] != 7.0).any() and (c[7] != 7.0).any()


@pytest.mark.parametrize("load_copy", COPIES)
def test_unknown_offset_is_a_load_error(load_copy: str) -> None:
    caches = make_kv(torch.bfloat16)
    worker = make_worker(caches, load_copy=load_copy)
    offsets = reserve_offsets(worker, 1)
    store(worker, 0, [0], offsets)
    assert load(worker, 1, [offsets[0] + 16], [3]) == {3}


def test_page_layout_falls_back_to_whole_blocks_when_rows_are_padded() -> None:
    padded = torch.zeros(4, 3 * PAGE_ELEMS, dtype=torch.bfloat16)
    view = padded.view(torch.int8)[:, :2 * PAGE_ELEMS * 2]
    layout = make_page_layout(view, 2 * PAGE_ELEMS * 2, torch.bfloat16, PAGE_ELEMS)
    assert layout.pages_per_block == 1
    assert layout.pages.shape == (4, 2 * PAGE_ELEMS)
    assert layout.raw_stride == 3 * PAGE_ELEMS * 2


@pytest.mark.parametrize("copy", COPIES)
def test_store_reports_bytes_written_equal_to_records(copy: str) -> None:
    caches = make_kv(torch.float32)
    worker = make_worker(caches, copy=copy)
    offsets = reserve_offsets(worker, 2)
    reports = store(worker, 0, [0, 1], offsets)
    for offset in offsets:
        assert reports[offset][0] == int(np.sum(worker._records[offset]))
        assert reports[offset][0] % 16 == 0


@pytest.mark.parametrize("copy", COPIES)
def test_store_report_checksum_sums_the_record_headers_in_the_arena(copy: str) -> None:
    """The block table keeps, per block, the sum of its records' checksums; walk
    the records by their headers (docs/format.md) to recompute it."""
    caches = make_kv(torch.bfloat16)
    caches[0][5, 1, 0, 0, 0] = float("inf")  # one raw record among compressed ones
    worker = make_worker(caches, copy=copy)
    offsets = reserve_offsets(worker, 2)
    reports = store(worker, 0, [5, 8], offsets)
    arena = worker.arena.numpy()
    for offset in offsets:
        pos, total = offset, 0
        for _ in range(2 * LAYERS):
            header = arena[pos:pos + 32]
            assert header[:4].view("<u4")[0] == 0x315A564B
            total += int(header[28:32].view("<u4")[0])
            payload = int(header[24:28].view("<u4")[0])
            pos += -(-(32 + payload) // 16) * 16
        assert reports[offset][0] == pos - offset
        assert reports[offset][2] == total % 2**32
    assert reports[offsets[0]][1] == 1 and reports[offsets[1]][1] == 0


@pytest.mark.parametrize("load_copy", COPIES)
def test_load_of_known_and_unknown_blocks_restores_the_known_ones(load_copy: str) -> None:
    caches = make_kv(torch.float16)
    original = [c.clone() for c in caches]
    worker = make_worker(caches, load_copy=load_copy)
    offsets = reserve_offsets(worker, 2)
    store(worker, 0, [1, 2], offsets)
    for c in caches:
        c.zero_()
    unknown = offsets[1] + worker.reserve_bytes(0)
    assert load(worker, 1, [offsets[0], unknown, offsets[1]], [4, 6, 9]) == {6}
    for c, o in zip(caches, original):
        assert torch.allclose(c[4].float(), o[1].float(), atol=0.1)
        assert torch.allclose(c[9].float(), o[2].float(), atol=0.1)
        assert (c[6] == 0).all()


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_block_larger_than_its_reservation_is_not_written(dtype: torch.dtype,
                                                          copy: str) -> None:
    """The scheduler reserves a predicted size; a block that compresses (or, raw,
    copies) to more must not write past its reservation, must not be recorded, and
    must report what it needed."""
    caches = make_kv(dtype)
    worker = make_worker(caches, copy=copy)
    fits = store(worker, 0, [4], reserve_offsets(worker, 1))
    needed = next(iter(fits.values()))[0]
    worker.arena.fill_(0xA5)
    src = GPULoadStoreSpec([4, 5], group_sizes=[2], block_indices=[0])
    dst = ArenaLoadStoreSpec([0, needed - 16], [needed - 16, 4 * needed])
    assert worker.submit_store(1, src, dst)
    worker.get_finished()
    reports = worker.store_reports.pop(1)
    assert reports[0][0] == -needed
    assert reports[needed - 16][0] > 0
    assert worker.counters.blocks_oversized == 1
    assert 0 not in worker._records
    assert load(worker, 2, [0], [7]) == {7}, "an oversized block is never served"
    worker.arena.fill_(0xA5)
    dst = ArenaLoadStoreSpec([0, 2 * needed], [needed - 16, 4 * needed])
    assert worker.submit_store(3, src, dst)
    worker.get_finished()
    assert (worker.arena[needed - 16:2 * needed] == 0xA5).all(), "nothing past a reservation"


def copies_into_arena(monkeypatch: pytest.MonkeyPatch,
                      worker: CompressedOffloadingWorker) -> list[bool]:
    """Records, per block-packing launch, whether it writes the arena itself (the
    kernel path) rather than staging slots (the copy-engine path)."""
    from vllm_kvcompress.offload import worker as worker_module

    into_arena: list[bool] = []
    op = worker_module.ops.pack_blocks

    def call(records, page_table, room, dst, *rest) -> None:
        into_arena.append(dst.data_ptr() == worker.arena.data_ptr())
        op(records, page_table, room, dst, *rest)

    monkeypatch.setattr(worker_module.ops, "pack_blocks", call)
    return into_arena


def store_ranges(worker: CompressedOffloadingWorker, job_id: int, blocks: list[int],
                 offsets: list[int], reserved: list[int]) -> dict[int, tuple[int, int, int]]:
    src = GPULoadStoreSpec(blocks, group_sizes=[len(blocks)], block_indices=[0])
    assert worker.submit_store(job_id, src, ArenaLoadStoreSpec(offsets, reserved))
    worker.wait({job_id})
    worker.get_finished()
    return worker.store_reports.pop(job_id)


def outside_ranges(worker: CompressedOffloadingWorker, offsets: list[int],
                   reserved: list[int]) -> torch.Tensor:
    """The arena bytes that no reservation covers."""
    mask = torch.ones(worker.arena.numel(), dtype=torch.bool)
    for offset, nbytes in zip(offsets, reserved):
        mask[max(offset, 0):max(offset + nbytes, 0)] = False
    return worker.arena[mask]


def test_plan_lays_runs_of_adjacent_ranges_back_to_back() -> None:
    offsets = np.array([100, 116, 148, 0, 16, 400, 500, 164])
    reserved = np.array([16, 32, 16, 16, 32, 64, 16, 16])
    inside = np.array([True, True, True, True, True, True, False, True])
    plan = _plan_chunk(offsets, reserved, inside, region=1024, max_runs=8)
    # runs: blocks 0-2 at 100 (64 bytes), 3-4 at 0 (48), 5 at 400 (64); block 6 is
    # outside the arena (no slot, not written); block 7 follows 6 only in the spec
    assert plan.runs == [(100, 0, 64), (0, 64, 48), (400, 112, 64), (164, 176, 16)]
    assert plan.dst.tolist() == [0, 16, 48, 64, 80, 112, -1, 176]
    kernel = _plan_chunk(offsets, reserved, inside, region=1024, max_runs=3)
    assert kernel.runs is None and kernel.dst.tolist() == [*offsets[:6], -1, 164]
    assert _plan_chunk(offsets, reserved, inside, region=191, max_runs=8).runs is None


@pytest.mark.parametrize("copy", COPIES)
def test_store_into_split_runs_round_trips_and_writes_only_reservations(
        monkeypatch: pytest.MonkeyPatch, copy: str) -> None:
    """After eviction a store's ranges are several runs, some adjacent, some not,
    not in the blocks' order. Every block comes back, and no byte outside the
    reservations changes, although the copy engines copy whole reservations."""
    caches = make_kv(torch.bfloat16)
    original = [c.clone() for c in caches]
    worker = make_worker(caches, copy=copy)
    # the sizes the scheduler learns from a first store, as its reservations follow
    needed = [r[0] for r in store(worker, 0, list(range(NUM_BLOCKS)),
                                  reserve_offsets(worker, NUM_BLOCKS)).values()]
    reserved = [n + 16 * (i % 3) for i, n in enumerate(needed)]
    # In the arena: 0 1 2, gap, 3, gap, 4 5 6, gap, 7 9 8; the last two side by side
    # but out of the blocks' order, so the runs are 012, 3, 456, 7, 8, 9.
    offsets, at = [0] * NUM_BLOCKS, 4096
    for i in [0, 1, 2, None, 3, None, 4, 5, 6, None, 7, 9, 8]:
        if i is None:
            at += 48
        else:
            offsets[i] = at
            at += reserved[i]
    worker.arena.fill_(0xA5)
    into_arena = copies_into_arena(monkeypatch, worker)
    reports = store_ranges(worker, 1, list(range(NUM_BLOCKS)), offsets, reserved)
    assert into_arena == [copy == "kernel"], "one chunk, six runs: copy engines"
    assert [reports[o][0] for o in offsets] == needed
    assert (outside_ranges(worker, offsets, reserved) == 0xA5).all()
    assert_reloads_every_block(worker, 2, caches, original, offsets)


@pytest.mark.parametrize("copy", COPIES)
def test_range_outside_the_arena_fails_its_block_unwritten(copy: str) -> None:
    """A range that starts before the arena or runs past its end is never written,
    even where the block's records alone would fit; its block is reported failed
    and the other blocks are stored."""
    caches = make_kv(torch.bfloat16)
    worker = make_worker(caches, arena_bytes=1 << 16, copy=copy)
    worst = worker.reserve_bytes(0)
    offsets = [0, worst, (1 << 16) - worst + 16, -16]
    reserved = [worst] * 4
    worker.arena.fill_(0xA5)
    reports = store_ranges(worker, 0, [0, 1, 2, 3], offsets, reserved)
    assert reports[offsets[0]][0] > 0 and reports[offsets[1]][0] > 0
    assert reports[offsets[2]][0] == reports[offsets[3]][0] == 0
    assert (outside_ranges(worker, offsets[:2], reserved[:2]) == 0xA5).all()
    assert worker.counters.blocks_stored == 2


@pytest.mark.parametrize("gaps", [MAX_DMA_RUNS - 1, MAX_DMA_RUNS])
def test_chunk_of_more_runs_than_the_threshold_takes_the_kernel(
        monkeypatch: pytest.MonkeyPatch, gaps: int) -> None:
    """Each copy-engine copy has a fixed cost; a chunk whose ranges split into more
    than MAX_DMA_RUNS runs is written by the block-packing kernel instead."""
    caches = make_kv(torch.bfloat16)
    original = [c.clone() for c in caches]
    worker = make_worker(caches)
    worst = worker.reserve_bytes(0)
    offsets = [i * worst + 16 * min(i, gaps) for i in range(NUM_BLOCKS)]
    reserved = [worst] * NUM_BLOCKS
    worker.arena.fill_(0xA5)
    into_arena = copies_into_arena(monkeypatch, worker)
    reports = store_ranges(worker, 0, list(range(NUM_BLOCKS)), offsets, reserved)
    assert into_arena == [gaps + 1 > MAX_DMA_RUNS]
    assert all(reports[o][0] > 0 for o in offsets)
    assert (outside_ranges(worker, offsets, reserved) == 0xA5).all()
    assert_reloads_every_block(worker, 1, caches, original, offsets)


def test_load_plan_stages_runs_with_their_gaps_back_to_back() -> None:
    offsets = np.array([1000, 1032, 1112, 1104, 5000, 5064, 9000, 1168, 1200])
    totals = np.array([32, 64, 48, 16, 48, 32, 64, 32, 16])
    plan = _plan_load(offsets, totals, arena_bytes=8192, chunk_bytes=1 << 20, max_runs=8)
    # runs: 0 1 2 (adjacent, then a 16-byte gap); 3 starts before 2's records end; 4
    # lies 3880 bytes past 3, more than the largest block (64), 5 16 bytes past 4; 6
    # runs past the arena's end (no run, no copy); 7 starts a run after it, and 8
    # follows 7 with no gap
    assert plan.inside.tolist() == [True] * 6 + [False, True, True]
    assert [c.runs for c in plan.chunks] == [[
        (1000, 0, 160), (1104, 160, 16), (5000, 176, 96), (1168, 336, 48)]]
    assert plan.seg.tolist() == [0, 32, 112, 160, 176, 240, 272, 336, 368]
    kernel = _plan_load(offsets, totals, arena_bytes=8192, chunk_bytes=1 << 20, max_runs=3)
    assert [c.runs for c in kernel.chunks] == [None] and kernel.seg.tolist() == plan.seg.tolist()
    # Chunks of 96 staged bytes: blocks 0-1, 2-4, 5-6, 7-8. A chunk starts a run
    # afresh and its last block ends one, whose gap stays out of staging (1, 4).
    small = _plan_load(offsets, totals, arena_bytes=8192, chunk_bytes=96, max_runs=8)
    assert [(c.lo, c.hi, c.runs) for c in small.chunks] == [
        (0, 2, [(1000, 0, 96)]),
        (2, 5, [(1112, 0, 48), (1104, 48, 16), (5000, 64, 48)]),
        (5, 7, [(5064, 0, 32)]),
        (7, 9, [(1168, 0, 48)])]
    assert small.seg.tolist() == [0, 32, 0, 48, 64, 0, 32, 0, 32]


def captured_load_plans(monkeypatch: pytest.MonkeyPatch) -> list[_LoadPlan]:
    """Records the plan of each group's load."""
    from vllm_kvcompress.offload import worker as worker_module

    plans: list[_LoadPlan] = []

    def plan(*args: object) -> _LoadPlan:
        plans.append(worker_module._plan_load.__wrapped__(*args))
        return plans[-1]

    plan.__wrapped__ = worker_module._plan_load
    monkeypatch.setattr(worker_module, "_plan_load", plan)
    return plans


def store_laid_out(worker: CompressedOffloadingWorker, layout: list[int | None], tails: int,
                   gap: int, holes: dict[int, int] | None = None) -> tuple[list[int], list[int]]:
    """Stores every block at the places ``layout`` gives, in arena order (``None``: a
    ``gap``-byte hole; ``holes``: bytes left free after a block's reservation), each
    reservation its block's size plus up to ``tails`` bytes, as the scheduler sizes
    them after a first store; returns the offsets and the blocks' sizes."""
    needed = [r[0] for r in store(worker, 0, list(range(NUM_BLOCKS)),
                                  reserve_offsets(worker, NUM_BLOCKS)).values()]
    reserved = [n + 16 * (i % (tails // 16 + 1)) for i, n in enumerate(needed)]
    offsets, at = [0] * NUM_BLOCKS, 4096
    for i in layout:
        if i is None:
            at += gap
        else:
            offsets[i] = at
            at += reserved[i] + (holes or {}).get(i, 0)
    worker.arena.fill_(0xA5)
    reports = store_ranges(worker, 1, list(range(NUM_BLOCKS)), offsets, reserved)
    assert [reports[o][0] for o in offsets] == needed
    return offsets, needed


def assert_loaded(caches: list[torch.Tensor], original: list[torch.Tensor], src: list[int],
                  dst: list[int], fill: float) -> None:
    """Each ``dst`` block holds its ``src`` block within the bound (1e-2 of each
    page's range); every other block still holds ``fill``."""
    for layer, (c, o) in enumerate(zip(caches, original)):
        for s, d in zip(src, dst):
            for kv in range(2):
                x, y = o[s, kv].double(), c[d, kv].double()
                assert (y - x).abs().max().item() <= 1e-2 * (x.max() - x.min()).item(), (
                    layer, s, d, kv)
        assert (c[[b for b in range(NUM_BLOCKS) if b not in dst]] == fill).all()


@pytest.mark.parametrize("load_copy", COPIES)
def test_load_of_blocks_spread_over_runs_with_gaps_and_out_of_order(
        monkeypatch: pytest.MonkeyPatch, load_copy: str) -> None:
    """After eviction a prompt's blocks lie in several runs, with reservation tails
    and small holes inside runs and wide holes between them, not in the load's
    order. Each run crosses PCIe with its gaps in one copy; every block comes back
    within the bound into its own GPU block, and no other block changes."""
    caches = make_kv(torch.bfloat16)
    original = [c.clone() for c in caches]
    worker = make_worker(caches, CodecConfig(1e-2, True), load_copy=load_copy)
    wide = 4 * worker.reserve_bytes(0)
    # In the arena: 0 1 2, hole, 3, hole, 4 5 (a 48-byte hole) 6, hole, 7 9 8.
    offsets, needed = store_laid_out(
        worker, [0, 1, 2, None, 3, None, 4, 5, 6, None, 7, 9, 8], tails=32, gap=wide,
        holes={5: 48})
    plans = captured_load_plans(monkeypatch)
    # Loaded as 4 5 6 | 0 1 | 9 8 | 3: four runs, the first two out of the arena's
    # order, the third against the blocks' order; 2 and 7 are not loaded.
    src = [4, 5, 6, 0, 1, 9, 8, 3]
    dst = [1, 3, 5, 7, 9, 0, 2, 4]
    for c in caches:
        c.fill_(7.0)
    assert load(worker, 2, [offsets[b] for b in src], dst) == set()
    assert_loaded(caches, original, src, dst, 7.0)
    (plan,) = plans
    if load_copy == "kernel":
        assert [c.runs for c in plan.chunks] == [None]
        return
    spans = [(offsets[4], offsets[6] + needed[6] - offsets[4]),
             (offsets[0], offsets[1] + needed[1] - offsets[0]),
             (offsets[9], offsets[8] + needed[8] - offsets[9]),
             (offsets[3], needed[3])]
    (chunk,) = plan.chunks
    assert [(at, nbytes) for at, _, nbytes in chunk.runs] == spans
    assert spans[0][1] > needed[4] + needed[5] + needed[6], "the gaps travel with the run"


@pytest.mark.parametrize("gaps", [MAX_LOAD_DMA_RUNS - 1, MAX_LOAD_DMA_RUNS])
def test_load_chunk_of_more_runs_than_the_threshold_takes_the_kernel(
        monkeypatch: pytest.MonkeyPatch, gaps: int) -> None:
    """A load chunk whose blocks lie in more than MAX_LOAD_DMA_RUNS runs is copied
    by the segment-copy kernel, and still comes back whole."""
    caches = make_kv(torch.bfloat16)
    original = [c.clone() for c in caches]
    worker = make_worker(caches, CodecConfig(1e-2, True))
    layout: list[int | None] = []
    for i in range(NUM_BLOCKS):
        layout += [i] if i >= gaps else [i, None]
    offsets, _ = store_laid_out(worker, layout, tails=0, gap=4 * worker.reserve_bytes(0))
    plans = captured_load_plans(monkeypatch)
    for c in caches:
        c.fill_(7.0)
    blocks = list(range(NUM_BLOCKS))
    assert load(worker, 2, offsets, blocks[::-1]) == set()
    assert_loaded(caches, original, blocks, blocks[::-1], 7.0)
    (chunk,) = plans[0].chunks
    if gaps + 1 > MAX_LOAD_DMA_RUNS:
        assert chunk.runs is None
    else:
        assert chunk.runs is not None and len(chunk.runs) == gaps + 1


@pytest.mark.parametrize("load_copy", COPIES)
def test_load_of_a_range_outside_the_arena_fails_its_block_unwritten(load_copy: str) -> None:
    """A block whose recorded range runs past the arena's end is copied by neither
    way and not decoded; its block fails and keeps what it held, the others load."""
    caches = make_kv(torch.bfloat16)
    original = [c.clone() for c in caches]
    worker = make_worker(caches, arena_bytes=1 << 16, load_copy=load_copy)
    offsets = reserve_offsets(worker, 2)
    store(worker, 0, [0, 1], offsets)
    past_end = worker.arena.numel() - 16
    worker._records[past_end] = worker._records[offsets[1]]
    for c in caches:
        c.fill_(7.0)
    assert load(worker, 1, [offsets[0], past_end, offsets[1]], [4, 5, 6]) == {5}
    assert_loaded(caches, original, [0, 1], [4, 6], 7.0)


def test_blocks_overwritten_by_later_stores_leave_the_worker_table() -> None:
    """The worker is not told of evictions; a store into ranges that held earlier
    blocks replaces their entries, so the table tracks the arena, not the traffic."""
    caches = make_kv(torch.bfloat16)
    original = [c.clone() for c in caches]
    worker = make_worker(caches)
    size = worker.reserve_bytes(0)
    first = reserve_offsets(worker, 6)
    store(worker, 0, list(range(6)), first)
    # Blocks 0-2 evicted; three new blocks take their space from 16 bytes in, with
    # smaller reservations: no new range starts at an old offset, and the one at 0
    # is only reached by its records.
    room = size - 16
    shifted = [16 + i * room for i in range(3)]
    store_ranges(worker, 1, [6, 7, 8], shifted, [room] * 3)
    assert sorted(worker._records) == sorted(first[3:] + shifted)
    assert np.array_equal(worker._record_offsets, np.sort(first[3:] + shifted))
    for c in caches:
        c.zero_()
    assert load(worker, 2, first[3:] + shifted, [3, 4, 5, 6, 7, 8]) == set()
    for c, o in zip(caches, original):
        assert (c[3:9] != 0).any() and (o[3:9] - c[3:9]).abs().max() < 1


def test_worker_table_stays_bounded_over_many_reallocations() -> None:
    caches = make_kv(torch.float16)
    worker = make_worker(caches, arena_bytes=1 << 21)
    size = worker.reserve_bytes(0)
    slots = worker.arena.numel() // size
    rng = np.random.default_rng(0)
    for job in range(40):
        # ranges at arbitrary 16-byte offsets, as a fragmented arena hands them out
        start = int(rng.integers(0, worker.arena.numel() - 3 * size)) // 16 * 16
        store_ranges(worker, job, [1, 2, 3], [start + i * size for i in range(3)], [size] * 3)
        assert len(worker._records) <= slots + 3
        assert np.array_equal(worker._record_offsets, np.sort(list(worker._records)))


def test_worker_table_matches_a_model_of_the_arena() -> None:
    """After every store the worker's entries are exactly the blocks whose records no
    later store's range has overlapped, for ranges of any size at any 16-byte offset,
    side by side or with gaps, some too small for their block (not kept)."""
    caches = make_kv(torch.float16)
    worker = make_worker(caches, arena_bytes=1 << 21)
    size = worker.reserve_bytes(0)
    rng = np.random.default_rng(1)
    model: dict[int, int] = {}  # offset -> bytes of the block's records
    for job in range(40):
        count = int(rng.integers(1, 4))
        room = [int(rng.integers(size // 3, size + 1)) // 16 * 16 for _ in range(count)]
        gaps = [16 * int(rng.integers(0, 2)) for _ in range(count)]
        start = int(rng.integers(0, worker.arena.numel() - sum(room) - sum(gaps))) // 16 * 16
        offsets = list(start + np.cumsum(gaps) + np.cumsum(room) - room)
        reports = store_ranges(worker, job, list(range(1, count + 1)), offsets, room)
        for at, nbytes in zip(offsets, room):
            model = {o: n for o, n in model.items() if o >= at + nbytes or o + n <= at}
        model.update({o: r[0] for o, r in reports.items() if r[0] > 0})
        assert {o: int(sizes.sum()) for o, sizes in worker._records.items()} == model
        assert np.array_equal(worker._record_offsets, np.sort(list(model)))
