"""Subspaces for projected-gradient optimizers: which side of a weight's gradient is projected, and
the bases (SVD, DCT, seeded random) that GaLore, Fira, APOLLO, FRUGAL and GaLore-DCT share.

A weight W (and its gradient G) is m x n (``nn.Linear``: out x in). A projection keeps r directions:

- ``left``:  P (m x r), R = P^T G  (r x n), back: P R
- ``right``: Q (r x n), R = G Q^T  (m x r), back: R Q
- ``full``:  both,      R = P^T G Q^T (r x r), back: P R Q

``proj_type`` picks the side as GaLore does (jiaweizzhao/GaLore: galore_projector.py): ``std``
projects the smaller dimension (right if m >= n, else left), so the moments live on the larger side
x r; ``reverse_std`` the larger one; ``left``/``right``/``full`` force it.

Every basis is plain tensors or integers in the optimizer state (never an object), so checkpoints
load with ``torch.load(weights_only=True)`` and resume exactly:

- :class:`SVDBasis` (GaLore, Fira, FRUGAL ``svd``): the top-r singular vectors of the current gradient,
  computed in fp32 and stored (``proj_left`` / ``proj_right``) in the gradient's dtype.
- :class:`DCTBasis` (SVD-free GaLore, Modoranu et al. 2025): a fixed orthonormal DCT-II basis D of the
  projected dimension; every T steps the r columns best aligned with G (largest norms of G·D or
  D^T·G: one matmul) are kept. Only their indices are stored (``proj_left_index`` / ...).
- :class:`RandomBasis` (APOLLO: Gaussian N(0, 1/r); FRUGAL ``random``: orthonormal, QR of a Gaussian):
  regenerated from an integer seed stored in the state (``proj_seed``), advanced at each refresh.

SVD robustness (GaLore's reference calls torch.linalg.svd unguarded and crashes when it does not
converge, GaLore#58): a zero or non-finite gradient carries no direction, so the previous basis is
kept; when SVD raises or returns non-finite factors, the basis comes from an eigendecomposition of the
Gram matrix (G G^T or G^T G) in float64, which converges where SVD's iterations may not; if that fails
too, the previous basis is kept. With no previous basis (the first refresh) the fallback is a seeded
random orthonormal basis, well defined and reproducible. Each fallback is counted in ``svd_fallbacks``.
A rank-deficient gradient needs no fallback: SVD completes U/V with orthonormal vectors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")

State = dict[str, Any]
Bases = tuple[torch.Tensor | None, torch.Tensor | None]  # (P, Q)


def projection_side(proj_type: str, shape: tuple[int, ...]) -> str:
    """'left', 'right' or 'full' for a gradient of ``shape`` (m, n)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown projection type '{proj_type}'; allowed: {', '.join(PROJ_TYPES)}")


def projected_shape(shape: tuple[int, ...], side: str, rank: int) -> tuple[int, int]:
    m, n = shape
    return {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]


def project(G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None) -> torch.Tensor:
    R = G if P is None else P.T @ G
    return R if Q is None else R @ Q.T


def project_back(R: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None) -> torch.Tensor:
    full = R if P is None else P @ R
    return full if Q is None else full @ Q


def next_seed(seed: int) -> int:
    """The next seed of a projection (splitmix64 step, kept in [0, 2^63))."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def _gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same matrix on every device.
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """rows x cols (rows >= cols) with orthonormal columns: Q of a Gaussian's QR, signs fixed (Haar)."""
    q, r = torch.linalg.qr(_gaussian(rows, cols, seed))
    return q * torch.sign(torch.diagonal(r)).masked_fill_(torch.diagonal(r) == 0, 1)


class Basis:
    """How a subspace is chosen and where it is kept in one parameter's optimizer state."""

    orthonormal = True  # P^T P = I (Q Q^T = I): moments can change basis (moments_on_refresh=rotate)

    def refresh(self, state: State, G: torch.Tensor, side: str, rank: int, seed: int) -> None:
        raise NotImplementedError

    def get(self, state: State, G: torch.Tensor, side: str, rank: int) -> Bases:
        raise NotImplementedError

    def clear(self) -> None:
        """Forget cached matrices (after the optimizer loads a state dict)."""


class SVDBasis(Basis):
    """Top-r singular vectors of the gradient at each refresh (GaLore)."""

    def refresh(self, state: State, G: torch.Tensor, side: str, rank: int, seed: int) -> None:
        previous = (state.get("proj_left"), state.get("proj_right"))
        P, Q, fell_back = svd_bases(G, side, rank, previous, seed)
        if fell_back:
            state["svd_fallbacks"] = state.get("svd_fallbacks", 0) + 1
        for key, basis in (("proj_left", P), ("proj_right", Q)):
            if basis is not None:
                state[key] = basis.to(G.dtype).contiguous()

    def get(self, state: State, G: torch.Tensor, side: str, rank: int) -> Bases:
        return state.get("proj_left"), state.get("proj_right")


def svd_bases(G: torch.Tensor, side: str, rank: int, previous: Bases, seed: int) -> tuple[
        torch.Tensor | None, torch.Tensor | None, bool]:
    """(P, Q, fell_back) for ``side``: fp32 SVD with the fallbacks described in the module docstring."""
    A = G.detach().float()
    left, right = side in ("left", "full"), side in ("right", "full")
    hi, lo = float(A.amax()), float(A.amin())  # finite and not all zero, without a gradient-sized temporary
    if math.isfinite(hi) and math.isfinite(lo) and max(hi, -lo) > 0:
        try:
            U, _, Vh = torch.linalg.svd(A, full_matrices=False)
            if not (torch.isfinite(U).all() and torch.isfinite(Vh).all()):
                raise torch.linalg.LinAlgError("non-finite singular vectors")
            return (U[:, :rank] if left else None), (Vh[:rank] if right else None), False
        except RuntimeError:  # LinAlgError ("failed to converge") is a RuntimeError
            try:
                return (_gram_top(A, rank, "left") if left else None), \
                    (_gram_top(A, rank, "right").T if right else None), True
            except RuntimeError:
                pass
    P_prev, Q_prev = previous
    if (not left or P_prev is not None) and (not right or Q_prev is not None):
        return P_prev, Q_prev, True
    m, n = A.shape
    P = _orthonormal(m, rank, seed).to(A.device) if left else None
    Q = _orthonormal(n, rank, next_seed(seed)).to(A.device).T if right else None
    return P, Q, True


def _gram_top(A: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-``rank`` eigenvectors (columns) of A A^T (side=left) or A^T A (right), in float64."""
    a = A.double()
    gram = a @ a.T if side == "left" else a.T @ a
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    top = vecs[:, -rank:].flip(-1).float()
    if not torch.isfinite(top).all():
        raise torch.linalg.LinAlgError("non-finite eigenvectors")
    return top


_dct_cache: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def dct_basis(d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """d x d orthonormal DCT-II basis: column k is sqrt(2/d)·c_k·cos(pi (2i+1) k / (2d)), c_0 = 1/sqrt(2).

    A pure function of d: cached per (d, device, dtype), shared by all layers, never checkpointed.
    """
    key = (d, str(device), dtype)
    if key not in _dct_cache:
        i = torch.arange(d, dtype=torch.float64).unsqueeze(1)
        k = torch.arange(d, dtype=torch.float64).unsqueeze(0)
        D = torch.cos(math.pi * (2 * i + 1) * k / (2 * d)) * math.sqrt(2.0 / d)
        D[:, 0] /= math.sqrt(2.0)
        _dct_cache[key] = D.to(device=device, dtype=dtype)
    return _dct_cache[key]


class DCTBasis(Basis):
    """r columns of a fixed DCT-II basis, chosen every T steps by alignment with G; indices stored."""

    def refresh(self, state: State, G: torch.Tensor, side: str, rank: int, seed: int) -> None:
        m, n = G.shape
        A = G.detach().float()
        if side in ("left", "full"):  # scores: norms of the rows of D^T G
            scores = (dct_basis(m, G.device, torch.float32).T @ A).norm(dim=1)
            state["proj_left_index"] = _top(scores, rank)
        if side in ("right", "full"):  # scores: norms of the columns of G D
            scores = (A @ dct_basis(n, G.device, torch.float32)).norm(dim=0)
            state["proj_right_index"] = _top(scores, rank)

    def get(self, state: State, G: torch.Tensor, side: str, rank: int) -> Bases:
        m, n = G.shape
        P = Q = None
        if "proj_left_index" in state:
            P = dct_basis(m, G.device, G.dtype)[:, state["proj_left_index"]]
        if "proj_right_index" in state:
            Q = dct_basis(n, G.device, G.dtype)[:, state["proj_right_index"]].T
        return P, Q


def _top(scores: torch.Tensor, rank: int) -> torch.Tensor:
    # Best aligned first (as singular vectors come); a non-finite score (non-finite G) ranks last.
    scores = torch.nan_to_num(scores, nan=-1.0, posinf=-1.0)
    return torch.topk(scores, rank, sorted=True).indices.to(torch.int64)


class RandomBasis(Basis):
    """A random basis regenerated from ``proj_seed`` in the state; the seed advances at each refresh.

    ``gaussian``: entries N(0, 1/r), not orthonormal (APOLLO: E[P P^T] = I). ``orthonormal``: Haar
    (FRUGAL's ``random``). The matrix itself is cached outside the state (a function of the seed).
    """

    def __init__(self, kind: str):
        if kind not in ("gaussian", "orthonormal"):
            raise ValueError(f"unknown random basis '{kind}'")
        self.kind = kind
        self.orthonormal = kind == "orthonormal"
        self._cache: dict[int, tuple[int, Bases]] = {}  # id(state) -> (seed, bases): one entry per parameter

    def clear(self) -> None:
        self._cache.clear()

    def refresh(self, state: State, G: torch.Tensor, side: str, rank: int, seed: int) -> None:
        state["proj_seed"] = next_seed(state["proj_seed"]) if "proj_seed" in state else seed

    def get(self, state: State, G: torch.Tensor, side: str, rank: int) -> Bases:
        seed = state["proj_seed"]
        cached = self._cache.get(id(state))
        if cached is None or cached[0] != seed:
            cached = (seed, self._make(G, side, rank, seed))
            self._cache[id(state)] = cached
        return cached[1]

    def _make(self, G: torch.Tensor, side: str, rank: int, seed: int) -> Bases:
        m, n = G.shape
        if self.kind == "gaussian":
            make = lambda rows, s: _gaussian(rows, rank, s) / math.sqrt(rank)  # noqa: E731
        else:
            make = _orthonormal_cols(rank)
        P = make(m, seed) if side in ("left", "full") else None
        Q = make(n, next_seed(seed)).T if side in ("right", "full") else None
        cast = lambda t: None if t is None else t.to(device=G.device, dtype=G.dtype).contiguous()  # noqa: E731
        return cast(P), cast(Q)


def _orthonormal_cols(rank: int):
    return lambda rows, seed: _orthonormal(rows, rank, seed)
