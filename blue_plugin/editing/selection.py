"""Dynamic boundary-layer selection (``layer_selection: dynamic``).

BLUE updates the first and the last critical layer. With ``layer_selection: dynamic`` the two
layers are chosen per batch: the first from ``layers[0] .. layers[0] + dynamic_window``, the last
from ``layers[-1] - dynamic_window .. layers[-1]`` (always first < last), each by a measurable
criterion on the batch's own targets:

- ``"residual_norm"`` (default): the mean relative residual ``||z_c - h_c|| / ||h_c||`` -- the
  layer where the edit has to move the hidden state least (the target optimisation clamps it at
  ``clamp_norm_factor``, so ties are possible);
- ``"steps"``: the mean number of target-optimisation steps (ties broken by the relative residual);
- ``"update_norm"``: ``||Delta_c||_F / ||W_c||_F`` of the layer's closed-form update -- the layer
  whose weights change least.

The first boundary is chosen on the model as it is; the chosen first layer's update is then
applied (temporarily) and the last boundary is chosen on that model, in the order BLUE edits
them. Cost: one target optimisation per candidate (``2 * (dynamic_window + 1)`` at most), on top
of the two the edit itself needs. Ties go to the configured boundary (``layers[0]`` /
``layers[-1]``). Weights and the edit state are unchanged on return.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from ..hparams import DYNAMIC_CRITERIA, BLUEHyperParams
from ..model.hooks import frozen

logger = logging.getLogger(__name__)

#: The criteria (``dynamic_criterion``), as :data:`blue_plugin.hparams.DYNAMIC_CRITERIA` lists them.
CRITERIA = DYNAMIC_CRITERIA


def boundary_candidates(hp: BLUEHyperParams) -> tuple[list[int], list[int]]:
    """Candidate first and last layers: ``layers[0] .. layers[0] + w`` and ``layers[-1] - w ..
    layers[-1]`` (``w = dynamic_window``), each kept strictly between the other boundary's end."""
    first, last, w = hp.layers[0], hp.layers[-1], hp.dynamic_window
    if first == last:
        return [first], [last]
    firsts = [l for l in range(first, first + w + 1) if l < last]
    lasts = [l for l in range(last - w, last + 1) if l > first]
    return firsts, lasts


def window_layers(hp: BLUEHyperParams) -> list[int]:
    """Every layer dynamic selection may edit (the engine must load C0 for all of them)."""
    firsts, lasts = boundary_candidates(hp)
    return sorted(set(firsts) | set(lasts))


def _evaluate(editor, reqs, prefixes, layer: int, criterion: str) -> dict[str, Any]:
    t = editor.targets_at(reqs, prefixes, layer)
    keys, outs = editor.keys_at(reqs, prefixes, [layer], [layer])
    h = outs[layer]
    R = t.z.to(h.device) - h
    rel = float((R.norm(dim=1) / h.norm(dim=1).clamp_min(1e-12)).mean())
    rec: dict[str, Any] = {"relative_residual": rel, "mean_steps": sum(t.steps) / len(t.steps), "K": keys[layer], "R": R}
    if criterion == "update_norm":
        delta = editor.layer_update(layer, keys[layer], R)
        rec["delta"] = delta
        rec["relative_update"] = float(delta.norm() / editor.W(layer).to(delta.dtype).norm().clamp_min(1e-30))
    return rec


#: Score of a candidate per criterion (lower is better).
SCORES = {
    "residual_norm": lambda rec: (rec["relative_residual"],),
    "steps": lambda rec: (rec["mean_steps"], rec["relative_residual"]),
    "update_norm": lambda rec: (rec["relative_update"],),
}
if set(SCORES) != set(CRITERIA):  # pragma: no cover - hparams and this module must list the same criteria
    raise ImportError(f"dynamic selection scores {sorted(SCORES)} but hparams lists {sorted(CRITERIA)}")


def _pick(editor, reqs, prefixes, candidates: Sequence[int], criterion: str, log: dict, prefer_high: bool) -> tuple[int, Optional[dict]]:
    """The candidate with the lowest score; ties go to the configured boundary (the lowest
    candidate for the first layer, the highest for the last)."""
    if len(candidates) == 1:
        return candidates[0], None
    recs = {c: _evaluate(editor, reqs, prefixes, c, criterion) for c in candidates}
    best = min(candidates, key=lambda c: SCORES[criterion](recs[c]) + (-c if prefer_high else c,))
    for c, rec in recs.items():
        log[c] = {k: v for k, v in rec.items() if k in ("relative_residual", "mean_steps", "relative_update")}
    return best, recs[best]


def choose_boundary_layers(editor, reqs, prefixes: Sequence[str], *, criterion: str = "residual_norm",
                           details: Optional[dict] = None) -> tuple[int, int]:
    """Choose the (first, last) layers BLUE updates for this batch (see the module docstring).

    ``editor``: a :class:`blue_plugin.editing.editor.Editor` (its ``hp.layers`` / ``hp.dynamic_window``
    define the window); ``reqs``: validated requests
    (:func:`blue_plugin.editing.requests.prepare_requests`); ``prefixes``: the context prefixes
    (``editor.prefixes()``). ``details``, if given, is filled with the per-candidate scores.
    Returns ``(first, last)`` with ``first < last`` (equal only when ``hp.layers`` has one layer).
    With ``dynamic_window = 0`` it returns ``(layers[0], layers[-1])`` without any computation.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    if not reqs:
        raise ValueError("give at least one request.")
    hp = editor.hp
    firsts, lasts = boundary_candidates(hp)
    log: dict[str, Any] = {"criterion": criterion, "first_candidates": firsts, "last_candidates": lasts, "first": {}, "last": {}}
    if len(firsts) == 1 and len(lasts) == 1:
        chosen = (firsts[0], lasts[0])
    else:
        needs_c0 = window_layers(hp) if criterion == "update_norm" else firsts
        editor.ensure_second_moments(needs_c0)
        with frozen(editor.model), editor.weights_restored(firsts):
            first, rec = _pick(editor, reqs, prefixes, firsts, criterion, log["first"], prefer_high=False)
            remaining = [l for l in lasts if l > first]
            if len(remaining) > 1:
                # Apply the chosen first layer's update, as BLUE does before the last layer.
                if rec is None:
                    rec = _evaluate(editor, reqs, prefixes, first, "residual_norm")
                delta = rec.get("delta")
                if delta is None:
                    delta = editor.layer_update(first, rec["K"], rec["R"])
                editor.add_update(first, delta)
            last, _ = _pick(editor, reqs, prefixes, remaining, criterion, log["last"], prefer_high=True)
        chosen = (first, last)
    log["chosen"] = list(chosen)
    if details is not None:
        details.update(log)
    logger.info("dynamic boundary layers: %s (criterion %s, candidates %s / %s)", chosen, criterion, firsts, lasts)
    return chosen
