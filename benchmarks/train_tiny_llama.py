"""Trains a small Llama-architecture causal LM for the KV-offloading fidelity evaluation.

The fidelity benchmark needs a *trained* decoder whose KV cache has the structure
real models have (RoPE'd keys, grouped-query attention), and no hub model can be
downloaded here or on the GPU host. This script trains one from scratch in a fixed
time budget on the corpus of ``prepare_fidelity_data.py`` and saves a Hugging Face
model directory (``config.json``, ``model.safetensors``, tokenizer files) that
``vllm.LLM(model=dir)`` and ``AutoModelForCausalLM`` load.

Defaults (the evaluated model): 8 layers, hidden 512, 8 query and 4 KV heads of 64
channels (GQA), SwiGLU 1408, tied embeddings, vocabulary 8192, context 1024;
AdamW, linear warm-up then cosine decay, bf16 autocast, batches of 32 x 1024 tokens.
The run stops at ``--max-epochs`` or when ``--time-budget-s`` is spent, whichever
comes first; the number of optimiser steps is fixed after timing the first steps, so
the cosine schedule ends where training does, and the summary records it for a
rerun with ``--max-steps``. The checkpoint kept is the one with the lowest loss on
the validation split (whole held-out speeches), since a 28M model sees this 3M-token
corpus many times and eventually overfits. Seeds fix the initialisation and the data
order; GPU kernels may still differ in the last bits between runs.

Example (GPU host)::

    python benchmarks/train_tiny_llama.py --data .gpu/fidelity/data.tar.xz \
        --tokenizer .gpu/fidelity/tokenizer --out /tmp/tiny-llama

Smoke test on a CPU (a 2-layer model, 20 steps)::

    python benchmarks/train_tiny_llama.py --data ../shared/data/fidelity \
        --tokenizer .gpu/fidelity/tokenizer --out /tmp/tiny-llama-cpu --tiny --device cpu
"""

import argparse
import contextlib
import json
import math
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass
class Shape:
    """Model and batch shape; ``TINY`` is only for smoke tests on a CPU."""

    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 64
    intermediate: int = 1408
    seq_len: int = 1024
    batch: int = 32


TINY = Shape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=176,
             seq_len=128, batch=4)


def read_splits(data: Path) -> dict[str, list[str]]:
    """Texts of train/val/test from a folder of JSONL files or the carried .tar.xz."""
    splits: dict[str, list[str]] = {}
    names = ("train", "val", "test")
    if data.is_dir():
        for name in names:
            lines = (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
            splits[name] = [json.loads(line)["text"] for line in lines]
        return splits
    with tarfile.open(data) as tar:
        for name in names:
            lines = tar.extractfile(f"{name}.jsonl").read().decode("utf-8").splitlines()
            splits[name] = [json.loads(line)["text"] for line in lines]
    return splits


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """All documents as one int64 stream, each preceded by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False).input_ids:
        ids.append(eos)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.int64)


def epoch_batches(stream: torch.Tensor, seq_len: int, batch: int,
                  rng: np.random.Generator) -> list[torch.Tensor]:
    """Non-overlapping (seq_len + 1)-token windows from a random offset, shuffled."""
    offset = int(rng.integers(seq_len))
    count = (stream.numel() - offset - 1) // seq_len
    starts = offset + seq_len * rng.permutation(count)
    windows = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
    return [windows[i:i + batch] for i in range(0, count - batch + 1, batch)]


def eval_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Every non-overlapping (seq_len + 1)-token window of a held-out stream, in order."""
    count = (stream.numel() - 1) // seq_len
    return torch.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)])


def lm_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch: int, device: torch.device,
              autocast: contextlib.AbstractContextManager) -> float:
    """Token-weighted mean next-token loss (nats) over all windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        chunk = windows[i:i + batch].to(device)
        with autocast:
            total += lm_loss(model, chunk).item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def build_model(shape: Shape, vocab_size: int, eos: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.seq_len, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (including the tied embedding), not norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with train/val/test.jsonl, or the carried data.tar.xz")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--summary", type=Path, help="training summary JSON (default: in --out)")
    parser.add_argument("--time-budget-s", type=float, default=240.0,
                        help="wall-clock seconds for the training loop, evaluations included")
    parser.add_argument("--max-epochs", type=float, default=12.0)
    parser.add_argument("--max-steps", type=int, help="fix the step count (skips the timing)")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup-frac", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--evals", type=int, default=16, help="validation passes per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--tiny", action="store_true",
                        help="2-layer model, 128-token context, 20 steps: a smoke test")
    args = parser.parse_args()

    shape = TINY if args.tiny else Shape()
    max_steps = 20 if args.tiny and args.max_steps is None else args.max_steps
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    started = time.time()
    texts = read_splits(args.data)
    streams = {name: token_stream(tokenizer, docs) for name, docs in texts.items()}
    print(" ".join(f"{name}: {s.numel() / 1e6:.2f} M tokens" for name, s in streams.items())
          + f" (tokenized in {time.time() - started:.1f} s)", flush=True)
    val = eval_windows(streams["val"], shape.seq_len)
    test = eval_windows(streams["test"], shape.seq_len)
    if args.tiny:
        val, test = val[:8], test[:8]

    model = build_model(shape, len(tokenizer), tokenizer.eos_token_id).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    print(f"model: {n_params / 1e6:.1f} M parameters ({(n_params - n_embed) / 1e6:.1f} M "
          f"without the tied embedding)", flush=True)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")

    tokens_per_step = shape.batch * shape.seq_len
    steps_per_epoch = max(1, (streams["train"].numel() - shape.seq_len) // tokens_per_step)
    planned = max_steps or max(1, int(args.max_epochs * steps_per_epoch))
    timing_steps = 0 if max_steps else min(10, planned // 4)
    warmup = max(1, int(args.warmup_frac * planned))
    eval_every = max(1, planned // args.evals)

    history: list[dict] = []
    best = {"val_loss": math.inf, "step": 0}
    best_state: dict[str, torch.Tensor] | None = None
    batches: list[torch.Tensor] = []
    step = 0
    loop_start = time.time()
    timing_start = loop_start
    budget_hit = False
    while step < planned:
        if not batches:
            batches = epoch_batches(streams["train"], shape.seq_len, shape.batch, rng)
        window = batches.pop(0).to(device, non_blocking=True)
        lr = lr_at(step, planned, warmup, args.lr, args.lr * args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss = lm_loss(step_model, window)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if timing_steps and step in (1, 1 + timing_steps) and device.type == "cuda":
            torch.cuda.synchronize()
        if step == 1:
            timing_start = time.time()  # the first step pays for kernel selection/compile
        if timing_steps and step == 1 + timing_steps:
            # Fix the schedule to the step count the remaining budget allows.
            step_s = (time.time() - timing_start) / timing_steps
            left = args.time_budget_s - (time.time() - loop_start)
            # Validation passes cost about one step per batch of windows.
            eval_cost = args.evals * -(-val.shape[0] // shape.batch) * step_s / 3
            affordable = step + int(max(0.0, left - eval_cost) / step_s)
            if affordable < planned:
                planned = affordable
                warmup = min(warmup, max(1, planned // 20))
                eval_every = max(1, planned // args.evals)
            print(f"timing: {step_s * 1e3:.1f} ms/step, {tokens_per_step / step_s / 1e3:.0f} k "
                  f"tokens/s -> {planned} steps ({planned / steps_per_epoch:.1f} epochs)",
                  flush=True)

        budget_hit = time.time() - loop_start > args.time_budget_s
        if step % eval_every == 0 or step == planned or budget_hit:
            val_loss = mean_loss(model, val, shape.batch, device, autocast)
            elapsed = time.time() - loop_start
            history.append({"step": step, "epoch": round(step / steps_per_epoch, 3),
                            "train_loss": round(loss.item(), 4), "val_loss": round(val_loss, 4),
                            "lr": lr, "seconds": round(elapsed, 1)})
            print(f"step {step}/{planned} epoch {step / steps_per_epoch:.2f} "
                  f"train {loss.item():.3f} val {val_loss:.3f} (ppl {math.exp(val_loss):.1f}) "
                  f"lr {lr:.2e} {elapsed:.0f} s", flush=True)
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "step": step}
                best_state = {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()}
        if budget_hit:
            break
    train_seconds = time.time() - loop_start

    assert best_state is not None
    model.load_state_dict(best_state)
    test_loss = mean_loss(model, test, shape.batch, device, autocast)
    model.save_pretrained(args.out)  # float32 master weights; vLLM casts to --dtype
    for path in args.tokenizer.iterdir():  # verbatim, so the class name stays portable
        shutil.copy(path, args.out / path.name)

    summary = {
        "architecture": "LlamaForCausalLM", "shape": asdict(shape),
        "vocab_size": len(tokenizer), "parameters": n_params,
        "parameters_without_embedding": n_params - n_embed,
        "train_tokens": streams["train"].numel(), "val_tokens": streams["val"].numel(),
        "test_tokens": streams["test"].numel(),
        "steps": step, "planned_steps": planned, "tokens_seen": step * tokens_per_step,
        "epochs": step / steps_per_epoch, "stopped_by_time_budget": budget_hit,
        "train_seconds": train_seconds, "best_step": best["step"],
        "val_loss": best["val_loss"], "val_ppl": math.exp(best["val_loss"]),
        "test_loss": test_loss, "test_ppl": math.exp(test_loss),
        "test_windows": int(test.shape[0]), "eval_precision": "bf16 autocast"
        if device.type == "cuda" else "fp32",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
        "history": history,
    }
    summary_path = args.summary or args.out / "training_summary.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1))
    print(f"best step {best['step']}: val ppl {math.exp(best['val_loss']):.2f}, test ppl "
          f"{math.exp(test_loss):.2f}; {step} steps, {step * tokens_per_step / 1e6:.1f} M tokens, "
          f"{train_seconds:.0f} s; saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
