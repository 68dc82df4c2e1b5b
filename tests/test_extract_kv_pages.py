"""benchmarks/extract_kv_pages.py cuts a model's K and V projections into vLLM-shaped
pages (block_size tokens x all KV heads), whole blocks only, on the model's device,
and leaves no hook behind."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
extract_kv_pages = pytest.importorskip("extract_kv_pages")
transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaModel(config).eval()


def test_pages_are_whole_blocks_of_every_layers_keys_and_values() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (90,))
    # Three windows of 24 tokens fit in 90 (a fourth would not); 24 tokens make one
    # whole block of 16 per layer, the other 8 are dropped.
    pages = extract_kv_pages.extract_pages(model, ids, seq_len=24, max_sequences=5,
                                           block_size=16)
    kv_dim = 2 * 8
    for kind in ("key", "value"):
        assert pages[kind].shape == (3 * 2, 16 * kv_dim)
        assert pages[kind].dtype == torch.bfloat16 and pages[kind].device.type == "cpu"
    # Page 0 is layer 0's first block: its K projection of the first 16 tokens.
    with torch.no_grad():
        hidden = model.embed_tokens(ids[:24].unsqueeze(0))
        first = model.layers[0].self_attn.k_proj(model.layers[0].input_layernorm(hidden))
    expected = first[0, :16].reshape(-1).to(torch.bfloat16)
    torch.testing.assert_close(pages["key"][0], expected)
    assert pages["key"].float().abs().sum() > 0 and not torch.equal(pages["key"], pages["value"])
    # No hook is left on the model: a second forward pass captures nothing more.
    for module in model.modules():
        assert not module._forward_hooks


def test_a_model_without_kv_projections_is_refused() -> None:
    with pytest.raises(ValueError, match="no k_proj/v_proj"):
        extract_kv_pages.capture_projections(torch.nn.Sequential(torch.nn.Linear(4, 4)))
