"""How far the distributed residual is from the direct one: residual deviation against the
distribution distance (5a), optimisation steps layer by layer (4) and the weight-deviation error
against batch size and sequential edit length (5b). Definitions in
:mod:`blue_plugin.research.analysis`."""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from ..editing.editor import Editor
from ..editing.requests import prepare_requests
from ..hparams import BLUEHyperParams
from ..model.hooks import frozen
from .common import check_layers, mean_of, setup
from .residuals import analyse_residuals, get_analysis, residual_analysis

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------
# (5a) residual deviation against distribution distance
# ------------------------------------------------------------------------------------------------

def residual_deviation(model, tok, hparams: Any, requests: Sequence[dict], *, analysis: Optional[dict] = None,
                       sequential: bool = False, layers: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """(5a) Residual deviation against the distribution distance ``L - l``, per request:
    ``to_last = ||R^l - R^L||`` (the paper's ``||R^{l*} - R^L||``), ``to_distributed =
    ||R^l - R^L/(m-i+1)||`` (the error the distributed residual makes), and both divided by
    ``||R^l||`` (``*_rel``). ``layers`` may extend below the critical layers to see more distances
    (the distributed residual then divides by the number of listed layers from l to L)."""
    if analysis is None:
        analysis = residual_analysis(model, tok, hparams, requests, layers=layers, sequential=sequential)
    L = analysis["z_layer"]
    out: dict[str, Any] = {"layers": analysis["layers"], "sequential": analysis["sequential"],
                           "distance": {l: L - l for l in analysis["layers"]}}
    for name in ("to_last", "to_distributed", "to_last_rel", "to_distributed_rel", "direct_norm"):
        out[name] = {}
    for l in analysis["layers"]:
        Rd = analysis["R_direct"][l].double()
        norm = Rd.norm(dim=1)
        to_last = (Rd - analysis["R_last"][l].double()).norm(dim=1)
        to_dist = (Rd - analysis["R_dist"][l].double()).norm(dim=1)
        out["direct_norm"][l] = norm.tolist()
        out["to_last"][l], out["to_distributed"][l] = to_last.tolist(), to_dist.tolist()
        out["to_last_rel"][l] = (to_last / norm.clamp_min(1e-12)).tolist()
        out["to_distributed_rel"][l] = (to_dist / norm.clamp_min(1e-12)).tolist()
    out["mean"] = {name: {l: mean_of(out[name][l]) for l in analysis["layers"]}
                   for name in ("to_last", "to_distributed", "to_last_rel", "to_distributed_rel")}
    return out


# ------------------------------------------------------------------------------------------------
# (4) optimisation steps layer by layer
# ------------------------------------------------------------------------------------------------
def optimisation_steps(model, tok, hparams: Any, requests: Sequence[dict], *, layers: Optional[Sequence[int]] = None,
                       update: bool = True) -> dict[str, Any]:
    """(4) Target-optimisation steps per layer when targets are computed layer by layer, first to
    last critical layer. With ``update`` (the paper's setting) each layer is updated with its full
    direct residual before the next target is computed (BLUE's procedure applied to every critical
    layer); without, every layer starts from the unedited model (the baseline). Weights are
    restored on return.

    Returns ``{"layers", "update", "steps": {l: [n]}, "mean_steps": {l}, "nll": {l: [n]},
    "residual_norm": {l: [n]}, "relative_residual_norm": {l: [n]} (||R^l|| / ||h_l||),
    "max_steps": v_num_grad_steps}``.
    """
    editor, reqs, prefixes = setup(model, tok, hparams, requests)
    layers = check_layers(layers if layers is not None else editor.hp.layers, editor.layout.n_layers)
    if update:
        editor.ensure_second_moments(layers)
    out: dict[str, Any] = {"layers": layers, "update": update, "max_steps": editor.hp.v_num_grad_steps,
                           "steps": {}, "mean_steps": {}, "nll": {}, "residual_norm": {}, "relative_residual_norm": {}}
    with frozen(model), editor.weights_restored(layers if update else []):
        for l in layers:
            t = editor.targets_at(reqs, prefixes, l)
            keys, outs = editor.keys_at(reqs, prefixes, [l], [l])
            R = t.z.to(outs[l].device) - outs[l]
            out["steps"][l], out["nll"][l] = list(t.steps), list(t.nll)
            out["mean_steps"][l] = mean_of(t.steps)
            out["residual_norm"][l] = R.norm(dim=1).tolist()
            out["relative_residual_norm"][l] = (R.norm(dim=1) / outs[l].norm(dim=1).clamp_min(1e-12)).tolist()
            if update:
                editor.add_update(l, editor.layer_update(l, keys[l], R))
    return out


# ------------------------------------------------------------------------------------------------
# (5b) weight-deviation error against batch size and sequential edit length
# ------------------------------------------------------------------------------------------------
def _weight_errors(editor: Editor, a: dict, idx: Sequence[int], layers: Sequence[int]) -> dict[int, tuple[float, float, torch.Tensor]]:
    """Per layer: (||D_dist - D_direct||_F, ||D_direct||_F, D_dist - D_direct) for the requests ``idx``."""
    out = {}
    for l in layers:
        K = a["K"][l][idx]
        d_dist = editor.layer_update(l, K, a["R_dist"][l][idx])
        d_dir = editor.layer_update(l, K, a["R_direct"][l][idx])
        diff = d_dist - d_dir
        out[l] = (float(diff.norm()), float(d_dir.norm()), diff)
    return out


def weight_deviation_vs_batch_size(
    model, tok, hparams: Any, requests: Sequence[dict], batch_sizes: Sequence[int], *,
    max_batches: Optional[int] = None, analysis: Optional[dict] = None,
) -> dict[str, Any]:
    """(5b) Weight-deviation error ``||Delta_l(R^L/(m-i+1)) - Delta_l(R^l)||_F`` of a batch of B
    requests, for each B in ``batch_sizes``: the requests are cut into consecutive disjoint
    batches of B (at most ``max_batches``) and the errors averaged. The residuals are computed
    once for all requests (each request's target does not depend on its batch).

    Returns ``{"layers", "batch_sizes", "error": {B: {l: mean}}, "relative": {B: {l: mean
    error / ||Delta_l(R^l)||}}, "n_batches": {B: k}}``."""
    editor, reqs, prefixes, a = get_analysis(model, tok, hparams, requests, analysis, None, False)
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 or b > len(reqs) for b in sizes):
        raise ValueError(f"batch sizes must be between 1 and the number of requests ({len(reqs)}), got {list(batch_sizes)!r}.")
    layers = a["layers"]
    editor.ensure_second_moments(layers)
    out: dict[str, Any] = {"layers": layers, "batch_sizes": sizes, "error": {}, "relative": {}, "n_batches": {}}
    for B in sizes:
        groups = [list(range(s, s + B)) for s in range(0, len(reqs) - B + 1, B)][: max_batches or None]
        errs = {l: [] for l in layers}
        rels = {l: [] for l in layers}
        for idx in groups:
            for l, (e, ref, _) in _weight_errors(editor, a, idx, layers).items():
                errs[l].append(e)
                rels[l].append(e / ref if ref > 0 else float("nan"))
        out["error"][B] = {l: mean_of(v) for l, v in errs.items()}
        out["relative"][B] = {l: mean_of(v) for l, v in rels.items()}
        out["n_batches"][B] = len(groups)
    return out


def weight_deviation_vs_sequence(
    model, tok, hparams: Any, requests: Sequence[dict], batch_size: int, *, edit_blue: bool = False,
) -> dict[str, Any]:
    """(5b) Weight-deviation error along a sequential edit: the requests are edited in consecutive
    batches of ``batch_size`` with the engine (the original method, or BLUE with ``edit_blue``),
    accumulating ``K_p K_p^T`` in a scratch state. Before batch t is applied, its residuals are
    analysed on the current model and, per critical layer, ``e_t = ||Delta(R_dist) - Delta(R^l)||_F``
    is measured (with the accumulated statistics) and the differences summed:
    ``cumulative_t = ||sum_{s<=t} (Delta_s(R_dist) - Delta_s(R^l))||_F``. Weights and the model's
    own edit state are restored on return. Cost per batch: m + 1 target optimisations.

    Returns ``{"layers", "batch_size", "n_batches", "edits_before": [0, B, ...] (edits in the model
    when batch t was measured), "edits": [B, 2B, ...] (after it was applied), "error": {l: [T]},
    "relative": {l: [T]}, "cumulative": {l: [T]}}``."""
    hp = BLUEHyperParams.coerce(hparams)
    base = Editor(model, tok, hp)
    batches = [list(requests[s:s + batch_size]) for s in range(0, len(requests), batch_size)] if batch_size > 0 else []
    if not batches:
        raise ValueError("give at least one request and a positive batch_size.")
    state = base.state.scratch()
    seq_hp = hp.replace(blue=edit_blue, layer_selection=hp.layer_selection if edit_blue else "all")
    editor = Editor(model, tok, seq_hp, state)
    layers = check_layers(hp.layers, editor.layout.n_layers)
    editor.ensure_second_moments(layers)
    out: dict[str, Any] = {"layers": layers, "batch_size": batch_size, "n_batches": len(batches), "edit_blue": edit_blue,
                           "edits_before": [], "edits": [], "error": {l: [] for l in layers}, "relative": {l: [] for l in layers},
                           "cumulative": {l: [] for l in layers}}
    cum: dict[int, torch.Tensor] = {}
    with editor.weights_restored(layers):
        for t, batch in enumerate(batches):
            reqs = prepare_requests(tok, batch, editor.hp)
            a = analyse_residuals(editor, reqs, editor.prefixes(), layers, False)
            for l, (e, ref, diff) in _weight_errors(editor, a, list(range(len(reqs))), layers).items():
                cum[l] = diff if l not in cum else cum[l] + diff
                out["error"][l].append(e)
                out["relative"][l].append(e / ref if ref > 0 else float("nan"))
                out["cumulative"][l].append(float(cum[l].norm()))
            out["edits_before"].append(sum(len(b) for b in batches[:t]))
            editor.apply(batch)
            out["edits"].append(sum(len(b) for b in batches[: t + 1]))
            logger.info("sequence: batch %d/%d edited; errors %s", t + 1, len(batches),
                        {l: round(out["error"][l][-1], 4) for l in layers})
    return out
