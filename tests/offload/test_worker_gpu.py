"""The worker on a CUDA device: its side streams, the copy engines writing the pinned
arena (one copy per run of reservations) and reading it back into two staging halves
while the other half decodes, and the reused pinned upload buffers. The CPU tests
(test_compressed_worker.py) cover the logic; these check what only a GPU runs, with
the model's stream busy as it is beside a prefill."""

import numpy as np
import pytest
import torch

from tests.offload.test_compressed_worker import (
    COPIES,
    NUM_BLOCKS,
    assert_loaded,
    captured_load_plans,
    make_kv,
    make_worker,
    reserve_offsets,
    store_laid_out,
)
from vllm.v1.kv_offload.base import GPULoadStoreSpec
from vllm_kvcompress.codec import CodecConfig
from vllm_kvcompress.offload.manager import ArenaLoadStoreSpec
from vllm_kvcompress.offload.worker import CompressedOffloadingWorker, _PinnedUpload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BUSY_CYCLES = 50_000_000  # ~25 ms of a spinning kernel on the model's stream


def finish(worker: CompressedOffloadingWorker, job_id: int) -> None:
    torch.cuda.synchronize()
    assert [r.job_id for r in worker.get_finished()] == [job_id]


def test_uploads_arrive_intact_while_their_buffers_are_busy() -> None:
    upload = _PinnedUpload(torch.device("cuda"))
    side = torch.cuda.Stream()
    arrays = [np.arange(n, dtype=np.int64) * (i + 1) for i, n in enumerate([5, 300, 7, 4096])]
    results = []
    with torch.cuda.stream(side):
        for array in arrays * 3:
            # Each copy queues behind a spinning kernel, so the next upload finds the
            # last buffers unread and must not overwrite them.
            torch.cuda._sleep(BUSY_CYCLES // 10)
            results.append(upload(array))
    torch.cuda.synchronize()
    for array, result in zip(arrays * 3, results):
        assert np.array_equal(result.cpu().numpy(), array)
    assert len(upload._buffers) <= _PinnedUpload.KEPT


@pytest.mark.parametrize("copy", COPIES)
def test_stores_and_loads_round_trip_beside_a_busy_model_stream(copy: str) -> None:
    caches = [c.cuda() for c in make_kv(torch.bfloat16)]
    original = [c.clone() for c in caches]
    worker = make_worker(caches, CodecConfig(1e-2, True), copy=copy)
    size = worker.reserve_bytes(0)
    blocks = list(range(NUM_BLOCKS))
    offsets = reserve_offsets(worker, NUM_BLOCKS)
    for job in range(3):
        torch.cuda._sleep(BUSY_CYCLES)  # the model's pending work; the store waits for it
        src = GPULoadStoreSpec(blocks, group_sizes=[NUM_BLOCKS], block_indices=[0])
        assert worker.submit_store(job, src, ArenaLoadStoreSpec(offsets, [size] * NUM_BLOCKS))
        finish(worker, job)
        reports = worker.store_reports.pop(job)
        assert all(reports[o][0] > 0 for o in offsets), reports
    for c in caches:
        c.zero_()
    for job in range(3, 5):
        dst = GPULoadStoreSpec(blocks[::-1], group_sizes=[NUM_BLOCKS], block_indices=[0])
        assert worker.submit_load(job, ArenaLoadStoreSpec(offsets[::-1], [size] * NUM_BLOCKS),
                                  dst)
        finish(worker, job)
    assert worker.failed_load_block_ids == set()
    for c, o in zip(caches, original):
        for block in blocks:
            for kv in range(2):
                x, y = o[block, kv].double(), c[block, kv].double()
                assert (y - x).abs().max().item() <= 1e-2 * (x.max() - x.min()).item()


@pytest.mark.parametrize("load_copy", COPIES)
def test_multi_chunk_loads_round_trip_through_both_staging_halves(
        monkeypatch: pytest.MonkeyPatch, load_copy: str) -> None:
    """Staging of one worst-case block makes chunks of one or two compressed blocks,
    so each of two loads of five blocks runs in several chunks and each staging half
    is reused, the copy of one chunk racing the decode of the one before. The loads
    are queued back to back, so the second's first copies also wait on the first's
    last decodes; both are checked once their end events have fired."""
    caches = [c.cuda() for c in make_kv(torch.bfloat16)]
    original = [c.clone() for c in caches]
    worker = make_worker(caches, CodecConfig(1e-2, True), load_copy=load_copy,
                         staging_bytes=make_worker(caches).reserve_bytes(0))
    # One run of reservations with tails, as after the scheduler's first store, laid
    # out against the blocks' order.
    blocks = list(range(NUM_BLOCKS))
    offsets, _ = store_laid_out(worker, blocks[::-1], tails=32, gap=0)
    plans = captured_load_plans(monkeypatch)
    for c in caches:
        c.fill_(7.0)
    half = NUM_BLOCKS // 2
    for job, part in enumerate([blocks[:half], blocks[half:]], start=2):
        torch.cuda._sleep(BUSY_CYCLES)  # the model's stream; a load does not wait for it
        src = ArenaLoadStoreSpec([offsets[b] for b in part], [0] * half)
        dst = GPULoadStoreSpec([NUM_BLOCKS - 1 - b for b in part], group_sizes=[half],
                               block_indices=[0])
        assert worker.submit_load(job, src, dst)
    worker.wait({2, 3})
    assert sorted(r.job_id for r in worker.get_finished()) == [2, 3]
    assert worker.failed_load_block_ids == set()
    assert all(len(plan.chunks) > 2 for plan in plans), "each half is used twice"
    assert all((c.runs is None) == (load_copy == "kernel") for p in plans for c in p.chunks)
    assert_loaded([c.cpu() for c in caches], [o.cpu() for o in original], blocks,
                  blocks[::-1], 7.0)
