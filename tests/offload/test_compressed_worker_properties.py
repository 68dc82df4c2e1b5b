"""Property tests of the worker's store and load paths on CPU tensors: whatever
blocks are stored, reloaded elsewhere, damaged or never stored, every reloaded
block is within the bound, every other one is reported, and nothing else in the
KV cache changes."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.offload.test_compressed_worker import (COPIES, NUM_BLOCKS, load, make_kv,
                                                  make_worker, reserve_offsets, store,
                                                  worker_block_bytes)
from vllm_kvcompress.codec import CodecConfig, CodecMode

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    stored = draw(st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=1, max_size=NUM_BLOCKS,
                           unique=True))
    # Each reloaded entry: a stored block (by position), or None for an offset this
    # worker never wrote.
    sources = draw(st.lists(st.one_of(st.none(), st.integers(0, len(stored) - 1)),
                            min_size=1, max_size=NUM_BLOCKS, unique=True))
    targets = draw(st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=len(sources),
                            max_size=len(sources), unique=True))
    damaged = draw(st.sets(st.integers(0, len(stored) - 1), max_size=2))
    return {
        "stored": stored, "sources": sources, "targets": targets, "damaged": damaged,
        "dtype": draw(st.sampled_from(DTYPES)), "mode": draw(st.sampled_from(list(CodecMode))),
        "eb": draw(st.sampled_from([3e-2, 1e-2])),
        "blocks_per_chunk": draw(st.integers(1, NUM_BLOCKS)),
        "copy": draw(st.sampled_from(COPIES)),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_reloads_are_within_bound_or_reported(s: dict) -> None:
    caches = make_kv(s["dtype"], seed=s["seed"])
    original = [c.clone() for c in caches]
    worker = make_worker(caches, CodecConfig(s["eb"], True, s["mode"]),
                         staging_bytes=s["blocks_per_chunk"] * worker_block_bytes(caches),
                         copy=s["copy"])
    offsets = reserve_offsets(worker, len(s["stored"]) + 1)
    unknown = offsets.pop()  # a reservation nothing was stored in
    reports = store(worker, 0, s["stored"], offsets)
    assert all(reports[o][0] > 0 for o in offsets)
    for i in s["damaged"]:
        # A byte in the middle of the block's first record: header, widths or planes.
        worker.arena[offsets[i] + 40] ^= 0x5A

    for c in caches:
        c.fill_(-1.0)
    sources = [unknown if i is None else offsets[i] for i in s["sources"]]
    failed = load(worker, 1, sources, s["targets"])

    expect_failed = {t for i, t in zip(s["sources"], s["targets"])
                     if i is None or i in s["damaged"]}
    assert failed == expect_failed
    assert worker.counters.blocks_loaded + worker.counters.failed_loads == len(sources)
    for layer, (c, o) in enumerate(zip(caches, original)):
        for i, target in zip(s["sources"], s["targets"]):
            if target in failed:
                continue
            x = o[s["stored"][i]].double().reshape(2, -1)
            y = c[target].double().reshape(2, -1)
            bound = s["eb"] * (x.amax(1) - x.amin(1))
            assert ((y - x).abs().amax(1) <= bound).all(), (layer, i, target)
        # A failed block may hold some decoded pages (each page is checked on its
        # own); vLLM recomputes it whole. Blocks outside the load stay as they were.
        untouched = np.setdiff1d(np.arange(NUM_BLOCKS), s["targets"])
        assert (c[torch.from_numpy(untouched)] == -1.0).all(), layer
