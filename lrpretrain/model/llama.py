"""A LLaMA decoder in one file.

RMSNorm (pre-norm), rotary position embeddings (the rotate-half layout of HF LLaMA), SwiGLU MLP,
causal attention through ``scaled_dot_product_attention``, no biases, untied embedding and LM head,
every weight initialised N(0, 0.02) as in the GaLore configs (``configs/llama_*.json``). The weights
are laid out as HF's ``LlamaForCausalLM`` lays them out (same RoPE convention, no q/k permutation):
``lrpretrain export`` only renames them.

Module names follow HF LLaMA where it matters for method targets: every attention projection lives
under ``attn`` (q_proj, k_proj, v_proj, o_proj) and every MLP projection under ``mlp`` (gate_proj,
up_proj, down_proj).

The model is built on the meta device and materialised with :meth:`LLaMA.init_weights` (see
:func:`lrpretrain.model.build_model`), so a 7B model costs nothing to describe and FSDP2 can shard it
before any memory is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrpretrain.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, shape (seq_len, head_dim), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D)
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


class KVCache:
    """The keys and values one attention layer has seen (generation only): each call of the model then
    computes only the new positions. Preallocated for ``max_len`` positions, filled from the left."""

    def __init__(self, max_len: int):
        self.max_len, self.len = max_len, 0
        self.k: torch.Tensor | None = None  # (B, H, max_len, D)
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H, T, D) at the next positions; returns every position's keys and values."""
        if self.k is None or self.v is None:
            self.k = k.new_empty(*k.shape[:2], self.max_len, k.shape[3])
            self.v = v.new_empty(*v.shape[:2], self.max_len, v.shape[3])
        end = self.len + k.shape[2]
        self.k[:, :, self.len:end], self.v[:, :, self.len:end] = k, v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    # generate() sets this to a KVCache while it decodes (a plain attribute: no state_dict key)
    kv_cache: KVCache | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """Causal attention of projected q, k, v (B, T, C): RoPE, softmax, heads merged; before o_proj.
        (Blocks that rewire the projections, CoLA-M's segments and CR-Net, call it directly.)"""
        B, T, C = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if self.kv_cache is not None:
            past = self.kv_cache.len
            k, v = self.kv_cache.update(k, v)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i sits at position past + i and sees keys 0 .. past + i (one new token: all of them)
            mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    # Activation recomputation (lrpretrain/train/recompute.py) sets this to a function
    # ``checkpoint_fn(block, x, cos, sin)`` that runs the block under torch.utils.checkpoint.
    # A plain attribute, not a module: it adds no state_dict key.
    checkpoint_fn: Callable[..., torch.Tensor] | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# (hidden states (B, T, d), head weight (V, d), labels (B, T)) -> summed next-token loss (fp32, 0-d): a loss
# that applies the head itself, chunk by chunk, so that the logits never exist whole (lrpretrain.kernels)
HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LMHead(nn.Linear):
    """The LM head: logits, or, given a ``head_loss``, the loss of its input against ``labels``.

    The loss is applied inside the head's own forward, so that whatever wraps the model sees the head's
    weight as it does in any forward (FSDP2 and DeepSpeed ZeRO-3 gather it around a module's forward)."""

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                head_loss: HeadLoss | None = None) -> torch.Tensor:
        if head_loss is None:
            return F.linear(h, self.weight)
        return head_loss(h, self.weight, labels)


class LLaMA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = LMHead(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_cache(cfg.max_seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, labels: torch.Tensor | None = None,
                head_loss: HeadLoss | None = None) -> torch.Tensor:
        """(B, T) token ids at positions start_pos .. start_pos + T - 1 -> (B, T, vocab) logits
        (start_pos > 0: decoding with a KV cache that holds the earlier positions).

        With ``head_loss`` (and ``labels``, aligned with the ids, -100 where not a target): the summed
        next-token loss that ``head_loss`` computes from the final hidden states and the head's weight,
        without the logits (training and evaluation under ``trainer.kernels``, lrpretrain/kernels)."""
        T = input_ids.shape[1]
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.forward_layers(self.embed_tokens(input_ids), cos, sin)
        return self.lm_head(self.norm(x), labels, head_loss)

    def forward_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The decoder blocks: embeddings (B, T, d) -> the last block's output (a rewired model overrides it)."""
        for layer in self.layers:
            x = layer(x, cos, sin) if layer.checkpoint_fn is None else layer.checkpoint_fn(layer, x, cos, sin)
        return x

    def tie_weights(self) -> None:
        """With ``tie_embeddings`` the LM head is the embedding matrix (again after ``to_empty``, which
        gives every module a parameter of its own)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Materialised weights: N(0, init_std) for every Linear and Embedding, ones for norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
        cos, sin = rope_cache(self.cfg.max_seq_len, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta,
                              device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy. Returns (sum over counted tokens, number of counted tokens).

    ``labels`` is aligned with the input ids (-100 where a position is not a target, e.g. padding);
    the shift happens here, as in HF's causal-LM loss.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss_sum, (shift_labels != -100).sum()


def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Exact parameter count of :class:`LLaMA` for ``cfg`` (no allocation)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    n = cfg.n_layers * per_layer + d  # + final norm
    if embeddings:
        n += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + causal attention scores (PaLM appendix B)."""
    matmul_params = param_count(cfg, embeddings=False) + cfg.vocab_size * cfg.dim  # LM head is a matmul
    attention = 12 * cfg.n_layers * cfg.dim * seq_len / 2  # QK^T and AV, halved by the causal mask
    return 6.0 * matmul_params + attention


@torch.no_grad()
def generate(model: LLaMA, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, eos_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Sample ``max_new_tokens`` continuations of each row of ``ids`` (B, T). Greedy when temperature == 0.

    With ``use_cache`` the prompt is run once (prefill) and every later step runs the newest token only,
    attending to the keys and values cached in each attention layer. Past ``max_seq_len`` tokens the
    context is the last ``max_seq_len`` tokens at positions 0 .. max_seq_len - 1, recomputed each step,
    with or without the cache (what the model saw in training; a sliding cache would keep keys computed
    from tokens that have left the window). A row that produced ``eos_id`` gets ``eos_id`` from then on;
    generation stops when every row has.
    """
    L = model.cfg.max_seq_len
    attns = [m for m in model.modules() if isinstance(m, Attention)] if use_cache else []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    cached = 0  # positions of ids held in the caches
    try:
        for _ in range(max_new_tokens):
            if attns and 0 < cached < ids.shape[1] <= L:
                logits = model(ids[:, cached:], start_pos=cached)
            else:  # the prompt, or a window past max_seq_len: from scratch
                for a in attns:
                    a.kv_cache = KVCache(L)
                logits = model(ids[:, -L:])
            cached = ids.shape[1]
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            if eos_id is not None:
                nxt = nxt.masked_fill(done[:, None], eos_id)
                done |= nxt[:, 0] == eos_id
            ids = torch.cat([ids, nxt], dim=1)
            if bool(done.all()):
                break
    finally:
        for a in attns:
            a.kv_cache = None
    return ids
