"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025): Adam in a random low-rank space only to estimate
a channel-wise (or tensor-wise) learning-rate scaling of the raw gradient.

With a Gaussian projection P (entries N(0, 1/r), regenerated every T steps from a seed kept in the
state; APOLLO stores no SVD), R = project(G), N = m / (sqrt(v) + eps) on R:

- ``scale_type=channel``: s_c = ||N_c|| / (||R_c|| + 1e-8) per channel c of the un-projected dimension;
- ``scale_type=tensor`` (APOLLO-Mini, rank 1): one s = ||N|| / (||R|| + 1e-8);

G̃ = G ⊙ s, passed through Fira's norm-growth limiter (γ = 1.01, ``norm_growth_limiter``), times
sqrt(α) after the limiter, or before it with ``scale_front`` (APOLLO-Mini's scripts at 60M/130M), and
Δ = lr · sqrt(1-b2^t)/(1-b1^t) · G̃. Moments are kept when P is resampled. Facts from
zhuhanqing/APOLLO (apollo_torch/apollo.py, random_projector.py); the seed sequence is ours (each
weight's first seed derives from the optimizer seed and its position, then a splitmix64 step per
refresh), so runs are reproducible, not bitwise equal to the reference's draws.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lrpretrain.optim.projector import RandomBasis
from lrpretrain.optim.subspace import SubspaceAdam, channel_scaling, limit_norm_growth, tensor_scaling

SCALE_TYPES = ("channel", "tensor")


class Apollo(SubspaceAdam):
    group_defaults = {**SubspaceAdam.group_defaults, "scale_type": "channel", "scale_front": False,
                      "norm_growth_limiter": True, "limiter_gamma": 1.01}

    def __init__(self, params, **kw):
        super().__init__(params, RandomBasis("gaussian"), **kw)

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        if group["proj_type"] == "full":
            raise ValueError("APOLLO needs a one-sided projection: proj_type=full has no un-projected dimension")
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"scale_type='{group['scale_type']}'; allowed: {SCALE_TYPES}")

    def update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], G: torch.Tensor,
               R: torch.Tensor, N: torch.Tensor, P, Q, side: str, step_size: float) -> torch.Tensor:
        s = channel_scaling(N, R, side) if group["scale_type"] == "channel" else tensor_scaling(N, R)
        scaled = torch.mul(G, s)
        root_alpha = math.sqrt(group["scale"])
        if group["scale_front"]:
            scaled.mul_(root_alpha)
        if group["norm_growth_limiter"]:
            scaled = limit_norm_growth(scaled, state, group["limiter_gamma"])
        return scaled.mul_(step_size if group["scale_front"] else root_alpha * step_size)
