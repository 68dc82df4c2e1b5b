"""End to end through vLLM on a GPU: outputs with compressed offloading equal
those without it, the reload path is really taken, a damaged stored block is
recomputed instead of served, and ``vllm serve --enable-compression`` answers.

``$KVCOMPRESS_ATTENTION_BACKEND`` picks vLLM's attention backend (e.g.
FLASH_ATTN, TRITON_ATTN). The model is ``$KVCOMPRESS_TEST_MODEL`` (a trained model; see
benchmarks/train_tiny_llama.py), else a small random-weight Llama written to a
temporary folder; ``$KVCOMPRESS_TEST_PROMPTS`` is a JSON list of token-id lists
(held-out text for the trained model), else random tokens. The GPU KV cache is kept
to a few prompts so that later prompts evict earlier ones from the GPU and a repeated
prompt must come back from the host.

A reused prefix alone changes the arithmetic: the cached blocks are reused and only
the tail is computed, in another split than a full prefill. Where two next tokens are
nearly tied (everywhere in a random-weight model; once in the 96 continuation tokens
of a trained 28M Llama on the H200) that flips a greedy token without any offloading.
So a pass that reloads from the host is compared with the same pass under vLLM's
native CPU offloading, which copies the KV exactly; a first pass, which computes
everything, with a run without offloading.
"""

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from vllm_kvcompress.offload.config import DEFAULT_ERROR_BOUND

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BLOCK = 16
PROMPT_TOKENS = 512
GPU_BLOCKS = 3 * PROMPT_TOKENS // BLOCK + 8
# Log-probability margin under which the two likeliest next tokens count as tied:
# a likelihood ratio of about 1.1.
NEAR_TIE = 0.1


def _counters(worker_self: object) -> dict:
    from dataclasses import asdict

    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return asdict(get_kv_transfer_group().connector_worker.worker.counters)


def _page_report(worker_self: object) -> dict:
    """What the codec makes of the pages now in the GPU KV cache (first 512), to
    tell apart a codec problem from KV values the bound cannot serve."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from vllm_kvcompress.codec import compress_pages

    worker = get_kv_transfer_group().connector_worker.worker
    pages = worker.layouts[0].pages
    if pages is None:
        return {"pages": None}
    n = min(pages.shape[0], 512)
    values = pages[:n].float()
    amax = values.abs().amax(1)
    table = compress_pages(pages, torch.arange(n, device=pages.device), worker.codec).table
    return {"shape": list(pages.shape), "stride": list(pages.stride()),
            "dtype": str(pages.dtype), "status_counts": torch.bincount(
                table[:, 2], minlength=5).tolist(),
            "non_finite_pages": int((~torch.isfinite(values).all(1)).sum()),
            "zero_pages": int((amax == 0).sum()), "median_amax": float(amax.median()),
            "median_range": float((values.amax(1) - values.amin(1)).median())}


def _corrupt_every_block(worker_self: object) -> int:
    """Flips a payload byte of every stored block on this rank."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    worker = get_kv_transfer_group().connector_worker.worker
    for offset, sizes in worker._records.items():
        worker.arena[offset + int(sizes[0]) // 2] ^= 0x5A
    return len(worker._records)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    trained = os.environ.get("KVCOMPRESS_TEST_MODEL")
    if trained:
        return trained
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("random-llama")
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return str(path)


BACKEND = os.environ.get("KVCOMPRESS_ATTENTION_BACKEND")


def make_llm(model: str, dtype: str = "bfloat16", **kwargs: object):
    vllm = pytest.importorskip("vllm")
    if BACKEND:
        kwargs["attention_backend"] = BACKEND
    return vllm.LLM(model=model, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True,
                    max_model_len=2 * PROMPT_TOKENS, block_size=BLOCK,
                    num_gpu_blocks_override=GPU_BLOCKS, gpu_memory_utilization=0.3,
                    enable_prefix_caching=True, seed=0, **kwargs)


def prompts(n: int, vocab: int = 4000) -> list[dict]:
    held_out = os.environ.get("KVCOMPRESS_TEST_PROMPTS")
    if held_out:
        windows = json.loads(Path(held_out).read_text())
        assert len(windows) >= n and all(len(w) >= PROMPT_TOKENS for w in windows[:n])
        return [{"prompt_token_ids": w[:PROMPT_TOKENS]} for w in windows[:n]]
    gen = torch.Generator().manual_seed(1)
    return [{"prompt_token_ids": torch.randint(10, vocab, (PROMPT_TOKENS,),
                                               generator=gen).tolist()} for _ in range(n)]


def greedy(llm, batch: list[dict], tokens: int = 24) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    # One prompt per call, so each one's KV is computed (and stored) before the next
    # prompt can evict it from the GPU.
    return [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids)
            for p in batch]


class Reload(NamedTuple):
    """Greedy continuations of a pass that reloads, and at each step the margin in
    log-probability between the two likeliest next tokens."""

    tokens: list[list[int]]
    margins: list[list[float]]


def greedy_with_margins(llm, batch: list[dict], tokens: int = 24) -> Reload:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    out = [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in batch]
    margins = []
    for o in out:
        steps = [sorted((lp.logprob for lp in step.values()), reverse=True)
                 for step in o.logprobs]
        margins.append([s[0] - s[1] for s in steps])
    return Reload([list(o.token_ids) for o in out], margins)


def assert_equal_but_near_ties(got: list[list[int]], expected: Reload) -> None:
    """Each continuation equals the reference, or first differs at a step where the
    reference's two likeliest tokens were within NEAR_TIE of each other: a lossy
    copy of the KV may tip a choice the model hardly makes, never a clear one (and
    after a different token the rest is conditioned on other text)."""
    for i, (a, b) in enumerate(zip(got, expected.tokens, strict=True)):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None:
            margin = expected.margins[i][first]
            print(f"prompt {i}: token {first} differs at a margin of {margin:.4f}")
            assert margin < NEAR_TIE, (i, first, a, b)


def free(llm) -> None:
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    del llm
    gc.collect()
    # The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 on the host):
    # vLLM keeps the KV connector in a process-wide global and creates one only when
    # none is set, so the next LLM would silently reuse this one and its settings.
    ensure_kv_transfer_shutdown()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def references(model_dir: str) -> Callable[[str], list[list[int]]]:
    """Greedy outputs without offloading, per model dtype, computed once."""
    done: dict[str, list[list[int]]] = {}

    def get(dtype: str) -> list[list[int]]:
        if dtype not in done:
            llm = make_llm(model_dir, dtype=dtype)
            done[dtype] = greedy(llm, prompts(4))
            free(llm)
        return done[dtype]

    return get


@pytest.fixture(scope="module")
def reference(references: Callable[[str], list[list[int]]]) -> list[list[int]]:
    return references("bfloat16")


@pytest.fixture(scope="module")
def native_reloads(model_dir: str) -> Callable[..., Reload]:
    """Greedy outputs of the prompts reloaded from the host by vLLM's native CPU
    offloading (an exact copy of the KV), per dtype and tensor-parallel size,
    computed once: the reference of a pass that reloads."""
    done: dict[tuple[str, int], Reload] = {}

    def get(dtype: str, tensor_parallel_size: int = 1) -> Reload:
        key = (dtype, tensor_parallel_size)
        if key not in done:
            llm = make_llm(model_dir, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                           kv_offloading_size=1, kv_offloading_backend="native")
            batch = prompts(4)
            greedy(llm, batch)
            time.sleep(1.0)
            done[key] = greedy_with_margins(llm, batch)
            free(llm)
        return done[key]

    return get


def run_with_compression(model_dir: str, error_bound: float, corrupt: bool = False,
                         dtype: str = "bfloat16"):
    from vllm_kvcompress import compressed_offload_kwargs

    llm = make_llm(model_dir, dtype=dtype,
                   **compressed_offload_kwargs(1, error_bound=error_bound))
    batch = prompts(4)
    first = greedy(llm, batch)
    time.sleep(1.0)
    if corrupt:
        assert sum(llm.collective_rpc(_corrupt_every_block)) > 0
    second = greedy(llm, batch)
    counters = llm.collective_rpc(_counters)[0]
    counters["pages"] = llm.collective_rpc(_page_report)[0]
    print(f"error bound {error_bound} ({dtype}): {counters}")
    free(llm)
    return first, second, counters


def test_tiny_bound_matches_no_offloading_and_reloads(
        model_dir: str, references: Callable[[str], list[list[int]]],
        native_reloads: Callable[..., Reload]) -> None:
    # fp16 keeps 11 significant bits, so a relative bound of 1e-3 is attainable and
    # the lossy path runs (in bf16 it would store every page raw).
    reference = references("float16")
    first, second, counters = run_with_compression(model_dir, error_bound=1e-3,
                                                   dtype="float16")
    assert first == reference
    assert counters["bytes_stored"] < counters["raw_bytes_stored"], counters
    assert counters["blocks_stored"] >= 4 * PROMPT_TOKENS // BLOCK - 4, counters
    assert counters["blocks_loaded"] > 0, "the second pass must reload from the host"
    assert counters["failed_loads"] == 0, counters
    assert_equal_but_near_ties(second, native_reloads("float16"))


def test_raw_pages_reload_exactly(model_dir: str, reference: list[list[int]],
                                  native_reloads: Callable[..., Reload]) -> None:
    """A bound bf16 cannot attain stores every page raw: the reload must then give
    exactly what native offloading's exact copy gives."""
    first, second, counters = run_with_compression(model_dir, error_bound=1e-4)
    assert first == reference
    assert counters["raw_pages"] > 0 and counters["blocks_loaded"] > 0, counters
    assert counters["failed_loads"] == 0, counters
    assert second == native_reloads("bfloat16").tokens


def test_default_bound_compresses_and_reloads(model_dir: str,
                                              reference: list[list[int]]) -> None:
    first, second, counters = run_with_compression(model_dir, error_bound=DEFAULT_ERROR_BOUND)
    assert first == reference, "the first pass computes everything itself"
    assert counters["blocks_loaded"] > 0, counters
    assert counters["bytes_stored"] < counters["raw_bytes_stored"], counters
    matching = sum(a == b for a, b in zip(second, reference))
    print(f"default bound: {matching}/{len(reference)} continuations identical, ratio "
          f"{counters['raw_bytes_stored'] / max(counters['bytes_stored'], 1):.2f}")


def test_damaged_blocks_are_recomputed_not_served(model_dir: str,
                                                  reference: list[list[int]]) -> None:
    first, second, counters = run_with_compression(model_dir, error_bound=1e-2, corrupt=True)
    assert counters["failed_loads"] > 0, "the damage must be detected"
    # Every reload failed, so the second pass computes everything, as a first pass.
    assert second == reference, "recomputed KV gives the reference output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_with_compression_answers(model_dir: str, tmp_path: Path) -> None:
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
           "--port", str(port), "--enforce-eager", "--max-model-len", "1024",
           "--gpu-memory-utilization", "0.3", "--skip-tokenizer-init",
           "--kv-offloading-size", "1", "--enable-compression",
           "--compression-error-bound", str(DEFAULT_ERROR_BOUND)]
    if BACKEND:
        cmd += ["--attention-backend", BACKEND]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            if server.poll() is not None:
                break
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        body = json.dumps({"model": model_dir, "prompt": list(range(10, 300)),
                           "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(base + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        reply = json.load(urllib.request.urlopen(request, timeout=120))
        assert reply["choices"][0]["finish_reason"] in ("length", "stop")
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        # The plugin's own series (vLLM exports kv_offload_* series of its own too).
        assert "vllm:kv_offload_compression_ratio" in metrics, metrics[-3000:]
        assert "vllm:kv_offload_compressed_bytes_stored" in metrics
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_2(model_dir: str, native_reloads: Callable[..., Reload]) -> None:
    """Each rank stores and reloads its half of the KV heads in its own arena at
    the offsets the one scheduler chose. The references run at TP=2 too: two GPUs
    sum partial results in another order than one, which can flip a greedy token by
    itself. The bound stores every page raw, so the reload must be exact."""
    from vllm_kvcompress import compressed_offload_kwargs

    # The counters come back from the rank processes through collective_rpc, which
    # ships the function pickled; vLLM allows that only when asked.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    # This process has initialised CUDA already: the rank processes must be spawned.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    batch = prompts(4)
    llm = make_llm(model_dir, tensor_parallel_size=2)
    reference = greedy(llm, batch)
    free(llm)
    llm = make_llm(model_dir, tensor_parallel_size=2,
                   **compressed_offload_kwargs(1, error_bound=1e-4))
    assert greedy(llm, batch) == reference
    time.sleep(1.0)
    assert greedy(llm, batch) == native_reloads("bfloat16", tensor_parallel_size=2).tokens
    counters = llm.collective_rpc(_counters)
    assert len(counters) == 2
    assert all(c["blocks_loaded"] > 0 and c["failed_loads"] == 0 for c in counters)
    free(llm)
