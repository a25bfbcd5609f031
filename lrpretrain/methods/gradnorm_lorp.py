"""GradNormLoRP, Gradient Weight-normalized Low-rank Projection (Huang, Shen, Zhu, Rudinac, Kanoulas;
AAAI 2025, arXiv 2412.19616; code: Jhhuangkay/Gradient-Weight-normalized-Low-rank-Projection-for-
Efficient-LLM-Training).

Every target weight is weight-normalised, W = M ⊙ (W0 + I·J) / ‖W0 + I·J‖_c, and the low-rank part
I·J is learnt GaLore-style, from gradients projected onto a rank-r subspace:

- **norms**: one magnitude M_i per output channel and the L2 norm of each output channel of the
  direction V = W0 + I·J, i.e. ``‖V‖_c`` is taken along the input dimension (dim 1 of the m x n
  ``nn.Linear`` weight; the paper's W is n x m as in x·W, where these are its columns). This is the
  weight normalisation of Salimans & Kingma and DoRA's magnitude, and the axis of the reference code
  (``torch.norm(v, dim=1)`` for 2-D weights). At initialisation V = W_init and M = ‖W_init‖_c, so the
  model starts exactly at the standard init.
- **the low-rank part is GaLore's**: with D = ∂L/∂V and P the top-r singular vectors of D (refreshed
  every T steps), Adam runs on PᵀD (or D·Qᵀ: the smaller side, ``proj_type=std``) and V moves by
  α·P·N_t. Between two refreshes V − V_{kT} = P·J, J the accumulated r x n steps: W0 + I·J with I = P
  and W0 = V_{kT}, and at each refresh I·J is folded into W0 and a new subspace begins (the paper's
  D̃_t = U_t η_t(U_tᵀ D_t V_t) V_tᵀ is ``proj_type=full``; the default one-sided ``std`` is GaLore's own
  implementation; both run in this project's shared subspace step, :mod:`lrpretrain.optim.subspace`).
  So V is held as one m x n tensor
  (W0 + I·J, already summed, as GaLore keeps W) and the optimizer state is r-dimensional; the
  magnitudes M get plain Adam (same LR, no weight decay) in the norms' group.
- **8-bit states** (``method.state_bits=8``, the paper's "8-bit GradNormLoRP", its headline LLaMA 7B
  on an RTX 4090): the projected moments in bitsandbytes' blockwise format, as GaLoreAdamW8bit.

Gradients (one autograd function, :class:`_WeightNormLinear`): with s = M/‖V‖_c, V̂ = V/‖V‖_c and
G = ∂L/∂W = gᵀx, ∂L/∂M = Σ_j G ⊙ V̂ (per row) and ∂L/∂V = s ⊙ (G − V̂ ⊙ ∂L/∂M). The function saves
only x (as a plain Linear does: no extra activations) and recomputes the norms and W in the backward, so
no m x n matrix outlives the layer's forward or backward. Per token the FLOPs are a dense layer's
(6mn); normalising W is O(mn) per step, not per token.

Choices where the paper (its full text could not be retrieved here; the abstract, the formulas above
and the reference code were) or the reference were silent or inconsistent:

- the reference repository's pre-training script does not wire its weight-normalised optimizers in
  (``torchrun_main.py`` only builds GaLore's) and they differ from one another (one projects the
  direction's gradient without the M/‖V‖ factor and the radial term, one never writes the weight
  back); we follow the paper's parameterisation with exact gradients through autograd;
- the magnitude is a trained parameter of the model (not optimizer state), so checkpoints, export
  and per-layer updates need nothing special; decoupled weight decay acts on V only, where it only
  rescales V (W does not depend on ‖V‖) and so its effective step size; published runs use 0;
- defaults (``conf/method/gradnorm_lorp.yaml``): r = 128, α = 0.25, T = 250, lr 0.01 at 60M: the
  repository's README command for this method (its benchmark scripts are GaLore's, T = 200); the
  per-size ranks of those scripts (256/256/1024 for 130M/350M/1B; 1024, T 500, lr 0.005 and 8-bit
  states at 7B, as GaLore's 7B run) in ``conf/experiment/gradnorm_lorp_c4_*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpretrain.methods import register_method
from lrpretrain.methods.base import Reparameterized
from lrpretrain.methods.subspace import SubspaceConfig, SubspaceMethod, moment_bytes, target_shapes
from lrpretrain.methods.toolkit import reparameterize
from lrpretrain.optim import GaLoreAdamW

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig


@dataclass
class GradNormLoRPConfig(SubspaceConfig):
    """The reference README's 60M command: r = 128, α = 0.25, T = 250, std projection (lr 0.01 in the presets)."""

    update_proj_gap: int = 250


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def channel_norms(direction: torch.Tensor) -> torch.Tensor:
    """‖V‖_c: the L2 norm of each output channel (row) of an m x n direction, in fp32, shape (m,)."""
    return torch.linalg.vector_norm(direction.float(), dim=1)


def normalized_weight(direction: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W = M ⊙ V / ‖V‖_c in fp32."""
    return direction.float() * (magnitude.float() / channel_norms(direction))[:, None]


class _WeightNormLinear(torch.autograd.Function):
    """y = x·Wᵀ with W = M ⊙ V/‖V‖_c; saves x, V, M (no activation beyond a Linear's input)."""

    @staticmethod
    def forward(ctx, x, direction, magnitude):
        dt = _compute_dtype(x)
        ctx.save_for_backward(x, direction, magnitude)
        ctx.dt = dt
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dt), normalized_weight(direction, magnitude).to(dt))

    @staticmethod
    def backward(ctx, grad_out):
        x, direction, magnitude = ctx.saved_tensors
        dt = ctx.dt
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
            grad_x = grad_direction = grad_magnitude = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ normalized_weight(direction, magnitude).to(dt)).view(x.shape).to(x.dtype)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                G = (g.t() @ x.reshape(-1, x.shape[-1]).to(dt)).float()  # ∂L/∂W, m x n
                norms = channel_norms(direction)
                unit = direction.float() / norms[:, None]  # V̂
                radial = (G * unit).sum(dim=1)  # ∂L/∂M = <G_i, V̂_i>
                if ctx.needs_input_grad[2]:
                    grad_magnitude = radial.to(magnitude.dtype)
                if ctx.needs_input_grad[1]:
                    G.sub_(unit * radial[:, None]).mul_((magnitude.float() / norms)[:, None])
                    grad_direction = G.to(direction.dtype)
        return grad_x, grad_direction, grad_magnitude


class WeightNormLinear(Reparameterized):
    """W = M ⊙ V/‖V‖_c: ``weight`` is the direction V (m x n, GaLore-projected), ``magnitude`` M (m,)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight.detach()
        self.weight = nn.Parameter(w.clone())  # V = W0 + I·J, starting at the standard init
        self.magnitude = nn.Parameter(channel_norms(w).to(w.dtype))  # M = ‖W_init‖_c: W starts at W_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WeightNormLinear.apply(x, self.weight, self.magnitude)

    def dense_weight(self) -> torch.Tensor:
        return normalized_weight(self.weight, self.magnitude)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@register_method("gradnorm_lorp")
class GradNormLoRP(SubspaceMethod):
    """Weight-normalised targets; GaLore on each direction V, Adam on the magnitudes and everything else."""

    Config = GradNormLoRPConfig
    cfg: GradNormLoRPConfig

    def prepare_model(self, model: nn.Module) -> nn.Module:
        reparameterize(model, list(self.cfg.targets), lambda _q, linear: WeightNormLinear(linear))
        return model

    def make_optimizer(self, groups: list[dict[str, Any]], **kw: Any) -> GaLoreAdamW:
        return GaLoreAdamW(groups, **kw)

    # -- accounting: the magnitudes (one per output channel of every target) on top of GaLore's ------------
    def _magnitudes(self, model_cfg: ModelConfig) -> list[int]:
        return [m for m, _n in target_shapes(model_cfg, list(self.cfg.targets)).values()] * model_cfg.n_layers

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        out = super().cost(model_cfg, seq_len)
        extra = float(sum(self._magnitudes(model_cfg)))
        out["params"] += extra
        out["trainable_params"] += extra
        return out

    def state_bytes(self, model_cfg: ModelConfig, bits: int) -> int:
        """GaLore's state of the directions and the other weights, plus Adam's two moments per magnitude."""
        magnitudes = sum(2 * moment_bytes(m, bits) for m in self._magnitudes(model_cfg))
        return super().state_bytes(model_cfg, bits) + magnitudes
