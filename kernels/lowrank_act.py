"""CoLA's low-rank activation h = B·σ(A·x), σ = SiLU, with σ in the first matmul's epilogue.

PyTorch runs u = A·x, z = σ(u) and h = B·z as three kernels and autograd keeps x, u (for σ's
backward) and z (for B's gradient): 2r values per token beside x. The Triton path:

- forward: one GEMM x·Aᵀ whose epilogue writes the pre-activation u and z = σ(u) (σ of u as stored, so
  that the backward's σ(u) is the forward's z); then h = z·Bᵀ (cuBLAS). Kept for the backward: x (in
  the matmul's dtype, as autocast keeps it) and u, r values per token; z is dropped.
- backward: one GEMM ∂z = ∂h·B whose epilogue recomputes σ from u and writes ∂u = ∂z ⊙ σ'(u) and z
  itself (for ∂B = ∂hᵀ·z); then ∂A = ∂uᵀ·x and ∂x = ∂u·A (cuBLAS).

:func:`cola_linear` is the whole layer (plain CoLA: the saved activations shrink from x + 2r to x + r
per projection); :func:`cola_encode` is z = σ(A·x) alone, the segment boundary of CoLA-M, whose
recomputation keeps only the z's between segments (d + 7r per token and block): the fused encode
runs inside the segments, so what CoLA-M keeps is unchanged, and its backward recomputes σ'(u) from
u the same way. The references (:func:`cola_linear_reference`, :func:`cola_encode_reference`) are
CoLA's PyTorch ops (lrpretrain/methods/cola.py).

The matmuls run in the dtype autocast would give them (bf16 under bf16 autocast), else the inputs';
fp32 accumulation; an fp32 ``tl.dot`` uses full fp32 precision (no TF32), as PyTorch's default does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrpretrain.kernels.triton_support import cdiv, interpreting, tl, triton


def cola_encode_reference(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return F.silu(F.linear(x, A))


def cola_linear_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return F.linear(cola_encode_reference(x, A), B)


@triton.jit
def _mm_silu_kernel(x_ptr, w_ptr, u_ptr, out_ptr, z_ptr, M, N, K, sxm, sxk, swk, swn,
                    BACKWARD: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GROUP_M: tl.constexpr):
    """acc = X (M x K) · W (K x N); forward: u = acc, z = σ(u); backward: out = acc ⊙ σ'(u), z = σ(u).
    Outputs are contiguous M x N."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * grid_n)  # grouped ordering: neighbouring programs share rows of X
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % size_m)
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(w_ptr + kk[:, None] * swk + rn[None, :] * swn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    offs = rm[:, None] * N + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if BACKWARD:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(u)
        tl.store(out_ptr + offs, (acc * (s * (1.0 + u * (1.0 - s)))).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(z_ptr + offs, (u * s).to(z_ptr.dtype.element_ty), mask=mask)
    else:
        u = acc.to(u_ptr.dtype.element_ty)
        tl.store(u_ptr + offs, u, mask=mask)
        uf = u.to(tl.float32)
        tl.store(z_ptr + offs, (uf * tl.sigmoid(uf)).to(z_ptr.dtype.element_ty), mask=mask)


def _configs():
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                     (128, 128, 32, 4, 4), (64, 64, 64, 4, 3))]


_mm_silu_tuned = triton.autotune(configs=_configs(), key=["M", "N", "K", "BACKWARD"])(_mm_silu_kernel)


def _mm_silu(x: torch.Tensor, w: torch.Tensor, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (``u`` None): (u, σ(u)) of x·w; backward: (x·w ⊙ σ'(u), σ(u)). ``w`` is K x N, any strides."""
    M, K = x.shape
    N = w.shape[1]
    backward = u is not None
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)  # u (forward) or ∂u (backward)
    z = torch.empty_like(out)
    args = (x, w, u if backward else out, out, z, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1))
    ieee = x.dtype == torch.float32
    if interpreting():  # one small configuration: the interpreter's cost grows with every program and tile
        _mm_silu_kernel[(cdiv(M, 32) * cdiv(N, 32),)](*args, BACKWARD=backward, IEEE=ieee, BM=32, BN=32, BK=32,
                                                      GROUP_M=4)
    else:
        grid = lambda meta: (cdiv(M, meta["BM"]) * cdiv(N, meta["BN"]),)  # noqa: E731
        _mm_silu_tuned[grid](*args, BACKWARD=backward, IEEE=ieee)
    return out, z


def _dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the matmuls in here, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _CoLALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B):
        dt = _dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        with torch.autocast(x.device.type, enabled=False):
            u, z = _mm_silu(x2, A.to(dt).t())
            h = z @ B.to(dt).t()
        ctx.save_for_backward(x2, u, A, B)
        ctx.x_dtype = x.dtype
        return h.view(*x.shape[:-1], B.shape[0])

    @staticmethod
    def backward(ctx, grad_h):
        x2, u, A, B = ctx.saved_tensors
        dt = x2.dtype
        g = grad_h.reshape(-1, B.shape[0]).to(dt)
        with torch.autocast(g.device.type, enabled=False):
            du, z = _mm_silu(g, B.to(dt), u)  # ∂u = (∂h·B) ⊙ σ'(u), and z = σ(u) again
            grad_B = (g.t() @ z).to(B.dtype) if ctx.needs_input_grad[2] else None
            grad_A = (du.t() @ x2).to(A.dtype) if ctx.needs_input_grad[1] else None
            grad_x = (du @ A.to(dt)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.view(*grad_h.shape[:-1], A.shape[1]), grad_A, grad_B)


class _CoLAEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A):
        dt = _dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        with torch.autocast(x.device.type, enabled=False):
            u, z = _mm_silu(x2, A.to(dt).t())
        ctx.save_for_backward(x2, u, A)
        ctx.x_dtype = x.dtype
        return z.view(*x.shape[:-1], A.shape[0])

    @staticmethod
    def backward(ctx, grad_z):
        x2, u, A = ctx.saved_tensors
        dt = x2.dtype
        uf = u.float()
        s = torch.sigmoid(uf)
        du = (grad_z.reshape(-1, A.shape[0]).float() * (s * (1.0 + uf * (1.0 - s)))).to(dt)  # σ'(u) recomputed
        with torch.autocast(du.device.type, enabled=False):
            grad_A = (du.t() @ x2).to(A.dtype) if ctx.needs_input_grad[1] else None
            grad_x = (du @ A.to(dt)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.view(*grad_z.shape[:-1], A.shape[1]), grad_A)


@torch.compiler.disable  # Triton launches inside: a graph break rather than Dynamo tracing the autograd function
def cola_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """h = B·σ(A·x) (x: (..., n), A: r x n, B: m x r) through the fused kernels."""
    return _CoLALinear.apply(x, A, B)


@torch.compiler.disable
def cola_encode(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """z = σ(A·x) through the fused kernel (CoLA-M's segment boundary)."""
    return _CoLAEncode.apply(x, A)
