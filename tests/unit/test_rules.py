"""The four update rules (blue_plugin.editing.rules) against independently computed closed forms.

Pure linear algebra in float64 on random matrices; no model involved. Shapes follow rules.py:
K (d_in, n), R (d_out, n), C0 / KpKp / P (d_in, d_in), W and Delta (d_out, d_in).
"""
from __future__ import annotations

import math

import pytest
import torch

from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.editing.rules import (
    RULES,
    LayerInputs,
    alphaedit_delta,
    get_rule,
    memit_delta,
    null_space_projector,
    prune_restrain,
    rect_sparsify,
)
from tests.tiny import low_rank_c0, spd

D_OUT, D_IN, N = 12, 20, 5
F64 = torch.float64


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=F64)


def _sqrt_psd(C: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(C)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


# ---- MEMIT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("with_kp", [False, True])
@pytest.mark.parametrize("lam", [0.5, 15000.0])
def test_memit_matches_regularised_least_squares(with_kp, lam):
    """Delta^T solves min ||K^T X - R^T||^2 + lam ||C0^1/2 X||^2 + ||Kp^T X||^2 (earlier keys
    keep their outputs): solved here as one stacked least-squares problem with lstsq."""
    K, R, C0 = _rand(D_IN, N, seed=1), _rand(D_OUT, N, seed=2), spd(D_IN, seed=3)
    Kp = _rand(D_IN, 7, seed=4) if with_kp else None
    A = [K.T, math.sqrt(lam) * _sqrt_psd(C0)]
    B = [R.T, torch.zeros(D_IN, D_OUT, dtype=F64)]
    if with_kp:
        A.append(Kp.T)
        B.append(torch.zeros(Kp.shape[1], D_OUT, dtype=F64))
    X = torch.linalg.lstsq(torch.cat(A), torch.cat(B), driver="gelsd").solution
    delta = memit_delta(K, R, C0, lam, Kp @ Kp.T if with_kp else None)
    assert delta.shape == (D_OUT, D_IN)
    assert torch.allclose(delta, X.T, rtol=1e-8, atol=1e-12 * max(1.0, float(X.abs().max())))


def test_memit_matches_explicit_inverse():
    K, R, C0, Kp = _rand(D_IN, N, seed=5), _rand(D_OUT, N, seed=6), spd(D_IN, seed=7), _rand(D_IN, 3, seed=8)
    expected = R @ K.T @ torch.linalg.inv(2.0 * C0 + Kp @ Kp.T + K @ K.T)
    assert torch.allclose(memit_delta(K, R, C0, 2.0, Kp @ Kp.T), expected, rtol=1e-9, atol=1e-12)


def test_memit_unregularised_limit_hits_the_residuals():
    """With lambda -> 0 (n < d_in keys) the update maps each key exactly onto its residual."""
    K, R = _rand(D_IN, N, seed=9), _rand(D_OUT, N, seed=10)
    delta = memit_delta(K, R, spd(D_IN, seed=11), 1e-9)
    assert torch.allclose(delta @ K, R, rtol=1e-6, atol=1e-7)
    # ... and a strongly regularised update does not (the prior matters).
    assert not torch.allclose(memit_delta(K, R, spd(D_IN, seed=11), 1e3) @ K, R, atol=1e-2)


# ---- AlphaEdit ---------------------------------------------------------------------------------


def test_null_space_projector():
    C0, U = low_rank_c0(D_IN, rank=13, seed=1)
    P, rank = null_space_projector(C0, threshold=1e-2)
    assert rank == D_IN - 13
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert torch.allclose(P @ C0, torch.zeros_like(C0), atol=1e-10)  # P kills the preserved keys' span
    assert torch.allclose(P @ U, torch.zeros_like(U), atol=1e-10)
    expected = torch.eye(D_IN, dtype=F64) - U @ U.T  # complement of span(U), computed independently
    assert torch.allclose(P, expected, atol=1e-10)


def test_null_space_projector_threshold():
    """Eigenvalues below the threshold count as null space, above it as preserved."""
    evecs, _ = torch.linalg.qr(_rand(6, 6, seed=3))
    evals = torch.tensor([1e-5, 1e-3, 0.05, 0.5, 1.0, 2.0], dtype=F64)
    C0 = (evecs * evals) @ evecs.T
    for threshold, expected_rank in [(1e-6, 0), (1e-2, 2), (0.1, 3), (10.0, 6)]:
        P, rank = null_space_projector(C0, threshold)
        assert rank == expected_rank
        assert torch.allclose(P, evecs[:, :expected_rank] @ evecs[:, :expected_rank].T, atol=1e-10)


@pytest.mark.parametrize("with_kp", [False, True])
def test_alphaedit_matches_paper_form(with_kp):
    """The paper's form Delta = R K^T P ((KpKp + K K^T) P + L2 I)^-1 (explicit inverse)."""
    K, R = _rand(D_IN, N, seed=1), _rand(D_OUT, N, seed=2)
    C0, _ = low_rank_c0(D_IN, rank=8, seed=3)
    P, _ = null_space_projector(C0, 1e-2)
    KpKp = (lambda Kp: Kp @ Kp.T)(_rand(D_IN, 4, seed=4)) if with_kp else torch.zeros(D_IN, D_IN, dtype=F64)
    L2 = 10.0
    expected = R @ K.T @ P @ torch.linalg.inv((KpKp + K @ K.T) @ P + L2 * torch.eye(D_IN, dtype=F64))
    delta = alphaedit_delta(K, R, P, L2, KpKp if with_kp else None)
    assert delta.shape == (D_OUT, D_IN)
    assert torch.allclose(delta, expected, rtol=1e-8, atol=1e-12)


def test_alphaedit_leaves_preserved_keys_unchanged():
    """Keys in the span of C0's large eigenvectors (the preserved knowledge) get Delta k = 0,
    while the edit keys do move."""
    C0, U = low_rank_c0(D_IN, rank=12, seed=5)
    P, rank = null_space_projector(C0, 2e-2)
    assert rank == D_IN - 12
    K, R = _rand(D_IN, N, seed=6), _rand(D_OUT, N, seed=7)
    Kp = _rand(D_IN, 3, seed=8)
    delta = alphaedit_delta(K, R, P, 1.0, Kp @ Kp.T)
    preserved = U @ _rand(12, 30, seed=9)  # 30 keys drawn from the preserved span
    assert float((delta @ preserved).abs().max()) < 1e-10 * float(delta.abs().max())
    assert torch.allclose(delta, delta @ P, atol=1e-12)  # Delta lives in the null space
    assert float((delta @ K).norm()) > 0.1 * float(R.norm())


def test_alphaedit_small_l2_fits_projected_keys():
    """With a tiny ridge term the update reproduces the residuals on the projected keys'
    span (as far as P K spans them)."""
    C0, _ = low_rank_c0(D_IN, rank=6, seed=1)
    P, _ = null_space_projector(C0, 1e-2)
    K, R = _rand(D_IN, N, seed=2), _rand(D_OUT, N, seed=3)
    delta = alphaedit_delta(K, R, P, 1e-9)
    assert torch.allclose(delta @ K, R, rtol=1e-5, atol=1e-6)


# ---- RECT -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.05, 0.4, 0.77])
def test_rect_keeps_top_fraction_by_relative_change(fraction):
    delta, W = _rand(D_OUT, D_IN, seed=1), _rand(D_OUT, D_IN, seed=2)
    out = rect_sparsify(delta, W, fraction)
    k = round(fraction * delta.numel())
    kept = out != 0
    assert int(kept.sum()) == k  # random entries: no ties
    assert int(kept.sum()) <= math.ceil(fraction * delta.numel())
    assert torch.equal(out[kept], delta[kept])  # kept entries are untouched
    rel = (delta.abs() / W.abs()).flatten()
    top = torch.zeros(delta.numel(), dtype=torch.bool)
    top[torch.argsort(rel, descending=True)[:k]] = True
    assert torch.equal(kept.flatten(), top)


def test_rect_full_fraction_and_zero_weights():
    delta, W = _rand(4, 5, seed=1), _rand(4, 5, seed=2)
    assert torch.equal(rect_sparsify(delta, W, 1.0), delta)
    W[0, 0] = 0.0  # a zero weight must not make the relative change NaN
    out = rect_sparsify(delta, W, 0.1)
    assert torch.isfinite(out).all()
    assert out[0, 0] == delta[0, 0]  # infinite relative change: kept first
    assert int((out != 0).sum()) == 2


# ---- PRUNE ------------------------------------------------------------------------------------


def _with_singular_values(U, Vh, s):
    return (U[:, : len(s)] * s) @ Vh[: len(s)]


def test_prune_restrains_large_singular_values_closed_form():
    """Singular values s of W_new - W_orig above sigma_max(W_orig) become
    log(s) - log(sigma_max) + sigma_max; the others and the singular vectors stay."""
    W_orig = _rand(D_OUT, D_IN, seed=1)
    sigma_max = float(torch.linalg.matrix_norm(W_orig, ord=2))
    U, _ = torch.linalg.qr(_rand(D_OUT, D_OUT, seed=2))
    V, _ = torch.linalg.qr(_rand(D_IN, D_IN, seed=3))
    s = torch.tensor([8.0, 3.0, 1.5, 0.5, 0.1], dtype=F64) * sigma_max
    D = _with_singular_values(U, V.T, s)
    out = prune_restrain(W_orig + D, W_orig, sigma_max)
    s_exp = torch.where(s > sigma_max, torch.log(s) - math.log(sigma_max) + sigma_max, s)
    assert torch.allclose(out - W_orig, _with_singular_values(U, V.T, s_exp), rtol=1e-9, atol=1e-10)
    s_new = torch.linalg.svdvals(out - W_orig)[: len(s)]
    assert torch.allclose(s_new, s_exp, rtol=1e-9)
    # The restraint only shrinks, and what was above sigma_max stays within log(s / sigma_max) of it.
    assert bool((s_new <= s + 1e-9).all())
    above = s > sigma_max
    assert bool((s_new[above] < s[above]).all())
    assert bool((s_new[above] <= sigma_max + torch.log(s[above] / sigma_max) + 1e-9).all())


def test_prune_below_threshold_is_identity():
    W_orig = _rand(D_OUT, D_IN, seed=4)
    sigma_max = float(torch.linalg.matrix_norm(W_orig, ord=2))
    D = _rand(D_OUT, D_IN, seed=5)
    D = D * (0.9 * sigma_max / float(torch.linalg.matrix_norm(D, ord=2)))
    assert torch.equal(prune_restrain(W_orig + D, W_orig, sigma_max), W_orig + D)


def test_prune_accumulated_change_is_what_gets_restrained():
    """The change is measured from the ORIGINAL weight (accumulated over batches), not from the
    weight before the current batch."""
    W_orig = _rand(D_OUT, D_IN, seed=6)
    sigma_max = float(torch.linalg.matrix_norm(W_orig, ord=2))
    step = _rand(D_OUT, D_IN, seed=7)
    step = step * (0.6 * sigma_max / float(torch.linalg.matrix_norm(step, ord=2)))
    W1 = prune_restrain(W_orig + step, W_orig, sigma_max)  # 0.6 sigma_max: untouched
    assert torch.equal(W1, W_orig + step)
    W2 = prune_restrain(W1 + step, W_orig, sigma_max)  # accumulated 1.2 sigma_max: restrained
    top = float(torch.linalg.matrix_norm(W2 - W_orig, ord=2))
    assert top == pytest.approx(math.log(1.2) + sigma_max, rel=1e-9)


# ---- the rule interface -------------------------------------------------------------------------


def _inputs(with_kp=True, seed=0):
    K, R, W = _rand(D_IN, N, seed=seed + 1), _rand(D_OUT, N, seed=seed + 2), _rand(D_OUT, D_IN, seed=seed + 3)
    C0, _ = low_rank_c0(D_IN, rank=10, seed=seed + 4)
    C0 = C0 + 1e-3 * torch.eye(D_IN, dtype=F64)
    P, _ = null_space_projector(C0, 2e-2)
    Kp = _rand(D_IN, 3, seed=seed + 5)
    sigma_max = float(torch.linalg.matrix_norm(W, ord=2))
    return LayerInputs(W=W, K=K, R=R, C0=C0, KpKp=Kp @ Kp.T if with_kp else None, P=P, W_orig=W.clone(), sigma_max=sigma_max)


def test_rules_dispatch_to_their_closed_forms():
    """Defaults (the references): RECT's walk update is MEMIT's dense one and the mask applies to
    the batch's update when it is written; PRUNE restrains once per sequence, not per layer."""
    hp = BLUEHyperParams(mom2_update_weight=3.0, L2=2.0, rect_keep_fraction=0.3)
    assert hp.rect_mask_timing == "batch" and hp.prune_timing == "sequence"
    x = _inputs()
    memit = memit_delta(x.K, x.R, x.C0, 3.0, x.KpKp)
    assert torch.allclose(get_rule("MEMIT").delta(x, hp), memit, rtol=1e-12)
    assert torch.allclose(get_rule("RECT").delta(x, hp), memit, rtol=1e-12)
    assert get_rule("RECT").adjusts_batch(hp)
    assert torch.equal(get_rule("RECT").batch_update(memit, x.W, hp), rect_sparsify(memit, x.W, 0.3))
    assert torch.allclose(get_rule("PRUNE").delta(x, hp), memit, rtol=1e-12)
    assert torch.allclose(get_rule("AlphaEdit").delta(x, hp), alphaedit_delta(x.K, x.R, x.P, 2.0, x.KpKp), rtol=1e-12)
    big = x.W + 50 * memit / float(torch.linalg.matrix_norm(memit, ord=2)) * x.sigma_max
    for name in RULES:
        assert torch.equal(get_rule(name).finalize(big, x, hp), big)
        assert get_rule(name).restrains_sequence(hp) == (name == "PRUNE")
        if name != "RECT":
            assert not get_rule(name).adjusts_batch(hp) and torch.equal(get_rule(name).batch_update(memit, x.W, hp), memit)
    served, info = get_rule("PRUNE").restrain_sequence(big, x.W_orig, x.sigma_max)
    assert torch.allclose(served, prune_restrain(big, x.W_orig, x.sigma_max)) and info["above"] >= 1


def test_rules_per_layer_and_per_batch_timings():
    """rect_mask_timing 'layer' / prune_timing 'batch': the mask and the restraint apply to each
    layer's new weight (the behaviour before the reference timings were the default)."""
    hp = BLUEHyperParams(mom2_update_weight=3.0, rect_keep_fraction=0.3, rect_mask_timing="layer", prune_timing="batch")
    x = _inputs()
    memit = memit_delta(x.K, x.R, x.C0, 3.0, x.KpKp)
    assert torch.allclose(get_rule("RECT").delta(x, hp), rect_sparsify(memit, x.W, 0.3), rtol=1e-12)
    assert not get_rule("RECT").adjusts_batch(hp)
    assert torch.equal(get_rule("RECT").batch_update(memit, x.W, hp), memit)
    big = x.W + 50 * memit / float(torch.linalg.matrix_norm(memit, ord=2)) * x.sigma_max
    assert torch.allclose(get_rule("PRUNE").finalize(big, x, hp), prune_restrain(big, x.W_orig, x.sigma_max))
    assert not get_rule("PRUNE").restrains_sequence(hp)


def test_rule_flags():
    assert set(RULES) == {"MEMIT", "RECT", "PRUNE", "AlphaEdit"}
    for name in ("MEMIT", "RECT", "PRUNE"):
        hp_acc = BLUEHyperParams(base_method=name, accumulate_keys=True)
        hp_no = BLUEHyperParams(base_method=name, accumulate_keys=False)
        assert get_rule(name).uses_kpkp(hp_acc) and not get_rule(name).uses_kpkp(hp_no)
    # accumulate_keys null (default): as the reference evaluations, MEMIT_seq and AlphaEdit
    # accumulate, RECT and PRUNE run on plain MEMIT.
    for name, expected in (("MEMIT", True), ("RECT", False), ("PRUNE", False), ("AlphaEdit", True)):
        assert get_rule(name).uses_kpkp(BLUEHyperParams(base_method=name)) is expected
    hp_no = BLUEHyperParams(base_method="AlphaEdit", accumulate_keys=False)
    assert get_rule("AlphaEdit").uses_kpkp(hp_no)  # AlphaEdit always includes K_p K_p^T
    assert get_rule("AlphaEdit").needs_projector and get_rule("PRUNE").needs_original
    with pytest.raises(ValueError, match="MEMIT"):
        get_rule("memit_typo")


def test_rules_keep_input_dtype():
    x32 = _inputs()
    x32 = LayerInputs(**{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in vars(x32).items()})
    hp = BLUEHyperParams()
    for name in RULES:
        assert get_rule(name).delta(x32, hp).dtype == torch.float32
