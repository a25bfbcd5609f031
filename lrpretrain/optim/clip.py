"""Global-norm clipping arithmetic, shared by the strategies' global step and the per-layer update.

Both must compute the same norm from the same per-tensor norms in the same order, and the same
coefficient, so that the two steps agree bit for bit.
"""

from __future__ import annotations

import torch

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coefficient c / (norm + eps)


def total_norm(norms: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm from per-tensor norms (the global step and the per-layer update share it)."""
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of a list of gradients."""
    return total_norm([torch.linalg.vector_norm(g) for g in grads])


def clip_coefficient(max_norm: float, norm: torch.Tensor) -> torch.Tensor:
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
