"""Validation: the token-weighted loss on the fixed held-out set, and optionally GaLore's routine.

``val_loss`` is the mean next-token loss over every target token of the held-out set (summed over
ranks, divided by the total count): the number to trust. ``eval.protocol=galore`` adds
``galore_val_loss``, computed on the same batches the way GaLore's ``evaluate_model`` computes it,
so a run can be put next to the published tables (METHODS.md §12):

- batches are visited in order until the *estimated* global non-pad input-token count (this rank's
  count x world size) exceeds ``eval.galore_tokens``; the check comes before each batch, so the batch
  that crosses the line is included;
- each batch contributes its own mean token loss (a mean of means, not token-weighted);
- the sum is divided by n + 1 for n batches (the reference's counter starts at 1): biased low by
  n/(n+1), e.g. about 1.8% in perplexity at 60M/130M with 256-row batches;
- ranks' values are averaged.

``galore_val_loss_unbiased`` is the same mean of n batch means divided by n.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from lrpretrain.comm import all_reduce_sum
from lrpretrain.config import EvalConfig
from lrpretrain.data import ValidationSet
from lrpretrain.model import HeadLoss, lm_loss


def batch_loss(forward: Callable[..., torch.Tensor], ids: torch.Tensor, labels: torch.Tensor,
               head_loss: HeadLoss | None, autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, number of targets) of one batch: from the model's logits (``lm_loss``), or
    through ``head_loss``, which applies the LM head itself and never holds the whole logits
    (``trainer.kernels``, :mod:`lrpretrain.kernels.head_loss`)."""
    with autocast():
        out = forward(ids) if head_loss is None else forward(ids, labels=labels, head_loss=head_loss)
    if head_loss is None:
        return lm_loss(out, labels)
    return out, (labels[:, 1:] != -100).sum()


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


@torch.no_grad()
def evaluate(forward: Callable[..., torch.Tensor], val: ValidationSet, batch_size: int,
             cfg: EvalConfig, device: torch.device, autocast: Callable[[], AbstractContextManager],
             world_size: int = 1, head_loss: HeadLoss | None = None) -> dict[str, float]:
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target tokens
    galore = cfg.protocol == "galore"
    g_sum, g_batches, g_tokens = 0.0, 0, 0  # sum of batch means, batches, estimated global tokens
    for ids, labels in val.batches(batch_size):
        loss_sum, n = batch_loss(forward, ids.to(device), labels.to(device), head_loss, autocast)
        total += torch.stack([loss_sum.double(), n.double()])
        if galore and g_tokens <= cfg.galore_tokens:
            g_sum += float(loss_sum) / max(int(n), 1)
            g_batches += 1
            g_tokens += int((labels != -100).sum()) * world_size
    loss_sum, n = all_reduce_sum(total).tolist()
    val_loss = loss_sum / max(n, 1)
    out = {"val_loss": val_loss, "val_ppl": _ppl(val_loss), "val_tokens": int(n)}
    if galore:
        per_rank = torch.tensor([g_sum / (g_batches + 1), g_sum / max(g_batches, 1), g_batches, g_tokens],
                                dtype=torch.float64, device=device)
        faithful, unbiased, batches, tokens = (all_reduce_sum(per_rank) / world_size).tolist()
        out.update({"galore_val_loss": faithful, "galore_val_ppl": _ppl(faithful),
                    "galore_val_loss_unbiased": unbiased, "galore_val_ppl_unbiased": _ppl(unbiased),
                    "galore_val_batches": int(round(batches * world_size)), "galore_val_tokens": int(round(tokens)),
                    "galore_val_complete": tokens > cfg.galore_tokens})
    return out
