"""Activation recomputation (``trainer.recompute``), applied once to the prepared model.

- ``none``: autograd keeps every activation the backward needs.
- ``full``: block-level checkpointing. A checkpointed decoder block keeps only its inputs; its forward
  runs again inside the backward. ``trainer.recompute_every=k`` checkpoints blocks 0, k, 2k, ... (1:
  every block), trading memory for the extra forward of fewer blocks.
- ``selective``: the same blocks, but an op-level policy
  (``torch.utils.checkpoint.create_selective_checkpoint_contexts``) keeps the outputs of the
  expensive ops (matmuls and the attention kernel) and recomputes only the cheap ones between them
  (RMSNorm, RoPE, SiLU, the SwiGLU product, residual adds, reshapes): most of the memory saving of
  ``full`` where activations are elementwise-heavy, for a fraction of its extra FLOPs.
- ``method``: the plugin's own policy (``Method.recompute_policy()``, e.g. CoLA-M's segments).

Checkpointing is non-reentrant (``use_reentrant=False``): it composes with autocast, with
``torch.compile`` and with parameters' post-accumulate-grad hooks (per-layer updates), and it saves
and restores the RNG state around the recomputation (``preserve_rng_state``), so a forward that
draws random numbers recomputes the same values. Losses and gradients equal those of ``none``
(tests/test_recompute.py: bit for bit on the CPU).

The model is left as it is (no wrapper modules, so state_dict keys do not change): each chosen
:class:`~lrpretrain.model.llama.Block` gets a ``checkpoint_fn`` that the model's forward loop calls.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lrpretrain.errors import ConfigError

if TYPE_CHECKING:
    from lrpretrain.methods import Method

_aten = torch.ops.aten
# Ops whose outputs ``selective`` keeps: the matmuls (nn.Linear lowers to mm/addmm, batched matmuls
# to bmm/baddbmm) and the fused attention kernels of each backend. Everything else is recomputed.
SAVED_OPS = frozenset(
    getattr(_aten, name).default
    for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                 "_efficient_attention_forward")
    if hasattr(_aten, name)
)


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_block(block: nn.Module, *args: torch.Tensor, selective: bool = False) -> torch.Tensor:
    """Run ``block(*args)`` under non-reentrant checkpointing (plainly when no graph is recorded)."""
    if not torch.is_grad_enabled():  # evaluation: nothing is saved anyway
        return block(*args)
    if selective:
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_matmuls))
    return checkpoint(block, *args, use_reentrant=False)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks recomputation applies to (``model.layers``)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(b, "checkpoint_fn") for b in layers):
        raise ConfigError(f"trainer.recompute=full|selective needs a model whose blocks (model.layers) accept a "
                          f"checkpoint_fn; {type(model).__name__} does not: use trainer.recompute=none or method")
    return list(layers)


def apply_recompute(model: nn.Module, mode: str, every: int, method: Method) -> None:
    """Install ``trainer.recompute`` on the prepared model (after ``prepare_model``, before any wrapping)."""
    if mode == "none":
        return
    if mode == "method":
        policy = method.recompute_policy()
        if policy is None:  # validate_config refuses this combination earlier; kept for direct callers
            raise ConfigError(f"trainer.recompute='method' is invalid: method '{method.name}' has no recompute "
                              "policy of its own; allowed: none, full, selective")
        policy(model)
        return
    run = functools.partial(checkpoint_block, selective=mode == "selective")
    for i, block in enumerate(blocks_of(model)):
        if i % every == 0:
            block.checkpoint_fn = run


def graph_is_reusable(mode: str) -> bool:
    """Can one backward graph be run twice (``retain_graph=True``)?

    Plain and block-checkpointed graphs can. An op-selective one cannot: PyTorch's selective
    checkpointing hands each saved output to one backward only. A method's policy may use it, so
    ``method`` counts as not reusable. The exact global clip of per-layer updates needs a second
    backward: it reuses the graph where it can and recomputes the forward otherwise.
    """
    return mode in ("none", "full")
