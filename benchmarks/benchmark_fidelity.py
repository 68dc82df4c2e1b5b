"""End-to-end fidelity of compressed KV offloading in vLLM on a trained model.

For each point of a sweep (dtype x codec mode x relative error bound) the script
builds one ``vllm.LLM`` with the compressed offloading connector and forces every
evaluation prompt's KV through the round trip GPU -> compress -> host arena ->
decompress -> GPU, then compares what the model computes on top of that KV with
the same model run without offloading:

1. *Store pass*: each prompt's first ``--prefix-tokens`` tokens (H, a multiple of
   the KV block size) are prefilled; the connector stores their full blocks.
2. ``LLM.reset_prefix_cache()`` drops the GPU prefix cache only. (Its
   ``reset_connector`` argument, false by default, would also clear the host
   cache through the connector's ``reset_cache``; that must not happen here.)
3. *Measure pass*: the whole W-token window is submitted with ``prompt_logprobs``
   and ``skip_reading_prefix_cache=False``. The GPU cache misses, the connector
   finds the H-token prefix on the host and loads it, and vLLM computes positions
   H..W-1 on top of the decompressed KV, then generates ``--gen-tokens`` greedy
   tokens. ``RequestOutput.num_cached_tokens`` must equal H for every prompt; the
   table reports how many did.

Which outputs depend on the reloaded KV: vLLM computes no hidden state for the
H cached positions, so prompt log-probabilities exist for targets H+1..W-1 (the
prediction at position j scores token j+1); every one of them attends, in every
layer, to the H reloaded positions. The generated tokens do too. The baseline
(no connector) is scored on exactly the same targets.

Measures, per point, against the baseline of the same dtype:

* perplexity over the scored targets and its relative increase;
* top-1 agreement of the next-token distributions at the scored positions;
* KL(baseline || offloaded) per position from the top-k log-probabilities
  (``--topk``): both distributions are coarsened to the tokens both runs list (top-k
  and the scored token) plus one bucket for the rest of the vocabulary. Every
  probability is then exact, so this is a lower bound on the full KL (data-processing
  inequality); the fraction of the baseline's tokens the offloaded run did not list
  (merged into the bucket) says how loose it may be;
* greedy agreement: the fraction of ``--gen-tokens``-token greedy continuations
  identical to the baseline's, and the first position where the others diverge;
* the compression ratio, uncompressed over stored bytes of the point's stores, from
  the plugin's counters in ``LLM.get_metrics()`` (null when they are missing; see
  ``plugin_metrics``), with the plugin's counts of raw pages and failed reloads.

Besides the baseline (no connector, one pass), a control runs vLLM's own exact CPU
offloading (``kv_offloading_backend="native"``) through the same two passes: it
shows the numerical noise of the procedure itself (a prefill split in two, other
batch shapes) with an exact copy of the KV.

Budget: a 30M-parameter model computes a point in a few seconds; building the
``LLM`` (engine process, CUDA context, profiling) dominates. The default is 64
prompts of 896 tokens (H = 512, 383 scored targets each, 24,512 in all) and 128
generated tokens; ``--quick`` runs 32 prompts on 5 points. Points run in priority
order (bf16 before fp16, controls first) and ``--deadline-s`` skips the rest once
the next point would not finish in time; the JSON is rewritten after every point.

Example::

    python benchmarks/benchmark_fidelity.py --model /tmp/tiny-llama \
        --data .gpu/fidelity/data.tar.xz --out /tmp/out/fidelity
"""

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_llama import read_splits, token_stream

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
MODES = ("fixed", "plain", "outlier")  # priority order when --deadline-s cuts the sweep
REL_EBS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
# Acceptance rule of docs/fidelity.md for the default error bound.
MAX_PPL_INCREASE_PCT = 1.0
MIN_GREEDY_IDENTICAL = 0.95


@dataclass(frozen=True)
class Point:
    """One LLM build: ``kind`` is baseline (no connector), native (vLLM's exact
    CPU offloading) or compressed (this plugin at ``mode`` and ``rel_eb``)."""

    dtype: str
    kind: str
    mode: str | None = None
    rel_eb: float | None = None

    @property
    def label(self) -> str:
        if self.kind == "compressed":
            return f"{self.dtype} {self.mode} {self.rel_eb:g}"
        return f"{self.dtype} {self.kind}"


@dataclass
class Scores:
    """What one point's measure pass produced, per prompt."""

    nll: list[np.ndarray]  # -log p(target) at the scored targets
    top1: list[np.ndarray]  # most likely token at the scored positions
    topk: list[list[dict[int, float]]]  # token -> log p: top-k and the target
    generated: list[list[int]]
    cached: list[int]  # RequestOutput.num_cached_tokens


@dataclass
class Row:
    """One point's results; quality figures are against the same dtype's baseline.

    ``host_hit_prompts`` counts prompts whose cached-token count was the expected
    one: H with offloading, 0 for the baseline (which reads no cache).
    """

    dtype: str
    kind: str
    mode: str | None
    rel_eb: float | None
    prompts: int
    scored_targets: int
    host_hit_prompts: int
    host_hit_tokens_mean: float
    ppl: float
    ppl_baseline: float
    ppl_increase_pct: float
    top1_agreement: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    kl_missing_fraction: float
    greedy_identical: float
    first_divergence_median: float | None
    first_divergence_min: int | None
    ratio: float | None
    blocks_stored: float | None
    raw_pages: float | None
    loads_failed: float | None
    init_s: float
    run_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def eval_windows(model_dir: Path, data: Path, num: int, window: int) -> list[list[int]]:
    """``num`` non-overlapping windows spread evenly over the tokenized test split."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = token_stream(tokenizer, read_splits(data)["test"])
    available = stream.numel() // window
    if available < num:
        raise SystemExit(f"the test split holds {available} windows of {window} tokens, "
                         f"fewer than --num-prompts {num}")
    picks = np.linspace(0, available - 1, num).round().astype(int)
    return [stream[i * window:(i + 1) * window].tolist() for i in picks]


def plan(args: argparse.Namespace) -> list[Point]:
    """Controls first, then the sweep; dtypes in the order given (bf16 first)."""
    points = []
    for dtype in args.dtypes:
        points.append(Point(dtype, "baseline"))
        if not args.no_native:
            points.append(Point(dtype, "native"))
        if not args.baseline_only:
            points += [Point(dtype, "compressed", mode, eb)
                       for mode in args.modes for eb in args.rel_ebs]
    return points


def build_llm(point: Point, args: argparse.Namespace) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if point.kind == "native":
        kwargs = {"kv_offloading_size": args.offload_gib, "kv_offloading_backend": "native"}
    elif point.kind == "compressed":
        from vllm_kvcompress import compressed_offload_kwargs

        kwargs = compressed_offload_kwargs(kv_offloading_size=args.offload_gib,
                                           error_bound=point.rel_eb, mode=point.mode,
                                           relative=True)
    if args.attention_backend:
        kwargs["attention_backend"] = args.attention_backend
    return LLM(model=str(args.model), dtype=DTYPES[point.dtype], enforce_eager=True,
               enable_prefix_caching=True, seed=args.seed, skip_tokenizer_init=True,
               max_model_len=args.window_tokens + args.gen_tokens,
               max_num_seqs=args.num_prompts, gpu_memory_utilization=args.gpu_memory_utilization,
               max_logprobs=args.topk, disable_log_stats=False, **kwargs)


def metric_values(llm: Any) -> dict[str, tuple[bool, float]]:
    """Offloading-related metrics summed over labels, as name -> (is_gauge, value);
    histograms as ``_sum`` and ``_count`` counters."""
    from vllm.v1.metrics.reader import Counter, Gauge, Histogram

    values: dict[str, tuple[bool, float]] = {}

    def add(name: str, is_gauge: bool, value: float) -> None:
        values[name] = (is_gauge, values.get(name, (is_gauge, 0.0))[1] + value)

    for metric in llm.get_metrics():
        if not any(key in metric.name for key in ("offload", "compress", "kv_load",
                                                   "prefix_cache", "connector")):
            continue
        if isinstance(metric, (Counter, Gauge)):
            add(metric.name, isinstance(metric, Gauge), float(metric.value))
        elif isinstance(metric, Histogram):
            add(metric.name + "_sum", False, metric.sum)
            add(metric.name + "_count", False, float(metric.count))
    return values


def point_metrics(before: dict[str, tuple[bool, float]], after: dict[str, tuple[bool, float]]
                  ) -> dict[str, float]:
    """Counters as increments over the point, gauges as their final value."""
    return {name: value if is_gauge else value - before.get(name, (False, 0.0))[1]
            for name, (is_gauge, value) in after.items()}


def plugin_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    """The plugin's own counters (None where absent): the ratio of uncompressed to
    stored bytes of the point's stores (the host-cache gauge if the counters are
    missing), blocks stored, pages stored raw and blocks whose reload failed its checks.
    vLLM's ``vllm:kv_offload_store_bytes`` is not used: whether it counts raw or
    compressed bytes is each connector's choice."""
    try:
        from vllm_kvcompress.offload.metrics import CompressionMetrics as M
    except ImportError:
        return {"ratio": None, "blocks_stored": None, "raw_pages": None, "loads_failed": None}
    raw = metrics.get(M.UNCOMPRESSED_BYTES_STORED, 0.0)
    packed = metrics.get(M.COMPRESSED_BYTES_STORED, 0.0)
    ratio = raw / packed if raw > 0 and packed > 0 else metrics.get(M.COMPRESSION_RATIO)
    return {"ratio": ratio if ratio else None, "blocks_stored": metrics.get(M.BLOCKS_STORED),
            "raw_pages": metrics.get(M.RAW_PAGES), "loads_failed": metrics.get(M.LOADS_FAILED)}


def read_scores(outputs: list[Any], first_target: int) -> Scores:
    """Extracts the scored targets (prompt positions >= first_target) of each output."""
    scores = Scores([], [], [], [], [])
    for out in outputs:
        lp = out.prompt_logprobs  # FlatLogprobs: entry 0 is the target, then ranks 1..k
        prompt = out.prompt_token_ids
        # Entry 0 stands for position 0 (no prediction); the others follow the computed
        # positions only, so a cached prefix shifts every target by its length.
        skipped = len(prompt) - len(lp)
        nll, top1, topk = [], [], []
        for pos in range(first_target, len(prompt)):
            start, end = lp.start_indices[pos - skipped], lp.end_indices[pos - skipped]
            ids, values = lp.token_ids[start:end], lp.logprobs[start:end]
            assert ids[0] == prompt[pos], "prompt logprobs out of step with the prompt"
            nll.append(-values[0])
            top1.append(ids[1])
            topk.append(dict(zip(ids, values)))
        scores.nll.append(np.array(nll))
        scores.top1.append(np.array(top1))
        scores.topk.append(topk)
        scores.generated.append(list(out.outputs[0].token_ids))
        scores.cached.append(out.num_cached_tokens or 0)
    return scores


def coarse_kl(base: dict[int, float], other: dict[int, float]) -> tuple[float, int]:
    """KL(base || other) over the tokens both runs listed plus one bucket for the rest.

    Those tokens and the bucket partition the vocabulary and both runs' probabilities
    are exact on every part, so this is a lower bound on the full KL (data-processing
    inequality). Returns it and how many of base's tokens ``other`` did not list (they
    fall into the bucket, loosening the bound).
    """
    shared = [t for t in base if t in other]
    lb = np.array([base[t] for t in shared], dtype=np.float64)
    lo = np.array([other[t] for t in shared], dtype=np.float64)
    pb = np.exp(lb)
    kl = float(np.sum(pb * (lb - lo)))
    rest_b = 1.0 - float(pb.sum())
    if rest_b > 1e-12:
        rest_o = max(1e-12, 1.0 - float(np.exp(lo).sum()))
        kl += rest_b * math.log(rest_b / rest_o)
    return max(kl, 0.0), len(base) - len(shared)


def compare(point: Point, scores: Scores, base: Scores, prefix: int, metrics: dict[str, float],
            init_s: float, run_s: float) -> Row:
    nll = np.concatenate(scores.nll)
    nll_base = np.concatenate(base.nll)
    top1 = np.concatenate(scores.top1) == np.concatenate(base.top1)
    kls, missing, listed = [], 0, 0
    for b_pos, o_pos in zip(base.topk, scores.topk):
        for b, o in zip(b_pos, o_pos):
            kl, miss = coarse_kl(b, o)
            kls.append(kl)
            missing += miss
            listed += len(b)
    divergence = []
    for gen, gen_base in zip(scores.generated, base.generated):
        diff = [i for i, (a, b) in enumerate(zip(gen, gen_base)) if a != b]
        if diff:
            divergence.append(diff[0])
    ppl, ppl_base = math.exp(nll.mean()), math.exp(nll_base.mean())
    counts = (plugin_metrics(metrics) if point.kind == "compressed" else
              {"ratio": 1.0 if point.kind == "native" else None, "blocks_stored": None,
               "raw_pages": None, "loads_failed": None})
    kl_arr = np.array(kls)
    expected_hit = prefix if point.kind != "baseline" else 0
    return Row(
        dtype=point.dtype, kind=point.kind, mode=point.mode, rel_eb=point.rel_eb,
        prompts=len(scores.nll), scored_targets=int(nll.size),
        host_hit_prompts=sum(c == expected_hit for c in scores.cached),
        host_hit_tokens_mean=float(np.mean(scores.cached)),
        ppl=ppl, ppl_baseline=ppl_base, ppl_increase_pct=100 * (ppl / ppl_base - 1),
        top1_agreement=float(top1.mean()), kl_mean=float(kl_arr.mean()),
        kl_p99=float(np.quantile(kl_arr, 0.99)), kl_max=float(kl_arr.max()),
        kl_missing_fraction=missing / max(1, listed),
        greedy_identical=1 - len(divergence) / len(scores.generated),
        first_divergence_median=statistics.median(divergence) if divergence else None,
        first_divergence_min=min(divergence) if divergence else None,
        **counts, init_s=init_s, run_s=run_s, metrics=metrics)


def run_point(point: Point, windows: list[list[int]], args: argparse.Namespace
              ) -> tuple[Scores, dict[str, float], float, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    one_token = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    measure = SamplingParams(
        max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
        prompt_logprobs=args.topk, flat_logprobs=True,
        # vLLM skips cache reads when prompt logprobs are asked for, since cached
        # positions get none; here that is wanted, so the host prefix is read.
        skip_reading_prefix_cache=point.kind == "baseline")
    started = time.time()
    llm = build_llm(point, args)
    init_s = time.time() - started
    try:
        started = time.time()
        before = metric_values(llm)
        if point.kind != "baseline":
            # Store pass: prefill the prefixes so their full blocks go to the host.
            llm.generate([TokensPrompt(prompt_token_ids=w[:args.prefix_tokens])
                          for w in windows], one_token, use_tqdm=False)
            reset_gpu_prefix_cache(llm)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], measure,
                               use_tqdm=False)
        # Counters of the last engine steps (stores finishing after the outputs) reach
        # this process with the next outputs; a request shorter than a block flushes them.
        time.sleep(0.5)
        llm.generate([TokensPrompt(prompt_token_ids=windows[0][:4])], one_token,
                     use_tqdm=False)
        after = metric_values(llm)
        run_s = time.time() - started
    finally:
        # The engine process holds all of the point's GPU memory: stop it before the
        # next build; this process never touches CUDA, so empty_cache is a safeguard.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    return (read_scores(outputs, args.prefix_tokens + 1), point_metrics(before, after),
            init_s, run_s)


def reset_gpu_prefix_cache(llm: Any, timeout_s: float = 10.0) -> None:
    """Drops the GPU prefix cache but not the connector's host cache.

    The reset fails while blocks are still held (e.g. a finishing request); retry.
    """
    deadline = time.time() + timeout_s
    while not llm.reset_prefix_cache(reset_connector=False):
        if time.time() > deadline:
            raise RuntimeError("could not reset the GPU prefix cache")
        time.sleep(0.05)


def recommend(rows: list[Row], greedy: bool = True) -> dict[str, float | None]:
    """Per mode, the largest bound meeting the acceptance rule in every dtype measured.

    Only points that compress count: a bound finer than the dtype's rounding stores
    every page raw and passes any rule without being a codec setting. With
    ``greedy=False`` the greedy-agreement target is dropped, which is the rule's
    fallback when no compressing bound meets both targets (docs/fidelity.md)."""
    result: dict[str, float | None] = {}
    for mode in sorted({r.mode for r in rows if r.kind == "compressed"}):
        sel = [r for r in rows if r.mode == mode and (r.ratio is None or r.ratio > 1.01)]
        ok_ebs = None
        for dtype in {r.dtype for r in rows if r.mode == mode}:
            ok = {r.rel_eb for r in sel if r.dtype == dtype
                  and r.ppl_increase_pct <= MAX_PPL_INCREASE_PCT
                  and (not greedy or r.greedy_identical >= MIN_GREEDY_IDENTICAL)}
            ok_ebs = ok if ok_ebs is None else ok_ebs & ok
        result[mode] = max(ok_ebs) if ok_ebs else None
    return result


def controls_below_rule(rows: list[Row]) -> dict[str, float]:
    """Dtypes whose exact native control already misses the greedy threshold, with
    its agreement: there the threshold is below the procedure's own noise (a prefill
    split in two flips near-tied greedy tokens), so the rule cannot rank bounds and
    the report must say so instead of picking one (docs/fidelity.md)."""
    return {r.dtype: r.greedy_identical for r in rows
            if r.kind == "native" and (r.greedy_identical < MIN_GREEDY_IDENTICAL
                                       or r.ppl_increase_pct > MAX_PPL_INCREASE_PCT)}


def print_table(rows: list[Row]) -> None:
    header = (f"{'point':<20}{'ratio':>7}{'hit':>7}{'fail':>5}{'ppl':>9}{'dppl%':>8}"
              f"{'top1%':>7}{'KL mean':>10}{'KL p99':>9}{'greedy%':>8}{'div@':>6}"
              f"{'init s':>7}{'run s':>6}")
    print(header)
    for r in rows:
        label = Point(r.dtype, r.kind, r.mode, r.rel_eb).label
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        div = f"{r.first_divergence_median:.0f}" if r.first_divergence_median is not None else "-"
        fail = f"{r.loads_failed:.0f}" if r.loads_failed is not None else "-"
        print(f"{label:<20}{ratio:>7}{r.host_hit_prompts:>4}/{r.prompts:<2}{fail:>5}{r.ppl:>9.3f}"
              f"{r.ppl_increase_pct:>8.3f}{100 * r.top1_agreement:>7.2f}{r.kl_mean:>10.2e}"
              f"{r.kl_p99:>9.1e}{100 * r.greedy_identical:>8.1f}{div:>6}{r.init_s:>7.1f}"
              f"{r.run_s:>6.1f}")


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Quality loss against the measured ratio (against the bound where no ratio was read)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compressed = [r for r in rows if r.kind == "compressed"]
    by_ratio = bool(compressed) and all(r.ratio is not None for r in compressed)
    panels = (("ppl_increase_pct", "perplexity increase (%)", MAX_PPL_INCREASE_PCT),
              ("greedy_identical", "identical greedy continuations", MIN_GREEDY_IDENTICAL),
              ("kl_mean", "mean KL (nats, top-k lower bound)", None),
              ("top1_agreement", "top-1 agreement", None))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for dtype, mode in sorted({(r.dtype, r.mode) for r in compressed}):
        sel = sorted((r for r in compressed if r.dtype == dtype and r.mode == mode),
                     key=lambda r: r.rel_eb)
        xs = [r.ratio if by_ratio else r.rel_eb for r in sel]
        for ax, (attr, _, _) in zip(axes.flat, panels):
            ax.plot(xs, [getattr(r, attr) for r in sel], label=f"{dtype} {mode}",
                    marker="o" if dtype == "bf16" else "s",
                    linestyle="-" if dtype == "bf16" else "--")
    for ax, (attr, ylabel, limit) in zip(axes.flat, panels):
        for r in rows:
            if r.kind == "native":  # the noise floor of the two-pass procedure
                ax.axhline(getattr(r, attr), color="grey", linestyle=":", linewidth=1)
        if limit is not None:
            ax.axhline(limit, color="red", linewidth=1)
        if attr == "kl_mean":
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_ylim(bottom=0)
        if not by_ratio:
            ax.set_xscale("log")
        ax.set_xlabel("measured compression ratio" if by_ratio
                      else "relative error bound (no ratio metric found)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}; dotted: vLLM native (exact) offloading; red: acceptance limit",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(out: Path, meta: dict, rows: list[Row], skipped: list[dict], started: float
               ) -> None:
    """Rewritten after every point, so a run cut short keeps what it measured."""
    from vllm.platforms import current_platform  # NVML: keeps CUDA out of this process

    meta = {**meta, "device": current_platform.get_device_name(),
            "seconds": time.time() - started}
    Path(f"{out}.json").write_text(json.dumps(
        {"meta": meta, "recommended_rel_eb": recommend(rows),
         "recommended_rel_eb_without_greedy": recommend(rows, greedy=False),
         "controls_below_rule": controls_below_rule(rows),
         "points": [asdict(r) for r in rows], "skipped": skipped}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="HF model directory")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with test.jsonl, or the carried data.tar.xz")
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json/.png")
    parser.add_argument("--quick", action="store_true",
                        help="32 prompts; bf16, fixed mode, bounds 1e-1, 3e-2, 1e-2")
    parser.add_argument("--baseline-only", action="store_true",
                        help="no compressed points: the baseline and the native-offload "
                             "control only (needs no plugin connector)")
    parser.add_argument("--no-native", action="store_true",
                        help="skip the vLLM native (exact) offloading control")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rel-ebs", nargs="+", type=float, default=list(REL_EBS))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prefix-tokens", type=int, default=512,
                        help="H: tokens whose KV makes the round trip (a multiple of the "
                             "offloaded block size)")
    parser.add_argument("--window-tokens", type=int, default=896,
                        help="W: prompt length; targets H+1..W-1 are scored")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--offload-gib", type=float, default=1.0, help="host cache size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.15)
    parser.add_argument("--attention-backend", help="e.g. TRITON_ATTN (default: vLLM's choice)")
    parser.add_argument("--deadline-s", type=float,
                        help="start no point that would end later than this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.num_prompts, args.dtypes, args.modes = 32, ["bf16"], ["fixed"]
        args.rel_ebs = [1e-1, 3e-2, 1e-2]
    if not 0 < args.prefix_tokens < args.window_tokens - 1:
        raise SystemExit("need 0 < --prefix-tokens < --window-tokens - 1")

    started = time.time()
    import vllm

    windows = eval_windows(args.model, args.data, args.num_prompts, args.window_tokens)
    summary_path = args.model / "training_summary.json"
    meta = {
        "model": str(args.model), "vllm": vllm.__version__, "torch": torch.__version__,
        "prompts": args.num_prompts, "prefix_tokens": args.prefix_tokens,
        "window_tokens": args.window_tokens, "gen_tokens": args.gen_tokens, "topk": args.topk,
        "scored_targets_per_prompt": args.window_tokens - args.prefix_tokens - 1,
        "acceptance": {"max_ppl_increase_pct": MAX_PPL_INCREASE_PCT,
                       "min_greedy_identical": MIN_GREEDY_IDENTICAL},
        "training": {k: v for k, v in json.loads(summary_path.read_text()).items()
                     if k != "history"} if summary_path.exists() else None,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    points = plan(args)
    rows: list[Row] = []
    skipped: list[dict] = []
    baselines: dict[str, Scores] = {}
    slowest = 0.0
    bar = tqdm(points, desc="fidelity points")
    for point in bar:
        elapsed = time.time() - started
        if args.deadline_s is not None and elapsed + slowest > args.deadline_s:
            skipped.append({**asdict(point), "reason": f"deadline at {elapsed:.0f} s"})
            continue
        if point.kind != "baseline" and point.dtype not in baselines:
            skipped.append({**asdict(point), "reason": "no baseline for this dtype"})
            continue
        bar.set_postfix_str(point.label)
        point_start = time.time()
        try:
            scores, metrics, init_s, run_s = run_point(point, windows, args)
        except Exception as exc:  # noqa: BLE001 - one failing point must not lose the rest
            print(f"{point.label}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            skipped.append({**asdict(point), "reason": f"{type(exc).__name__}: {exc}"})
            continue
        slowest = max(slowest, time.time() - point_start)
        if point.kind == "baseline":
            baselines[point.dtype] = scores
        rows.append(compare(point, scores, baselines[point.dtype], args.prefix_tokens,
                            metrics, init_s, run_s))
        write_json(args.out, meta, rows, skipped, started)
    write_json(args.out, meta, rows, skipped, started)

    print_table(rows)
    for skip in skipped:
        label = Point(skip["dtype"], skip["kind"], skip["mode"], skip["rel_eb"]).label
        print(f"skipped {label}: {skip['reason']}")
    recommended = recommend(rows)
    if recommended:
        print(f"largest bound with ppl +<= {MAX_PPL_INCREASE_PCT}% and >= "
              f"{100 * MIN_GREEDY_IDENTICAL:.0f}% identical greedy continuations, per mode: "
              + ", ".join(f"{m}: {eb if eb is not None else 'none'}"
                          for m, eb in recommended.items()))
    if recommended and not any(recommended.values()):
        print(f"no compressing bound meets both; largest with ppl +<= {MAX_PPL_INCREASE_PCT}% "
              "alone, per mode: " + ", ".join(
                  f"{m}: {eb if eb is not None else 'none'}"
                  for m, eb in recommend(rows, greedy=False).items()))
    for dtype, agreement in controls_below_rule(rows).items():
        print(f"{dtype}: the exact native control itself has {100 * agreement:.1f}% identical "
              "greedy continuations, so the rule cannot separate bounds here; read the "
              "compressed points against the control")
    plot(rows, Path(f"{args.out}.png"),
         f"KV offloading fidelity, {meta['training']['parameters'] / 1e6:.0f}M Llama"
         if meta["training"] else "KV offloading fidelity")
    print(f"{time.time() - started:.0f} s; wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
