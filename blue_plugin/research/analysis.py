"""Diagnostics of residual distribution (the BLUE paper's analyses), for any model and config.

Notation: ``n`` requests, critical layers ``l_1 < ... < l_m = L`` (``hparams.layers`` unless a
function is given ``layers``), ``h_l`` the output of block ``l`` at the edited token (bare prompt),
``z_l`` the target optimised at block ``l`` by :func:`blue_plugin.editing.targets.compute_targets`.

- **direct residual** at layer ``l``: ``R^l = z_l - h_l`` (what BLUE uses, and what the target
  optimisation adds to the output of block ``l``);
- **last-layer residual**: ``R^L = z_L - h_L``;
- **distributed residual** at the i-th critical layer (1-based): ``R^L / (m - i + 1)``, which is
  the paper's ``R^L / (L - l + 1)`` for contiguous layers (what MEMIT-style methods use);
- **update** of a layer for residuals ``R`` (n, d_out) and keys ``K`` (n, d_in): the engine's
  update rule (``hparams.base_method``) with the same ``C0`` and accumulated ``K_p K_p^T``,
  see :meth:`Editor.layer_update <blue_plugin.editing.editor.Editor.layer_update>`.

Two contexts for the residuals (:func:`residual_analysis`):

- ``sequential=False`` (the paper's analysis): every quantity on the model as it is when the
  function is called; nothing is updated between layers.
- ``sequential=True`` (what the original method really does): the layers are visited first to
  last; at the i-th one ``R^L`` is recomputed on the current model (``z_L`` fixed, ``h_L`` current),
  the direct residual is re-optimised on the current model, and the *distributed* update is
  applied before moving on.

Probabilities: ``P(o|p)`` is the per-token geometric mean probability of the answer's tokens,
``exp(-mean token NLL)``, averaged over the context prefixes (the first prefix is the bare
prompt), as in the official analysis' "average probability". Efficacy of a request is
``NLL(o*|p) < NLL(o_true|p)`` on the bare prompt, as in :mod:`blue_plugin.evaluation.metrics`.

Every function leaves the model's weights bit-identical and its edit state untouched (the caches
of ``C0``, projectors and context prefixes in :func:`blue_plugin.get_state` are used and filled).
Tensors in results are on the CPU; devices and dtypes come from the model's weights.

Every analysis runs on the editor's public probes (``Editor.targets_at``, ``keys_at``,
``layer_update``, ``add_update``, ``weights_restored``). This module holds the single-layer
effects (1, 3) and the residual cosine (2), and gathers the rest under one name:
:mod:`~blue_plugin.research.residuals` (the residuals of every layer),
:mod:`~blue_plugin.research.probabilities` (answer probabilities),
:mod:`~blue_plugin.research.deviation` (4, 5a, 5b) and :mod:`~blue_plugin.research.common`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..editing.editor import Editor
from ..editing.state import EditState
from ..model.hooks import frozen
from .common import KINDS, VIA, check_layers, mean_of, setup, std_of
from .deviation import optimisation_steps, residual_deviation, weight_deviation_vs_batch_size, weight_deviation_vs_sequence
from .probabilities import answer_probabilities
from .residuals import analyse_residuals, get_analysis, residual_analysis, summarize_analysis

__all__ = [
    "KINDS", "VIA", "check_layers", "setup", "answer_probabilities", "residual_analysis", "analyse_residuals",
    "summarize_analysis", "single_layer_effects", "contribution_scores", "single_layer_efficacy", "residual_cosine",
    "residual_deviation", "optimisation_steps", "weight_deviation_vs_batch_size", "weight_deviation_vs_sequence",
    "targets_at", "keys_at", "layer_update", "add_update", "weights_restored", "scratch_state",
]

# The editor's probes as functions of an editor, ``targets_at(editor, reqs, prefixes, layer)``
# etc. (one implementation each: the :class:`~blue_plugin.editing.editor.Editor` methods).
targets_at = Editor.targets_at
keys_at = Editor.keys_at
layer_update = Editor.layer_update
add_update = Editor.add_update
weights_restored = Editor.weights_restored
scratch_state = EditState.scratch


# ------------------------------------------------------------------------------------------------
# (1) contribution scores and (3) single-layer efficacy
# ------------------------------------------------------------------------------------------------
def _batches(n: int, batch_size: Optional[int]) -> list[list[int]]:
    if batch_size is None:
        return [list(range(n))]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


def single_layer_effects(
    model,
    tok,
    hparams: Any,
    requests: Sequence[dict],
    *,
    via: str = "hidden",
    sequential: bool = False,
    batch_size: Optional[int] = None,
    analysis: Optional[dict] = None,
) -> dict[str, Any]:
    """Apply ONE layer's change at a time (distributed or direct residual) to the model as it is
    and measure ``P(o*|p)`` and efficacy.

    ``via="hidden"``: the residual is added to the block's output at the edited token (the
    official analysis' procedure; per request, no weight change). ``via="weight"``: the layer's
    closed-form weight update for the residuals (requests edited together in batches of
    ``batch_size``, default all at once) is written, scored, and undone.

    Returns ``{"layers", "via", "sequential", "p_orig": [n], "efficacy_orig": [n],
    "distributed"/"direct": {"p": {l: [n]}, "score": {l: [n]}, "efficacy": {l: [n]}}}`` with
    ``score = P_edited(o*|p) - P_orig(o*|p)``.
    """
    if via not in VIA:
        raise ValueError(f"via must be one of {VIA}, got {via!r}.")
    editor, reqs, prefixes, a = get_analysis(model, tok, hparams, requests, analysis, None, sequential)
    layers = a["layers"]
    groups = _batches(len(reqs), batch_size)
    if via == "weight":
        editor.ensure_second_moments(layers)
    with frozen(model):
        base = answer_probabilities(editor, reqs, prefixes)
        out: dict[str, Any] = {
            "layers": layers, "via": via, "sequential": a["sequential"], "n_requests": len(reqs),
            "p_orig": base["p"].tolist(), "efficacy_orig": base["efficacy"],
        }
        for kind in KINDS:
            key = "R_dist" if kind == "distributed" else "R_direct"
            rec: dict[str, dict[int, list]] = {"p": {}, "score": {}, "efficacy": {}}
            for l in layers:
                R = a[key][l]
                p = torch.empty(len(reqs), dtype=torch.float64)
                eff: list[Optional[float]] = [None] * len(reqs)
                if via == "hidden":
                    r = answer_probabilities(editor, reqs, prefixes, l, R)
                    p, eff = r["p"], r["efficacy"]
                else:
                    for idx in groups:
                        sub = [reqs[j] for j in idx]
                        delta = editor.layer_update(l, a["K"][l][idx], R[idx])
                        with editor.weights_restored([l]):
                            editor.add_update(l, delta)
                            r = answer_probabilities(editor, sub, prefixes)
                        p[idx] = r["p"]
                        for k, j in enumerate(idx):
                            eff[j] = r["efficacy"][k]
                rec["p"][l] = p.tolist()
                rec["score"][l] = (p - base["p"]).tolist()
                rec["efficacy"][l] = eff
            out[kind] = rec
    return out


def contribution_scores(model, tok, hparams: Any, requests: Sequence[dict], *, via: str = "hidden",
                        effects: Optional[dict] = None, **kw: Any) -> dict[str, Any]:
    """(1) Contribution score per critical layer, ``s_l = P_edited(o*|p) - P_orig(o*|p)`` with only
    layer l's change applied, for the distributed and the direct residual. Adds ``mean`` / ``std``
    of the scores per kind and layer to :func:`single_layer_effects`' result (pass that result as
    ``effects`` to reuse it; ``kw`` go to :func:`single_layer_effects`)."""
    out = _effects(model, tok, hparams, requests, via, effects, kw)
    out = {**out, **{kind: dict(out[kind]) for kind in KINDS}}
    for kind in KINDS:
        out[kind]["mean"] = {l: mean_of(v) for l, v in out[kind]["score"].items()}
        out[kind]["std"] = {l: std_of(v) for l, v in out[kind]["score"].items()}
    return out


def single_layer_efficacy(model, tok, hparams: Any, requests: Sequence[dict], *, via: str = "weight",
                          effects: Optional[dict] = None, **kw: Any) -> dict[str, Any]:
    """(3) Efficacy of editing a single layer with the direct vs the distributed residual
    (default: the layer's weight update). Returns ``{"layers", "via", "efficacy_orig": mean,
    "distributed"/"direct": {l: mean efficacy}, "p": {kind: {l: mean P(o*|p)}}, "p_orig"}``
    (``effects``: a :func:`single_layer_effects` result to reuse)."""
    d = _effects(model, tok, hparams, requests, via, effects, kw)
    return {
        "layers": d["layers"], "via": d["via"], "sequential": d["sequential"],
        "efficacy_orig": mean_of(d["efficacy_orig"]),
        "p_orig": mean_of(d["p_orig"]),
        **{kind: {l: mean_of(v) for l, v in d[kind]["efficacy"].items()} for kind in KINDS},
        "p": {kind: {l: mean_of(v) for l, v in d[kind]["p"].items()} for kind in KINDS},
    }


def _effects(model, tok, hparams, requests, via, effects, kw) -> dict[str, Any]:
    if effects is None:
        return single_layer_effects(model, tok, hparams, requests, via=via, **kw)
    if effects.get("via") != via:
        raise ValueError(f"the given effects were measured via {effects.get('via')!r}, not {via!r}.")
    return effects


# ------------------------------------------------------------------------------------------------
# (2) cosine similarity of the distributed and the direct residual
# ------------------------------------------------------------------------------------------------
def residual_cosine(model, tok, hparams: Any, requests: Sequence[dict], *, analysis: Optional[dict] = None,
                    sequential: bool = False, layers: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """(2) Cosine similarity between the distributed residual ``R^L/(m-i+1)`` and the directly
    computed residual ``R^l`` at each layer, per request. Returns ``{"layers", "cosine": {l: [n]},
    "mean": {l}, "std": {l}}`` (the last layer compares R^L with itself unless ``sequential``)."""
    if analysis is None:
        analysis = residual_analysis(model, tok, hparams, requests, layers=layers, sequential=sequential)
    cos = {l: F.cosine_similarity(analysis["R_dist"][l].double(), analysis["R_direct"][l].double(), dim=1).tolist()
           for l in analysis["layers"]}
    return {"layers": analysis["layers"], "sequential": analysis["sequential"], "cosine": cos,
            "mean": {l: mean_of(v) for l, v in cos.items()}, "std": {l: std_of(v) for l, v in cos.items()}}
