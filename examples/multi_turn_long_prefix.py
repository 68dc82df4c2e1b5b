"""Long-prefix multi-turn chat with compressed CPU offloading on and off.

Run:
    python examples/multi_turn_long_prefix.py MODEL \
        [--conversations 8] [--turns 4] [--gpu-kv-blocks 1024] [--kv-offloading-size 2]

Several conversations, each about its own long document, take turns round
robin. The GPU KV cache is held small (``--gpu-kv-blocks``), so by the time a
conversation comes back its prefix has left the GPU prefix cache: it is either
loaded from the host cache or recomputed. The same workload runs twice, each in
a fresh process and with the same host budget (``--kv-offloading-size`` GiB):
once with vLLM's own, uncompressed CPU offloading and once with compressed
offloading. For each it prints which share of the prompt tokens was served from a
cache (the GPU prefix cache or the host cache) and which was recomputed, and the
mean time to first token (TTFT) of first turns (cold) and later turns.

The shares come from each request's ``num_cached_tokens``, not from vLLM's
``vllm:prefix_cache_hits`` counters: the offline engine records the scheduler's
statistics only for steps that return outputs, and the step that schedules a
request after an idle engine, or that waits for its KV to load from the host,
returns none, so those counters miss most of this workload's hits.

On a small model, recomputing a few hundred tokens can be faster than loading
them; the TTFT gain shows on large models and long prefixes.

Compression shows when the conversations' KV does not fit in the host budget
uncompressed but does compressed. KV bytes per token are
``2 * layers * kv_heads * head_dim * dtype_bytes`` (128 KiB for Llama-3.1-8B in
bf16); the script prints the prompt tokens of the last turn of each conversation,
so choose ``--kv-offloading-size`` between their KV size divided by the
compression ratio and their uncompressed KV size.
"""

import argparse
import multiprocessing
import random
import statistics
from typing import Any

from vllm import LLM, SamplingParams
from vllm.v1.metrics.reader import Gauge

from vllm_kvcompress import compressed_offload_kwargs
from vllm_kvcompress.offload.config import DEFAULT_ERROR_BOUND, DEFAULT_MODE, MODE_NAMES

QUESTIONS = (
    "Which stations report light rain?",
    "What is the highest wind speed in the log?",
    "Which station is the coldest?",
    "Summarise the log in one sentence.",
)
WEATHER = ("clear skies", "light rain", "fog", "snow", "a thunderstorm")


def document(conversation: int, entries: int) -> str:
    """A long, distinct document per conversation, so no two share a prefix."""
    rng = random.Random(conversation)
    lines = [f"Weather log {conversation}."]
    for i in range(entries):
        lines.append(
            f"Entry {i}: station {rng.randrange(1000)} reports {rng.randrange(-15, 40)} "
            f"degrees, wind {rng.randrange(80)} km/h and {rng.choice(WEATHER)}.")
    return " ".join(lines)


def run_workload(model: str, offload_kwargs: dict[str, Any], args: argparse.Namespace,
                 results: "multiprocessing.Queue[dict[str, Any]]") -> None:
    """Runs every conversation on one engine and reports token shares and TTFTs."""
    llm = LLM(
        model,
        max_model_len=args.max_model_len,
        num_gpu_blocks_override=args.gpu_kv_blocks,
        disable_log_stats=False,  # per-request TTFTs and llm.get_metrics() need stats
        **offload_kwargs,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens)
    histories = [document(c, args.document_entries) for c in range(args.conversations)]
    ttft: dict[str, list[float]] = {"first": [], "later": []}
    prompt_tokens = cached_tokens = 0
    last_turn_tokens: list[int] = []
    for turn in range(args.turns):
        for c in range(args.conversations):
            prompt = f"{histories[c]}\n\nQuestion: {QUESTIONS[turn % len(QUESTIONS)]}\nAnswer:"
            output = llm.generate(prompt, params, use_tqdm=False)[0]
            histories[c] = prompt + output.outputs[0].text
            prompt_tokens += len(output.prompt_token_ids)
            cached_tokens += output.num_cached_tokens or 0
            ttft["first" if turn == 0 else "later"].append(output.metrics.first_token_latency)
            if turn == args.turns - 1:
                last_turn_tokens.append(len(output.prompt_token_ids))

    ratio = next((m.value for m in llm.get_metrics()
                  if isinstance(m, Gauge) and m.name == "vllm:kv_offload_compression_ratio"),
                 None)
    results.put({
        "cached": cached_tokens / prompt_tokens,
        "recomputed": 1 - cached_tokens / prompt_tokens,
        "ttft_first": statistics.mean(ttft["first"]),
        "ttft_later": statistics.mean(ttft["later"]) if ttft["later"] else float("nan"),
        "ratio": ratio,
        "last_turn_tokens": last_turn_tokens,
    })


def run_in_fresh_process(model: str, offload_kwargs: dict[str, Any],
                         args: argparse.Namespace) -> dict[str, Any]:
    """One engine per process: GPU memory and the metrics registry start empty."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=run_workload, args=(model, offload_kwargs, args, results))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the workload process failed with exit code {process.exitcode}")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model name or path")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--document-entries", type=int, default=150,
                        help="log entries per document (about 25 tokens each)")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--gpu-kv-blocks", type=int, default=1024,
                        help="GPU KV cache size in blocks (16 tokens each on most models); "
                             "it must hold at least one --max-model-len sequence")
    parser.add_argument("--kv-offloading-size", type=float, default=2.0,
                        help="host cache size in GiB, the same for both runs")
    parser.add_argument("--error-bound", type=float, default=DEFAULT_ERROR_BOUND)
    parser.add_argument("--mode", choices=MODE_NAMES, default=DEFAULT_MODE)
    args = parser.parse_args()

    configs = {
        "uncompressed": {"kv_offloading_size": args.kv_offloading_size},
        "compressed": compressed_offload_kwargs(
            kv_offloading_size=args.kv_offloading_size, error_bound=args.error_bound,
            mode=args.mode, relative=True),
    }
    rows = {name: run_in_fresh_process(args.model, kwargs, args)
            for name, kwargs in configs.items()}

    print(f"\nprompt tokens of each conversation's last turn: "
          f"{rows['compressed']['last_turn_tokens']}")
    print(f"{'offloading':<14}{'cached':>9}{'recomputed':>12}"
          f"{'TTFT first':>12}{'TTFT later':>12}{'ratio':>8}")
    for name, row in rows.items():
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        print(f"{name:<14}{row['cached']:>9.1%}{row['recomputed']:>12.1%}"
              f"{row['ttft_first'] * 1e3:>10.1f}ms{row['ttft_later'] * 1e3:>10.1f}ms{ratio:>8}")


if __name__ == "__main__":
    main()
