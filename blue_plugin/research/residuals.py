"""Residuals at every critical layer: the direct ``R^l``, the last-layer ``R^L`` and the distributed
``R^L / (m - i + 1)`` (definitions in :mod:`blue_plugin.research.analysis`)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ..editing.editor import Editor
from ..editing.requests import EditRequest
from ..model.hooks import frozen
from .common import check_layers, mean_of, setup


def analyse_residuals(
    editor: Editor, reqs: Sequence[EditRequest], prefixes: Sequence[str], layers: Sequence[int], sequential: bool
) -> dict[str, Any]:
    """:func:`residual_analysis` with an editor, validated requests and prefixes at hand."""
    layers = check_layers(layers, editor.layout.n_layers)
    L, m = layers[-1], len(layers)
    res: dict[str, Any] = {
        "layers": layers, "z_layer": L, "sequential": sequential, "n_requests": len(reqs),
        "K": {}, "h": {}, "R_direct": {}, "R_dist": {}, "R_last": {}, "steps": {}, "nll": {},
    }
    if sequential:
        editor.ensure_second_moments(layers)
    with frozen(editor.model), editor.weights_restored(layers if sequential else []):
        t_last = editor.targets_at(reqs, prefixes, L)
        for i, l in enumerate(layers):
            keys, outs = editor.keys_at(reqs, prefixes, [l], sorted({l, L}))
            K, h_l, h_L = keys[l], outs[l], outs[L]
            if l == L and (not sequential or i == 0):
                t_l = t_last
            else:
                t_l = editor.targets_at(reqs, prefixes, l)
            R_last = t_last.z.to(h_L.device) - h_L
            R_direct = t_l.z.to(h_l.device) - h_l
            R_dist = R_last / (m - i)
            res["K"][l], res["h"][l] = K.detach().cpu(), h_l.detach().cpu()
            res["R_direct"][l], res["R_dist"][l], res["R_last"][l] = R_direct.cpu(), R_dist.cpu(), R_last.cpu()
            res["steps"][l], res["nll"][l] = list(t_l.steps), list(t_l.nll)
            if sequential and i < m - 1:
                editor.add_update(l, editor.layer_update(l, K, R_dist))
    return res


def residual_analysis(
    model, tok, hparams: Any, requests: Sequence[dict], *, layers: Optional[Sequence[int]] = None, sequential: bool = False
) -> dict[str, Any]:
    """Keys, block outputs and the direct / distributed / last-layer residuals of every layer.

    Returns a dict: ``layers``, ``z_layer`` (L), ``sequential``, ``n_requests`` and, keyed by layer,
    ``K`` (n, d_in), ``h`` (n, d_model), ``R_direct`` / ``R_dist`` / ``R_last`` (n, d_model) float32
    CPU tensors, ``steps`` (optimisation steps of the direct target, per request) and ``nll``.
    ``sequential=True`` applies the distributed updates between layers (restored on return) and
    needs ``C0`` (loaded or computed through the engine's statistics cache). Cost: ``m`` target
    optimisations (``m + 1`` with ``sequential``).
    """
    editor, reqs, prefixes = setup(model, tok, hparams, requests)
    return analyse_residuals(editor, reqs, prefixes, layers if layers is not None else editor.hp.layers, sequential)


def get_analysis(model, tok, hparams, requests, analysis, layers, sequential):
    """``(editor, reqs, prefixes, analysis)``: the given :func:`residual_analysis` result (checked
    against the requests) or a new one."""
    editor, reqs, prefixes = setup(model, tok, hparams, requests)
    if analysis is None:
        analysis = analyse_residuals(editor, reqs, prefixes, layers if layers is not None else editor.hp.layers, sequential)
    elif analysis["n_requests"] != len(reqs):
        raise ValueError(f"the analysis was computed for {analysis['n_requests']} requests, got {len(reqs)}; pass the same requests.")
    return editor, reqs, prefixes, analysis


def summarize_analysis(analysis: dict[str, Any]) -> dict[str, Any]:
    """Plain-number summary of :func:`residual_analysis` (no tensors): mean norms and steps."""
    out: dict[str, Any] = {"layers": analysis["layers"], "z_layer": analysis["z_layer"], "sequential": analysis["sequential"]}
    for key in ("R_direct", "R_dist", "R_last", "h"):
        out[f"{key}_norm"] = {l: mean_of(analysis[key][l].norm(dim=1).tolist()) for l in analysis["layers"]}
    out["mean_steps"] = {l: mean_of(analysis["steps"][l]) for l in analysis["layers"]}
    return out
