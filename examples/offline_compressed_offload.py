"""Offline inference with compressed CPU offloading of the KV cache.

Run:
    python examples/offline_compressed_offload.py MODEL [--kv-offloading-size GIB]

Four questions share one long document as their prompt prefix. The first round
computes the prefix and stores its KV blocks, compressed, in the host arena. The
GPU prefix cache is then cleared, so in the second round every cached prefix
token must come back from the host: decompressed on the GPU, each value within
the error bound of the original. Both rounds print their answers and how many
prompt tokens were served from cache. An answer may differ between the rounds
where the bounded error tips a near tie between two tokens.

``LLM(...)`` rejects keyword arguments it does not know, so the compression
settings reach vLLM inside a ``KVTransferConfig`` built by
``compressed_offload_kwargs``; do not pass ``kv_offloading_size`` to ``LLM``
as well (vLLM would then replace the connector with its uncompressed one).
"""

import argparse
import time

from vllm import LLM, RequestOutput, SamplingParams

from vllm_kvcompress import compressed_offload_kwargs
from vllm_kvcompress.offload.config import DEFAULT_ERROR_BOUND, DEFAULT_MODE, MODE_NAMES



def document(entries: int) -> str:
    """A weather log of ``entries`` lines, about 30 tokens each: the shared prefix."""
    return " ".join(
        f"Entry {i}: the relay station at kilometre {17 * i % 997} logs a temperature of "
        f"{(31 * i) % 45 - 10} degrees, a wind speed of {(13 * i) % 70} km/h and "
        f"{'clear skies' if i % 3 else 'light rain'}."
        for i in range(entries))

QUESTIONS = (
    "Which entries report light rain at temperatures below zero?",
    "What is the highest wind speed in the log?",
    "Summarise the weather at kilometre 17.",
    "How many entries are there?",
)


def clear_gpu_prefix_cache(llm: LLM, timeout_s: float = 30.0) -> None:
    """Drops the GPU copies of cached blocks; the host (connector) cache is kept.

    The reset is refused while blocks are still held, e.g. by stores to the host
    that have not finished yet, so retry until they drain.
    """
    deadline = time.monotonic() + timeout_s
    while not llm.reset_prefix_cache(reset_connector=False):
        if time.monotonic() > deadline:
            raise TimeoutError("the GPU prefix cache could not be reset")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model name or path")
    parser.add_argument("--kv-offloading-size", type=float, default=4.0,
                        help="host arena size in GiB (total over tensor-parallel ranks)")
    parser.add_argument("--error-bound", type=float, default=DEFAULT_ERROR_BOUND)
    parser.add_argument("--mode", choices=MODE_NAMES, default=DEFAULT_MODE)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--document-entries", type=int, default=120,
                        help="lines of the shared document; lower it for short-context models")
    args = parser.parse_args()

    llm = LLM(
        args.model,
        max_model_len=args.max_model_len,
        **compressed_offload_kwargs(
            kv_offloading_size=args.kv_offloading_size,
            error_bound=args.error_bound,
            mode=args.mode,
            relative=True,
        ),
    )
    shared = document(args.document_entries)
    prompts = [f"{shared}\n\nQuestion: {q}\nAnswer:" for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=48)

    report("first round: prefix computed, stored to the host", llm.generate(prompts, params))
    clear_gpu_prefix_cache(llm)
    report("second round: prefix loaded from the host", llm.generate(prompts, params))


def report(title: str, outputs: list[RequestOutput]) -> None:
    print(f"\n=== {title} ===")
    for output in outputs:
        print(f"[{output.num_cached_tokens} of {len(output.prompt_token_ids)} prompt tokens "
              f"cached] {output.outputs[0].text.strip()!r}")


if __name__ == "__main__":
    main()
