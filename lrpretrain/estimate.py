"""``lrpretrain estimate``: parameters, FLOPs and peak memory of a run, from formulas alone.

Nothing is built or allocated: every figure comes from the method plugin's ``cost()`` and its memory
hooks (:meth:`~lrpretrain.methods.Method.optimizer_state_bytes`,
:meth:`~lrpretrain.methods.Method.activation_bytes`), so a 7B configuration is estimated in
milliseconds on any machine. The memory model is that of *this* trainer, measured on the CPU by
``lrpretrain bench`` (tests/test_estimate.py holds the two within 10%). The formulas live next to what
they describe, below the plugins that use them too: :mod:`lrpretrain.model.memory` (a LLaMA's
activations and buffers) and :mod:`lrpretrain.optim.memory` (optimizer states and step temporaries).

Three precisions (``trainer.precision``): ``fp32``; ``bf16`` (autocast over fp32 master weights);
``pure_bf16`` (bf16 weights, gradients and activations, no fp32 copy; :mod:`lrpretrain.optim.bf16`).

- **weights**: parameters, fp32 (also under bf16 autocast) or bf16 (pure bf16), + buffers (RoPE
  tables, fp32 in every mode; SLTrain's support indices; LR-QAT's int8 codes of the frozen weights) + a
  method's own tensors (SwitchLoRA's candidate pools);
- **optimizer states**: the plugin's analytic bytes (Adam moments, fp32 or blockwise 8-bit, GaLore's
  stored bases in ``method.basis_dtype``, ...), plus the bf16 compensation buffers of
  ``trainer.bf16_update=kahan``;
- **gradients**: one per trainable parameter, in the parameters' dtype; with per-layer updates (and no
  gradient accumulation) only one is alive at a time: the largest;
- **activations**: what autograd keeps for the backward of one micro-batch after its forward,
  for the chosen ``trainer.recompute`` (per-layer formulas that equal the saved-tensor bytes
  measured on the CPU; tests/test_estimate.py), the embedding's token ids, the final norm, the LM head
  input and the loss's log-softmax; under bf16 autocast also the bf16 copies of the weights that
  autocast caches for the whole forward;
- **transients**: the loss's logits copies at the end of the forward, the logits' gradient at the
  start of the backward, the optimizer's per-tensor temporaries (under pure bf16 with the fp32
  working copies of the stepped weight and its gradient), and what a method's own work adds inside the
  backward of its costliest update (``backward_temp_bytes``: LoQT's full gradient of a quantized
  weight with its SVD at an update step).

Peak = weights + optimizer states + the largest of these moments of an update:
  end of forward:      activations + loss transients (+ gradients of earlier micro-batches)
  start of backward:   activations + logits gradient + the LM head's gradient; with per-layer updates
                       the LM head's step instead (its gradient and the step's temporaries); + the
                       method's own backward work
  layer step:          with per-layer updates, the costliest single-parameter step (a GaLore refresh, a
                       dequantized INT8 step) beside that layer weight's gradient, the activations (less
                       the loss's) and the method's own backward work
  optimizer step:      every gradient + the step's temporaries (global step only)
  module backward:     for a method whose modules hold temporaries of their own (a weight rebuilt from
                       quantized codes, ``module_temp_bytes``): activations + the LM head's gradient
                       (global step) + those temporaries
  second forward/backward (a method whose optimizer evaluates the loss again inside its step, DLRT):
                       that pass's activations and transients + what the method holds through it
                       (:meth:`~lrpretrain.methods.Method.second_pass_bytes`)
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from lrpretrain.config import Config
from lrpretrain.errors import UserError
from lrpretrain.kernels import KernelChoice, choose
from lrpretrain.kernels.head_loss import fused_loss_bytes
from lrpretrain.methods import get_method
from lrpretrain.model.memory import (
    activation_itemsize,
    autocast_weight_bytes,
    largest_trainable,
    loss_transient_bytes,
    outside_layers_bytes,
    rope_bytes,
)
from lrpretrain.optim.memory import elementwise_temp_bytes
from lrpretrain.options import split_options
from lrpretrain.train import load_config

GiB = 2**30


# -- the estimate -----------------------------------------------------------------------------------------


@dataclass
class Estimate:
    model: str
    method: str
    micro_batch_size: int
    seq_len: int
    accumulation: int
    recompute: str
    per_layer_update: bool
    precision: str
    state_bits: int
    params: float
    trainable_params: float
    flops_per_token: float
    weights: float  # bytes: parameters (fp32) + buffers + the method's own tensors
    optimizer_states: float
    gradients: float  # peak of live gradients
    activations: float  # saved for the backward of one micro-batch (incl. autocast's weight copies)
    transients: float  # beside the rest at the peak moment (logits copies, optimizer temporaries)
    peak: float
    peak_at: str  # end of forward | start of backward | layer step | optimizer step | module backward | second forward
    # | second backward
    budget: float | None = None
    quantized_params: float = 0.0  # weights stored quantized in buffers (LoQT, Q-GaLore), not in ``params``
    gradients_at_peak: float = 0.0  # of ``gradients``, those alive at the peak moment (with ``transients``
    # and, but at the optimizer step, ``activations``, what the peak holds beyond weights and states)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


def precision_of(cfg: Config) -> str:
    """The trainer's precision on the device the estimate is for: ``trainer.precision``, or for
    ``auto`` bf16 (autocast on CUDA) unless ``trainer.device=cpu`` (fp32). An estimate is for a GPU
    run unless it says otherwise, whatever machine computes it."""
    return cfg.trainer.resolved_precision(cfg.trainer.device != "cpu")


def kernels_of(cfg: Config) -> KernelChoice:
    """``trainer.kernels`` on the device the estimate is for (as :func:`precision_of`: a GPU unless
    ``trainer.device=cpu``), Triton and liger-kernel assumed present there."""
    return choose(cfg.trainer.kernels, cfg.trainer.device != "cpu", check=False)


def estimate(cfg: Config, budget: float | None = None, precision: str | None = None,
             world_size: int = 1, kernels: KernelChoice | None = None) -> Estimate:
    """The analytic estimate for a validated config (nothing is built).

    ``precision`` (``fp32``, ``bf16`` or ``pure_bf16``) overrides the config's, resolved for the
    device (:func:`precision_of`), and ``kernels`` what ``trainer.kernels`` resolves to
    (:func:`kernels_of`); ``bench`` passes what it measured.
    """
    t, mc = cfg.trainer, cfg.model
    kernels = kernels or kernels_of(cfg)
    plugin = get_method(cfg.method.name)(cfg.method, mc)
    plugin.kernels = "triton" if kernels.triton else "torch"
    T, B = cfg.data.seq_len, t.micro_batch_size
    accum = t.batch_size // (B * world_size)
    precision = precision or precision_of(cfg)
    pure = precision == "pure_bf16"
    wb = 2.0 if pure else 4.0  # bytes per parameter and per gradient entry
    cost = plugin.cost(mc, T)
    params, trainable = cost["params"], cost["trainable_params"]
    bits = min(cfg.optim.state_bits, getattr(cfg.method, "state_bits", 32))  # either asks for 8-bit moments

    weights = wb * params + cost.get("buffer_bytes", rope_bytes(mc)) + cost.get("method_state_bytes", 0.0)
    states = float(plugin.optimizer_state_bytes(mc, cfg.optim))
    if pure and t.bf16_update == "kahan":  # a bf16 compensation buffer per trained bf16 weight
        states += 2.0 * cost.get("kahan_params", trainable)
    largest = float(cost.get("largest_trainable", largest_trainable(mc)))
    all_grads = wb * trainable
    in_backward = t.per_layer_update and not (t.per_layer_clip == "global" and accum > 1)
    grads_kept = wb * largest if in_backward and accum == 1 else all_grads

    tokens = B * T
    try:
        layers = plugin.activation_bytes(mc, t.recompute, t.recompute_every, precision)
    except NotImplementedError as e:  # a third-party policy without an activation model
        raise UserError(f"cannot estimate trainer.recompute={t.recompute} for method '{cfg.method.name}': {e}; "
                        "trainer.recompute=none gives an upper bound") from e
    fused = kernels.head_loss != "full"  # a head loss (lrpretrain/kernels/head_loss.py): no logits, its gradients kept
    head_trained = cost.get("head_grad_params", 1.0) > 0  # LR-QAT's train_rest=false freezes the LM head
    per_token = layers + outside_layers_bytes(mc, T, precision, fused_loss=fused)
    if not (fused or head_trained):  # a frozen head's matmul saves not its input (no gradient of W needs it)
        per_token -= activation_itemsize(precision) * mc.dim
    saved = tokens * per_token
    embeddings = mc.vocab_size * mc.dim * (1 if mc.tie_embeddings else 2)
    # autocast's bf16 weight copies, saved by the matmuls; a fused loss saves not the head's (it lives in
    # autocast's cache while the loss runs: a transient, fused_loss_bytes)
    cast_params = cost.get("autocast_params", params - embeddings + mc.vocab_size * mc.dim)
    cast = autocast_weight_bytes(cast_params - (mc.vocab_size * mc.dim if fused else 0.0)) if precision == "bf16" else 0.0
    if fused:
        loss_kept, fwd_t, bwd_t = fused_loss_bytes(kernels.head_loss, tokens, mc.dim, mc.vocab_size, precision,
                                                   head_grad=head_trained)
        saved += loss_kept
    else:
        loss_kept = 0.0
        fwd_t, bwd_t = (tokens * x for x in loss_transient_bytes(mc, T, precision))
    activations = saved + cast
    earlier = all_grads if accum > 1 else 0.0  # gradients of the earlier micro-batches, held meanwhile
    head_grad = wb * cost.get("head_grad_params", mc.vocab_size * mc.dim)  # 0 when a method freezes the head
    # the costliest single-parameter step: the optimizer's temporaries (under pure bf16 with the fp32
    # working copies of the weight and its gradient that the step runs on, lrpretrain/optim/bf16.py)
    step_temp = float(plugin.step_temp_bytes(mc, cfg.optim, precision))
    # in the activations and freed first in the backward: the log-softmax, or a fused loss's gradients
    log_softmax = loss_kept if fused else tokens * 4.0 * mc.vocab_size * (T - 1) / T
    # the method's own work inside the backward (LoQT's full gradient of W and its SVD at an update step)
    method_temp = float(plugin.backward_temp_bytes(mc, cfg.optim, precision, tokens, accum, t.recompute,
                                                   t.recompute_every))
    # with per-layer updates, the gradient beside a layer's step: at most a dense layer weight's
    layer_grad = wb * min(largest, mc.dim * max(mc.ffn_dim, mc.dim))
    moments = {"end of forward": activations + fwd_t + earlier}
    if in_backward:
        # The LM head steps first, beside nearly every activation; its temporaries are an element-wise step's
        # (plain Adam, in pieces), at most the costliest step's.
        head_temp = min(step_temp, elementwise_temp_bytes(head_grad / wb, bits, precision)) if head_grad else 0.0
        if fused:  # after the loss's backward, whose kept gradients a retained graph (the exact global clip's
            # first pass, which does not step) still holds
            moments["start of backward"] = activations + bwd_t + max(earlier, head_grad) \
                + max(0.0, head_temp - loss_kept) + method_temp
        else:
            moments["start of backward"] = activations - log_softmax + max(earlier, head_grad) + head_temp + method_temp
        # The costliest step (a GaLore refresh, a dequantized INT8 step) is a layer's: it runs once that
        # weight's gradient is ready, when the head's has been stepped and freed and the loss's kept tensors
        # too; beside it that gradient (``layer_grad``) and, conservatively, every layer's activations.
        moments["layer step"] = activations - log_softmax + max(earlier, layer_grad) + step_temp + method_temp
    else:
        moments["start of backward"] = activations + bwd_t + max(earlier, head_grad) + method_temp
        moments["optimizer step"] = all_grads + step_temp
    module_temp = float(plugin.module_temp_bytes(mc, precision))
    if module_temp:  # a module's backward (a weight rebuilt from codes) beside the activations and the head's gradient
        moments["module backward"] = activations - log_softmax + max(earlier, 0.0 if in_backward else head_grad) \
            + module_temp
    second = plugin.second_pass_bytes(mc, T, t.recompute, t.recompute_every, precision, wb, fused_loss=fused)
    if second is not None:  # a second forward and backward inside the optimizer's step (DLRT's S-step)
        saved2, held = tokens * second[0] + cast, second[1]
        moments["second forward"] = saved2 + fwd_t + held
        moments["second backward"] = saved2 - log_softmax + bwd_t + held
    peak_at = max(moments, key=moments.__getitem__)
    static = weights + states
    peak = static + moments[peak_at]
    gradients_at_peak = {"end of forward": earlier, "start of backward": max(earlier, head_grad),
                         "layer step": max(earlier, layer_grad),
                         "optimizer step": all_grads,
                         "module backward": max(earlier, 0.0 if in_backward else head_grad)}.get(
                             peak_at, second[1] if second else 0.0)
    transients = moments[peak_at] - gradients_at_peak - (activations if peak_at != "optimizer step" else 0.0)
    transients = max(transients, 0.0)
    return Estimate(model=mc.name, method=cfg.method.name, micro_batch_size=B, seq_len=T, accumulation=accum,
                    recompute=t.recompute, per_layer_update=t.per_layer_update, precision=precision, state_bits=bits,
                    params=params, trainable_params=trainable, flops_per_token=cost["flops_per_token"],
                    weights=weights, optimizer_states=states, gradients=grads_kept, activations=activations,
                    transients=transients, peak=peak, peak_at=peak_at, budget=budget,
                    quantized_params=cost.get("quantized_params", 0.0), gradients_at_peak=gradients_at_peak)


# -- budgets and output -------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_budget(text: str) -> float:
    """'24GB' -> 24e9 bytes. KB/MB/GB/TB are powers of 1000; KiB/MiB/GiB/TiB (and K/M/G/T, as
    nvidia-smi and PyTorch report) powers of 1024; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--budget '{text}' is invalid: expected a positive size such as 24GB, 24GiB, 80G or "
                        "25769803776 (units: B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB or K, M, G, T "
                        "= powers of 1024)")
    return float(m.group(1)) * _UNITS[unit]


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:8.1f} MiB"


def format_estimate(e: Estimate) -> str:
    grads = "largest single gradient (per-layer updates)" if e.gradients < 2 * e.trainable_params \
        else "every trainable parameter's"
    lines = [
        f"{e.model} | method {e.method} | {e.micro_batch_size} x {e.seq_len} tokens per micro-batch, "
        f"accumulation {e.accumulation} | recompute {e.recompute} | per-layer updates "
        f"{'on' if e.per_layer_update else 'off'} | {e.precision} | optimizer states {e.state_bits}-bit",
        f"parameters      {e.params / 1e6:10.2f} M ({e.trainable_params / 1e6:.2f} M trainable)"
        + (f" + {e.quantized_params / 1e6:.2f} M stored quantized" if e.quantized_params else ""),
        f"FLOPs per token {e.flops_per_token / 1e9:10.3f} GFLOP (training: forward + backward)",
        f"weights          {_gib(e.weights)}   {'bf16' if e.precision == 'pure_bf16' else 'fp32'} parameters + buffers",
        f"optimizer states {_gib(e.optimizer_states)}",
        f"gradients        {_gib(e.gradients)}   {grads}; {_gib(e.gradients_at_peak).strip()} alive at the peak",
        f"activations      {_gib(e.activations)}   saved for the backward of one micro-batch",
        f"transients       {_gib(e.transients)}   at the peak ({e.peak_at})",
        f"peak             {_gib(e.peak)}",
    ]
    if e.budget is not None:
        verdict = "fits" if e.fits else "does NOT fit"
        lines.append(f"budget           {_gib(e.budget)}   -> {verdict} ({100 * e.peak / e.budget:.0f}% of the budget)")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    """``lrpretrain estimate [overrides] [--budget SIZE] [--json]``."""
    if "--pure-bf16" in args:
        raise UserError("--pure-bf16 is not an option any more: pure bf16 is a training mode (bf16 weights, "
                        "gradients and activations); use trainer.precision=pure_bf16")
    values, flags, overrides = split_options(args, "estimate", {"--budget": "24GB"}, ("--json",))
    budget = parse_budget(values["--budget"]) if "--budget" in values else None
    cfg, _ = load_config(overrides)
    e = estimate(cfg, budget)
    print(json.dumps(e.as_dict(), indent=1) if "--json" in flags else format_estimate(e))
    return 0
