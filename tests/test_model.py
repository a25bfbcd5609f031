"""The LLaMA model: preset shapes, meta-device construction, causality, initialisation, loss masking."""

from __future__ import annotations

import pytest
import torch

from lrpretrain.model import build_model, flops_per_token, lm_loss, param_count
from lrpretrain.model.llama import apply_rope, rope_cache
from lrpretrain.train import load_config

# ../shared/METHODS.md §13 (GaLore configs/*.json): total / non-embedding parameters, as printed there
# (to 4 significant digits, so compared to 0.1%).
PRESETS = {
    "llama_60m": (58.1e6, 25.3e6),
    "llama_130m": (134.1e6, 84.9e6),
    "llama_350m": (368.0e6, 302.4e6),
    "llama_1b": (1339e6, 1208e6),
    "llama_3b": (2686e6, 2522e6),
    "llama_7b": (6738e6, 6476e6),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_the_galore_table(name):
    cfg, _ = load_config([f"model={name}"])
    total, non_emb = PRESETS[name]
    model = build_model(cfg.model, materialize=False)  # meta device: the 7B costs nothing
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert n == param_count(cfg.model)
    assert n == pytest.approx(total, rel=1e-3)
    emb = 2 * cfg.model.vocab_size * cfg.model.dim
    assert n - emb == pytest.approx(non_emb, rel=1e-3)
    assert flops_per_token(cfg.model, 256) > 6 * (n - emb)


@pytest.mark.parametrize("name, lo, hi", [("llama_tiny", 2e6, 3e6), ("llama_small", 6.5e6, 8e6)])
def test_cpu_sizes(name, lo, hi):
    cfg, _ = load_config([f"model={name}"])
    assert lo <= param_count(cfg.model) <= hi


@pytest.fixture
def tiny():
    cfg, _ = load_config(["model=llama_tiny"])
    torch.manual_seed(0)
    return build_model(cfg.model)


def test_materialised_init(tiny):
    w = tiny.layers[0].mlp.up_proj.weight
    assert not w.is_meta and abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(tiny.layers[1].attn_norm.weight, torch.ones(128))
    cos, sin = rope_cache(tiny.cfg.max_seq_len, 32, tiny.cfg.rope_theta)
    assert torch.equal(tiny.rope_cos, cos) and torch.equal(tiny.rope_sin, sin)
    names = {n for n, _ in tiny.named_parameters()}
    assert "layers.0.attn.q_proj.weight" in names and "layers.1.mlp.gate_proj.weight" in names
    assert tiny.lm_head.weight.data_ptr() != tiny.embed_tokens.weight.data_ptr()  # untied


def test_tied_embeddings_stay_tied_when_materialised():
    """to_empty gives every module its own parameter: build_model ties the head to the embedding again."""
    cfg, _ = load_config(["model=llama_tiny", "model.tie_embeddings=true"])
    m = build_model(cfg.model)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert sum(p.numel() for p in m.parameters()) == param_count(cfg.model)


def test_same_seed_same_weights():
    cfg, _ = load_config(["model=llama_tiny"])
    torch.manual_seed(1)
    a = build_model(cfg.model)
    torch.manual_seed(1)
    b = build_model(cfg.model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_causal(tiny):
    ids = torch.randint(0, 8192, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 8192
    with torch.no_grad():
        a, b = tiny(ids), tiny(changed)
    assert a.shape == (2, 16, 8192)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_is_relative():
    """<R(m)q, R(n)k> depends on m - n only."""
    cos, sin = rope_cache(64, 16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (apply_rope(q, cos[m : m + 1], sin[m : m + 1]) * apply_rope(k, cos[n : n + 1], sin[n : n + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))


def test_loss_masks_padding_and_shifts():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, -100, -100, -100]])
    total, n = lm_loss(logits, labels)
    assert n == 5  # 4 targets in row 0, 1 in row 1
    ref = torch.nn.functional.cross_entropy(logits[0, :4], labels[0, 1:], reduction="sum") + \
        torch.nn.functional.cross_entropy(logits[1, :1], labels[1, 1:2], reduction="sum")
    torch.testing.assert_close(total, ref)
