"""Prefix reuse latency with no offloading, vLLM's native CPU offloading and
compressed offloading, measured side by side in one run.

Workload (issue #3): a Llama-architecture model with random weights (vLLM's
``load_format="dummy"``; 16 layers, 8 KV heads x 128, bf16), prompts of
``--prompt-tokens`` tokens, a GPU KV cache of ``--gpu-prompts`` prompts, so that a
prompt four prompts back has left the GPU. For each configuration:

* cold: a new prompt (for the offloading configurations this includes storing it);
* GPU hit: the prompt just run, again;
* CPU hit: a prompt evicted from the GPU since (recomputed without offloading).

Each latency is one ``generate`` call producing one token (time to first token as
the offline API sees it), median over ``--repeats`` prompts, after one unrecorded
round of the same measurements (the first prefill of each shape compiles kernels).
It also reports how many tokens the host cache holds at the same ``--offload-gib``:
for native offloading its block count, for compressed offloading the blocks it holds
once new prompts have filled it and it has been evicting for a while (the capacity
reached in practice, with reservations and fragmentation; the arena over the mean
block size is reported beside it as ``host_tokens_if_packed``). New prompts stored
while a full host cache evicts time its cold prefill, for native and compressed
offloading alike (``cold_slowdown_native_evicting``,
``cold_slowdown_compressed_evicting``). Writes JSON, a PNG and a table.

    python benchmarks/benchmark_offload.py --out results/offload
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_kvcompress.offload.config import DEFAULT_ERROR_BOUND, DEFAULT_MODE, MODE_NAMES

BLOCK = 16


def write_model_config(path: Path, layers: int, kv_heads: int, head_dim: int) -> None:
    """A Llama-3-8B-shaped config with ``layers`` layers; weights come from
    ``load_format="dummy"``, so no checkpoint is needed."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": 128256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))


def _worker_counters(worker_self: object) -> dict[str, int]:
    from dataclasses import asdict

    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return asdict(get_kv_transfer_group().connector_worker.worker.counters)


def build_llm(model: Path, mode: str, args: argparse.Namespace):
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if mode == "native":
        kwargs = {"kv_offloading_size": args.offload_gib, "kv_offloading_backend": "native"}
    elif mode == "compressed":
        from vllm_kvcompress import compressed_offload_kwargs

        kwargs = compressed_offload_kwargs(args.offload_gib, error_bound=args.error_bound,
                                           mode=args.codec_mode)
    if args.attention_backend:
        kwargs["attention_backend"] = args.attention_backend
    gpu_blocks = int(args.gpu_prompts * args.prompt_tokens / BLOCK)
    return LLM(model=str(model), load_format="dummy", skip_tokenizer_init=True,
               dtype="bfloat16", enforce_eager=args.enforce_eager, block_size=BLOCK,
               max_model_len=args.prompt_tokens + 64, enable_prefix_caching=True,
               num_gpu_blocks_override=gpu_blocks, gpu_memory_utilization=0.85,
               max_num_batched_tokens=args.prompt_tokens + 64, seed=0,
               # the host cache's gauges (blocks held) come through the stats path
               disable_log_stats=False, **kwargs)


def metrics(llm) -> dict[str, float]:
    """Counter totals and gauge values of ``LLM.get_metrics()``, by name."""
    from vllm.v1.metrics.reader import Counter, Gauge

    values: dict[str, float] = {}
    for m in llm.get_metrics():
        if isinstance(m, (Counter, Gauge)):
            values[m.name] = values.get(m.name, 0.0) + float(m.value)
    return values


def fill_host_cache(llm, args: argparse.Namespace,
                    is_evicting: Callable[[], bool]) -> dict[str, Any]:
    """Stores new prompts until the host cache has been evicting (``is_evicting``,
    asked after each prompt) for ``--fill-extra-prompts`` prompts. The prompts stored
    while it evicts are the cold prefills of a server whose host cache is full
    (``cold_evicting_ms``, their median), which the cold column, measured while the
    compressed cache still has room, does not see."""
    prompts_after_eviction = 0
    evicting_s: list[float] = []
    for i in range(args.fill_max_prompts):
        seconds = timed(llm, make_prompts(1, args.prompt_tokens, seed=10_000 + i)[0])
        if prompts_after_eviction:
            evicting_s.append(seconds)
        if prompts_after_eviction or is_evicting():
            prompts_after_eviction += 1
            if prompts_after_eviction > args.fill_extra_prompts:
                break
    return {"prompts": i + 1, "evicting": prompts_after_eviction > 0,
            "cold_evicting_ms": 1e3 * statistics.median(evicting_s) if evicting_s else None}


def compressed_cache_held(llm) -> dict[str, float]:
    """What the full compressed host cache holds once its stores have finished: the
    capacity reached in practice, with reservations and fragmentation, not the arena
    size over the mean block size."""
    from vllm_kvcompress.offload.metrics import CompressionMetrics as M

    settle(llm)
    final = metrics(llm)
    return {"cached_blocks": final.get(M.CACHED_BLOCKS, 0.0),
            "arena_usage": final.get(M.ARENA_USAGE, 0.0),
            "arena_fragmentation": final.get(M.ARENA_FRAGMENTATION, 0.0),
            "stores_oversized": final.get(M.STORES_OVERSIZED, 0.0)}


def native_evicting(stored_prompts: int, blocks_per_prompt: int, held_blocks: int
                    ) -> Callable[[], bool]:
    """Whether vLLM's native cache evicts, asked once per new prompt: it holds a fixed
    number of blocks, so it evicts once the prompts stored exceed them."""
    stored = itertools.count(stored_prompts + 1)
    return lambda: next(stored) * blocks_per_prompt > held_blocks


def make_prompts(n: int, tokens: int, seed: int) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(1000, 120000, (tokens,), generator=gen).tolist()}
            for _ in range(n)]


def timed(llm, prompt: dict) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    return time.perf_counter() - start


def settle(llm, seconds: float = 1.0) -> None:
    """Steps the engine with tiny requests so finished stores are registered."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        llm.generate([{"prompt_token_ids": [7, 8, 9]}], params, use_tqdm=False)
        time.sleep(0.05)


def measure(llm, args: argparse.Namespace, seed: int) -> dict[str, list[float]]:
    """Cold runs of ``repeats + 4`` prompts (enough to push the first ones out of
    the GPU cache), GPU hits on the last, then CPU hits on the first ones.

    Cold prompts follow each other, so each one's prefill overlaps the previous
    one's store, as in a busy server; the hits start once stores have drained, so
    they time the hit alone."""
    prompts = make_prompts(args.repeats + 4, args.prompt_tokens, seed)
    cold = [timed(llm, p) for p in prompts]
    settle(llm)
    gpu_hit = [timed(llm, prompts[-1]) for _ in range(args.repeats)]
    settle(llm)
    cpu_hit = []
    for p in prompts[:args.repeats]:
        cpu_hit.append(timed(llm, p))
        settle(llm, 0.2)
    return {"cold": cold[1:], "gpu_hit": gpu_hit, "cpu_hit": cpu_hit}


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model_dir or tempfile.mkdtemp(prefix="llama-dummy-"))
    write_model_config(model, args.layers, args.kv_heads, args.head_dim)
    kv_bytes_per_token = 2 * args.layers * args.kv_heads * args.head_dim * 2
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "prompt_tokens": args.prompt_tokens,
        "prompt_kv_mib": args.prompt_tokens * kv_bytes_per_token / 2**20,
        "gpu_prompts": args.gpu_prompts, "offload_gib": args.offload_gib,
        "error_bound": args.error_bound, "codec_mode": args.codec_mode,
        "attention_backend": args.attention_backend or "default", "configs": {},
    }
    # The counters are read with LLM.collective_rpc, which ships a function to the
    # engine process; that needs pickle, which vLLM allows only when asked.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    for mode in tqdm(args.configs, desc="offload configs"):
        llm = build_llm(model, mode, args)
        measure(llm, args, seed=1000)
        samples = measure(llm, args, seed=1)
        entry: dict[str, Any] = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        entry["samples_ms"] = {k: [x * 1e3 for x in v] for k, v in samples.items()}
        block_bytes = kv_bytes_per_token * BLOCK
        capacity = args.offload_gib * 2**30
        if mode == "native":
            entry["host_tokens"] = capacity // block_bytes * BLOCK
            # Both measure() rounds stored repeats + 4 new prompts each.
            entry["fill"] = fill_host_cache(llm, args, native_evicting(
                2 * (args.repeats + 4), -(-args.prompt_tokens // BLOCK),
                capacity // block_bytes))
        elif mode == "compressed":
            counters = llm.collective_rpc(_worker_counters)[0]
            entry["counters"] = counters
            mean_block = counters["bytes_stored"] / max(counters["blocks_stored"], 1)
            entry["compression_ratio"] = counters["raw_bytes_stored"] / max(
                counters["bytes_stored"], 1)
            entry["host_tokens_if_packed"] = int(capacity / max(mean_block, 1) * BLOCK)
            from vllm_kvcompress.offload.metrics import CompressionMetrics as M

            fill = fill_host_cache(llm, args,
                                   lambda: metrics(llm).get(M.BLOCKS_EVICTED, 0) > 0)
            if not fill["evicting"]:
                raise SystemExit(f"the host cache never filled in {fill['prompts']} prompts; "
                                 "raise --fill-max-prompts")
            fill |= compressed_cache_held(llm)
            entry["fill"] = fill
            entry["host_tokens"] = int(fill["cached_blocks"]) * BLOCK
        results["configs"][mode] = entry
        # Written after every configuration, so a run cut short still reports.
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    summarize(results)
    return results


def summarize(results: dict[str, Any]) -> None:
    configs = results["configs"]
    none = configs.get("none")
    native = configs.get("native")
    comp = configs.get("compressed")
    summary: dict[str, Any] = {}
    if native and comp:
        summary["reload_overhead_vs_native"] = (
            (comp["cpu_hit"] - comp["gpu_hit"]) / (native["cpu_hit"] - native["gpu_hit"]))
        summary["host_tokens_vs_native"] = comp["host_tokens"] / native["host_tokens"]
    if none and native and comp:
        # The same ratio over no offloading's GPU hit: the three GPU hits are the same
        # work for vLLM, but a slow host spreads them by up to 10 ms within one run,
        # and each configuration's own then moves its ratio as much as its reload does.
        summary["reload_overhead_vs_native_over_none_gpu_hit"] = (
            (comp["cpu_hit"] - none["gpu_hit"]) / (native["cpu_hit"] - none["gpu_hit"]))
    if none:
        for name, entry in (("native", native), ("compressed", comp)):
            if entry:
                summary[f"cold_slowdown_{name}"] = entry["cold"] / none["cold"] - 1
        for name, entry in (("native", native), ("compressed", comp)):
            evicting = (entry or {}).get("fill", {}).get("cold_evicting_ms")
            if evicting is not None:
                summary[f"cold_slowdown_{name}_evicting"] = evicting / none["cold"] - 1
    results["summary"] = summary


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['device']}: {results['prompt_tokens']}-token prompts "
          f"({results['prompt_kv_mib']:.0f} MiB of KV), {results['offload_gib']} GiB host cache")
    print(f"{'config':<11}{'cold ms':>9}{'GPU hit':>9}{'CPU hit':>9}{'host tokens':>13}"
          f"{'ratio':>7}")
    for mode, e in results["configs"].items():
        tokens = f"{e['host_tokens']:,}" if "host_tokens" in e else "-"
        ratio = f"{e['compression_ratio']:.2f}" if "compression_ratio" in e else "-"
        print(f"{mode:<11}{e['cold']:>9.1f}{e['gpu_hit']:>9.1f}{e['cpu_hit']:>9.1f}"
              f"{tokens:>13}{ratio:>7}")
    for k, v in results["summary"].items():
        print(f"{k}: {v:.3f}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(results["configs"])
    kinds = ["cold", "gpu_hit", "cpu_hit"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(configs)
    for i, mode in enumerate(configs):
        values = [results["configs"][mode][k] for k in kinds]
        ax.bar([j + i * width for j in range(len(kinds))], values, width, label=mode)
    ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(kinds))],
                  ["cold prefill", "GPU prefix hit", "evicted prefix"])
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"{results['prompt_tokens']}-token prompt, {results['device']}")
    ax.legend()
    held = {m: e["host_tokens"] for m, e in results["configs"].items() if "host_tokens" in e}
    ax2.bar(list(held), list(held.values()), color=["tab:orange", "tab:green"][:len(held)])
    ax2.set_ylabel(f"tokens in {results['offload_gib']} GiB of host memory")
    ax2.set_title("host cache capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output prefix (.json, .png)")
    parser.add_argument("--configs", nargs="+", default=["none", "native", "compressed"],
                        choices=["none", "native", "compressed"])
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--gpu-prompts", type=float, default=2.5)
    parser.add_argument("--offload-gib", type=float, default=8)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--error-bound", type=float, default=DEFAULT_ERROR_BOUND)
    parser.add_argument("--codec-mode", default=DEFAULT_MODE, choices=list(MODE_NAMES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fill-max-prompts", type=int, default=200,
                        help="new prompts at most to fill the host cache until it evicts")
    parser.add_argument("--fill-extra-prompts", type=int, default=8,
                        help="prompts stored after the first eviction before counting")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--model-dir", type=str, default=None)
    parser.add_argument("--attention-backend", default=None,
                        help="vLLM attention backend (default: vLLM's choice)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = run(args)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print_table(results)


if __name__ == "__main__":
    main()
