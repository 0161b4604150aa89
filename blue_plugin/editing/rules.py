"""The four base methods' update rules behind one interface.

Shapes: ``K`` (d_in, n) keys, ``R`` (d_out, n) residuals, ``C0`` / ``KpKp`` / ``P`` (d_in, d_in),
``W`` and every returned update ``Delta`` (d_out, d_in). All arithmetic happens in the dtype of
the inputs (the engine passes ``solve_dtype``, float64 by default).

- MEMIT:     Delta = R K^T (lambda C0 + KpKp + K K^T)^-1
- AlphaEdit: Delta^T = (P (K K^T + KpKp) + L2 I)^-1 P K R^T
- RECT:      MEMIT's Delta, keeping only the top fraction of entries by |Delta| / |W|: of each
             layer's whole update of the batch when the batch is written (``rect_mask_timing:
             batch``, the reference; the layers are walked with dense updates), or of each
             layer's update before the next layer is computed (``layer``)
- PRUNE:     MEMIT's Delta; the singular values of the accumulated change W_new - W_orig above
             sigma_max(W_orig) are mapped to log(s) - log(sigma_max) + sigma_max, once for the
             sequence (``prune_timing: sequence``, the reference; the engine serves the
             restrained weights and continues from the unrestrained ones) or after every batch
             and layer (``batch``)

Which of them add earlier batches' K_p K_p^T is ``hp.accumulates_keys`` (see :meth:`UpdateRule.uses_kpkp`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..hparams import BASE_METHODS, BLUEHyperParams


def memit_delta(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam: float, KpKp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Least-squares update with the key second moment as prior."""
    A = lam * C0 + K @ K.T
    if KpKp is not None:
        A = A + KpKp
    return torch.linalg.solve(A, K @ R.T).T


def null_space_projector(C0: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = U U^T over the eigenvectors of C0 with eigenvalue < threshold; returns (P, rank)."""
    evals, evecs = torch.linalg.eigh(C0)
    U = evecs[:, evals < threshold]
    return U @ U.T, U.shape[1]


def alphaedit_delta(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, L2: float, KpKp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Null-space constrained update: Delta = Delta' P restricted to span(P)."""
    G = K @ K.T
    if KpKp is not None:
        G = G + KpKp
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(P @ G + L2 * eye, P @ K @ R.T).T


def rect_sparsify(delta: torch.Tensor, W: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Zero all but the ``keep_fraction`` entries of ``delta`` with the largest |delta| / |W|."""
    rel = delta.abs() / W.abs().to(delta.dtype).clamp_min(torch.finfo(delta.dtype).tiny)
    k = max(1, int(round(keep_fraction * rel.numel())))
    if k >= rel.numel():
        return delta
    threshold = torch.topk(rel.flatten(), k).values[-1]
    return torch.where(rel >= threshold, delta, torch.zeros_like(delta))


def prune_restrain(W_new: torch.Tensor, W_orig: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Restrain the singular values of the accumulated change W_new - W_orig that exceed
    ``sigma_max`` (the largest singular value of W_orig): ``W_orig + restrain(W_new - W_orig)``.

    The BLUE repository's ``experiments/evaluate.py`` adds the restrained change to the already
    edited weight (``W_new + restrain(W_new - W_orig)``, which counts the change twice); PRUNE's
    definition, followed here, replaces the change by its restrained form."""
    return prune_restrain_with_info(W_new, W_orig, sigma_max)[0]


def prune_restrain_with_info(W_new: torch.Tensor, W_orig: torch.Tensor, sigma_max: float) -> tuple[torch.Tensor, dict]:
    """:func:`prune_restrain` plus, from the same SVD, how the accumulated change compares with
    the bound: ``max_over_sigma_max`` (its largest singular value / sigma_max) and ``above``
    (how many singular values were restrained; when 0, ``W_new`` itself is returned)."""
    D = W_new - W_orig
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    above = S > sigma_max
    info = {"max_over_sigma_max": float(S[0] / sigma_max), "above": int(above.sum())}
    if not bool(above.any()):
        return W_new, info
    S2 = torch.where(above, torch.log(S) - torch.log(torch.as_tensor(sigma_max, dtype=S.dtype)) + sigma_max, S)
    return W_orig + (U * S2) @ Vh, info


@dataclass
class LayerInputs:
    """What a rule may use for one layer (tensors in the solve dtype, on the layer's device).
    ``C0`` is ``None`` for a rule that does not need it (``needs_c0 = False``: AlphaEdit, whose
    update uses the projector ``P`` only)."""

    W: torch.Tensor
    K: torch.Tensor
    R: torch.Tensor
    C0: Optional[torch.Tensor]
    KpKp: Optional[torch.Tensor]
    P: Optional[torch.Tensor] = None
    W_orig: Optional[torch.Tensor] = None
    sigma_max: Optional[float] = None


class UpdateRule:
    """Base rule: ``delta`` computes the change of W while the layers are walked; ``finalize``
    may adjust each new weight at once; ``batch_update`` may adjust each layer's whole update of
    the batch when the batch is written; ``restrains_sequence`` says whether the served weights
    are a restrained form of the sequence's weights (PRUNE). ``needs_c0``: whether ``delta`` reads
    ``LayerInputs.C0`` (when not, the engine may edit with an imported projector alone)."""

    name = "base"
    needs_c0 = True
    needs_projector = False
    needs_original = False
    always_accumulates = False

    def delta(self, x: LayerInputs, hp: BLUEHyperParams) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, W_new: torch.Tensor, x: LayerInputs, hp: BLUEHyperParams) -> torch.Tensor:
        return self.finalize_with_info(W_new, x, hp)[0]

    def finalize_with_info(self, W_new: torch.Tensor, x: LayerInputs, hp: BLUEHyperParams) -> tuple[torch.Tensor, Optional[dict]]:
        """``finalize`` plus what the rule wants recorded in the batch's history (or None)."""
        return W_new, None

    def adjusts_batch(self, hp: BLUEHyperParams) -> bool:
        """Whether :meth:`batch_update` changes anything (the engine skips it otherwise)."""
        return False

    def batch_update(self, D: torch.Tensor, W_before: torch.Tensor, hp: BLUEHyperParams) -> torch.Tensor:
        """The update of a layer written with the batch, from ``D`` (d_out, d_in), the layer's
        dense update of the whole batch, and ``W_before``, its weight before the batch."""
        return D

    def restrains_sequence(self, hp: BLUEHyperParams) -> bool:
        """Whether the model serves ``restrain_sequence`` of the sequence's (unrestrained) weights."""
        return False

    def restrain_sequence(self, W: torch.Tensor, W_orig: torch.Tensor, sigma_max: float) -> tuple[torch.Tensor, Optional[dict]]:
        """The served form of the sequence's weight ``W`` (d_out, d_in) and what to record."""
        return W, None

    def uses_kpkp(self, hp: BLUEHyperParams) -> bool:
        return self.always_accumulates or hp.accumulates_keys


class MemitRule(UpdateRule):
    name = "MEMIT"

    def delta(self, x, hp):
        return memit_delta(x.K, x.R, x.C0, hp.mom2_update_weight, x.KpKp)


class RectRule(MemitRule):
    """RECT as the BLUE evaluation runs it: MEMIT's update keeping only the ``rect_keep_fraction``
    entries with the largest relative change |Delta| / |W|. ``rect_mask_timing: batch`` (the
    reference): the layers are walked with dense updates (later layers, and in BLUE mode the
    last layer's target, see the dense update of the first), and each layer's update of the batch
    is masked, relative to its weight before the batch, when the batch is written. ``layer``:
    each layer's update is masked before the next layer is computed."""

    name = "RECT"

    def delta(self, x, hp):
        delta = super().delta(x, hp)
        return rect_sparsify(delta, x.W, hp.rect_keep_fraction) if hp.rect_mask_timing == "layer" else delta

    def adjusts_batch(self, hp):
        return hp.rect_mask_timing == "batch"

    def batch_update(self, D, W_before, hp):
        return rect_sparsify(D, W_before, hp.rect_keep_fraction) if self.adjusts_batch(hp) else D


class PruneRule(MemitRule):
    """PRUNE: MEMIT's update; the accumulated change W - W_orig has its singular values above
    sigma_max(W_orig) restrained (:func:`prune_restrain`).

    ``prune_timing: sequence`` (PRUNE's own code and the BLUE evaluation): the sequence runs as
    plain MEMIT and the restraint applies once, to the change accumulated at its end. The engine
    keeps the unrestrained weights in the edit state and serves ``W_orig + restrain(W - W_orig)``
    after every call, so the model is final whenever it is evaluated, saved or exported, and
    the next batch starts again from the unrestrained weights. ``batch``: every layer's new weight
    is restrained when it is written (not idempotent: the restraint of later batches compounds).

    Not copied: the BLUE repository's ``experiments/evaluate.py`` adds the restrained change to
    the already edited weight (``W + restrain(W - W_orig)``), counting the change twice."""

    name = "PRUNE"
    needs_original = True

    def finalize_with_info(self, W_new, x, hp):
        if hp.prune_timing != "batch":
            return W_new, None
        return prune_restrain_with_info(W_new, x.W_orig, x.sigma_max)

    def restrains_sequence(self, hp):
        return hp.prune_timing == "sequence"

    def restrain_sequence(self, W, W_orig, sigma_max):
        return prune_restrain_with_info(W, W_orig, sigma_max)


class AlphaEditRule(UpdateRule):
    name = "AlphaEdit"
    needs_c0 = False  # the update reads P (and K_p K_p^T), never C0
    needs_projector = True
    always_accumulates = True

    def delta(self, x, hp):
        return alphaedit_delta(x.K, x.R, x.P, hp.L2, x.KpKp)


#: The rule of each base method, in the order of :data:`blue_plugin.hparams.BASE_METHODS`.
RULES: dict[str, UpdateRule] = {r.name: r for r in (MemitRule(), RectRule(), PruneRule(), AlphaEditRule())}
if tuple(RULES) != BASE_METHODS:  # pragma: no cover - hparams and this module must list the same methods
    raise ImportError(f"update rules {tuple(RULES)} do not match hparams.BASE_METHODS {BASE_METHODS}")


def get_rule(name: str) -> UpdateRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown base_method {name!r}; choose one of {', '.join(RULES)}.") from None
