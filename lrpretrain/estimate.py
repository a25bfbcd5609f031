"""``lrpretrain estimate``: parameters, FLOPs and peak memory of a run, from formulas alone.

Nothing is built or allocated: every figure comes from the method plugin's ``cost()`` and its memory
hooks (:meth:`~lrpretrain.methods.Method.optimizer_state_bytes`,
:meth:`~lrpretrain.methods.Method.activation_bytes`), so a 7B configuration is estimated in
milliseconds on any machine. The memory model is that of *this* trainer, measured on the CPU by
``lrpretrain bench`` (tests/test_estimate.py holds the two within 10%):

- **weights**: fp32 master parameters (also under bf16 autocast) + buffers (RoPE tables, SLTrain's
  support indices) + a method's own tensors (SwitchLoRA's candidate pools);
- **optimizer states**: the plugin's analytic bytes (Adam moments, fp32 or blockwise 8-bit, GaLore's
  stored bases, ...);
- **gradients**: fp32, one per trainable parameter; with per-layer updates (and no gradient
  accumulation) only one is alive at a time: the largest;
- **activations**: what autograd keeps for the backward of one micro-batch after its forward,
  for the chosen ``trainer.recompute`` (per-layer formulas that equal the saved-tensor bytes
  measured on the CPU; tests/test_estimate.py), the embedding's token ids, the final norm, the LM head
  input and the loss's log-softmax; under bf16 autocast also the bf16 copies of the weights that
  autocast caches for the whole forward;
- **transients**: the loss's logits copies at the end of the forward, the logits' gradient at the
  start of the backward, and the optimizer's per-tensor temporaries.

Peak = weights + optimizer states + the largest of three moments of an update:
  end of forward:      activations + loss transients (+ gradients of earlier micro-batches)
  start of backward:   activations + logits gradient + the LM head's gradient; with per-layer updates
                       the LM head's step instead (its gradient and the step's temporaries)
  optimizer step:      every gradient + the step's temporaries (global step only)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lrpretrain.errors import UserError

if TYPE_CHECKING:
    from lrpretrain.config import Config, ModelConfig

GiB = 2**30

# -- activation formulas -------------------------------------------------------------------------------
# Bytes per token that autograd saves for the backward, counted as torch 2.13 saves them (each storage
# once, parameters and buffers excluded): see tests/test_estimate.py, which measures them with
# saved_tensors_hooks. d = model.dim, f = model.ffn_dim, H = model.n_heads.


def llama_layer_bytes(model_cfg: ModelConfig, recompute: str, bf16: bool) -> float:
    """Bytes per token that one plain LLaMA decoder block keeps for the backward.

    ``none``, fp32: 10d + 4f + H + 2 values: the two RMSNorms' inputs, normalised values and outputs
    and 1/rms (3d + 1 each), q and k before RoPE and their rotated halves (4d), the RoPE'd q, k and v
    (3d), the attention output and its head-merged copy (2d) and log-sum-exp (H), SwiGLU's gate, up,
    SiLU(gate) and product (4f). Under bf16 autocast the matmul inputs are bf16 copies (one per
    projection that reads them) and the residual stream stays fp32: 34d + 8f + 4H + 8 bytes.
    ``full``: the block's input (the fp32 residual stream), 4d bytes.
    ``selective``: its input plus the kept matmul and attention outputs (q, k, v, o, down: 5d;
    gate, up: 2f; attention output d, log-sum-exp H), in the matmuls' dtype.
    """
    d, f, H = model_cfg.dim, model_cfg.ffn_dim, model_cfg.n_heads
    if recompute == "full":
        return 4.0 * d
    if recompute == "selective":
        return 4.0 * d + (2.0 if bf16 else 4.0) * (6 * d + 2 * f) + 4.0 * H
    if bf16:
        return 34.0 * d + 8.0 * f + 4.0 * H + 8.0
    return 4.0 * (10 * d + 4 * f + H + 2)


def outside_layers_bytes(model_cfg: ModelConfig, seq_len: int, bf16: bool) -> float:
    """Bytes per token saved outside the decoder blocks: token ids (int64), the final RMSNorm
    (3d + 1 fp32; under bf16 the LM head's bf16 input instead of the fp32 one) and the loss: the fp32
    log-softmax of the shifted logits and the int64 targets (T - 1 positions per row)."""
    d, V = model_cfg.dim, model_cfg.vocab_size
    norm = (10.0 * d + 4.0) if bf16 else 4.0 * (3 * d + 1)
    return 8.0 + norm + (4.0 * V + 8.0) * (seq_len - 1) / seq_len


def loss_transient_bytes(model_cfg: ModelConfig, seq_len: int, bf16: bool) -> tuple[float, float]:
    """Bytes per token alive beside the saved activations (end of forward, start of backward).

    End of forward, inside the loss: the logits and the contiguous copy of the shifted logits (and,
    under bf16, its fp32 copy) beside the log-softmax. Start of backward: one logits-sized fp32
    gradient (the log-softmax's saved output is released as the next gradient is made).
    """
    V = model_cfg.vocab_size
    logit = 2.0 if bf16 else 4.0
    return V * (logit + logit + (4.0 if bf16 else 0.0)), 4.0 * V


def autocast_weight_bytes(matmul_params: float) -> float:
    """bf16 autocast caches a bf16 copy of every weight it casts until the forward's autocast region
    ends (and the matmuls save them for the backward): 2 bytes per matmul weight entry."""
    return 2.0 * matmul_params


# -- optimizer states ------------------------------------------------------------------------------------


def moment_pair_bytes(numel: float, bits: int) -> float:
    """Bytes of Adam's two moments of one tensor: fp32, or blockwise 8-bit codes + fp32 absmax per 256."""
    from lrpretrain.optim import quant8

    if quant8.use_8bit(int(numel), bits):
        return 2.0 * (numel + 4 * math.ceil(numel / quant8.BLOCK))
    return 8.0 * numel


def adamw_state_bytes(model_cfg: ModelConfig, trainable_params: float, bits: int) -> float:
    """AdamW's state for a LLaMA with ``trainable_params`` trainable entries: two moments per tensor
    and a 0-d fp32 step. Embedding, LM head and norm weights are counted tensor by tensor (the norms
    keep fp32 moments below bitsandbytes' 4096-entry threshold); the rest, the decoder's matrices, as
    large tensors."""
    d, V, L = model_cfg.dim, model_cfg.vocab_size, model_cfg.n_layers
    embeddings = [V * d] * (1 if model_cfg.tie_embeddings else 2)
    norms = [d] * (2 * L + 1)
    rest = trainable_params - sum(embeddings) - sum(norms)
    n_rest = 7 * L  # tensors: about one per projection (step counters only)
    total = sum(moment_pair_bytes(n, bits) for n in embeddings + norms)
    total += moment_pair_bytes(rest, bits) if rest > 0 else 0.0
    return total + 4.0 * (len(embeddings) + len(norms) + n_rest)


def optimizer_temp_bytes(largest: float, bits: int) -> float:
    """Temporaries of one parameter's AdamW step: sqrt(v) and its scaled copy; with 8-bit states also
    the dequantised m and v and their requantised codes."""
    return 4.0 * largest * (2 + (2 if bits == 8 else 0)) + (2.0 * largest if bits == 8 else 0.0)


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
    peak_at: str  # end of forward | start of backward | optimizer step
    budget: float | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


def precision_of(cfg: Config) -> str:
    """The trainer's precision on the device the estimate is for: ``trainer.precision``, or for
    ``auto`` bf16 (autocast on CUDA) unless ``trainer.device=cpu`` (fp32). An estimate is for a GPU
    run unless it says otherwise, whatever machine computes it."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "fp32" if cfg.trainer.device == "cpu" else "bf16"


def estimate(cfg: Config, budget: float | None = None, precision: str | None = None,
             world_size: int = 1, pure_bf16: bool = False) -> Estimate:
    """The analytic estimate for a validated config (nothing is built).

    ``pure_bf16``: the papers' accounting instead of this trainer's: parameters, gradients and
    32-bit optimizer states held in bf16 (GaLore's reference casts the whole model to bf16; no fp32
    master weights, no autocast copies). ``lrpretrain train`` does not train this way.
    """
    from lrpretrain.methods import get_method

    t, mc = cfg.trainer, cfg.model
    plugin = get_method(cfg.method.name)(cfg.method, mc)
    T, B = cfg.data.seq_len, t.micro_batch_size
    accum = t.batch_size // (B * world_size)
    precision = "pure bf16" if pure_bf16 else (precision or precision_of(cfg))
    bf16 = precision != "fp32"
    wb = 2.0 if pure_bf16 else 4.0  # bytes per parameter and per gradient entry
    cost = plugin.cost(mc, T)
    params, trainable = cost["params"], cost["trainable_params"]
    bits = min(cfg.optim.state_bits, getattr(cfg.method, "state_bits", 32))  # either asks for 8-bit moments

    weights = wb * params + cost.get("buffer_bytes", rope_bytes(mc)) + cost.get("method_state_bytes", 0.0)
    states = float(plugin.optimizer_state_bytes(mc, cfg.optim)) * (0.5 if pure_bf16 and bits == 32 else 1.0)
    largest = float(cost.get("largest_trainable", largest_trainable(mc)))
    all_grads = wb * trainable
    in_backward = t.per_layer_update and not (t.per_layer_clip == "global" and accum > 1)
    grads_kept = wb * largest if in_backward and accum == 1 else all_grads

    tokens = B * T
    try:
        layers = plugin.activation_bytes(mc, t.recompute, t.recompute_every, bf16)
    except NotImplementedError as e:  # a third-party policy without an activation model
        raise UserError(f"cannot estimate trainer.recompute={t.recompute} for method '{cfg.method.name}': {e}; "
                        "trainer.recompute=none gives an upper bound") from e
    per_token = layers + outside_layers_bytes(mc, T, bf16)
    saved = tokens * per_token
    embeddings = mc.vocab_size * mc.dim * (1 if mc.tie_embeddings else 2)
    cast = autocast_weight_bytes(params - embeddings + mc.vocab_size * mc.dim) if bf16 and not pure_bf16 else 0.0
    activations = saved + cast
    fwd_t, bwd_t = (tokens * x for x in loss_transient_bytes(mc, T, bf16))
    earlier = all_grads if accum > 1 else 0.0  # gradients of the earlier micro-batches, held meanwhile
    head_grad = wb * mc.vocab_size * mc.dim
    step_temp = optimizer_temp_bytes(largest, bits)
    log_softmax = tokens * 4.0 * mc.vocab_size * (T - 1) / T  # in the activations, freed first in the backward
    moments = {"end of forward": activations + fwd_t + earlier}
    if in_backward:  # the LM head's step runs early in the backward, beside nearly every activation
        moments["start of backward"] = activations - log_softmax + max(earlier, head_grad) + step_temp
    else:
        moments["start of backward"] = activations + bwd_t + max(earlier, head_grad)
        moments["optimizer step"] = all_grads + step_temp
    peak_at = max(moments, key=moments.__getitem__)
    static = weights + states
    peak = static + moments[peak_at]
    gradients_at_peak = {"end of forward": earlier, "start of backward": max(earlier, head_grad),
                         "optimizer step": all_grads}[peak_at]
    transients = moments[peak_at] - gradients_at_peak - (activations if peak_at != "optimizer step" else 0.0)
    transients = max(transients, 0.0)
    return Estimate(model=mc.name, method=cfg.method.name, micro_batch_size=B, seq_len=T, accumulation=accum,
                    recompute=t.recompute, per_layer_update=t.per_layer_update, precision=precision, state_bits=bits,
                    params=params, trainable_params=trainable, flops_per_token=cost["flops_per_token"],
                    weights=weights, optimizer_states=states, gradients=grads_kept, activations=activations,
                    transients=transients, peak=peak, peak_at=peak_at, budget=budget)


def rope_bytes(model_cfg: ModelConfig) -> float:
    """The RoPE cos and sin tables (fp32, max_seq_len x head_dim each)."""
    return 2.0 * 4 * model_cfg.max_seq_len * (model_cfg.dim // model_cfg.n_heads)


def largest_trainable(model_cfg: ModelConfig) -> int:
    """Entries of the largest trainable tensor of a LLaMA: the embedding (or a dense MLP matrix)."""
    return max(model_cfg.vocab_size * model_cfg.dim, model_cfg.ffn_dim * model_cfg.dim)


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
        f"parameters      {e.params / 1e6:10.2f} M ({e.trainable_params / 1e6:.2f} M trainable)",
        f"FLOPs per token {e.flops_per_token / 1e9:10.3f} GFLOP (training: forward + backward)",
        f"weights          {_gib(e.weights)}   {'bf16' if e.precision == 'pure bf16' else 'fp32'} parameters + buffers",
        f"optimizer states {_gib(e.optimizer_states)}",
        f"gradients        {_gib(e.gradients)}   {grads}",
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
    from lrpretrain.cli.options import split_options
    from lrpretrain.config import load_config

    values, flags, overrides = split_options(args, "estimate", {"--budget": "24GB"}, ("--pure-bf16", "--json"))
    budget = parse_budget(values["--budget"]) if "--budget" in values else None
    as_json, pure = "--json" in flags, "--pure-bf16" in flags
    cfg, _ = load_config(overrides)
    e = estimate(cfg, budget, pure_bf16=pure)
    print(json.dumps(e.as_dict(), indent=1) if as_json else format_estimate(e))
    if pure and not as_json:
        print("(--pure-bf16: the papers' accounting, bf16 weights/gradients/states; lrpretrain train keeps fp32 "
              "master weights and autocasts)")
    return 0
