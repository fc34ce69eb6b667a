"""Tests of lmms_lostattn.statistics.metrics: closed forms, an independent float64 NumPy reference, token cap, bad
input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmms_lostattn.statistics import metrics
from lmms_lostattn.statistics.metrics import (
    RANK_EPS,
    decompose,
    delta_d,
    delta_s,
    erank,
    mixig,
    module_stats,
    rid,
    select_tokens,
    tme,
    update_stats,
)

# --------------------------------------------------------------------------------------------------- helpers


def _rand(shape: tuple[int, int], seed: int, rank: int | None = None, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(*shape, generator=gen, dtype=dtype)
    a = torch.randn(shape[0], rank, generator=gen, dtype=torch.float64)
    b = torch.randn(rank, shape[1], generator=gen, dtype=torch.float64)
    return (a @ b).to(dtype)


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_rand((n, k), seed))
    return q


def _with_spectrum(spectrum: list[float], shape: tuple[int, int], seed: int) -> torch.Tensor:
    k = len(spectrum)
    u, v = _orthonormal(shape[0], k, seed), _orthonormal(shape[1], k, seed + 1)
    return u @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ v.T


# --------------------------------------------------------------------------------------------------- NumPy reference


def _np_erank(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def _np_delta_d(x: np.ndarray, x_new: np.ndarray, combine: str = "mean") -> float:
    u, s, vt = np.linalg.svd(x, full_matrices=True)
    tol = max(x.shape) * np.finfo(np.float32).eps * s[0]
    r = int(np.sum(s > tol))
    p_c = u[:, :r] @ u[:, :r].T
    p_r = vt[:r].T @ vt[:r]
    res_c = np.linalg.norm((np.eye(x.shape[0]) - p_c) @ x_new)
    res_r = np.linalg.norm(x_new @ (np.eye(x.shape[1]) - p_r))
    r_c, r_r = res_c / np.linalg.norm(x_new), res_r / np.linalg.norm(x_new)
    return float({"mean": (r_c + r_r) / 2, "l2": np.sqrt(r_c**2 + r_r**2), "sum": r_c + r_r}[combine])


def _np_tme(x: np.ndarray, alpha: float, agg: str) -> float:
    n = x.shape[0]
    xt = x / np.linalg.norm(x, axis=1, keepdims=True)
    entropies = []
    for t in range(n):
        w = np.array([((xt[t] @ xt[j] + 1) / 2) ** alpha for j in range(n)])
        p = w / w.sum()
        entropies.append(-np.sum(p * np.log(p)) / np.log(n))
    return float(entropies[-1] if agg == "last" else np.mean(entropies))


def _np_all(x: np.ndarray, dx: np.ndarray, combine: str = "mean", reference: np.ndarray | None = None) -> dict:
    """Every ``kind="all"`` statistic; RID, ΔS and ΔD against ``reference`` (default x), MixIG from x."""
    x_new = x + dx
    ref = x if reference is None else reference
    e_x, e_new = _np_erank(ref), _np_erank(x_new)
    d_s = abs(e_new - e_x) / min(x.shape)
    d_d = _np_delta_d(ref, x_new, combine)
    return {
        "rid": d_s + d_d,
        "mixig": _np_tme(x_new, 8.0, "last") - _np_tme(x, 8.0, "last"),
        "mixig_mean": _np_tme(x_new, 1.0, "mean") - _np_tme(x, 1.0, "mean"),
        "delta_s": d_s,
        "delta_d": d_d,
        "erank_x": e_x,
        "erank_x_new": e_new,
        "tme_update": _np_tme(dx, 8.0, "last"),
    }


REFERENCE_CASES = {
    "tall": ((40, 12), None),
    "wide": ((12, 40), None),
    "square": ((16, 16), None),
    "tall_rank_deficient": ((30, 20), 5),
    "wide_rank_deficient": ((10, 24), 4),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_module_stats_matches_numpy_reference(case: str, dtype: torch.dtype) -> None:
    shape, rank = REFERENCE_CASES[case]
    x = _rand(shape, 1, rank=rank, dtype=dtype)
    dx = 0.3 * _rand(shape, 2, dtype=dtype)
    got = module_stats(x, dx, kind="all")
    want = _np_all(x.double().numpy(), dx.double().numpy())
    assert got.keys() == want.keys()
    for key, value in want.items():
        scale = max(1.0, abs(value)) if key.startswith("erank") else 1.0
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        assert abs(got[key] - value) <= tol * scale, (key, got[key], value)
    # The single-metric functions agree with module_stats (which shares decompositions between them).
    x_new = x + dx
    assert rid(x, x_new) == pytest.approx(got["rid"], abs=1e-6)
    assert delta_s(x, x_new) == pytest.approx(got["delta_s"], abs=1e-6)
    assert delta_d(x, x_new) == pytest.approx(got["delta_d"], abs=1e-6)
    assert erank(x) == pytest.approx(got["erank_x"], rel=1e-6)
    assert erank(x_new) == pytest.approx(got["erank_x_new"], rel=1e-6)
    assert mixig(x, x_new) == pytest.approx(got["mixig"], abs=1e-6)
    assert mixig(x, x_new, alpha=1.0, agg="mean") == pytest.approx(got["mixig_mean"], abs=1e-6)


def test_module_stats_paper_keys_and_low_precision_upcast() -> None:
    x, dx = _rand((20, 8), 3), 0.5 * _rand((20, 8), 4)
    ref = module_stats(x, dx, kind="all")
    got = module_stats(x.to(torch.bfloat16), dx.to(torch.bfloat16))
    assert set(got) == {"rid", "mixig"}
    assert all(isinstance(v, float) for v in got.values())
    # bfloat16 inputs are rounded (3 significant digits) but computed in float32: close to the float64 values.
    assert got["rid"] == pytest.approx(ref["rid"], abs=3e-2)
    assert got["mixig"] == pytest.approx(ref["mixig"], abs=3e-2)


# Spectra with a clear gap around the default tolerance max(S, H) * eps_float32 (~5e-6 here): exact low rank, and
# singular values spread over ten decades (kept down to 1e-3, dropped from 1e-6).
GRAM_CASES = {
    "tall_rank_3": ((40, 12), [3.0, 1.0, 0.5]),
    "wide_rank_3": ((12, 40), [3.0, 1.0, 0.5]),
    "square_rank_1": ((16, 16), [2.0]),
    "tall_ill_conditioned": ((40, 12), [1.0, 1e-1, 1e-2, 1e-3, 1e-6, 1e-8, 1e-10]),
    "wide_ill_conditioned": ((12, 40), [1.0, 1e-1, 1e-2, 1e-3, 1e-6, 1e-8, 1e-10]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(GRAM_CASES))
def test_gram_decomposition_agrees_with_svd_on_rank_deficient_matrices(case: str, dtype: torch.dtype) -> None:
    shape, spectrum = GRAM_CASES[case]
    x = _with_spectrum(spectrum, shape, 7).to(dtype)
    want_rank = sum(s > max(shape) * RANK_EPS * spectrum[0] for s in spectrum)
    dec = decompose(x)
    # Same rank as an SVD at the same tolerance, float64 and float32 (torch.linalg.matrix_rank's own convention).
    s_ref = torch.linalg.svdvals(x.double())
    assert dec.rank() == want_rank == int((s_ref > max(shape) * RANK_EPS * s_ref[0]).sum())
    assert dec.rank() == int(torch.linalg.matrix_rank(x.float()))
    # Singular values to the Gram matrix's resolution, sqrt(max(S, H) * eps_float64) * sigma_max.
    torch.testing.assert_close(dec.singular_values, s_ref, rtol=1e-6, atol=1e-7 * float(s_ref[0]))
    # Values below that resolution count as 0: eRank moves by < 1e-6 relative (float32 rounding noise in X).
    assert dec.erank == pytest.approx(_np_erank(x.double().numpy()), rel=1e-6 if dtype == torch.float64 else 1e-5)
    # Orthonormal bases of the same subspaces as the SVD's.
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    for side, ref in (("col", u[:, :want_rank]), ("row", vh[:want_rank].T)):
        basis = dec.basis(side, want_rank).double()
        torch.testing.assert_close(basis.T @ basis, torch.eye(want_rank, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(basis @ basis.T, ref @ ref.T, atol=1e-6, rtol=0)
    # ΔD matches the float64 SVD reference; for a zero update it is the energy in the dropped singular values.
    dx = 0.1 * _rand(shape, 8, dtype=dtype)
    x_np, x_new_np = x.double().numpy(), (x + dx).double().numpy()
    got = module_stats(x, dx, kind="all")
    assert got["delta_d"] == pytest.approx(_np_delta_d(x_np, x_new_np), abs=1e-6)
    assert got["erank_x_new"] == pytest.approx(_np_erank(x_new_np), rel=1e-6)
    dropped = math.sqrt(sum(s**2 for s in spectrum[want_rank:]) / sum(s**2 for s in spectrum))
    assert module_stats(x, torch.zeros_like(x))["rid"] == pytest.approx(
        dropped, abs=1e-9 if dtype == torch.float64 else 1e-6
    )
    # With a tolerance above the smallest kept value the rank drops, as with the SVD.
    assert dec.rank(rtol=0.05) == sum(s > 0.05 * spectrum[0] for s in spectrum)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [(48, 12), (12, 48), (16, 16)], ids=["tall", "wide", "square"])
def test_full_rank_projections_match_svd_at_the_worst_conditioning(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Full rank with the smallest singular value just above the rank tolerance, the worst condition the Cholesky
    projector takes: ΔD equals the float64 SVD reference, with and without a tiny part outside X's subspaces, and
    no eigenvectors are computed."""
    n, tol = min(shape), max(shape) * RANK_EPS
    x = _with_spectrum(np.geomspace(1.0, 2 * tol, n).tolist(), shape, 3).to(dtype)
    inside = x.double() @ _rand((shape[1], shape[0]), 4) @ x.double()  # in X's column and row spaces
    for outside in (0.0, 1e-5, 0.3):
        x_new = (x.double() + 0.5 * inside / inside.norm() + outside * _rand(shape, 6)).to(dtype)
        dec = decompose(x)
        assert dec.rank() == n
        want = _np_delta_d(x.double().numpy(), x_new.double().numpy())
        got = sum(dec.outside(x_new)) / (2 * float(torch.linalg.matrix_norm(x_new.double())))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9 if dtype == torch.float64 else 2e-7)  # float32 rounding
        assert (got < 1e-6) == (outside == 0.0 or shape[0] == shape[1])  # a square X of full rank spans everything
        assert "_eigenvectors" not in vars(dec)  # Cholesky of the Gram matrix, not eigh
    rank_deficient = decompose(_with_spectrum([1.0] * (n - 1) + [0.0], shape, 3).to(dtype))
    rank_deficient.outside(x)
    assert "_eigenvectors" in vars(rank_deficient)


def test_update_stats_shares_decompositions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chained updates (attention, then FFN) decompose each of X, X_mid, X_out once (one eigvalsh each) and compute
    each TME once (two per matrix, one per update's ``tme_update``), and equal the NumPy reference."""
    calls = {"eigvalsh": 0, "tme": 0}

    def counted(name: str, function):
        def count(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return count

    monkeypatch.setattr(torch.linalg, "eigvalsh", counted("eigvalsh", torch.linalg.eigvalsh))
    monkeypatch.setattr(metrics, "_tme_from_unit", counted("tme", metrics._tme_from_unit))
    x, d_attn, d_ffn = _rand((30, 10), 11), 0.5 * _rand((30, 10), 12), 0.5 * _rand((30, 10), 13)
    before, mid, out = decompose(x), decompose(x + d_attn), decompose(x + d_attn + d_ffn)
    got = [update_stats(before, mid, kind="all"), update_stats(mid, out, kind="all")]
    assert calls == {"eigvalsh": 3, "tme": 8}
    want = [_np_all(x.numpy(), d_attn.numpy()), _np_all((x + d_attn).numpy(), d_ffn.numpy())]
    for stats, reference in zip(got, want, strict=True):
        assert stats == pytest.approx(reference, abs=1e-9)
    backwards = update_stats(out, mid)  # kind="paper", from the decompositions already made
    assert calls == {"eigvalsh": 3, "tme": 8}
    assert backwards == pytest.approx({k: v for k, v in _np_all(out.x.numpy(), -d_ffn.numpy()).items()
                                       if k in ("rid", "mixig")}, abs=1e-9)
    with pytest.raises(ValueError, match=r"after must match before's shape \(30, 10\)"):
        update_stats(before, decompose(x[:5]))
    with pytest.raises(ValueError, match=r"kind must be one of"):
        update_stats(before, mid, kind="some")


# --------------------------------------------------------------------------------------------------- closed forms


def test_erank_identity_and_rank_one() -> None:
    for n in (1, 3, 7):
        assert erank(torch.eye(n)) == pytest.approx(n, rel=1e-6)
    assert erank(torch.eye(4, 9)) == pytest.approx(4, rel=1e-6)
    assert erank(torch.outer(torch.arange(1.0, 6.0), torch.randn(8))) == pytest.approx(1.0, abs=1e-5)


def test_erank_known_spectrum_and_zero_matrix() -> None:
    # p = (1/2, 1/4, 1/4): entropy = 1.5 log 2, eRank = 2^1.5.
    assert erank(_with_spectrum([2.0, 1.0, 1.0], (9, 6), 5)) == pytest.approx(2**1.5, rel=1e-9)
    assert erank(torch.zeros(5, 3)) == 0.0


def test_delta_s_known_spectra() -> None:
    x = _with_spectrum([1.0, 1.0], (8, 4), 6)  # eRank 2
    x_new = _with_spectrum([5.0, 5.0, 5.0, 5.0], (8, 4), 8)  # eRank 4
    assert delta_s(x, x_new) == pytest.approx(abs(4 - 2) / 4, abs=1e-9)
    assert delta_s(x_new, x) == pytest.approx(0.5, abs=1e-9)
    y = _with_spectrum([2.0, 1.0, 1.0], (5, 7), 10)  # eRank 2^1.5
    y_new = _with_spectrum([3.0], (5, 7), 12)  # eRank 1
    assert delta_s(y, y_new) == pytest.approx((2**1.5 - 1) / 5, abs=1e-9)
    # Scaling does not change the spectrum's shape: ΔS = 0.
    assert delta_s(y, 7.0 * y) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (9, 9)])
def test_rid_of_zero_update_is_zero(shape: tuple[int, int], dtype: torch.dtype) -> None:
    x = _rand(shape, 20, dtype=dtype)
    assert rid(x, x) == pytest.approx(0.0, abs=1e-6)
    assert module_stats(x, torch.zeros_like(x))["rid"] == pytest.approx(0.0, abs=1e-6)
    low_rank = _rand(shape, 21, rank=2, dtype=dtype)
    assert rid(low_rank, low_rank.clone()) == pytest.approx(0.0, abs=1e-6)


def test_delta_d_zero_when_update_inside_both_spaces() -> None:
    x = _rand((10, 14), 30, rank=3)
    u, s, vh = np.linalg.svd(x.numpy())
    p_c, p_r = u[:, :3] @ u[:, :3].T, vh[:3].T @ vh[:3]
    m = _rand((3, 3), 31).numpy()
    updates = {
        "x_xtx": 0.05 * x @ x.T @ x,  # columns are mixes of X's columns, rows are rows of X^T X: inside both spaces
        "u_m_vt": torch.from_numpy(u[:, :3] @ m @ vh[:3]),
    }
    for name, dx in updates.items():
        d = dx.numpy()
        # The construction really lies inside both spaces (checked with explicit projectors) ...
        assert np.linalg.norm(d - p_c @ d) < 1e-9 * np.linalg.norm(d), name
        assert np.linalg.norm(d - d @ p_r) < 1e-9 * np.linalg.norm(d), name
        # ... and is not a trivial update.
        assert np.linalg.norm(d) > 0.1, name
        assert delta_d(x, x + dx) == pytest.approx(0.0, abs=1e-9), name
        assert delta_d(x.float(), (x + dx).float()) == pytest.approx(0.0, abs=1e-5), name
    # Sanity check of the construction: a generic update of the same size is far from 0.
    assert delta_d(x, x + _rand((10, 14), 32)) > 0.3


def test_delta_d_update_orthogonal_to_both_spaces_closed_form() -> None:
    s_rows, h_cols, a, b = 9, 11, 4, 5
    x = torch.zeros(s_rows, h_cols, dtype=torch.float64)
    x[:a, :b] = _rand((a, b), 40)  # full rank 4: column space = e_0..e_3, row space = e_0..e_4
    dx = torch.zeros_like(x)
    dx[a:, b:] = _rand((s_rows - a, h_cols - b), 41)
    # (I - P_C) X' = dX and X' (I - P_R) = dX, so ΔD = 2 ||dX|| / (2 ||X + dX||) = ||dX|| / sqrt(||X||² + ||dX||²).
    n_x, n_dx = float(x.norm()), float(dx.norm())
    want = n_dx / math.sqrt(n_x**2 + n_dx**2)
    assert 0.3 < want < 1.0
    assert delta_d(x, x + dx) == pytest.approx(want, abs=1e-12)
    assert delta_d(x.float(), (x + dx).float()) == pytest.approx(want, abs=1e-6)
    assert rid(x, x + dx) >= want

    # Update in X's token space but outside its feature space: only the row-space residual, = dX.
    dx_rows = torch.zeros_like(x)
    dx_rows[:a, b:] = _rand((a, h_cols - b), 42)
    n_dx = float(dx_rows.norm())
    assert delta_d(x, x + dx_rows) == pytest.approx(n_dx / (2 * math.sqrt(n_x**2 + n_dx**2)), abs=1e-12)

    # X = 0 has rank 0: everything in X' is new.
    assert delta_d(torch.zeros_like(x), dx) == pytest.approx(1.0, abs=1e-12)
    # ||X'|| = 0: defined as 0.
    assert delta_d(x, torch.zeros_like(x)) == 0.0


@pytest.mark.parametrize("combine", ["mean", "l2", "sum"])
@pytest.mark.parametrize("case", ["tall", "wide_rank_deficient"])
def test_combine_and_reference_match_numpy(case: str, combine: str) -> None:
    """Each ΔD combination, with the update measured against its own input and against an earlier stream (the
    layer's input for the FFN), against the float64 NumPy reference."""
    shape, rank = REFERENCE_CASES[case]
    x_in = _rand(shape, 5, rank=rank)
    x = x_in + 0.2 * _rand(shape, 6)
    dx = 0.3 * _rand(shape, 7)
    for reference in (None, x_in):
        got = update_stats(
            decompose(x),
            decompose(x + dx),
            kind="all",
            combine=combine,
            reference=None if reference is None else decompose(reference),
        )
        want = _np_all(x.numpy(), dx.numpy(), combine, None if reference is None else reference.numpy())
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-9 * max(1.0, abs(value))), (key, combine, reference is None)
    assert delta_d(x, x + dx, combine=combine) == pytest.approx(_np_delta_d(x.numpy(), (x + dx).numpy(), combine))
    assert rid(x, x + dx, combine=combine) == pytest.approx(_np_all(x.numpy(), dx.numpy(), combine)["rid"])


def test_combinations_of_an_update_orthogonal_to_both_spaces() -> None:
    """Both residual ratios are r = ||dX|| / sqrt(||X||² + ||dX||²): mean r, l2 √2·r, sum 2r; one ratio only
    (an update in X's token space, outside its feature space): mean r/2, l2 r, sum r."""
    x = torch.zeros(9, 11, dtype=torch.float64)
    x[:4, :5] = _rand((4, 5), 40)
    dx = torch.zeros_like(x)
    dx[4:, 5:] = _rand((5, 6), 41)
    r = float(dx.norm()) / math.sqrt(float(x.norm()) ** 2 + float(dx.norm()) ** 2)
    for combine, factor in (("mean", 1.0), ("l2", math.sqrt(2.0)), ("sum", 2.0)):
        assert delta_d(x, x + dx, combine=combine) == pytest.approx(factor * r, abs=1e-12)
    dx_rows = torch.zeros_like(x)
    dx_rows[:4, 5:] = _rand((4, 6), 42)
    r = float(dx_rows.norm()) / math.sqrt(float(x.norm()) ** 2 + float(dx_rows.norm()) ** 2)
    for combine, factor in (("mean", 0.5), ("l2", 1.0), ("sum", 1.0)):
        assert delta_d(x, x + dx_rows, combine=combine) == pytest.approx(factor * r, abs=1e-12)
    with pytest.raises(ValueError, match=r"combine must be one of \('mean', 'l2', 'sum'\); got 'max'"):
        delta_d(x, x + dx, combine="max")


def test_a_zero_ffn_update_gives_the_attention_rid_against_the_layer_input() -> None:
    """Layer reference: the FFN's RID is that of the layer's input -> the stream after the FFN; with a zero FFN
    update that stream is the one after attention, so the FFN's RID equals the attention's."""
    x_in = _rand((20, 12), 60)
    mid = x_in + 0.4 * _rand((20, 12), 61)
    attention = update_stats(decompose(x_in), decompose(mid), kind="all")
    ffn = update_stats(decompose(mid), decompose(mid.clone()), kind="all", reference=decompose(x_in))
    assert ffn["rid"] == pytest.approx(attention["rid"], abs=1e-12)
    assert ffn["delta_d"] == pytest.approx(attention["delta_d"], abs=1e-12)
    assert ffn["mixig"] == 0.0  # MixIG stays the module's own: TME(X') - TME(X) with X' = X
    assert update_stats(decompose(mid), decompose(mid.clone()))["rid"] == pytest.approx(0.0, abs=1e-12)


def test_delta_d_rtol_override() -> None:
    x = _with_spectrum([1.0, 1e-3], (6, 8), 50)
    dx = 1e-3 * _rand((6, 8), 51)
    # Default tolerance keeps sigma = 1e-3 (rank 2); rtol=1e-2 drops it (rank 1): more of X' lies outside.
    assert delta_d(x, x + dx, rtol=1e-2) > delta_d(x, x + dx)
    assert rid(x, x + dx, rtol=1e-2) > rid(x, x + dx)
    assert module_stats(x, dx, kind="all", rtol=1e-2)["delta_d"] == pytest.approx(delta_d(x, x + dx, rtol=1e-2))


@pytest.mark.parametrize(("dtype", "scales"), [(torch.float32, (1e-30, 1e19, 1e30)),
                                              (torch.float64, (1e-300, 1e-200, 1e200, 1e300))])
def test_statistics_do_not_depend_on_the_magnitude_of_the_stream(dtype: torch.dtype, scales: tuple[float, ...]) -> None:
    """Every statistic is a ratio: X and X' scaled together (or X alone) give the values at scale 1, down to where
    squares would underflow and up to where they would overflow."""
    x, dx = _rand((6, 9), 60, rank=4, dtype=dtype), _rand((6, 9), 61, dtype=dtype)
    expected = module_stats(x, dx, kind="all")
    for scale in scales:
        got = module_stats(x * scale, dx * scale, kind="all")
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), scale
        assert rid(x * scale, x + dx) == pytest.approx(rid(x, x + dx), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_rid_within_bounds_on_random_matrices(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    s_rows, h_cols = (int(v) for v in torch.randint(2, 30, (2,), generator=gen))
    rank = int(torch.randint(1, min(s_rows, h_cols) + 1, (1,), generator=gen))
    x = _rand((s_rows, h_cols), 100 + seed, rank=rank, dtype=torch.float32)
    scale = float(10 ** torch.empty(1).uniform_(-3, 3, generator=gen))
    stats = module_stats(x, scale * _rand((s_rows, h_cols), 200 + seed, dtype=torch.float32), kind="all")
    assert 0.0 <= stats["rid"] <= 2.0
    assert 0.0 <= stats["delta_s"] <= 1.0 and 0.0 <= stats["delta_d"] <= 1.0
    assert -1.0 <= stats["mixig"] <= 1.0 and -1.0 <= stats["mixig_mean"] <= 1.0
    assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("agg", ["last", "mean"])
def test_tme_identical_rows_is_one(agg: str) -> None:
    row = torch.randn(16)
    x = row.repeat(7, 1) * torch.arange(1.0, 8.0)[:, None]  # same direction, different norms
    for alpha in (1.0, 8.0, 0.5):
        assert tme(x, alpha=alpha, agg=agg) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tme_of_uniform_similarities_stays_within_one(dtype: torch.dtype) -> None:
    """Identical rows give a uniform row of P, whose entropy / log S rounds to just above 1 for some S."""
    for n_tokens in range(2, 40):
        for agg in ("last", "mean"):
            value = tme(torch.ones(n_tokens, 4, dtype=dtype), agg=agg)
            assert 1.0 - 1e-6 < value <= 1.0, (n_tokens, agg, value)


@pytest.mark.parametrize(("dtype", "scales"), [(torch.float32, (1e-9, 1e4, 1e-30)), (torch.float64, (1e-13, 1e200))])
@pytest.mark.parametrize("agg", ["last", "mean"])
def test_tme_depends_on_each_rows_direction_only(dtype: torch.dtype, scales: tuple[float, ...], agg: str) -> None:
    """Rows are L2-normalised before anything else: scaling single rows, even far below the others, changes nothing."""
    x = _rand((6, 5), 62, dtype=dtype)
    expected = tme(x, agg=agg)
    for row, scale in enumerate(scales):
        x[-1 - row] *= scale
        assert tme(x, agg=agg) == pytest.approx(expected, abs=1e-5), (row, scale)


def test_tme_normalises_a_row_of_subnormal_numbers() -> None:
    """A float64 row of small integers times 2^-1070 (subnormal, held exactly) is normalised like the integers."""
    x = _rand((6, 5), 63, dtype=torch.float64)
    x[-1] = torch.tensor([3.0, -1.0, 2.0, 0.0, 5.0], dtype=torch.float64)
    expected = {agg: tme(x, agg=agg) for agg in ("last", "mean")}
    x[-1] *= 2.0**-1070
    assert {agg: tme(x, agg=agg) for agg in ("last", "mean")} == pytest.approx(expected, abs=1e-12)


def test_tme_closed_form_two_orthogonal_rows() -> None:
    # Orthogonal rows: w = [1, (1/2)^alpha] for each row, so H = entropy of that normalised pair, over log 2.
    x = torch.eye(2, 5)
    alpha = 3.0
    p = torch.tensor([1.0, 0.5**alpha], dtype=torch.float64)
    p = p / p.sum()
    want = float(-(p * p.log()).sum() / math.log(2))
    assert tme(x, alpha=alpha, agg="last") == pytest.approx(want, abs=1e-6)
    assert tme(x, alpha=alpha, agg="mean") == pytest.approx(want, abs=1e-6)


def test_tme_zero_row_is_finite() -> None:
    x = _rand((5, 4), 60)
    x[-1] = 0.0
    # All-zero last row: cosine 0 with every row, so w = (1/2)^alpha everywhere and P_S is uniform.
    assert tme(x, agg="last") == pytest.approx(1.0, abs=1e-12)
    assert math.isfinite(tme(x, agg="mean"))


@pytest.mark.parametrize("agg", ["last", "mean"])
def test_mixig_of_zero_update_is_zero(agg: str) -> None:
    x = _rand((12, 6), 70, dtype=torch.float32)
    assert mixig(x, x, agg=agg) == 0.0
    assert module_stats(x, torch.zeros_like(x), kind="all")["mixig"] == 0.0
    assert module_stats(x, torch.zeros_like(x), kind="all")["mixig_mean"] == 0.0


def test_mean_aggregation_invariant_to_token_order() -> None:
    x, x_new = _rand((15, 7), 80), _rand((15, 7), 81)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(perm, torch.arange(15))
    assert tme(x[perm], agg="mean", alpha=1.0) == pytest.approx(tme(x, agg="mean", alpha=1.0), abs=1e-12)
    assert mixig(x[perm], x_new[perm], agg="mean") == pytest.approx(mixig(x, x_new, agg="mean"), abs=1e-12)
    # RID does not depend on token order either (singular values and subspaces are permutation-equivariant).
    assert rid(x[perm], x_new[perm]) == pytest.approx(rid(x, x_new), abs=1e-12)
    # agg="last" does depend on which token is last.
    assert tme(x[perm], agg="last") != pytest.approx(tme(x, agg="last"), abs=1e-6)


# --------------------------------------------------------------------------------------------------- token cap


@pytest.mark.parametrize("n_tokens,max_tokens", [(5, 2), (10, 3), (1000, 7), (1025, 1024), (4097, 1024), (7, 6)])
def test_select_tokens_subsample_properties(n_tokens: int, max_tokens: int) -> None:
    idx = select_tokens(n_tokens, max_tokens)
    assert idx.dtype == torch.long
    assert idx.numel() == max_tokens
    assert int(idx[0]) == 0 and int(idx[-1]) == n_tokens - 1
    assert bool((idx[1:] > idx[:-1]).all())  # sorted and unique
    # Evenly spaced: within rounding of linspace(0, n - 1, max_tokens).
    grid = np.linspace(0, n_tokens - 1, max_tokens)
    assert np.abs(idx.numpy() - grid).max() <= 0.5
    assert torch.equal(idx, select_tokens(n_tokens, max_tokens))  # deterministic


def test_select_tokens_known_values_and_no_cap() -> None:
    assert select_tokens(10, 4).tolist() == [0, 3, 6, 9]
    assert select_tokens(5, 3).tolist() == [0, 2, 4]
    assert select_tokens(6, 3).tolist() == [0, 3, 5]  # 2.5 rounds half up
    assert select_tokens(4, 4).tolist() == [0, 1, 2, 3]
    assert select_tokens(3, 1024).tolist() == [0, 1, 2]
    assert select_tokens(1, 2).tolist() == [0]


def test_module_stats_uses_capped_rows() -> None:
    x, dx = _rand((50, 6), 90), _rand((50, 6), 91)
    idx = select_tokens(50, 8)
    got = module_stats(x, dx, kind="all", max_tokens=8)
    want = module_stats(x[idx], dx[idx], kind="all")
    assert got == pytest.approx(want, abs=1e-12)
    assert got["mixig"] != pytest.approx(module_stats(x, dx)["mixig"], abs=1e-6)


# --------------------------------------------------------------------------------------------------- bad input


def _x() -> torch.Tensor:
    return _rand((6, 4), 99)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: erank(torch.ones(3)), r"x must be 2-D.*\(3,\)"),
        (lambda: erank(torch.ones(2, 3, 4)), r"x must be 2-D.*\(2, 3, 4\)"),
        (lambda: erank(torch.ones(0, 3)), r"x must have at least one row.*\(0, 3\)"),
        (lambda: erank(np.ones((3, 3))), r"x must be a torch.Tensor.*ndarray"),
        (lambda: erank(torch.ones(3, 3, dtype=torch.complex64)), r"x must be a real.*complex64"),
        (lambda: erank(torch.ones(3, 3, dtype=torch.bool)), r"x must be a real.*torch.bool"),
        (lambda: delta_s(_x(), torch.ones(5, 4)), r"x_new must have the same shape as x \(6, 4\).*\(5, 4\)"),
        (lambda: delta_d(_x(), torch.ones(6, 5)), r"x_new must have the same shape"),
        (lambda: rid(torch.full((6, 4), math.nan), _x()), r"x must contain only finite values; got 24 NaN/inf"),
        (lambda: rid(_x(), torch.full((6, 4), math.inf)), r"x_new must contain only finite"),
        (lambda: mixig(_x(), torch.ones(4, 4)), r"x_new must have the same shape"),
        (lambda: tme(_x(), alpha=0.0), r"alpha must be a finite number > 0; got 0.0"),
        (lambda: tme(_x(), alpha=-1), r"alpha must be a finite number > 0; got -1"),
        (lambda: tme(_x(), alpha=math.nan), r"alpha must be a finite number > 0; got nan"),
        (lambda: tme(_x(), alpha=math.inf), r"alpha must be a finite number > 0; got inf"),
        (lambda: tme(_x(), alpha="8"), r"alpha must be a finite number > 0; got '8'"),
        (lambda: mixig(_x(), _x(), alpha=-2.0), r"alpha must be .*got -2.0"),
        (lambda: tme(_x(), agg="max"), r"agg must be one of \('last', 'mean'\); got 'max'"),
        (lambda: mixig(_x(), _x(), agg="first"), r"agg must be one of .*'first'"),
        (lambda: tme(torch.ones(1, 4)), r"x must have at least 2 rows.*\(1, 4\)"),
        (lambda: mixig(torch.ones(1, 4), torch.ones(1, 4)), r"x must have at least 2 rows"),
        (lambda: delta_d(_x(), _x(), rtol=-1e-3), r"rtol must be None .* >= 0; got -0.001"),
        (lambda: rid(_x(), _x(), rtol=math.inf), r"rtol must be .*got inf"),
        (lambda: select_tokens(10, 1), r"max_tokens must be an integer >= 2; got 1"),
        (lambda: select_tokens(10, 2.5), r"max_tokens must be an integer >= 2; got 2.5"),
        (lambda: select_tokens(0, 4), r"n_tokens must be an integer >= 1; got 0"),
        (lambda: module_stats(_x(), _x(), max_tokens=1), r"max_tokens must be an integer >= 2; got 1"),
        (lambda: module_stats(_x(), _x(), kind="some"), r"kind must be one of \('paper', 'all'\); got 'some'"),
        (lambda: module_stats(_x(), torch.ones(6, 3)), r"dx must have the same shape as x \(6, 4\).*\(6, 3\)"),
        (lambda: module_stats(_x(), torch.full((6, 4), math.nan)), r"dx must contain only finite"),
        (lambda: module_stats(torch.ones(1, 4), torch.ones(1, 4)), r"x must have at least 2 rows"),
        (lambda: module_stats(_x(), _x(), rtol=-1.0), r"rtol must be"),
        (
            lambda: module_stats(torch.full((3, 2), 3e38), torch.full((3, 2), 3e38)),
            r"x \+ dx overflows",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
