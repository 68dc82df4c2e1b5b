"""Captures real K and V activations of a transformers model as KV-cache pages.

The codec benchmark needs KV pages from a trained model, but the GPU host cannot
download one. This script runs any local Hugging Face model directory (a causal
LM with ``k_proj``/``v_proj`` or a BERT-style encoder with ``key``/``value``
projections) over English text, records every layer's key and value projections
and cuts them into pages of ``block_size`` tokens x all KV heads, the layout of
one vLLM KV block. It runs the model on the GPU when there is one (``--device``);
the pages it saves (bf16, on the CPU) travel to the GPU host.

Example::

    python benchmarks/extract_kv_pages.py --model PATH/TO/MODEL \
        --text /usr/share/common-licenses/GPL-3 --out .gpu/kv_pages.pt
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

PROJECTION_NAMES = {"k_proj": "key", "v_proj": "value", "key": "key", "value": "value"}


def capture_projections(model: torch.nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Hooks every K/V projection; returns the lists the hooks fill and the handles."""
    captured: dict[str, list[torch.Tensor]] = {"key": [], "value": []}
    handles = []
    for name, module in model.named_modules():
        kind = PROJECTION_NAMES.get(name.rsplit(".", 1)[-1])
        if kind is None or not isinstance(module, torch.nn.Linear):
            continue
        handles.append(module.register_forward_hook(
            lambda _m, _i, out, kind=kind: captured[kind].append(out.detach()[0].float())))
    if not handles:
        raise ValueError("found no k_proj/v_proj or key/value linear layers in the model")
    return captured, handles


def to_pages(activations: list[torch.Tensor], block_size: int) -> torch.Tensor:
    """(tokens, kv_dim) per layer -> (pages, block_size * kv_dim), whole blocks only."""
    pages = []
    for act in activations:
        usable = act.shape[0] // block_size * block_size
        pages.append(act[:usable].reshape(-1, block_size * act.shape[1]))
    return torch.cat(pages)


def extract_pages(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, max_sequences: int,
                  block_size: int) -> dict[str, torch.Tensor]:
    """Runs ``model`` (already on its device) over up to ``max_sequences`` windows of
    ``seq_len`` tokens of ``ids``; returns the key and value pages in bf16 on the CPU."""
    device = next(model.parameters()).device
    captured, handles = capture_projections(model)
    try:
        with torch.no_grad():
            for start in range(0, min(len(ids), seq_len * max_sequences) - seq_len + 1, seq_len):
                model(input_ids=ids[start:start + seq_len].unsqueeze(0).to(device))
    finally:
        for h in handles:
            h.remove()
    return {kind: to_pages(acts, block_size).to(torch.bfloat16).cpu()
            for kind, acts in captured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local model directory")
    parser.add_argument("--text", required=True, nargs="+", help="English text files")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-sequences", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default: the GPU when there is one)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    model.to(args.device)
    text = "\n".join(Path(p).read_text(errors="ignore") for p in args.text)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    seq_len = min(args.seq_len, getattr(model.config, "max_position_embeddings", args.seq_len))
    result: dict = extract_pages(model, ids, seq_len, args.max_sequences, args.block_size)
    result["block_size"] = args.block_size
    result["model"] = str(model.config.name_or_path or args.model)
    result["architecture"] = type(model).__name__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    print(f"saved {result['key'].shape[0]} key and {result['value'].shape[0]} value pages of "
          f"{result['key'].shape[1]} values from {result['architecture']} to {args.out}")


if __name__ == "__main__":
    main()
