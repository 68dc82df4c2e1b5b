"""The scheduler side of the compressed connector: host hits too short to be worth a
load are recomputed and counted; longer ones and deferred lookups pass through."""

from types import SimpleNamespace

import pytest

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import (
    OffloadingConnectorScheduler,
)
from vllm_kvcompress.offload.config import CompressionConfig
from vllm_kvcompress.offload.connector import (
    MIN_LOAD_BLOCKS,
    CompressedOffloadingConnectorScheduler,
    worth_loading,
)
from vllm_kvcompress.offload.manager import CompressedCPUOffloadingManager
from vllm_kvcompress.offload.metrics import CompressionMetrics

BLOCK = 16


def scheduler(monkeypatch: pytest.MonkeyPatch,
              found: tuple[int | None, bool]) -> CompressedOffloadingConnectorScheduler:
    """The connector's scheduler over a real manager, with vLLM's lookup replaced by
    one that finds ``found``: building vLLM's scheduler needs a whole engine config."""
    monkeypatch.setattr(OffloadingConnectorScheduler, "get_num_new_matched_tokens",
                        lambda self, request, num_computed_tokens: found)
    s = object.__new__(CompressedOffloadingConnectorScheduler)
    s.config = SimpleNamespace(kv_group_configs=[SimpleNamespace(tokens_per_chunk=BLOCK)])
    s.manager = CompressedCPUOffloadingManager(
        capacity=1 << 20, reserve_bytes=1024, raw_block_bytes=960,
        compression=CompressionConfig(cpu_bytes=1 << 20), kv_dtype="bfloat16")
    return s


def recomputed(s: CompressedOffloadingConnectorScheduler) -> float:
    data = s.manager.get_stats().data["data"]
    return data.get(CompressionMetrics.SHORT_HITS_RECOMPUTED, {}).get((), 0)


@pytest.mark.parametrize("blocks", range(1, MIN_LOAD_BLOCKS))
def test_short_hit_is_recomputed_and_counted(monkeypatch: pytest.MonkeyPatch,
                                             blocks: int) -> None:
    s = scheduler(monkeypatch, (blocks * BLOCK, True))
    assert s.get_num_new_matched_tokens(object(), 8176) == (0, False)
    assert recomputed(s) == blocks


def test_partial_block_hit_counts_as_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    s = scheduler(monkeypatch, (BLOCK - 1, True))
    assert s.get_num_new_matched_tokens(object(), 8177) == (0, False)
    assert recomputed(s) == 1


@pytest.mark.parametrize("found", [(MIN_LOAD_BLOCKS * BLOCK, True),
                                   (512 * BLOCK, True), (0, False), (None, False)])
def test_long_hits_misses_and_deferred_lookups_pass_through(
        monkeypatch: pytest.MonkeyPatch, found: tuple[int | None, bool]) -> None:
    s = scheduler(monkeypatch, found)
    assert s.get_num_new_matched_tokens(object(), 0) == found
    assert recomputed(s) == 0


def test_worth_loading_from_min_load_blocks() -> None:
    assert not worth_loading(MIN_LOAD_BLOCKS * BLOCK - 1, BLOCK)
    assert worth_loading(MIN_LOAD_BLOCKS * BLOCK, BLOCK)
    assert worth_loading(MIN_LOAD_BLOCKS * 32, 32) and not worth_loading(32, 32)
