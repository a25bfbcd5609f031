"""Target selection shared by every method."""

from __future__ import annotations

import pytest
from torch import nn

from lrpretrain.errors import ConfigError
from lrpretrain.methods.targets import TargetsConfig, expand_targets, select_targets, set_module
from lrpretrain.model import build_model
from lrpretrain.train import load_config


@pytest.fixture
def model():
    cfg, _ = load_config(["model=llama_tiny"])
    return build_model(cfg.model, materialize=False)


def test_default_targets_are_the_seven_projections_of_every_block(model):
    found = select_targets(model, TargetsConfig(name="x").targets)
    assert len(found) == 7 * 2
    assert [q for q, _ in found[:7]] == [
        "layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.attn.v_proj", "layers.0.attn.o_proj",
        "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    assert all(isinstance(m, nn.Linear) for _, m in found)


def test_aliases_and_names(model):
    assert expand_targets(["mlp", "q_proj"]) == ("q_proj", "gate_proj", "up_proj", "down_proj")
    assert {q.split(".")[-1] for q, _ in select_targets(model, ["attn"])} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_embeddings_head_and_norms_are_never_targets(model):
    names = [q for q, _ in select_targets(model, ["attn", "mlp"])]
    assert not any(n.startswith(("embed", "lm_head", "norm")) or "norm" in n for n in names)


def test_unknown_target_is_one_clear_error():
    with pytest.raises(ConfigError, match="method.targets: unknown target 'qproj'; allowed: attn, mlp, q_proj"):
        TargetsConfig(name="x", targets=["qproj"]).validate()
    with pytest.raises(ConfigError, match="method.targets=\\[\\] is invalid"):
        expand_targets([])


def test_set_module_replaces_in_place(model):
    set_module(model, "layers.1.mlp.up_proj", nn.Identity())
    assert isinstance(model.layers[1].mlp.up_proj, nn.Identity)
