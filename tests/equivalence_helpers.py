"""Reference computations and EasyEdit glue for ``tests/integration/test_equivalence.py``.

Two kinds of reference, both fed exactly the inputs the engine gets (model, tokenizer, requests,
context prefixes with their groups, C0):

* **written out here** (no EasyEdit needed): keys read with a forward hook of our own, one unpadded
  forward per row, averaged within each context-template group and then across the groups; the
  closed-form MEMIT / AlphaEdit updates; AlphaEdit's null-space projector; and the reference layer
  walk (original method and BLUE) driven only by the engine's public probes
  :func:`blue_plugin.research.analysis.targets_at` / :func:`~blue_plugin.research.analysis.keys_at`.
* **EasyEdit's own functions** (``EASYEDIT_ROOT``): ``compute_ks``, ``compute_z``,
  ``apply_memit_to_model`` and ``apply_AlphaEdit_to_model``, with EasyEdit's module-level caches
  (context templates, covariances, AlphaEdit's projector and accumulated keys) set or reset on the
  module objects for the duration of one test, its covariance loader replaced by the C0 the
  engine uses, and the tokenizer right-padded as EasyEdit's editor sets it for MEMIT/AlphaEdit.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import types
from typing import Optional, Sequence

import pytest
import torch

from blue_plugin.research import analysis as A
from blue_plugin.model.layout import find_module, num_layers, resolve_layout
from blue_plugin.editing.contexts import ContextPrefixes
from blue_plugin.model.hooks import frozen
from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.editing.state import EditState

from tests.tiny import full_prompt, prefix_key

EASYEDIT_ENV = "EASYEDIT_ROOT"
SKIP_REASON = (
    f"{EASYEDIT_ENV} is not set: point it at an EasyEdit checkout (git clone https://github.com/zjunlp/EasyEdit, "
    "kept outside this repository; see docs/easyedit.md) to compare with EasyEdit's own functions"
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# context prefixes
# ------------------------------------------------------------------------------------------------
def easyedit_templates(prefixes: ContextPrefixes) -> list[list[str]]:
    """EasyEdit's nested context templates for our prefixes: ``[["{}"], [p + "{}", ...], ...]``,
    one inner list per group. EasyEdit writes a template as ``generated_text + ". {}"``; our
    prefixes are ``generated_text + ". "`` put before the prompt, so the strings are the same."""
    out, start = [], 0
    for g in prefixes.groups:
        out.append([p + "{}" for p in prefixes[start:start + g]])
        start += g
    return out


def probe_editor(model, tok, hp: BLUEHyperParams, requests: Sequence[dict], prefixes: ContextPrefixes):
    """``(editor, reqs, prefixes)`` from :func:`blue_plugin.research.analysis.setup` on a fresh state that
    holds only ``prefixes`` (the engine's public probes need nothing else)."""
    state = EditState()
    state.prefixes[prefix_key(hp)] = prefixes
    editor, reqs, got = A.setup(model, tok, hp, requests, state=state)
    assert list(got) == list(prefixes) and tuple(got.groups) == tuple(prefixes.groups)
    return editor, reqs, got


# ------------------------------------------------------------------------------------------------
# keys by hand
# ------------------------------------------------------------------------------------------------
def _subject_last(tok, prefix: str, request: dict) -> int:
    """Index of the subject's last token in ``prefix + prompt``: the token count of the text up to
    the end of the subject, minus one (what EasyEdit's ``get_words_idxs_in_templates`` does)."""
    prompt, subject = request["prompt"], request["subject"]
    head = prompt.split("{}")[0] + subject if "{}" in prompt else prompt[: prompt.index(subject) + len(subject)]
    return len(tok(prefix + head)["input_ids"]) - 1


@torch.no_grad()
def hooked_key_rows(model, tok, hp: BLUEHyperParams, requests: Sequence[dict], prefixes: Sequence[str], layer: int) -> torch.Tensor:
    """(n_requests, n_prefixes, d_in) float64: the input of the rewrite module of ``layer`` at the
    subject's last token of ``prefix + prompt``, one unpadded forward per row, read with a
    forward pre-hook of our own."""
    module = find_module(model, resolve_layout(model, hp).rewrite(layer))
    store = {}

    def hook(mod, args):
        store["x"] = args[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        out = []
        for req in requests:
            rows = []
            for prefix in prefixes:
                ids = torch.tensor([tok(prefix + full_prompt(req))["input_ids"]])
                model(input_ids=ids, use_cache=False)
                rows.append(store["x"][0, _subject_last(tok, prefix, req)].double())
            out.append(torch.stack(rows))
    finally:
        handle.remove()
    return torch.stack(out)


def group_weighted_mean(rows: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """(n, n_prefixes, d) -> (n, d): the mean within each group, then the mean of the group means
    (every reference's ``compute_ks``), written as one weighted sum: a row of a group of size g
    weighs 1 / (len(groups) * g)."""
    w = torch.cat([torch.full((g,), 1.0 / (len(groups) * g), dtype=rows.dtype) for g in groups])
    return torch.einsum("npd,p->nd", rows, w)


@torch.no_grad()
def hooked_second_moment(model, module_names: Sequence[str], texts: Sequence[str], tok, max_length: int = 64) -> dict[str, torch.Tensor]:
    """E[k k^T] (float64) of the inputs of ``module_names`` over every token of ``texts`` (one
    unpadded forward per text), read with forward pre-hooks of our own."""
    sums, count, handles = {}, 0, []

    def make(name):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
        return hook

    for name in module_names:
        handles.append(find_module(model, name).register_forward_pre_hook(make(name)))
    try:
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
            model(input_ids=torch.tensor([ids]), use_cache=False)
            count += len(ids)
    finally:
        for h in handles:
            h.remove()
    return {name: s / count for name, s in sums.items()}


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------
def memit_closed_form(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam: float, KpKp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Delta = R K^T (lambda C0 + K K^T [+ K_p K_p^T])^-1 for K (n, d_in), R (n, d_out): (d_out, d_in)
    float64 (an explicit inverse, not the engine's solve)."""
    K, R, C0 = K.double().cpu(), R.double().cpu(), C0.double().cpu()
    A_ = lam * C0 + K.T @ K
    if KpKp is not None:
        A_ = A_ + KpKp.double().cpu()
    return R.T @ K @ torch.linalg.inv(A_)


def projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P = U U^T over the singular vectors of C0 with singular value < threshold
    (EasyEdit's ``get_project``: an SVD of the covariance), float64."""
    U, S, _ = torch.linalg.svd(C0.double().cpu())
    U0 = U[:, S < threshold]
    return U0 @ U0.T


def alphaedit_closed_form(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, L2: float, KpKp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Delta with Delta^T = (P (K K^T [+ K_p K_p^T]) + L2 I)^-1 P K R^T: (d_out, d_in) float64."""
    K, R, P = K.double().cpu(), R.double().cpu(), P.double().cpu()
    G = K.T @ K
    if KpKp is not None:
        G = G + KpKp.double().cpu()
    eye = torch.eye(G.shape[0], dtype=torch.float64)
    return (torch.linalg.inv(P @ G + L2 * eye) @ P @ K.T @ R).T


def _add_to_weight(model, hp: BLUEHyperParams, layer: int, delta: torch.Tensor) -> None:
    """W += Delta (d_out, d_in) in the stored orientation (GPT-2's Conv1D stores (d_in, d_out)),
    computed in float64 and rounded once to the stored dtype, as the engine writes."""
    module = find_module(model, resolve_layout(model, hp).rewrite(layer))
    W = module.weight
    d = delta.T if type(module).__name__ == "Conv1D" else delta
    with torch.no_grad():
        W.copy_((W.double() + d.to(W.device)).to(W.dtype))


def reference_walk(
    model,
    tok,
    hp: BLUEHyperParams,
    requests: Sequence[dict],
    prefixes: ContextPrefixes,
    C0: dict[int, torch.Tensor],
    KpKp: Optional[dict[int, torch.Tensor]] = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Edit ``model`` in place with one batch, the reference way: the layers, residuals and updates
    of DESIGN.md section 1 computed here, from the engine's public probes only
    (:func:`~blue_plugin.research.analysis.targets_at`, :func:`~blue_plugin.research.analysis.keys_at`).

    Original method (``hp.blue`` false): z at the last critical layer L; for the i-th layer (of m)
    R = (z - h_L(current)) / (m - i + 1). BLUE: for l in (l_1, l_m), z_l at l on the current model,
    R = z_l - h_l(current). Update: MEMIT's closed form with ``KpKp`` when ``hp.accumulates_keys``,
    or AlphaEdit's with P from C0 and ``KpKp``. Returns the per-layer change (d_out, d_in, float64)
    and the batch's K^T K per layer (to accumulate)."""
    editor, reqs, prefixes = probe_editor(model, tok, hp, requests, prefixes)
    layers = list(hp.edit_layers)
    deltas, kkt = {}, {}

    def update(layer, K, R):
        kp = (KpKp or {}).get(layer)
        if hp.base_method == "AlphaEdit":
            delta = alphaedit_closed_form(K, R, projector(C0[layer], hp.nullspace_threshold), hp.L2, kp)
        else:
            delta = memit_closed_form(K, R, C0[layer], hp.mom2_update_weight, kp if hp.accumulates_keys else None)
        _add_to_weight(model, hp, layer, delta)
        deltas[layer] = delta
        kkt[layer] = K.double().cpu().T @ K.double().cpu()

    with frozen(model):
        if hp.blue:
            for layer in layers:
                z = A.targets_at(editor, reqs, prefixes, layer).z
                keys, outs = A.keys_at(editor, reqs, prefixes, [layer], [layer])
                update(layer, keys[layer], z - outs[layer])
        else:
            last = layers[-1]
            z = A.targets_at(editor, reqs, prefixes, last).z
            for i, layer in enumerate(layers):
                keys, outs = A.keys_at(editor, reqs, prefixes, [layer], [last])
                update(layer, keys[layer], (z - outs[last]) / (len(layers) - i))
    return deltas, kkt


# ------------------------------------------------------------------------------------------------
# EasyEdit
# ------------------------------------------------------------------------------------------------
def easyedit_or_skip() -> types.SimpleNamespace:
    """EasyEdit's MEMIT / AlphaEdit modules (imported through blue_plugin's bridge), or a skip
    naming ``EASYEDIT_ROOT`` when it is unset."""
    root = os.environ.get(EASYEDIT_ENV, "").strip()
    if not root:
        pytest.skip(SKIP_REASON)
    from blue_plugin.integrations.easyedit import import_easyeditor

    import_easyeditor(root)
    mod = importlib.import_module
    return types.SimpleNamespace(
        root=root,
        memit_main=mod("easyeditor.models.memit.memit_main"),
        memit_ks=mod("easyeditor.models.memit.compute_ks"),
        memit_z=mod("easyeditor.models.memit.compute_z"),
        MEMITHyperParams=mod("easyeditor.models.memit.memit_hparams").MEMITHyperParams,
        alpha_main=mod("easyeditor.models.alphaedit.AlphaEdit_main"),
        alpha_ks=mod("easyeditor.models.alphaedit.compute_ks"),
        alpha_z=mod("easyeditor.models.alphaedit.compute_z"),
        AlphaEditHyperParams=mod("easyeditor.models.alphaedit.AlphaEdit_hparams").AlphaEditHyperParams,
    )


def easyedit_requests(requests: Sequence[dict]) -> list[dict]:
    """Requests as EasyEdit's ``execute_memit`` / ``execute_AlphaEdit`` prepare them before calling
    ``compute_ks`` / ``compute_z``: ``target_new`` with a leading space, the subject replaced by
    ``{}`` in the prompt."""
    out = []
    for r in requests:
        r = dict(r)
        if not r["target_new"].startswith(" "):
            r["target_new"] = " " + r["target_new"]
        if "{}" not in r["prompt"]:
            r["prompt"] = r["prompt"].replace(r["subject"], "{}")
        out.append(r)
    return out


def _lm_head_module(model, name: str) -> str:
    """A module whose ``weight`` is the output head and that ``named_parameters`` lists under its
    own name: with tied embeddings EasyEdit's MEMIT ``compute_z`` (``nethook.get_parameter``) finds
    no ``lm_head.weight``, so EasyEdit's configs name the embedding (GPT-2: ``transformer.wte``)."""
    head = find_module(model, name).weight
    for pname, p in model.named_parameters():
        if p is head:
            return pname.rsplit(".", 1)[0]
    raise AssertionError(f"the output head {name} has no parameter of its own")


def easyedit_hparams(ee, kind: str, model, hp: BLUEHyperParams, model_name: str, workdir, **over):
    """EasyEdit's ``MEMITHyperParams`` / ``AlphaEditHyperParams`` with our hyperparameters:
    ``layers`` = the layers our engine edits (the critical layers for the original method), the
    module templates our layout resolved, ``v_loss_layer`` the last block (ours: -1). EasyEdit picks
    matrix sizes from substrings of ``model_name`` (AlphaEdit: "llama"/"qwen" for ``nn.Linear``,
    "gpt2-xl" for GPT-2's ``Conv1D``), so pass such a name."""
    t = dict(resolve_layout(model, hp).templates)
    t["lm_head_module"] = _lm_head_module(model, t["lm_head_module"])
    n = num_layers(model)
    fields = dict(
        layers=list(hp.edit_layers),
        layer_selection="all",
        fact_token=hp.fact_token,
        v_num_grad_steps=hp.v_num_grad_steps,
        v_lr=hp.v_lr,
        v_loss_layer=n - 1 if hp.v_loss_layer in (-1, n - 1) else hp.v_loss_layer,
        v_weight_decay=hp.v_weight_decay,
        clamp_norm_factor=hp.clamp_norm_factor,
        kl_factor=hp.kl_factor,
        mom2_adjustment=True,
        mom2_update_weight=hp.mom2_update_weight,
        rewrite_module_tmp=t["rewrite_module_tmp"],
        layer_module_tmp=t["layer_module_tmp"],
        mlp_module_tmp=t["mlp_module_tmp"],
        attn_module_tmp=t["attn_module_tmp"],
        ln_f_module=t["ln_f_module"],
        lm_head_module=t["lm_head_module"],
        mom2_dataset="(get_cov is patched by the test)",
        mom2_n_samples=hp.mom2_n_samples,
        mom2_dtype="float32",
        alg_name=kind,
        device="cpu",
        model_name=model_name,
        stats_dir=str(workdir / "stats"),
    )
    if kind == "AlphaEdit":
        fields.update(nullspace_threshold=hp.nullspace_threshold, L2=hp.L2, P_loc=str(workdir / "no-such-P.pt"))
        cls = ee.AlphaEditHyperParams
    else:
        cls = ee.MEMITHyperParams
    fields.update(over)
    return cls(**fields)


@contextlib.contextmanager
def easyedit_session(ee, monkeypatch, model, tok, templates: list[list[str]], covs: dict[str, torch.Tensor], workdir):
    """Everything EasyEdit's MEMIT / AlphaEdit keep in module globals or read from outside, set for
    one test and put back afterwards: the context templates (its cache, which it would otherwise
    fill by sampling from the model), ``get_cov`` (it would compute statistics over Wikipedia)
    returning ``covs[module name]`` as float32 (the dtype its own ``get_cov`` returns), AlphaEdit's
    projector and accumulated keys (``P``, ``cache_c`` and their flags) reset, the working
    directory (AlphaEdit writes ``null_space_project.pt`` there), the tokenizer right-padded (EasyEdit's
    editor sets that for MEMIT/AlphaEdit; its index arithmetic assumes it) and the parameters'
    ``requires_grad`` (``compute_z`` switches it off)."""

    def get_cov(model_, tok_, layer_name, *args, **kwargs):
        return covs[layer_name].detach().clone().float()

    for main in (ee.memit_main, ee.alpha_main):
        monkeypatch.setattr(main, "CONTEXT_TEMPLATES_CACHE", templates)
        monkeypatch.setattr(main, "COV_CACHE", {})
        monkeypatch.setattr(main, "get_cov", get_cov)
    for name, value in (("P", None), ("P_loaded", False), ("cache_c", None), ("cache_c_new", False)):
        monkeypatch.setattr(ee.alpha_main, name, value, raising=False)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(tok, "padding_side", "right")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def quiet():
    """EasyEdit prints a lot; collect it (``buf.getvalue()``) instead."""
    return contextlib.redirect_stdout(io.StringIO())


def easyedit_targets(ee, model, tok, requests: Sequence[dict], ehp, layer: int, templates, which: str = "memit") -> tuple[torch.Tensor, list[int]]:
    """EasyEdit's ``compute_z`` for each request (it optimises one request at a time):
    ``(z (n, d_model), iterations)``; ``iterations`` counts the loss lines it printed (one per
    iteration, the last one included)."""
    compute_z = (ee.memit_z if which == "memit" else ee.alpha_z).compute_z
    zs, its = [], []
    for r in easyedit_requests(requests):
        with quiet() as buf:
            zs.append(compute_z(model, tok, r, ehp, layer, templates).detach().float())
        its.append(sum(1 for line in buf.getvalue().splitlines() if line.startswith("loss ")))
    return torch.stack(zs), its


def weight_changes(model, before: dict[str, torch.Tensor], hp: BLUEHyperParams, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per layer, the change of the rewrite weight against ``before`` (a state-dict copy) as
    (d_out, d_in) float64."""
    layout = resolve_layout(model, hp)
    out = {}
    for layer in layers:
        name = layout.weight_name(layer)
        module = find_module(model, layout.rewrite(layer))
        d = model.state_dict()[name].double() - before[name].double()
        out[layer] = d.T if type(module).__name__ == "Conv1D" else d
    return out
