"""The fidelity benchmark reads prompt log-probabilities at the right positions,
whether or not a prefix of the prompt came from a cache (CPU; no model needed)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm.logprobs import FlatLogprobs, create_prompt_logprobs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
benchmark_fidelity = pytest.importorskip("benchmark_fidelity")


def fake_output(prompt: list[int], cached: int) -> SimpleNamespace:
    """What vLLM returns: entry 0 for position 0, then one entry per computed
    position j >= max(cached, 1), scoring target j (the token the previous position
    predicts), with the target first and a top-1 guess of target + 1."""
    lp: FlatLogprobs = create_prompt_logprobs(flat_logprobs=True)
    for target in range(max(cached, 0) + 1, len(prompt)):
        lp.append_fast([prompt[target], prompt[target] + 1], [-0.1 * target, -0.05],
                       iter([2, 1]), [None, None])
    return SimpleNamespace(prompt_logprobs=lp, prompt_token_ids=prompt,
                           outputs=[SimpleNamespace(token_ids=[5, 6])],
                           num_cached_tokens=cached)


@pytest.mark.parametrize("cached", [0, 16])
def test_scores_follow_the_prompt_with_and_without_a_cached_prefix(cached: int) -> None:
    prompt = list(range(100, 140))
    scores = benchmark_fidelity.read_scores([fake_output(prompt, cached)], first_target=17)
    assert scores.nll[0].tolist() == pytest.approx([0.1 * t for t in range(17, 40)])
    assert scores.top1[0].tolist() == [prompt[t] + 1 for t in range(17, 40)]
    assert scores.cached == [cached]


def test_scores_refuse_logprobs_out_of_step_with_the_prompt() -> None:
    out = fake_output(list(range(100, 140)), cached=16)
    out.prompt_logprobs.start_indices.pop(1)
    out.prompt_logprobs.end_indices.pop(1)
    out.prompt_logprobs.append(None)
    with pytest.raises(AssertionError, match="out of step"):
        benchmark_fidelity.read_scores([out], first_target=17)


def test_a_control_below_the_rule_is_reported_not_hidden() -> None:
    def row(kind: str, greedy: float, mode: str | None = None, eb: float | None = None):
        return SimpleNamespace(dtype="bf16", kind=kind, mode=mode, rel_eb=eb, ratio=None,
                               greedy_identical=greedy, ppl_increase_pct=0.0)

    rows = [row("baseline", 1.0), row("native", 0.8125), row("compressed", 0.75, "plain", 1e-2)]
    assert benchmark_fidelity.controls_below_rule(rows) == {"bf16": 0.8125}
    assert benchmark_fidelity.recommend(rows) == {"plain": None}
    rows[1].greedy_identical = 1.0
    assert benchmark_fidelity.controls_below_rule(rows) == {}


def test_recommendation_skips_raw_points_and_falls_back_to_perplexity_alone() -> None:
    """The 2026-11-23 bf16 sweep in small: 1e-3 is all raw (ratio 1), so it passes
    both targets without compressing; no compressing bound keeps 95% greedy."""
    def row(eb: float, ratio: float, ppl: float, greedy: float, dtype: str = "bf16"):
        return SimpleNamespace(dtype=dtype, kind="compressed", mode="fixed", rel_eb=eb,
                               ratio=ratio, ppl_increase_pct=ppl, greedy_identical=greedy)

    rows = [row(1e-1, 6.10, 1.21, 0.031), row(3e-2, 3.90, 0.05, 0.25),
            row(1e-2, 2.75, -0.004, 0.359), row(1e-3, 1.00, 0.0, 1.0)]
    assert benchmark_fidelity.recommend(rows) == {"fixed": None}
    assert benchmark_fidelity.recommend(rows, greedy=False) == {"fixed": 3e-2}
    rows.append(row(3e-2, 3.99, 1.5, 0.34, dtype="fp16"))
    assert benchmark_fidelity.recommend(rows, greedy=False) == {"fixed": None}, \
        "a bound must pass in every dtype"
