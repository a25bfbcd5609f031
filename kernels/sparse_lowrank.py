"""SLTrain's sparse + low-rank linear y = x·(s·B·A + S)ᵀ: the PyTorch op and a Triton one that never
makes S dense.

S is (m, n) with its values on a fixed support: ``index``, the sorted flat row-major positions (nnz of
them, δ·m·n), and ``values``; A is r x n, B is m x r, s a float.

**Reference** (:class:`SparseLowRankFunction`, ``trainer.kernels=torch`` and the CPU default): the
dense weight s·B·A + S is rebuilt in the forward and again in the backward (as the SLTrain reference
code does), one (m, n) buffer at a time, and freed after its matmul; the values' gradient is
(gᵀx)[support] computed a block of rows at a time (:func:`support_gradient`), so at most
``block_rows`` x n entries of the dense gradient exist at once; ∂B = s·gᵀ(x Aᵀ), ∂A = s·(g B)ᵀ x.

**Triton** (:class:`SparseLowRankTriton`): the low-rank part through its factors,
y = s·(x Aᵀ) Bᵀ (cuBLAS), and the sparse part as sparse products that read only the nnz values:

- forward, y += x Sᵀ: per output row i of S (CSR: its entries are a contiguous slice of ``index``),
  a program sums v_k · xᵀ[col_k, t-block] over the row's entries (``_spmm_kernel``);
- ∂x = s·(g B) A + g S: the same kernel over the columns of S (CSC: a cached permutation of the
  support sorted by column) reading gᵀ;
- ∂values_k = Σ_t g[t, row_k] · x[t, col_k] (``_sddmm_kernel``): sampled at the support only, never
  the m x n gradient;
- ∂A, ∂B as in the reference. Activations and tokens are used transposed (xᵀ, gᵀ: tokens
  contiguous), so that each gathered row of xᵀ is a contiguous load.

What that trades: the reference's m x n transients (the rebuilt weight, the values' gradient blocks)
become 2-3 token-by-width copies (xᵀ, gᵀ, the transposed outputs), and the dense GEMMs (tensor cores,
2·tokens·m·n FLOPs each) become gathers of tokens·nnz values (CUDA cores, memory-bound). At δ = 0.03
and many tokens per micro-batch the dense rebuild is likely the faster of the two; with few tokens
and large matrices (7B layers at micro-batch 1) the sparse op saves the m x n buffers. The GPU suite
measures both at llama_1b shapes (benchmarks/gpu_suite.py, rows k_sltrain and e_sltrain_*).

The cached support layout (:func:`support_layout`, per module): row pointers (m + 1), column
pointers (n + 1) and the column-order permutation (int32, nnz): 4 bytes per support entry beside the
8 of ``index``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lrpretrain.kernels.triton_support import cdiv, interpreting, tl, triton

# -- the reference -------------------------------------------------------------------------------------


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run this matmul in (bf16 under bf16 autocast), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def dense_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                 scale: float, dtype: torch.dtype) -> torch.Tensor:
    """s·B·A + S as one dense (m, n) matrix in ``dtype``.

    The product is written with ``out=`` and then scaled and added to in place: ``trainer.recompute=
    selective`` keeps the outputs of plain matmuls (``aten.mm.default``) for the backward, and would
    both keep this weight-sized temporary and refuse the in-place edits of a kept tensor."""
    w = torch.empty(lora_B.shape[0], lora_A.shape[1], dtype=dtype, device=lora_B.device)
    torch.mm(lora_B.to(dtype), lora_A.to(dtype), out=w).mul_(scale)
    return w.view(-1).index_add_(0, index, values.to(dtype)).view(lora_B.shape[0], lora_A.shape[1])


def support_gradient(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, block_rows: int) -> torch.Tensor:
    """(grad_outᵀ x) at the flat ``index`` (sorted, row-major), one block of rows at a time.

    grad_out: (tokens, m); x: (tokens, n). Never holds more than ``block_rows`` x n of the dense product.
    """
    m, n = grad_out.shape[1], x.shape[1]
    out = torch.empty(index.numel(), dtype=grad_out.dtype, device=grad_out.device)
    row_starts = torch.arange(0, m + block_rows, block_rows, device=index.device).clamp_(max=m)
    bounds = torch.searchsorted(index, row_starts * n).tolist()  # support slice of each row block
    for b, r0 in enumerate(range(0, m, block_rows)):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        r1 = min(r0 + block_rows, m)
        block = grad_out[:, r0:r1].t() @ x  # (r1 - r0, n)
        out[lo:hi] = block.view(-1)[index[lo:hi] - r0 * n]
    return out


class SparseLowRankFunction(torch.autograd.Function):
    """y = x (s·B·A + S)ᵀ with gradients for x, A, B and S's values, and no dense weight gradient."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, values, index, scale: float, block_rows: int):
        dtype = compute_dtype(x)
        ctx.save_for_backward(x, lora_A, lora_B, values, index)
        ctx.scale, ctx.block_rows, ctx.dtype = scale, block_rows, dtype
        w = dense_weight(lora_A, lora_B, values, index, scale, dtype)
        return F.linear(x.to(dtype), w)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, values, index = ctx.saved_tensors
        s, dtype = ctx.scale, ctx.dtype
        n, m = lora_A.shape[1], lora_B.shape[0]
        g = grad_out.reshape(-1, m).to(dtype)
        x2 = x.reshape(-1, n).to(dtype)
        grad_x = grad_A = grad_B = grad_values = None
        if ctx.needs_input_grad[0]:
            w = dense_weight(lora_A, lora_B, values, index, s, dtype)
            grad_x = (g @ w).view(x.shape).to(x.dtype)
            del w
        if ctx.needs_input_grad[2]:
            grad_B = (g.t() @ (x2 @ lora_A.to(dtype).t())).mul_(s).to(lora_B.dtype)  # s·gᵀ(x Aᵀ)
        if ctx.needs_input_grad[1]:
            grad_A = ((g @ lora_B.to(dtype)).t() @ x2).mul_(s).to(lora_A.dtype)  # s·(g B)ᵀ x
        if ctx.needs_input_grad[3]:
            grad_values = support_gradient(g, x2, index, ctx.block_rows).to(values.dtype)
        return grad_x, grad_A, grad_B, grad_values, None, None, None


# -- Triton ---------------------------------------------------------------------------------------------


@dataclass
class SupportLayout:
    """The support of S in the two orders the sparse products read it in (see the module doc)."""

    m: int
    n: int
    row_ptr: torch.Tensor  # (m + 1,) int32: entries of row i are index[row_ptr[i]:row_ptr[i + 1]]
    col_ptr: torch.Tensor  # (n + 1,) int32: entries of column j are index[perm[col_ptr[j]:col_ptr[j + 1]]]
    perm: torch.Tensor  # (nnz,) int32: the support in column-major order
    key: tuple  # (device, data_ptr, version, numel) of the index it was made from

    @property
    def nbytes(self) -> int:
        return 4 * (self.row_ptr.numel() + self.col_ptr.numel() + self.perm.numel())


def _key(index: torch.Tensor) -> tuple:
    return (index.device, index.data_ptr(), index._version, index.numel())


def support_layout(index: torch.Tensor, m: int, n: int, cached: SupportLayout | None = None) -> SupportLayout:
    """The layout of the sorted flat ``index`` of an (m, n) support; ``cached`` again if it still describes
    ``index`` (same storage, unmodified)."""
    if cached is not None and cached.key == _key(index) and (cached.m, cached.n) == (m, n):
        return cached
    if index.numel() >= 2**31 or m * n >= 2**62:
        raise ValueError(f"a support of {index.numel()} entries in a {m} x {n} matrix is too large for int32 pointers")
    i64 = index.long()
    row_ptr = torch.searchsorted(i64, torch.arange(m + 1, device=index.device) * n).to(torch.int32)
    cols = i64 % n
    perm = torch.argsort(cols * m + i64 // n)  # column-major order (stable: distinct keys)
    col_ptr = torch.searchsorted(cols[perm], torch.arange(n + 1, device=index.device)).to(torch.int32)
    return SupportLayout(m, n, row_ptr, col_ptr, perm.to(torch.int32), _key(index))


@triton.jit
def _spmm_kernel(out_ptr, src_ptr, ptr_ptr, idx_ptr, perm_ptr, val_ptr, lines, T, n,
                 COLUMNS: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """out[i, t] += Σ_k val[k] · src[j_k, t] over the entries k of line i of S, for L lines and BT tokens:
    a line is a row (j_k = col_k), or with COLUMNS a column (its entries through ``perm``, j_k = row_k).
    out, src: (lines, T) and (other dimension, T), contiguous."""
    li = tl.program_id(0) * L + tl.arange(0, L)
    lmask = li < lines
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    tmask = t < T
    start = tl.load(ptr_ptr + li, mask=lmask, other=0)
    end = tl.load(ptr_ptr + li + 1, mask=lmask, other=0)
    longest = tl.max(end - start, axis=0)
    acc = tl.zeros((L, BT), dtype=tl.float32)
    for k0 in range(0, longest, BK):
        k = start[:, None] + k0 + tl.arange(0, BK)[None, :]  # (L, BK) entries
        kmask = k < end[:, None]
        if COLUMNS:
            k = tl.load(perm_ptr + k, mask=kmask, other=0)
        flat = tl.load(idx_ptr + k, mask=kmask, other=0)
        j = flat // n if COLUMNS else flat % n
        vals = tl.load(val_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        rows = tl.load(src_ptr + j[:, :, None] * T + t[None, None, :], mask=kmask[:, :, None] & tmask[None, None, :],
                       other=0.0)
        acc += tl.sum(vals[:, :, None] * rows.to(tl.float32), axis=1)
    o = out_ptr + li[:, None] * T + t[None, :]
    omask = lmask[:, None] & tmask[None, :]
    tl.store(o, (tl.load(o, mask=omask, other=0.0).to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _sddmm_kernel(out_ptr, gT_ptr, xT_ptr, idx_ptr, nnz, T, n, BK: tl.constexpr, BT: tl.constexpr):
    """out[k] = Σ_t gᵀ[row_k, t] · xᵀ[col_k, t] for a block of BK support entries."""
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    kmask = k < nnz
    flat = tl.load(idx_ptr + k, mask=kmask, other=0)
    r, c = flat // n, flat % n
    acc = tl.zeros((BK,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        t = t0 + tl.arange(0, BT)
        mask = kmask[:, None] & (t[None, :] < T)
        a = tl.load(gT_ptr + r[:, None] * T + t[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(xT_ptr + c[:, None] * T + t[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + k, acc.to(out_ptr.dtype.element_ty), mask=kmask)


def _blocks() -> tuple[int, int, int]:
    """(lines, tokens, support entries) per program step; large blocks under the interpreter, whose cost is
    per program and per operation rather than per element."""
    return (64, 128, 8) if interpreting() else (4, 64, 16)


def spmm_(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor, values: torch.Tensor, layout: SupportLayout,
          columns: bool) -> torch.Tensor:
    """out (lines x T) += S src (S's rows; ``columns``: Sᵀ src, S's columns); src is (m or n) x T."""
    lines, T = out.shape
    bl, bt, bk = _blocks()
    ptr = layout.col_ptr if columns else layout.row_ptr
    _spmm_kernel[(cdiv(lines, bl), cdiv(T, bt))](out, src, ptr, index, layout.perm, values, lines, T, layout.n,
                                                 COLUMNS=columns, L=bl, BT=bt, BK=bk)
    return out


def sddmm(gT: torch.Tensor, xT: torch.Tensor, index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight gradient gᵀx sampled at the support: out[k] = (gᵀx)[row_k, col_k], from gᵀ (m x T)
    and xᵀ (n x T)."""
    nnz, T = index.numel(), gT.shape[1]
    out = torch.empty(nnz, dtype=dtype, device=gT.device)
    bk, bt = (64, 128) if interpreting() else (64, 64)
    _sddmm_kernel[(cdiv(nnz, bk),)](out, gT, xT, index, nnz, T, n, BK=bk, BT=bt)
    return out


class SparseLowRankTriton(torch.autograd.Function):
    """:class:`SparseLowRankFunction`'s op with S applied sparsely (Triton); same inputs, same saved tensors."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, values, index, scale: float, layout: SupportLayout):
        dtype = compute_dtype(x)
        n, m = lora_A.shape[1], lora_B.shape[0]
        ctx.save_for_backward(x, lora_A, lora_B, values, index)
        ctx.scale, ctx.dtype, ctx.layout = scale, dtype, layout
        with torch.autocast(x.device.type, enabled=False):
            xT = x.reshape(-1, n).to(dtype).t().contiguous()  # (n, T)
            yT = (lora_B.to(dtype) @ (lora_A.to(dtype) @ xT)).mul_(scale)  # s·B (A xᵀ): (m, T)
            spmm_(yT, xT, index, values, layout, columns=False)
        return yT.t().reshape(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, values, index = ctx.saved_tensors
        s, dtype, layout = ctx.scale, ctx.dtype, ctx.layout
        n, m = lora_A.shape[1], lora_B.shape[0]
        grad_x = grad_A = grad_B = grad_values = None
        with torch.autocast(x.device.type, enabled=False):
            gT = grad_out.reshape(-1, m).to(dtype).t().contiguous()  # (m, T)
            xT = x.reshape(-1, n).to(dtype).t().contiguous()  # (n, T)
            A, B = lora_A.to(dtype), lora_B.to(dtype)
            bg = B.t() @ gT  # (r, T)
            if ctx.needs_input_grad[0]:
                dxT = (A.t() @ bg).mul_(s)  # s·Aᵀ Bᵀ gᵀ: (n, T)
                spmm_(dxT, gT, index, values, layout, columns=True)  # + Sᵀ gᵀ
                grad_x = dxT.t().reshape(x.shape).to(x.dtype)
                del dxT
            if ctx.needs_input_grad[2]:
                grad_B = (gT @ (A @ xT).t()).mul_(s).to(lora_B.dtype)  # s·gᵀ(x Aᵀ)
            if ctx.needs_input_grad[1]:
                grad_A = (bg @ xT.t()).mul_(s).to(lora_A.dtype)  # s·(g B)ᵀ x
            if ctx.needs_input_grad[3]:
                grad_values = sddmm(gT, xT, index, n, values.dtype)
        return grad_x, grad_A, grad_B, grad_values, None, None, None


@torch.compiler.disable  # Triton launches inside: a graph break rather than Dynamo tracing the autograd function
def sparse_lowrank_triton(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, values: torch.Tensor,
                          index: torch.Tensor, scale: float, layout: SupportLayout) -> torch.Tensor:
    """y = x (s·B·A + S)ᵀ with S applied sparsely (``layout``: :func:`support_layout` of ``index``)."""
    return SparseLowRankTriton.apply(x, lora_A, lora_B, values, index, scale, layout)
