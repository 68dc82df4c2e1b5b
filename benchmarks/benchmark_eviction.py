"""Where a cold prefill's time goes while compressed offloading stores it, before and
after its host cache fills.

``benchmark_offload.py`` times the compressed cache's cold prefill several
milliseconds slower once its full host cache evicts, where native offloading's does
not change. This runs the same engine and workload in this process (no engine-core
subprocess, so one profiler sees the scheduler, the worker and the GPU) and times
new prompts back to back in two phases: while the host cache fills, and once it
evicts. For each phase it reports per prompt

* the wall time, without and with the profiler;
* the host time of the plugin's scheduler-side and worker-side calls;
* the GPU time of every kernel and copy;
* how store chunks reached the arena: copy-engine runs or the block-packing kernel.

JSON, a PNG and a table::

    python benchmarks/benchmark_eviction.py --out results/eviction
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_offload import build_llm, make_prompts, metrics, timed, write_model_config

from vllm_kvcompress.offload import connector as connector_module
from vllm_kvcompress.offload import manager as manager_module
from vllm_kvcompress.offload import worker as worker_module
from vllm_kvcompress.offload.config import DEFAULT_ERROR_BOUND, DEFAULT_MODE, MODE_NAMES
from vllm_kvcompress.offload.metrics import CompressionMetrics

PREFIX = "kvcompress."
TRACED = {
    manager_module.CompressedCPUOffloadingManager: (
        "lookup", "prepare_store", "_allocate_evicting", "complete_store", "touch",
        "prepare_load", "complete_load", "take_events", "get_stats", "record_store_reports"),
    connector_module.CompressedOffloadingConnectorScheduler: ("update_connector_output",),
    connector_module.CompressedOffloadingConnectorWorker: ("build_connector_worker_meta",),
    worker_module.CompressedOffloadingWorker: (
        "submit_store", "submit_load", "get_finished", "_collect_store",
        "_replace_records"),
}


class PluginTrace:
    """Host time and calls of each plugin method of ``TRACED``, timed by the wrapper
    itself (a profiler range around each call as well, for traces), and how each
    store chunk is copied (the worker's copy plan)."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()
        self.chunks: Counter = Counter()

    def clear(self) -> None:
        for counter in (self.seconds, self.calls, self.chunks):
            counter.clear()

    def install(self, patch: Callable[[object, str, object], None] = setattr) -> None:
        """Wraps the methods in place (``patch`` lets a test undo it)."""
        for cls, names in TRACED.items():
            for name in names:
                patch(cls, name, self._timed(f"{cls.__name__}.{name}", getattr(cls, name)))
        plan_chunk = worker_module._plan_chunk

        def counted_plan(*args, **kwargs):
            plan = plan_chunk(*args, **kwargs)
            self.chunks["kernel" if plan.runs is None else f"dma, {len(plan.runs)} runs"] += 1
            return plan
        patch(worker_module, "_plan_chunk", counted_plan)

    def _timed(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                with record_function(PREFIX + name):
                    return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return wrapper


def is_evicting(llm) -> bool:
    """Whether the host cache has dropped blocks it stored: held fewer than stored."""
    values = metrics(llm)
    return values.get(CompressionMetrics.BLOCKS_STORED, 0) > values.get(
        CompressionMetrics.CACHED_BLOCKS, 0)


def measure_phase(llm, args: argparse.Namespace, seed: int, trace: PluginTrace
                  ) -> dict[str, Any]:
    """Times ``--prompts`` new prompts, then ``--profiled-prompts`` more under the
    profiler; per prompt: host ms of each plugin call, GPU ms of each kernel."""
    prompts = make_prompts(args.prompts + args.profiled_prompts, args.prompt_tokens, seed)
    wall = [timed(llm, p) * 1e3 for p in prompts[:args.prompts]]
    trace.clear()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled = [timed(llm, p) * 1e3 for p in prompts[args.prompts:]]
    n = len(profiled)
    gpu_ms = {event.key[:80]: event.self_device_time_total / 1e3 / n
              for event in prof.key_averages() if event.self_device_time_total > 0}
    return {
        "prompt_ms": statistics.median(wall), "prompt_ms_samples": wall,
        "profiled_prompt_ms": statistics.median(profiled),
        "host_ms_per_prompt": {k: 1e3 * v / n for k, v in trace.seconds.items()},
        "calls_per_prompt": {k: v / n for k, v in trace.calls.items()},
        "gpu_ms_per_prompt": dict(sorted(gpu_ms.items(), key=lambda kv: -kv[1])),
        "store_chunks_per_prompt": {k: v / n for k, v in sorted(trace.chunks.items())},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model_dir or tempfile.mkdtemp(prefix="llama-dummy-"))
    write_model_config(model, args.layers, args.kv_heads, args.head_dim)
    trace = PluginTrace()
    trace.install()
    llm = build_llm(model, "compressed", args)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(),
                               "args": {k: str(v) for k, v in vars(args).items()}}
    for p in make_prompts(2, args.prompt_tokens, seed=1):
        timed(llm, p)
    if is_evicting(llm):
        raise SystemExit("the host cache evicts already; raise --offload-gib")
    results["filling"] = measure_phase(llm, args, seed=2, trace=trace)
    if is_evicting(llm):
        raise SystemExit("the host cache evicted while filling was timed; raise --offload-gib")
    filled = 0
    for i in tqdm(range(args.fill_max_prompts), desc="filling the host cache"):
        timed(llm, make_prompts(1, args.prompt_tokens, seed=10_000 + i)[0])
        filled += 1
        if is_evicting(llm):
            break
    else:
        raise SystemExit("the host cache never evicted; raise --fill-max-prompts")
    for p in make_prompts(args.settle_prompts, args.prompt_tokens, seed=3):
        timed(llm, p)
    results["evicting"] = measure_phase(llm, args, seed=4, trace=trace)
    results["prompts_to_fill"] = filled
    return results


def print_table(results: dict[str, Any]) -> None:
    fill, evict = results["filling"], results["evicting"]
    print(f"\n{results['device']}: per new prompt, host cache filling vs evicting")
    print(f"{'':<58}{'filling':>10}{'evicting':>10}")
    print(f"{'wall ms (median)':<58}{fill['prompt_ms']:>10.2f}{evict['prompt_ms']:>10.2f}")
    print(f"{'wall ms under the profiler':<58}{fill['profiled_prompt_ms']:>10.2f}"
          f"{evict['profiled_prompt_ms']:>10.2f}")
    for title, key in (("host ms", "host_ms_per_prompt"), ("GPU ms", "gpu_ms_per_prompt"),
                       ("store chunks", "store_chunks_per_prompt")):
        names = list(dict.fromkeys([*evict[key], *fill[key]]))
        for name in names[:14] if key == "gpu_ms_per_prompt" else names:
            print(f"{title + ' ' + name[:50]:<58}{fill[key].get(name, 0):>10.2f}"
                  f"{evict[key].get(name, 0):>10.2f}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, unit in ((axes[0], "host_ms_per_prompt", "host ms per prompt"),
                          (axes[1], "gpu_ms_per_prompt", "GPU ms per prompt")):
        names = list(dict.fromkeys([*results["evicting"][key], *results["filling"][key]]))[:12]
        for i, phase in enumerate(("filling", "evicting")):
            ax.barh([j + 0.4 * i for j in range(len(names))],
                    [results[phase][key].get(n, 0) for n in names], 0.4, label=phase)
        ax.set_yticks([j + 0.2 for j in range(len(names))], [n[:40] for n in names], fontsize=7)
        ax.set_xlabel(unit)
        ax.invert_yaxis()
        ax.legend()
    fig.suptitle(f"New {results['args']['prompt_tokens']}-token prompt, compressed offloading: "
                 f"host cache filling vs evicting ({results['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output prefix (.json, .png)")
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--gpu-prompts", type=float, default=2.5)
    parser.add_argument("--offload-gib", type=float, default=8)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--error-bound", type=float, default=DEFAULT_ERROR_BOUND)
    parser.add_argument("--codec-mode", default=DEFAULT_MODE, choices=list(MODE_NAMES))
    parser.add_argument("--prompts", type=int, default=8, help="timed prompts per phase")
    parser.add_argument("--profiled-prompts", type=int, default=4,
                        help="prompts per phase timed under the profiler")
    parser.add_argument("--settle-prompts", type=int, default=4,
                        help="prompts stored after the first eviction before timing")
    parser.add_argument("--fill-max-prompts", type=int, default=200)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--model-dir", type=str, default=None)
    parser.add_argument("--attention-backend", default="FLASH_ATTN")
    args = parser.parse_args()
    # One process holds the engine, so the profiler sees the scheduler and the worker.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = run(args)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print_table(results)


if __name__ == "__main__":
    main()
