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
  see :func:`layer_update`.

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
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import replace as dc_replace
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..model.layout import as_out_in, from_out_in
from ..editing.editor import Editor
from ..model.hooks import add_delta, frozen
from ..hparams import BLUEHyperParams
from ..editing.keys import keys_and_outputs
from ..editing.requests import EditRequest, Row, key_rows, pad_rows, prepare_requests, target_rows
from ..model.tokens import encode_target, pad_token_id
from ..editing.rules import LayerInputs
from ..editing.state import EditState
from ..editing.targets import TargetResult, compute_targets, head_logits, last_hidden
from ..model.devices import input_device

logger = logging.getLogger(__name__)

KINDS = ("distributed", "direct")
VIA = ("hidden", "weight")


# ------------------------------------------------------------------------------------------------
# engine pieces shared by the analyses (and by blue_plugin.editing.selection)
# ------------------------------------------------------------------------------------------------
def coerce_hparams(hparams: Any) -> BLUEHyperParams:
    """``hparams`` as a :class:`BLUEHyperParams` (a dict of its keys is accepted)."""
    if isinstance(hparams, BLUEHyperParams):
        return hparams
    if isinstance(hparams, dict):
        return BLUEHyperParams.from_dict(hparams)
    raise ValueError(f"hparams must be a BLUEHyperParams or a dict of its keys, got {type(hparams).__name__}.")


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Validated, ascending list of distinct layer indices inside the model."""
    layers = list(layers)
    if not layers:
        raise ValueError("give at least one layer.")
    if not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        raise ValueError(f"layers must be integers, got {layers!r}.")
    if layers != sorted(set(layers)):
        raise ValueError(f"layers must be ascending and distinct, got {layers!r}.")
    if layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers {layers!r} are outside the model, which has layers 0..{n_layers - 1}.")
    return layers


def setup(model, tok, hparams: Any, requests: Sequence[dict], state: Optional[EditState] = None) -> tuple[Editor, list[EditRequest], list[str]]:
    """An :class:`~blue_plugin.editing.editor.Editor` on ``model`` (its own state unless ``state``), the
    validated requests and the context prefixes (the first is ``""``)."""
    editor = Editor(model, tok, coerce_hparams(hparams), state)
    reqs = prepare_requests(tok, requests, editor.hp)
    return editor, reqs, editor.prefixes()


def targets_at(editor: Editor, reqs: Sequence[EditRequest], prefixes: Sequence[str], layer: int) -> TargetResult:
    """Targets ``z`` (n, d_model) at block ``layer`` on the current model, exactly as the engine
    computes them. Call inside :func:`blue_plugin.model.hooks.frozen`."""
    hp = editor.hp
    rows = target_rows(editor.tok, reqs, prefixes, hp.fact_token)
    lower = [editor.layout.block(i) for i in range(layer)] if hp.v_replay_lower_layers else ()
    return compute_targets(editor.model, editor.tok, editor.layout.block(layer), rows, len(reqs), len(prefixes), hp, lower)


def keys_at(
    editor: Editor, reqs: Sequence[EditRequest], prefixes: Sequence[str], key_layers: Sequence[int], out_layers: Sequence[int] = ()
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Keys (n, d_in) at ``key_layers`` and block outputs h (n, d_model) at ``out_layers``."""
    rows = key_rows(editor.tok, reqs, prefixes, editor.hp.fact_token)
    return keys_and_outputs(editor.model, editor.tok, editor.layout, rows, len(reqs), prefixes, key_layers, out_layers)


@torch.no_grad()
def layer_update(editor: Editor, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The change ``W_new - W`` (d_out, d_in; solve dtype, on the weight's device) that the
    engine's rule would make to ``layer`` for keys ``K`` (n, d_in) and residuals ``R`` (n, d_out),
    with the state's ``C0``, accumulated ``K_p K_p^T`` (if the rule uses it), AlphaEdit projector and
    PRUNE original: the update the layers after it see during the walk (RECT with
    ``rect_mask_timing: batch`` masks it only when the batch is written, PRUNE with
    ``prune_timing: sequence`` restrains only the served weights). Nothing is written. ``C0`` must
    be loaded (:meth:`Editor.ensure_second_moments`)."""
    module, stored = editor.module(layer), editor.weight(layer)
    dev, sd = stored.device, editor.solve_dtype
    W = as_out_in(module, stored).to(sd)
    if K.shape[0] != R.shape[0] or K.shape[1] != W.shape[1] or R.shape[1] != W.shape[0]:
        raise ValueError(f"layer {layer}: keys {tuple(K.shape)} / residuals {tuple(R.shape)} do not fit the weight {tuple(W.shape)} (d_out, d_in).")
    rule, hp = editor.rule, editor.hp
    ls = editor.state.layers.get(layer)
    W_orig, sigma = None, None
    if rule.needs_original:
        W_orig = ls.W_orig if ls is not None and ls.W_orig is not None else W
        sigma = ls.sigma_max if ls is not None and ls.sigma_max is not None else float(torch.linalg.matrix_norm(W_orig, ord=2))
    x = LayerInputs(
        W=W,
        K=K.T.to(dev, sd),
        R=R.T.to(dev, sd),
        C0=editor.C0(layer),
        KpKp=ls.kpkp if ls is not None and rule.uses_kpkp(hp) else None,
        P=editor.projector(layer) if rule.needs_projector else None,
        W_orig=W_orig,
        sigma_max=sigma,
    )
    W_new = rule.finalize(W + rule.delta(x, hp), x, hp)
    return W_new - W


def add_update(editor: Editor, layer: int, delta: torch.Tensor) -> None:
    """Add ``delta`` (d_out, d_in) to the stored weight of ``layer`` (in place, stored dtype)."""
    module, stored = editor.module(layer), editor.weight(layer)
    W = as_out_in(module, stored).to(delta.dtype) + delta.to(stored.device)
    with torch.no_grad():
        stored.copy_(from_out_in(module, W).to(stored.dtype))


@contextmanager
def weights_restored(editor: Editor, layers: Sequence[int]) -> Iterator[None]:
    """Restore the rewrite weights of ``layers`` bit-for-bit on exit (also on errors)."""
    saved = {l: editor.weight(l).detach().clone() for l in dict.fromkeys(layers)}
    try:
        yield
    finally:
        with torch.no_grad():
            for l, W in saved.items():
                editor.weight(l).copy_(W)


def scratch_state(state: EditState) -> EditState:
    """A copy of the edit part of ``state`` that shares its model-constant caches (C0,
    projectors, prefixes), for edits that must not touch the real state."""
    s = state.snapshot()
    s.second_moments, s.projectors, s.prefixes = state.second_moments, state.projectors, state.prefixes
    return s


# ------------------------------------------------------------------------------------------------
# answer probabilities
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _row_logprobs(editor: Editor, rows: Sequence[Row], block: Optional[str], deltas: Optional[torch.Tensor], max_rows: int = 64) -> torch.Tensor:
    """Mean log-probability of each row's target tokens, shape (len(rows),), float64 CPU.
    With ``block``, ``deltas[k]`` (d_model) is added to that block's output at row k's lookup."""
    model, tok = editor.model, editor.tok
    device = input_device(model)
    pad_id = pad_token_id(tok)
    out = []
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        batch = pad_rows(chunk, pad_id, device)
        ctx = nullcontext()
        if block is not None:
            idx = torch.arange(len(chunk), device=device)
            pos = torch.tensor([r.lookup for r in chunk], device=device)
            ctx = add_delta(model, block, idx, pos, deltas[start:start + len(chunk)].to(device))
        with ctx:
            hidden = last_hidden(model, batch)
        t_row, t_pos, t_tok = [], [], []
        for k, r in enumerate(chunk):
            t_row += [k] * len(r.targets)
            t_pos += range(r.target_start - 1, r.target_start - 1 + len(r.targets))
            t_tok += r.targets
        t_row_t = torch.tensor(t_row, device=device)
        logp = F.log_softmax(head_logits(model, hidden[t_row_t, torch.tensor(t_pos, device=device)]), dim=-1)
        lp = logp.gather(1, torch.tensor(t_tok, device=device).unsqueeze(1)).squeeze(1).double()
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, t_row_t, lp)
        counts = torch.tensor([len(r.targets) for r in chunk], dtype=torch.float64, device=device)
        out.append((sums / counts).cpu())
    return torch.cat(out)


def _with_target(tok, req: EditRequest, answer: str) -> EditRequest:
    return dc_replace(req, target_new=answer, target_ids=encode_target(tok, answer))


def answer_probabilities(
    editor: Editor,
    reqs: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: Optional[int] = None,
    R: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """``P(o*|p)`` per request (mean over prefixes of exp(mean token log-prob)), and the bare-prompt
    NLLs of o* and of the true object with efficacy ``NLL(o*) < NLL(o_true)`` (None where a request
    has no ground truth). With ``layer`` and ``R`` (n, d_model), ``R[j]`` is added to the output of
    block ``layer`` at request j's edited token in every prefixed row (the way the target
    optimisation applies its delta) -- the "hidden" way of applying a residual.

    Returns ``{"p": (n,) float64, "nll_new": (n,), "nll_true": list (None where unknown),
    "efficacy": list of 0/1/None}``."""
    n, n_pre = len(reqs), len(prefixes)
    block = editor.layout.block(layer) if layer is not None else None
    if (layer is None) != (R is None):
        raise ValueError("give both layer and R (or neither).")
    if R is not None and R.shape[0] != n:
        raise ValueError(f"R has {R.shape[0]} rows for {n} requests.")
    deltas = R.float().repeat_interleave(n_pre, dim=0) if R is not None else None
    rows = target_rows(editor.tok, reqs, prefixes, editor.hp.fact_token)[: n * n_pre]
    lp_new = _row_logprobs(editor, rows, block, deltas).view(n, n_pre)
    p = lp_new.exp().mean(dim=1)
    nll_new = -lp_new[:, 0]
    with_gt = [j for j, r in enumerate(reqs) if r.ground_truth]
    nll_true: list[Optional[float]] = [None] * n
    if with_gt:
        true_reqs = [_with_target(editor.tok, reqs[j], reqs[j].ground_truth) for j in with_gt]
        bare = [target_rows(editor.tok, [r], [""], editor.hp.fact_token)[0] for r in true_reqs]
        for r, j in zip(bare, with_gt):
            r.request = j
        d_true = R.float()[with_gt] if R is not None else None
        lp_true = _row_logprobs(editor, bare, block, d_true)
        for k, j in enumerate(with_gt):
            nll_true[j] = float(-lp_true[k])
    efficacy = [None if t is None else float(float(nll_new[j]) < t) for j, t in enumerate(nll_true)]
    return {"p": p, "nll_new": nll_new, "nll_true": nll_true, "efficacy": efficacy}


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(vals) / len(vals) if vals else None


def _std(xs: Sequence[float]) -> Optional[float]:
    vals = [float(x) for x in xs]
    if len(vals) < 2:
        return 0.0 if vals else None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# ------------------------------------------------------------------------------------------------
# residuals at every critical layer
# ------------------------------------------------------------------------------------------------
def _residual_analysis(
    editor: Editor, reqs: Sequence[EditRequest], prefixes: Sequence[str], layers: Sequence[int], sequential: bool
) -> dict[str, Any]:
    layers = check_layers(layers, editor.layout.n_layers)
    L, m = layers[-1], len(layers)
    res: dict[str, Any] = {
        "layers": layers, "z_layer": L, "sequential": sequential, "n_requests": len(reqs),
        "K": {}, "h": {}, "R_direct": {}, "R_dist": {}, "R_last": {}, "steps": {}, "nll": {},
    }
    if sequential:
        editor.ensure_second_moments(layers)
    with frozen(editor.model), weights_restored(editor, layers if sequential else []):
        t_last = targets_at(editor, reqs, prefixes, L)
        for i, l in enumerate(layers):
            keys, outs = keys_at(editor, reqs, prefixes, [l], sorted({l, L}))
            K, h_l, h_L = keys[l], outs[l], outs[L]
            if l == L and (not sequential or i == 0):
                t_l = t_last
            else:
                t_l = targets_at(editor, reqs, prefixes, l)
            R_last = t_last.z.to(h_L.device) - h_L
            R_direct = t_l.z.to(h_l.device) - h_l
            R_dist = R_last / (m - i)
            res["K"][l], res["h"][l] = K.detach().cpu(), h_l.detach().cpu()
            res["R_direct"][l], res["R_dist"][l], res["R_last"][l] = R_direct.cpu(), R_dist.cpu(), R_last.cpu()
            res["steps"][l], res["nll"][l] = list(t_l.steps), list(t_l.nll)
            if sequential and i < m - 1:
                add_update(editor, l, layer_update(editor, l, K, R_dist))
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
    return _residual_analysis(editor, reqs, prefixes, layers if layers is not None else editor.hp.layers, sequential)


def _get_analysis(model, tok, hparams, requests, analysis, layers, sequential):
    editor, reqs, prefixes = setup(model, tok, hparams, requests)
    if analysis is None:
        analysis = _residual_analysis(editor, reqs, prefixes, layers if layers is not None else editor.hp.layers, sequential)
    elif analysis["n_requests"] != len(reqs):
        raise ValueError(f"the analysis was computed for {analysis['n_requests']} requests, got {len(reqs)}; pass the same requests.")
    return editor, reqs, prefixes, analysis


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
    editor, reqs, prefixes, a = _get_analysis(model, tok, hparams, requests, analysis, None, sequential)
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
                        delta = layer_update(editor, l, a["K"][l][idx], R[idx])
                        with weights_restored(editor, [l]):
                            add_update(editor, l, delta)
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
        out[kind]["mean"] = {l: _mean(v) for l, v in out[kind]["score"].items()}
        out[kind]["std"] = {l: _std(v) for l, v in out[kind]["score"].items()}
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
        "efficacy_orig": _mean(d["efficacy_orig"]),
        "p_orig": _mean(d["p_orig"]),
        **{kind: {l: _mean(v) for l, v in d[kind]["efficacy"].items()} for kind in KINDS},
        "p": {kind: {l: _mean(v) for l, v in d[kind]["p"].items()} for kind in KINDS},
    }


def _effects(model, tok, hparams, requests, via, effects, kw) -> dict[str, Any]:
    if effects is None:
        return single_layer_effects(model, tok, hparams, requests, via=via, **kw)
    if effects.get("via") != via:
        raise ValueError(f"the given effects were measured via {effects.get('via')!r}, not {via!r}.")
    return effects


# ------------------------------------------------------------------------------------------------
# (2) cosine similarity and (5a) residual deviation against distribution distance
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
            "mean": {l: _mean(v) for l, v in cos.items()}, "std": {l: _std(v) for l, v in cos.items()}}


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
    out["mean"] = {name: {l: _mean(out[name][l]) for l in analysis["layers"]}
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
    with frozen(model), weights_restored(editor, layers if update else []):
        for l in layers:
            t = targets_at(editor, reqs, prefixes, l)
            keys, outs = keys_at(editor, reqs, prefixes, [l], [l])
            R = t.z.to(outs[l].device) - outs[l]
            out["steps"][l], out["nll"][l] = list(t.steps), list(t.nll)
            out["mean_steps"][l] = _mean(t.steps)
            out["residual_norm"][l] = R.norm(dim=1).tolist()
            out["relative_residual_norm"][l] = (R.norm(dim=1) / outs[l].norm(dim=1).clamp_min(1e-12)).tolist()
            if update:
                add_update(editor, l, layer_update(editor, l, keys[l], R))
    return out


# ------------------------------------------------------------------------------------------------
# (5b) weight-deviation error against batch size and sequential edit length
# ------------------------------------------------------------------------------------------------
def _weight_errors(editor: Editor, a: dict, idx: Sequence[int], layers: Sequence[int]) -> dict[int, tuple[float, float, torch.Tensor]]:
    """Per layer: (||D_dist - D_direct||_F, ||D_direct||_F, D_dist - D_direct) for the requests ``idx``."""
    out = {}
    for l in layers:
        K = a["K"][l][idx]
        d_dist = layer_update(editor, l, K, a["R_dist"][l][idx])
        d_dir = layer_update(editor, l, K, a["R_direct"][l][idx])
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
    editor, reqs, prefixes, a = _get_analysis(model, tok, hparams, requests, analysis, None, False)
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
        out["error"][B] = {l: _mean(v) for l, v in errs.items()}
        out["relative"][B] = {l: _mean(v) for l, v in rels.items()}
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
    hp = coerce_hparams(hparams)
    base = Editor(model, tok, hp)
    batches = [list(requests[s:s + batch_size]) for s in range(0, len(requests), batch_size)] if batch_size > 0 else []
    if not batches:
        raise ValueError("give at least one request and a positive batch_size.")
    state = scratch_state(base.state)
    seq_hp = hp.replace(blue=edit_blue, layer_selection=hp.layer_selection if edit_blue else "all")
    editor = Editor(model, tok, seq_hp, state)
    layers = check_layers(hp.layers, editor.layout.n_layers)
    editor.ensure_second_moments(layers)
    out: dict[str, Any] = {"layers": layers, "batch_size": batch_size, "n_batches": len(batches), "edit_blue": edit_blue,
                           "edits_before": [], "edits": [], "error": {l: [] for l in layers}, "relative": {l: [] for l in layers},
                           "cumulative": {l: [] for l in layers}}
    cum: dict[int, torch.Tensor] = {}
    with weights_restored(editor, layers):
        for t, batch in enumerate(batches):
            reqs = prepare_requests(tok, batch, editor.hp)
            a = _residual_analysis(editor, reqs, editor.prefixes(), layers, False)
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


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------
def summarize_analysis(analysis: dict[str, Any]) -> dict[str, Any]:
    """Plain-number summary of :func:`residual_analysis` (no tensors): mean norms and steps."""
    out: dict[str, Any] = {"layers": analysis["layers"], "z_layer": analysis["z_layer"], "sequential": analysis["sequential"]}
    for key in ("R_direct", "R_dist", "R_last", "h"):
        out[f"{key}_norm"] = {l: _mean(analysis[key][l].norm(dim=1).tolist()) for l in analysis["layers"]}
    out["mean_steps"] = {l: _mean(analysis["steps"][l]) for l in analysis["layers"]}
    return out
