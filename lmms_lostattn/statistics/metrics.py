"""Residual-stream statistics of the paper "Large Vision-Language Models Get Lost in Attention" (SPEC.md §3).

Every function is pure and works on 2-D tensors of shape ``(S, H)``: the S tokens of one sample as rows, the H
hidden units as columns. ``x`` is the residual stream entering a module, ``dx`` the update the module adds to it and
``x_new = x + dx``.

* ``erank(X)        = exp(-sum_i p_i log p_i)``, ``p_i = sigma_i / sum_j sigma_j`` (singular values of X)
* ``delta_s(X, X')  = |eRank(X') - eRank(X)| / min(S, H)``
* ``delta_d(X, X')  = (||(I - P_C(X)) X'||_F + ||X' (I - P_R(X))||_F) / (2 ||X'||_F)``: the mean of the two
  residual ratios r_c, r_r (``combine="mean"``, the paper); ``"l2"``: sqrt(r_c² + r_r²) (the authors' released
  building blocks' default); ``"sum"``: r_c + r_r
* ``rid(X, X')      = delta_s + delta_d``, in ``[0, 2]``
* ``tme(X)``: normalised entropy of the token-mixing distribution ``P_t ∝ ((x̃_t·x̃_j + 1) / 2)^alpha``
* ``mixig(X, X')    = TME(X') - TME(X)``

Conventions shared by all functions:

* Inputs are detached and computed in float32 at least: lower precisions (bfloat16, float16, integers) are upcast to
  float32, float64 stays float64. Results are returned as Python floats.
* Numerical rank tolerance: ``r = #{sigma_i > tol * sigma_max}`` with ``tol = max(S, H) * eps_float32`` (what
  ``torch.linalg.matrix_rank`` uses for float32), whatever the input dtype, so float32 and float64 inputs give the
  same rank; ``rtol`` overrides ``tol``.
* Every statistic is invariant to the scale of each matrix: norms, Gram matrices and row normalisations work on
  the matrix times a power of two that brings its largest entry near 1 (exact), so no magnitude a float holds
  overflows or underflows them.
* Singular values come from the float64 eigenvalues of the smaller Gram matrix, projections from its Cholesky
  factor (X of full rank) or its eigenvectors (see :class:`Decomposition`, which also lets several statistics
  share one matrix's decomposition).
* Bad input (not 2-D, empty, complex, shapes that differ, NaN/inf, bad ``alpha``/``agg``/``rtol``/``max_tokens``)
  raises ``ValueError`` naming the argument, the bad value and what is accepted; no function returns NaN.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch

from lmms_lostattn.config.spec import STATS_COMBINES as COMBINES
from lmms_lostattn.statistics.inputs import (
    AGGS,
    check_agg,
    check_alpha,
    check_int,
    check_rtol,
    prepare,
    prepare_pair,
)

__all__ = [
    "AGGS",
    "COMBINES",
    "KINDS",
    "RANK_EPS",
    "delta_d",
    "Decomposition",
    "decompose",
    "delta_s",
    "erank",
    "innovation",
    "mixig",
    "module_stats",
    "rid",
    "select_tokens",
    "tme",
    "update_stats",
]

KINDS = ("paper", "all")
RANK_EPS = float(torch.finfo(torch.float32).eps)
"""Machine epsilon of float32; the default rank tolerance is ``max(S, H) * RANK_EPS`` relative to ``sigma_max``."""

_EPS64 = float(torch.finfo(torch.float64).eps)


# --------------------------------------------------------------------------------------------------- internals


def _erank_from_sv(s: torch.Tensor) -> float:
    """eRank from singular values; 0 for an all-zero spectrum (zero matrix), where p is undefined."""
    total = s.sum()
    if float(total) == 0.0:
        return 0.0
    return float(torch.exp(torch.special.entr(s / total).sum()))


def _delta_s_from_eranks(e_x: float, e_new: float, shape: torch.Size) -> float:
    # eRank <= min(S, H) holds exactly; the clamp only absorbs rounding of exp(log k) above k.
    return min(1.0, abs(e_new - e_x) / min(shape))


def _unit_factor(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The power of two 2^-e that brings max|t| into [1/2, 1), a 0-dim tensor on t's device (no host sync; 1 for a
    zero ``t``; ``e`` clamped so that 2^-e stays a normal number of t's dtype); with ``dim``, one per slice along it
    (kept as a size-1 dimension). Scaling by it is exact, and every statistic here is invariant to a common scale of
    one matrix: scaled, norms and Gram matrices neither overflow nor underflow at any magnitude the dtype holds."""
    limit = -math.frexp(torch.finfo(t.dtype).tiny)[1]
    peak = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    exponent = torch.frexp(peak)[1].clamp(-limit, limit)
    return torch.tensor(2.0, dtype=t.dtype, device=t.device).pow(-exponent)


def _unit_scale(t: torch.Tensor) -> torch.Tensor:
    """``t`` scaled by :func:`_unit_factor`."""
    return t * _unit_factor(t)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` L2-normalised, each scaled by its own :func:`_unit_factor` first, so that a row far smaller
    than the others is normalised like any other (a zero row stays zero)."""
    x = x * _unit_factor(x, dim=1)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, 1.0)


def _tme_from_unit(xn: torch.Tensor, alpha: float, agg: str) -> float:
    """TME from L2-normalised rows ``xn`` (S >= 2 already checked)."""
    n_tokens = xn.shape[0]
    rows = xn[-1:] if agg == "last" else xn
    cos = (rows @ xn.T).clamp(-1.0, 1.0)
    # log w = alpha * log((cos + 1) / 2); cos = -1 gives w = 0 (log -inf), which softmax maps to probability 0.
    # Every row has at least one finite entry: its own self-similarity, 1 (or 0 for an all-zero row).
    probs = torch.softmax(alpha * torch.log((cos + 1.0) / 2.0), dim=1)
    entropy = torch.special.entr(probs).sum(dim=1) / math.log(n_tokens)
    return float(entropy.clamp(0.0, 1.0).mean())  # a uniform row can round to 1 + 1e-7


def _check_tokens(x: torch.Tensor) -> None:
    if x.shape[0] < 2:
        raise ValueError(f"x must have at least 2 rows (tokens) for TME/MixIG (entropy / log S); got {tuple(x.shape)}")


@contextlib.contextmanager
def _one_cpu_thread(t: torch.Tensor) -> Iterator[None]:
    """Run a CPU eigensolver on one thread: LAPACK's tridiagonalisation opens one OpenMP region per column, and
    with spin-waiting threads on a busy host each region stalls (measured ~100x slower on a shared 2-core host);
    at the ``min(S, H) <= 1024`` sizes here one thread costs little. No-op on other devices."""
    if t.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Decomposition:
    """Singular values, eRank, TME and the parts of another matrix outside this one's subspaces, for one ``(S, H)``
    matrix X, each computed once, on first use.

    Build it with :func:`decompose`; statistics that share a matrix (X' of the attention update is X of the FFN
    update) share its decomposition. Everything starts from the smaller Gram matrix in float64, ``G = X X^T`` when
    ``S <= H``, else ``X^T X``:

    * singular values: ``sigma = sqrt(eigvalsh(G))``. Squaring the spectrum loses half the digits, so eigenvalues
      at or below ``max(S, H) * eps_float64 * sigma_max^2`` (rounding noise of G) count as ``sigma = 0``: the
      smallest nonzero ``sigma`` resolved is ``sqrt(max(S, H) * eps_float64) * sigma_max``, well below the rank
      tolerance ``max(S, H) * eps_float32 * sigma_max``, so ranks match an SVD's (a smaller ``rtol`` gives at most
      the resolved rank);
    * subspace bases when X has full rank ``min(S, H)`` at the default tolerance: the smaller side's space is the
      whole space (its projector is the identity) and the other side's orthonormal basis comes from the Cholesky
      factor ``G = L L^T`` (CholeskyQR): ``Q = L^-1 X`` has orthonormal rows (``S <= H``), ``X L^-T`` orthonormal
      columns. Q's loss of orthonormality is about ``eps_float64 * cond(G)``, and the tolerance bounds cond(G) by
      ``(max(S, H) * eps_float32)^-2``: at most about ``0.016 / max(S, H)^2`` (below 1e-8 from max(S, H) ~ 1300
      on), reached only by a stream whose smallest singular value sits at the tolerance; streams of a few dozen
      tokens and more, away from it, stay near 1e-15;
    * otherwise (rank-deficient X, or a smaller ``rtol``) the thin SVD ``X = U diag(sigma) V^T`` is read off
      ``eigh(G)``: ``G = U diag(sigma^2) U^T`` (``S <= H``) or ``V diag(sigma^2) V^T``, and the other side's rank-r
      basis is ``V_r = X^T U_r / sigma_r`` (or ``U_r = X V_r / sigma_r``), in float64.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self._tme: dict[tuple[float, str], float] = {}

    @functools.cached_property
    def _factor(self) -> torch.Tensor:
        return _unit_factor(self.x)

    @functools.cached_property
    def _scaled(self) -> torch.Tensor:
        """X in float64 times :attr:`_factor`, a power of two (:func:`_unit_factor`): what the Gram matrix and the
        bases are built from (eRank, ranks and bases do not depend on the scale)."""
        return self.x.to(torch.float64) * self._factor

    @functools.cached_property
    def _gram(self) -> torch.Tensor:
        x = self._scaled
        return x @ x.T if self.x.shape[0] <= self.x.shape[1] else x.T @ x

    @functools.cached_property
    def singular_values(self) -> torch.Tensor:
        """The ``min(S, H)`` singular values of X in descending order (float64)."""
        return self._sigma / self._factor

    @functools.cached_property
    def _sigma(self) -> torch.Tensor:
        """The singular values of the scaled X (:attr:`_scaled`), descending."""
        with _one_cpu_thread(self._gram):
            lam = torch.linalg.eigvalsh(self._gram).flip(0)
        floor = max(self.x.shape) * _EPS64 * lam[0]
        return torch.where(lam > floor, lam, 0.0).sqrt()

    @functools.cached_property
    def erank(self) -> float:
        """``eRank(X)``, see :func:`erank`."""
        return _erank_from_sv(self._sigma)

    def rank(self, rtol: float | None = None) -> int:
        """Numerical rank ``#{sigma_i > tol * sigma_max}``, ``tol = max(S, H) * eps_float32`` unless ``rtol``."""
        s = self._sigma
        tol = max(self.x.shape) * RANK_EPS if rtol is None else rtol
        return int((s > tol * s[0]).sum())

    @functools.cached_property
    def _eigenvectors(self) -> torch.Tensor:
        """Eigenvectors of G, ordered as :attr:`singular_values` (descending)."""
        with _one_cpu_thread(self._gram):
            return torch.linalg.eigh(self._gram)[1].flip(1)

    def basis(self, side: str, r: int) -> torch.Tensor:
        """Orthonormal basis of the top-r column (``side="col"``, ``U_r``, S×r) or row (``"row"``, ``V_r``, H×r)
        space of X, in X's dtype; ``r`` must not exceed :meth:`rank` (``sigma_r > 0``)."""
        gram_side = "col" if self.x.shape[0] <= self.x.shape[1] else "row"  # the side G's eigenvectors span
        if side == gram_side:
            return self._eigenvectors[:, :r].to(self.x.dtype)
        x = self._scaled
        if r == min(self.x.shape) and self._cholesky is not None:  # CholeskyQR: rows of L^-1 X, or columns of X L^-T
            q = torch.linalg.solve_triangular(self._cholesky, x if gram_side == "col" else x.T, upper=False)
            return q.T.to(self.x.dtype)
        vec = self._eigenvectors[:, :r]
        return ((x.T @ vec if side == "row" else x @ vec) / self._sigma[:r]).to(self.x.dtype)

    @functools.cached_property
    def _cholesky(self) -> torch.Tensor | None:
        """Lower Cholesky factor of G when X has full rank at the default tolerance (else, or if it fails, None)."""
        if self.rank() < min(self.x.shape):
            return None
        with _one_cpu_thread(self._gram):
            factor, info = torch.linalg.cholesky_ex(self._gram)
        return factor if int(info) == 0 else None

    def outside(self, x_new: torch.Tensor, rtol: float | None = None) -> tuple[float, float]:
        """``(||(I - P_C) X'||_F, ||X' (I - P_R)||_F)``: the parts of ``x_new`` (same shape as X) outside X's column
        (token) and row (feature) spaces at rank ``r = rank(rtol)``. Residuals are formed explicitly, never as
        ``||X'||² - ||P X'||²``, which would lose half the digits to cancellation when X' stays inside. A projector
        onto a whole space (``r`` equal to the number of rows or columns) is the identity: that residual is 0."""
        n_rows, n_cols = x_new.shape
        r = self.rank(rtol)
        res_c = res_r = 0.0
        if r < n_rows:
            u_r = self.basis("col", r)
            res_c = float(torch.linalg.matrix_norm(x_new - u_r @ (u_r.T @ x_new)))
        if r < n_cols:
            v_r = self.basis("row", r)
            res_r = float(torch.linalg.matrix_norm(x_new - (x_new @ v_r) @ v_r.T))
        return res_c, res_r

    def tme(self, alpha: float = 8.0, agg: str = "last") -> float:
        """``TME(X)``, see :func:`tme` (arguments already checked; ``S >= 2``). The value is kept, the normalised rows
        are not: a decomposition carried to the next layer keeps only what that layer reads again."""
        key = (alpha, agg)
        if key not in self._tme:
            self._tme[key] = _tme_from_unit(_unit_rows(self.x), alpha, agg)
        return self._tme[key]


def _delta_d(dec: Decomposition, x_new: torch.Tensor, rtol: float | None, combine: str = "mean") -> float:
    """ΔD of X' against X's subspaces, from X's decomposition (see :meth:`Decomposition.outside`)."""
    x_new = _unit_scale(x_new)  # the residuals and the norm scale alike: their ratios do not change
    norm_new = float(torch.linalg.matrix_norm(x_new))
    if norm_new == 0.0:
        return 0.0
    # Each residual is at most ||X'||_F exactly; the clamp only absorbs rounding.
    r_c, r_r = (min(1.0, residual / norm_new) for residual in dec.outside(x_new, rtol))
    if combine == "l2":
        return math.hypot(r_c, r_r)
    return r_c + r_r if combine == "sum" else (r_c + r_r) / 2.0


def _check_combine(combine: str) -> str:
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}; got {combine!r}")
    return combine


# --------------------------------------------------------------------------------------------------- public API


def decompose(x: torch.Tensor) -> Decomposition:
    """Validate ``x`` (see the module's conventions) and wrap it in a lazily evaluated :class:`Decomposition`."""
    return Decomposition(prepare("x", x))


def erank(x: torch.Tensor) -> float:
    """Effective rank ``eRank(X) = exp(-sum_i p_i log p_i)``, ``p_i = sigma_i / sum_j sigma_j``.

    The sum runs over all ``min(S, H)`` singular values of X with ``0 log 0 = 0``, so ``1 <= eRank <= min(S, H)``
    for a non-zero X (``eRank(I_n) = n``, rank one gives 1). Convention: ``eRank(0) = 0`` (p is undefined).
    """
    return decompose(x).erank


def delta_s(x: torch.Tensor, x_new: torch.Tensor) -> float:
    """Spectral innovation ``ΔS = |eRank(X') - eRank(X)| / min(S, H)``, in ``[0, 1]``."""
    x, x_new = prepare_pair(x, x_new)
    e_x, e_new = Decomposition(x).erank, Decomposition(x_new).erank
    return _delta_s_from_eranks(e_x, e_new, x.shape)


def delta_d(x: torch.Tensor, x_new: torch.Tensor, rtol: float | None = None, combine: str = "mean") -> float:
    """Directional innovation ``ΔD = (||(I - P_C) X'||_F + ||X' (I - P_R)||_F) / (2 ||X'||_F)``, in ``[0, 1]``.

    With r_c = ||(I - P_C) X'||_F / ||X'||_F and r_r = ||X' (I - P_R)||_F / ||X'||_F: ``combine="mean"`` is
    (r_c + r_r) / 2 (above), ``"l2"`` sqrt(r_c² + r_r²) in ``[0, √2]``, ``"sum"`` r_c + r_r in ``[0, 2]``.

    ``P_C = U_r U_r^T`` (S×S) and ``P_R = V_r V_r^T`` (H×H) project onto the column (token) and row (feature)
    spaces of X, from its thin SVD truncated at the numerical rank ``r = #{sigma_i > tol * sigma_max}``,
    ``tol = max(S, H) * eps_float32`` unless ``rtol`` is given. The projectors are never formed.

    Conventions: ``||X'||_F = 0`` gives 0 (no energy, nothing new); ``X = 0`` has rank 0, so a non-zero X' gives 1.
    """
    x, x_new = prepare_pair(x, x_new)
    return _delta_d(Decomposition(x), x_new, check_rtol(rtol), _check_combine(combine))


def rid(x: torch.Tensor, x_new: torch.Tensor, rtol: float | None = None, combine: str = "mean") -> float:
    """Relative innovation degree ``RID = ΔS + ΔD`` (see :func:`delta_s`, :func:`delta_d`), in ``[0, 2]`` for the
    paper's ``combine="mean"``."""
    x, x_new = prepare_pair(x, x_new)
    rtol, combine = check_rtol(rtol), _check_combine(combine)
    dec = Decomposition(x)
    d_s = _delta_s_from_eranks(dec.erank, Decomposition(x_new).erank, x.shape)
    return d_s + _delta_d(dec, x_new, rtol, combine)


def tme(x: torch.Tensor, alpha: float = 8.0, agg: str = "last") -> float:
    """Token-mixing entropy, in ``[0, 1]``.

    Rows are L2-normalised to ``x̃_t`` (each row first scaled by a power of two, so a row of any nonzero size gets
    the direction of its larger copies; an all-zero row stays zero and has cosine 0 with every row, itself
    included), ``w_tj = ((x̃_t · x̃_j + 1) / 2)^alpha``, ``P_t = w_t / sum_j w_tj`` and
    ``H(P_t) = -sum_j P_tj log P_tj`` (natural log). ``agg="last"``: ``TME = H(P_S) / log S`` (final token's row);
    ``agg="mean"``: ``TME = mean_t H(P_t) / log S``. Identical rows give 1. Needs ``S >= 2`` (ValueError otherwise).
    """
    x = prepare("x", x)
    _check_tokens(x)
    return _tme_from_unit(_unit_rows(x), check_alpha(alpha), check_agg(agg))


def mixig(x: torch.Tensor, x_new: torch.Tensor, alpha: float = 8.0, agg: str = "last") -> float:
    """Mixing information gain ``MixIG = TME(X') - TME(X)`` (see :func:`tme`), in ``[-1, 1]``."""
    x, x_new = prepare_pair(x, x_new)
    _check_tokens(x)
    alpha, agg = check_alpha(alpha), check_agg(agg)
    return _tme_from_unit(_unit_rows(x_new), alpha, agg) - _tme_from_unit(_unit_rows(x), alpha, agg)


def select_tokens(n_tokens: int, max_tokens: int) -> torch.Tensor:
    """Row indices kept by the token cap (``stats_max_tokens``), as a sorted, unique int64 tensor.

    ``n_tokens <= max_tokens``: all rows ``0 .. n_tokens-1``. Otherwise exactly ``max_tokens`` evenly spaced rows,
    ``idx_i = round_half_up(i * (n_tokens - 1) / (max_tokens - 1))`` for ``i = 0 .. max_tokens-1`` (``linspace``
    rounded, in exact integer arithmetic), which always keeps the first and the last token; the indices are
    distinct because the spacing exceeds 1.
    """
    n_tokens = check_int("n_tokens", n_tokens, 1)
    max_tokens = check_int("max_tokens", max_tokens, 2)
    if n_tokens <= max_tokens:
        return torch.arange(n_tokens, dtype=torch.long)
    steps = max_tokens - 1
    i = torch.arange(max_tokens, dtype=torch.long)
    return (i * (n_tokens - 1) + steps // 2) // steps


def module_stats(
    x: torch.Tensor,
    dx: torch.Tensor,
    *,
    kind: str = "paper",
    max_tokens: int = 1024,
    rtol: float | None = None,
) -> dict[str, float]:
    """All statistics of one module update, ``X' = X + dX``, on the rows kept by :func:`select_tokens`.

    ``kind="paper"``: ``{"rid", "mixig"}`` with MixIG at ``alpha=8, agg="last"`` (the released code's defaults).
    ``kind="all"`` adds ``"mixig_mean"`` (``alpha=1, agg="mean"``, the paper's printed formula), ``"delta_s"``,
    ``"delta_d"``, ``"erank_x"`` and ``"erank_x_new"``. Same definitions and conventions as the single functions
    (which it matches): X and X' are decomposed once each and shared by eRank, ΔD and TME (see
    :func:`update_stats`). ``max(S, H)`` in the rank tolerance and ``log S`` in TME use the capped S.
    """
    x, dx = prepare_pair(x, dx, new_name="dx")
    idx = select_tokens(x.shape[0], max_tokens)
    if idx.numel() < x.shape[0]:
        idx = idx.to(x.device)
        x, dx = x[idx], dx[idx]
    x_new = x + dx
    if not bool(torch.isfinite(x_new).all()):
        raise ValueError("x + dx overflows: x_new = x + dx has non-finite values; pass float64 or rescale the inputs")
    return update_stats(Decomposition(x), Decomposition(x_new), kind=kind, rtol=rtol)


def innovation(
    reference: Decomposition, after: Decomposition, *, rtol: float | None = None, combine: str = "mean"
) -> tuple[float, float, float]:
    """``(RID, ΔS, ΔD)`` of X' = ``after.x`` measured against ``reference``'s eRank and subspaces (for a module's
    update, the module's input; for the layer-referenced FFN, the layer's input), both from :func:`decompose`."""
    x_new = after.x
    if reference.x.shape != x_new.shape:
        raise ValueError(f"after must match the reference's shape {tuple(reference.x.shape)}; got {tuple(x_new.shape)}")
    d_s = _delta_s_from_eranks(reference.erank, after.erank, x_new.shape)
    d_d = _delta_d(reference, x_new, check_rtol(rtol), _check_combine(combine))
    return d_s + d_d, d_s, d_d


def update_stats(
    before: Decomposition,
    after: Decomposition,
    *,
    kind: str = "paper",
    rtol: float | None = None,
    combine: str = "mean",
    reference: Decomposition | None = None,
) -> dict[str, float]:
    """:func:`module_stats` of the update from X (``before``) to X' (``after``), both from :func:`decompose`.

    RID, ΔS and ΔD are measured against ``reference`` (default: X itself; the layer's input for the FFN's
    layer-referenced RID), with ΔD's residuals joined by ``combine``; MixIG is always TME(X') - TME(X).
    ``kind="all"`` also gives ``tme_update``, TME (alpha=8, last) of the update X' - X itself.

    No token cap is applied (select the rows first). Decompositions are reused across calls: pass the same
    object as ``after`` of one update and ``before`` of the next (e.g. attention then FFN) and X' is decomposed,
    and its eRank and TME computed, once.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    x, x_new = before.x, after.x
    if x.shape != x_new.shape or x.dtype != x_new.dtype:
        raise ValueError(
            f"after must match before's shape {tuple(x.shape)} and dtype {x.dtype}; "
            f"got {tuple(x_new.shape)}, {x_new.dtype}"
        )
    _check_tokens(x)
    reference = before if reference is None else reference
    rid_value, d_s, d_d = innovation(reference, after, rtol=rtol, combine=combine)
    out = {"rid": rid_value, "mixig": after.tme(8.0, "last") - before.tme(8.0, "last")}
    if kind == "all":
        out["mixig_mean"] = after.tme(1.0, "mean") - before.tme(1.0, "mean")
        out.update(delta_s=d_s, delta_d=d_d, erank_x=reference.erank, erank_x_new=after.erank)
        out["tme_update"] = _tme_from_unit(_unit_rows(x_new - x), 8.0, "last")
    return out
