"""blue_plugin.research.analysis and blue_plugin.research.tracing on tiny random models, against hand computations.

The hand computations run the model on one unpadded sequence at a time with plain forward hooks
(block outputs, keys, added residuals, restored MLP outputs), and the closed-form MEMIT update
with an explicit inverse; only the target optimisation itself (compute_targets, tested in
test_targets.py) is taken from the engine, read through a spy.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from blue_plugin.editing import editor as engine
from blue_plugin.research import analysis as A
from blue_plugin import apply_blue_to_model, get_state
from blue_plugin.research import tracing as T
from blue_plugin.model.layout import as_out_in, find_module, resolve_layout
from blue_plugin.evaluation.metrics import answer_nll
from blue_plugin.editing.requests import prepare_requests
from tests.tiny import ARCHS, PREFIXES, all_requests, full_prompt, inject_prefixes, make_hparams, make_model, weights

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]



def _setup(arch: str = "llama", **hp):
    model, tok = make_model(arch)
    hp = make_hparams(**hp)
    inject_prefixes(model, hp)
    return model, tok, hp


# ---- hand computations ----------------------------------------------------------------------------


def _head(req: dict) -> str:
    """The prompt up to the end of the subject."""
    p, s = req["prompt"], req["subject"]
    return p.split("{}")[0] + s if "{}" in p else p[: p.index(s) + len(s)]


def _ids(tok, req: dict, prefix: str) -> tuple[list[int], int]:
    ids = tok(prefix + full_prompt(req))["input_ids"]
    return ids, len(tok(prefix + _head(req))["input_ids"]) - 1


def _mod(model, hp, layer: int, what: str):
    layout = resolve_layout(model, hp)
    return find_module(model, layout.block(layer) if what == "block" else layout.rewrite(layer))


@torch.no_grad()
def _run(model, ids, hooks=()):
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    finally:
        for h in handles:
            h.remove()


def _adder(pos: int, vec: torch.Tensor):
    def hook(module, args, output):
        hid = output[0] if isinstance(output, tuple) else output
        hid = hid.clone()
        hid[0, pos] += vec.to(hid.dtype)
        return (hid,) + tuple(output[1:]) if isinstance(output, tuple) else hid
    return hook


def hand_h(model, tok, hp, layer: int, reqs) -> torch.Tensor:
    out = []
    for r in reqs:
        ids, pos = _ids(tok, r, "")
        store = {}

        def hook(m, a, o):
            store["h"] = (o[0] if isinstance(o, tuple) else o)[0, pos].double()
        _run(model, ids, [(_mod(model, hp, layer, "block"), hook)])
        out.append(store["h"])
    return torch.stack(out)


def hand_keys(model, tok, hp, layer: int, reqs) -> torch.Tensor:
    mod = _mod(model, hp, layer, "rewrite")
    out = []
    for r in reqs:
        ks = []
        for prefix in PREFIXES:
            ids, pos = _ids(tok, r, prefix)
            store = {}
            handle = mod.register_forward_pre_hook(lambda m, a: store.__setitem__("k", a[0][0, pos].double()))
            try:
                _run(model, ids)
            finally:
                handle.remove()
            ks.append(store["k"])
        # compute_ks of the references: mean within each context-template group (the bare prompt;
        # the two prefixes of [[4, 2]]), then across the groups
        out.append((ks[0] + torch.stack(ks[1:]).mean(0)) / 2)
    return torch.stack(out)


def hand_p(model, tok, hp, reqs, answers, layer=None, R=None, prefixes=PREFIXES) -> torch.Tensor:
    """Mean over prefixes of exp(mean target-token log-prob), residual R[j] added at block ``layer``."""
    out = []
    for j, (r, ans) in enumerate(zip(reqs, answers)):
        tgt = tok(" " + ans, add_special_tokens=False)["input_ids"]
        ps = []
        for prefix in prefixes:
            ids, pos = _ids(tok, r, prefix)
            hooks = [(_mod(model, hp, layer, "block"), _adder(pos, R[j]))] if layer is not None else []
            logits = _run(model, ids + tgt[:-1], hooks)
            lp = torch.log_softmax(logits, -1)
            vals = [lp[len(ids) - 1 + k, t] for k, t in enumerate(tgt)]
            ps.append(math.exp(float(sum(vals) / len(vals))))
        out.append(sum(ps) / len(ps))
    return torch.tensor(out, dtype=torch.float64)


def hand_memit(K: torch.Tensor, R: torch.Tensor, lam: float, KpKp=None) -> torch.Tensor:
    """(d_out, d_in) MEMIT update for K (n, d_in), R (n, d_out), C0 = I."""
    K, R = K.double(), R.double()
    A_ = lam * torch.eye(K.shape[1], dtype=torch.float64) + K.T @ K
    if KpKp is not None:
        A_ = A_ + KpKp
    return R.T @ K @ torch.linalg.inv(A_)


def hand_add(model, hp, layer: int, delta: torch.Tensor) -> None:
    mod = _mod(model, hp, layer, "rewrite")
    with torch.no_grad():
        W = as_out_in(mod, mod.weight)
        W.copy_((W.double() + delta).to(W.dtype))


def spy_targets(monkeypatch) -> list:
    calls = []
    original = engine.compute_targets

    def spy(model, tok, block_name, *args, **kwargs):
        res = original(model, tok, block_name, *args, **kwargs)
        calls.append((block_name, res))
        return res
    monkeypatch.setattr(engine, "compute_targets", spy)
    return calls


def _close(a, b, tol=1e-4) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return torch.allclose(a, b, rtol=tol, atol=tol * scale)


# ---- residual analysis ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_analysis_matches_hand_computation(arch, monkeypatch):
    """R^l = z_l - h_l, R_dist at the i-th layer = (z_L - h_L) / (m - i + 1), keys averaged over
    prefixes, all on the unedited model; the model is unchanged afterwards."""
    model, tok, hp = _setup(arch, layers=[0, 1, 2])
    reqs = all_requests()
    before = weights(model)
    calls = spy_targets(monkeypatch)
    a = A.residual_analysis(model, tok, hp, reqs)
    blocks = [resolve_layout(model, hp).block(l) for l in (2, 0, 1)]
    assert [c[0] for c in calls] == blocks  # z_L first, then the other layers, nothing recomputed
    z = {l: c[1].z.double() for l, c in zip((2, 0, 1), calls)}
    hL = hand_h(model, tok, hp, 2, reqs)
    for i, l in enumerate([0, 1, 2]):
        h = hand_h(model, tok, hp, l, reqs)
        assert _close(a["h"][l], h)
        assert _close(a["R_direct"][l], z[l] - h)
        assert _close(a["R_last"][l], z[2] - hL)
        assert _close(a["R_dist"][l], (z[2] - hL) / (3 - i))
        assert _close(a["K"][l], hand_keys(model, tok, hp, l, reqs))
        assert a["steps"][l] == [c[1] for c in calls if c[0] == resolve_layout(model, hp).block(l)][0].steps
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_sequential_analysis_applies_distributed_updates(monkeypatch):
    """sequential=True: before layer 1 the distributed update of layer 0 (MEMIT, C0 = I) is in the
    model, so h_L and R^L at layer 1 are those of the partly edited model; weights restored."""
    model, tok, hp = _setup("llama", layers=[0, 1, 2])
    reqs = all_requests()
    before = weights(model)
    calls = spy_targets(monkeypatch)
    a = A.residual_analysis(model, tok, hp, reqs, sequential=True)
    assert len(calls) == 4  # z_L, then z at 0, 1, 2 on the current model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    zL = calls[0][1].z.double()
    edited = copy.deepcopy(model)
    K0 = hand_keys(edited, tok, hp, 0, reqs)
    R0 = (zL - hand_h(edited, tok, hp, 2, reqs)) / 3
    hand_add(edited, hp, 0, hand_memit(K0, R0, hp.mom2_update_weight))
    hL1 = hand_h(edited, tok, hp, 2, reqs)
    assert _close(a["R_last"][1], zL - hL1)
    assert _close(a["R_dist"][1], (zL - hL1) / 2)
    assert _close(a["h"][1], hand_h(edited, tok, hp, 1, reqs))
    assert _close(a["R_direct"][1], calls[2][1].z.double() - hand_h(edited, tok, hp, 1, reqs))
    assert not _close(a["R_last"][1], a["R_last"][0], 1e-6)  # the update did change h_L


def test_cosine_and_deviation_are_the_hand_quantities():
    model, tok, hp = _setup("llama", layers=[0, 1, 2])
    reqs = all_requests()
    a = A.residual_analysis(model, tok, hp, reqs)
    cos = A.residual_cosine(model, tok, hp, reqs, analysis=a)
    dev = A.residual_deviation(model, tok, hp, reqs, analysis=a)
    for l in (0, 1, 2):
        Rd, Rs, RL = a["R_direct"][l].double(), a["R_dist"][l].double(), a["R_last"][l].double()
        expect = [(float(x @ y) / float(x.norm() * y.norm())) for x, y in zip(Rs, Rd)]
        assert _close(cos["cosine"][l], expect, 1e-9)
        assert _close(dev["to_last"][l], (Rd - RL).norm(dim=1), 1e-9)
        assert _close(dev["to_distributed"][l], (Rd - Rs).norm(dim=1), 1e-9)
        assert _close(dev["to_distributed_rel"][l], (Rd - Rs).norm(dim=1) / Rd.norm(dim=1), 1e-9)
        assert dev["distance"][l] == 2 - l
    assert cos["mean"][2] == pytest.approx(1.0)
    assert dev["mean"]["to_last"][2] == pytest.approx(0.0)
    assert dev["mean"]["to_last"][0] > 0


def test_analysis_rejects_bad_input():
    model, tok, hp = _setup("llama")
    reqs = all_requests()
    with pytest.raises(ValueError, match="ascending"):
        A.residual_analysis(model, tok, hp, reqs, layers=[2, 1])
    with pytest.raises(ValueError, match="outside the model"):
        A.residual_analysis(model, tok, hp, reqs, layers=[1, 9])
    a = A.residual_analysis(model, tok, hp, reqs[:2])
    with pytest.raises(ValueError, match="computed for 2 requests"):
        A.contribution_scores(model, tok, hp, reqs, analysis=a)
    with pytest.raises(ValueError, match="via"):
        A.contribution_scores(model, tok, hp, reqs[:2], analysis=a, via="logits")
    with pytest.raises(ValueError, match="batch sizes"):
        A.weight_deviation_vs_batch_size(model, tok, hp, reqs[:2], [3], analysis=a)
    with pytest.raises(ValueError):
        A.residual_analysis(model, tok, hp, [])


# ---- probabilities, contribution scores, single-layer efficacy --------------------------------------


def test_answer_probabilities_match_hand_and_metrics():
    model, tok, hp = _setup("llama")
    reqs = all_requests()
    editor, preqs, prefixes = A.setup(model, tok, hp, reqs)
    r = A.answer_probabilities(editor, preqs, prefixes)
    assert _close(r["p"], hand_p(model, tok, hp, reqs, [q["target_new"] for q in reqs]), 1e-5)
    prompts = [full_prompt(q) for q in reqs]
    nll_new = answer_nll(model, tok, prompts, [q["target_new"] for q in reqs])
    nll_true = answer_nll(model, tok, prompts, [q["ground_truth"] for q in reqs])
    assert _close(r["nll_new"], nll_new, 1e-5)
    assert _close(r["nll_true"], nll_true, 1e-5)
    assert r["efficacy"] == [float(a < b) for a, b in zip(nll_new.tolist(), nll_true.tolist())]


def test_contribution_hidden_adds_the_residual_at_the_block():
    """via='hidden': P with R added to block l's output at the edited token, minus P_orig."""
    model, tok, hp = _setup("llama", layers=[0, 1, 2])
    reqs = all_requests()
    a = A.residual_analysis(model, tok, hp, reqs)
    c = A.contribution_scores(model, tok, hp, reqs, analysis=a, via="hidden")
    news = [q["target_new"] for q in reqs]
    p0 = hand_p(model, tok, hp, reqs, news)
    assert _close(c["p_orig"], p0, 1e-5)
    for l in (0, 2):
        for kind, key in (("distributed", "R_dist"), ("direct", "R_direct")):
            p = hand_p(model, tok, hp, reqs, news, layer=l, R=a[key][l].double())
            assert _close(c[kind]["p"][l], p, 1e-5)
            assert _close(c[kind]["score"][l], p - p0, 1e-4)
            assert c[kind]["mean"][l] == pytest.approx(float((p - p0).mean()), rel=1e-4, abs=1e-9)
    # at the last layer the distributed residual is R^L itself
    assert c["direct"]["mean"][2] == pytest.approx(c["distributed"]["mean"][2])
    e = A.single_layer_effects(model, tok, hp, reqs, analysis=a, via="hidden")
    assert A.contribution_scores(model, tok, hp, reqs, via="hidden", effects=e)["direct"]["mean"] == c["direct"]["mean"]
    assert "mean" not in e["direct"]  # the given effects are not modified
    eff = A.single_layer_efficacy(model, tok, hp, reqs, via="hidden", effects=e)
    assert eff["direct"][0] == pytest.approx(sum(e["direct"]["efficacy"][0]) / 3)
    with pytest.raises(ValueError, match="measured via"):
        A.single_layer_efficacy(model, tok, hp, reqs, via="weight", effects=e)


@pytest.mark.parametrize("arch", ARCHS)
def test_contribution_weight_applies_only_that_layers_update(arch):
    """via='weight': the MEMIT update (C0 = I) of layer l alone, requests in batches of 2."""
    model, tok, hp = _setup(arch, layers=[0, 1, 2])
    reqs = all_requests()
    before = weights(model)
    a = A.residual_analysis(model, tok, hp, reqs)
    c = A.contribution_scores(model, tok, hp, reqs, analysis=a, via="weight", batch_size=2)
    s = A.single_layer_efficacy(model, tok, hp, reqs, analysis=a, batch_size=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    news = [q["target_new"] for q in reqs]
    p0 = hand_p(model, tok, hp, reqs, news)
    for l in (0, 1):
        for kind, key in (("distributed", "R_dist"), ("direct", "R_direct")):
            expect, eff = [], []
            for idx in ([0, 1], [2]):
                edited = copy.deepcopy(model)
                hand_add(edited, hp, l, hand_memit(a["K"][l][idx], a[key][l][idx], hp.mom2_update_weight))
                sub = [reqs[j] for j in idx]
                expect += hand_p(edited, tok, hp, sub, [news[j] for j in idx]).tolist()
                prompts = [full_prompt(q) for q in sub]
                nn_ = answer_nll(edited, tok, prompts, [q["target_new"] for q in sub])
                nt = answer_nll(edited, tok, prompts, [q["ground_truth"] for q in sub])
                eff += [float(x < y) for x, y in zip(nn_.tolist(), nt.tolist())]
            assert _close(c[kind]["p"][l], expect, 1e-4)
            assert _close(c[kind]["score"][l], torch.tensor(expect) - p0, 1e-3)
            assert c[kind]["efficacy"][l] == eff
            assert s[kind][l] == pytest.approx(sum(eff) / len(eff))


# ---- optimisation steps --------------------------------------------------------------------------------


def test_steps_layer_by_layer_update_earlier_layers(monkeypatch):
    """update=True: layer 0 gets its full direct residual (MEMIT, C0 = I) before the target of
    layer 1 is optimised, so that target starts from h_1 of the edited model."""
    model, tok, hp = _setup("llama", layers=[0, 1], v_early_stop_loss=5.9)
    reqs = all_requests()
    before = weights(model)
    calls = spy_targets(monkeypatch)
    out = A.optimisation_steps(model, tok, hp, reqs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [c[0] for c in calls] == [resolve_layout(model, hp).block(l) for l in (0, 1)]
    for (_, res), l in zip(calls, (0, 1)):
        assert out["steps"][l] == res.steps
        assert out["mean_steps"][l] == pytest.approx(sum(res.steps) / len(res.steps))
        assert all(0 <= s <= hp.v_num_grad_steps for s in res.steps)
    edited = copy.deepcopy(model)
    R0 = calls[0][1].z.double() - hand_h(edited, tok, hp, 0, reqs)
    hand_add(edited, hp, 0, hand_memit(hand_keys(edited, tok, hp, 0, reqs), R0, hp.mom2_update_weight))
    assert _close(calls[1][1].h, hand_h(edited, tok, hp, 1, reqs))
    assert not _close(calls[1][1].h, hand_h(model, tok, hp, 1, reqs), 1e-6)
    rel = out["relative_residual_norm"][1]
    R1 = calls[1][1].z.double() - hand_h(edited, tok, hp, 1, reqs)
    expect = R1.norm(dim=1) / hand_h(edited, tok, hp, 1, reqs).norm(dim=1)
    assert torch.allclose(torch.tensor(rel, dtype=torch.float64), expect, rtol=1e-3, atol=1e-5)
    base = A.optimisation_steps(model, tok, hp, reqs, update=False)
    assert _close(calls[-1][1].h, hand_h(model, tok, hp, 1, reqs))  # without update: unedited model
    assert set(base["steps"]) == {0, 1}


# ---- weight deviation -------------------------------------------------------------------------------------


def test_weight_deviation_vs_batch_size_is_the_closed_form_difference():
    model, tok, hp = _setup("llama", layers=[0, 1, 2])
    reqs = all_requests()
    a = A.residual_analysis(model, tok, hp, reqs)
    out = A.weight_deviation_vs_batch_size(model, tok, hp, reqs, [1, 2, 3], analysis=a)
    lam = hp.mom2_update_weight
    for B, groups in ((1, [[0], [1], [2]]), (2, [[0, 1]]), (3, [[0, 1, 2]])):
        assert out["n_batches"][B] == len(groups)
        for l in (0, 1, 2):
            errs, rels = [], []
            for idx in groups:
                K = a["K"][l][idx]
                d_dist = hand_memit(K, a["R_dist"][l][idx], lam)
                d_dir = hand_memit(K, a["R_direct"][l][idx], lam)
                errs.append(float((d_dist - d_dir).norm()))
                rels.append(errs[-1] / float(d_dir.norm()))
            assert out["error"][B][l] == pytest.approx(sum(errs) / len(errs), rel=1e-6, abs=1e-12)
            assert out["relative"][B][l] == pytest.approx(sum(rels) / len(rels), rel=1e-6, abs=1e-12)
    assert out["error"][3][2] == pytest.approx(0.0, abs=1e-12)  # R_dist = R^L at the last layer


def test_weight_deviation_vs_sequence_uses_the_accumulated_keys():
    """Batch 0 on the unedited model; batch 1 after the engine's original-method edit of batch 0,
    with K_0 K_0^T added to the normal matrix; model and its edit state unchanged afterwards."""
    model, tok, hp = _setup("llama", layers=[0, 1])
    reqs = all_requests(2)
    before = weights(model)
    out = A.weight_deviation_vs_sequence(model, tok, hp, reqs, 1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert get_state(model).n_edits == 0 and not get_state(model).history
    assert out["edits"] == [1, 2] and out["edits_before"] == [0, 1] and out["n_batches"] == 2
    lam = hp.mom2_update_weight
    a0 = A.residual_analysis(model, tok, hp, reqs[:1])
    e0 = float((hand_memit(a0["K"][0], a0["R_dist"][0], lam) - hand_memit(a0["K"][0], a0["R_direct"][0], lam)).norm())
    assert out["error"][0][0] == pytest.approx(e0, rel=1e-6)
    assert out["cumulative"][0][0] == pytest.approx(e0, rel=1e-6)
    edited = copy.deepcopy(model)
    inject_prefixes(edited, hp)
    apply_blue_to_model(edited, tok, reqs[:1], hp.replace(blue=False))
    kpkp = get_state(edited).layers[0].kpkp
    assert _close(kpkp, a0["K"][0].double().T @ a0["K"][0].double(), 1e-5)
    a1 = A.residual_analysis(edited, tok, hp, reqs[1:2])
    d1 = hand_memit(a1["K"][0], a1["R_dist"][0], lam, kpkp) - hand_memit(a1["K"][0], a1["R_direct"][0], lam, kpkp)
    assert out["error"][0][1] == pytest.approx(float(d1.norm()), rel=1e-4)
    d0 = hand_memit(a0["K"][0], a0["R_dist"][0], lam) - hand_memit(a0["K"][0], a0["R_direct"][0], lam)
    assert out["cumulative"][0][1] == pytest.approx(float((d0 + d1).norm()), rel=1e-4)


# ---- causal tracing -----------------------------------------------------------------------------------------


def _trace_hand(model, tok, hp, req: dict, layer: int, samples: int, noise: float, seed: int, kind="mlp"):
    """P_clean, P_corrupt and P with the kind's output of ``layer`` restored at the subject's last
    token, one sample at a time (inputs_embeds with the noise added by hand)."""
    layout = resolve_layout(model, hp)
    tmpl = {"mlp": "mlp_module_tmp", "hidden": "layer_module_tmp"}[kind]
    mod = find_module(model, layout.templates[tmpl].format(layer))
    ids = tok(full_prompt(req))["input_ids"]
    last = len(tok(_head(req))["input_ids"]) - 1
    head_wo_subject = req["prompt"].split("{}")[0] if "{}" in req["prompt"] else req["prompt"][: req["prompt"].index(req["subject"])]
    head_wo_subject = head_wo_subject.rstrip()  # the space before the subject belongs to its first token
    first = len(tok(head_wo_subject)["input_ids"]) if head_wo_subject else (1 if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else 0)
    x = torch.tensor([ids])
    store = {}
    h = mod.register_forward_hook(lambda m, a, o: store.__setitem__("c", (o[0] if isinstance(o, tuple) else o)[0, last].clone()))
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits[0, -1]
    h.remove()
    probs = logits.softmax(-1)
    ans = int(probs.argmax())
    emb = model.get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    nz = torch.randn(samples, last - first + 1, emb.weight.shape[1], generator=g) * noise

    def replace(m, a, o):
        hid = (o[0] if isinstance(o, tuple) else o).clone()
        hid[0, last] = store["c"]
        return (hid,) + tuple(o[1:]) if isinstance(o, tuple) else hid

    corrupt, restored = [], []
    for k in range(samples):
        e = emb(x).detach().clone()
        e[0, first:last + 1] += nz[k]
        with torch.no_grad():
            corrupt.append(float(model(inputs_embeds=e, use_cache=False).logits[0, -1].softmax(-1)[ans]))
            hh = mod.register_forward_hook(replace)
            try:
                restored.append(float(model(inputs_embeds=e, use_cache=False).logits[0, -1].softmax(-1)[ans]))
            finally:
                hh.remove()
    return float(probs[ans]), sum(corrupt) / samples, sum(restored) / samples, (first, last)


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_trace_matches_hand_restoration(arch):
    model, tok, hp = _setup(arch, layers=[0, 1, 2])
    reqs = all_requests(2)
    preqs = prepare_requests(tok, reqs, hp)
    sigma = T.embedding_noise_std(model, tok, preqs)
    out = T.causal_trace(model, tok, hp, reqs, samples=3, noise_scale=3.0, seed=5)
    assert out["sigma"] == pytest.approx(sigma) and out["noise"] == pytest.approx(3 * sigma)
    for j, req in enumerate(reqs):
        _, first, last = T.subject_span(tok, preqs[j])
        for layer in (0, 2):
            pc, pk, pr, span = _trace_hand(model, tok, hp, req, layer, 3, 3 * sigma, 5 + j)
            assert span == (first, last)
            assert out["p_clean"][j] == pytest.approx(pc, rel=1e-5)
            assert out["p_corrupt"][j] == pytest.approx(pk, rel=1e-4)
            assert out["per_request"][j][layer] == pytest.approx(pr - pk, rel=1e-3, abs=1e-7)
    assert out["indirect_effect"][1] == pytest.approx(sum(r[1] for r in out["per_request"]) / 2)
    assert len(out["indirect_effect"]) == resolve_layout(model, hp).n_layers


def test_causal_trace_invariants():
    """No noise: nothing to restore (IE = 0). Subject at the end of the prompt: restoring the last
    block's output there gives back the clean probability exactly."""
    model, tok, hp = _setup("llama")
    req = [{"prompt": "The capital of France", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"}]
    quiet = T.causal_trace(model, tok, hp, req, samples=2, noise_scale=0.0)
    assert quiet["p_corrupt"][0] == pytest.approx(quiet["p_clean"][0], rel=1e-6)
    assert max(abs(x) for x in quiet["indirect_effect"]) < 1e-6
    out = T.causal_trace(model, tok, hp, req, kind="hidden", samples=4, noise_std=1.0)
    assert out["noise"] == pytest.approx(3.0)
    assert out["p_corrupt"][0] != pytest.approx(out["p_clean"][0], rel=1e-3)
    assert out["per_request"][0][-1] == pytest.approx(out["p_clean"][0] - out["p_corrupt"][0], rel=1e-5)
    wide = T.causal_trace(model, tok, hp, req, kind="hidden", samples=4, noise_std=1.0, window=3)
    assert wide["per_request"][0][-1] == pytest.approx(out["per_request"][0][-1], rel=1e-5)  # window clipped at the top
    assert T.window_of(2, 3, 4) == [1, 2, 3] and T.window_of(0, 4, 4) == [0, 1]
    with pytest.raises(ValueError, match="kind"):
        T.causal_trace(model, tok, hp, req, kind="ffn")
    with pytest.raises(ValueError, match="samples"):
        T.causal_trace(model, tok, hp, req, samples=0)


def test_suggest_critical_layers():
    assert T.suggest_critical_layers([0, 1, 5, 4, 0, 9], 1) == [5]
    assert T.suggest_critical_layers([0, 1, 5, 4, 0, 0], 2) == [2, 3]
    assert T.suggest_critical_layers([1, 1, 1, 1], 2) == [0, 1]
    with pytest.raises(ValueError):
        T.suggest_critical_layers([1, 2], 3)


# ---- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_writes_json_plots_and_resumes(tmp_path, monkeypatch):
    """benchmarks.analysis end to end on a tiny Llama saved as a model folder: every analysis,
    analysis.json + summary.md + one PNG each; a second run reuses the finished analyses."""
    import benchmarks.analysis as cli

    data = cli.DEFAULT_DATA
    if not data.is_file():
        pytest.skip(f"{data} not available")
    model, tok = make_model("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    argv = ["--what", "all", "--n", "3", "--model", str(folder), "--out", str(out), "--set", "layers=[0, 1, 2]",
            "--set", "v_loss_layer=-1", "--set", "mom2_n_samples=10", "--set", "mom2_max_length=12",
            "--set", "context_template_length_params=[[3, 1]]", "--stats-dir", str(tmp_path / "stats"), "--steps", "2",
            "--batch-sizes", "1,2", "--seq-batches", "2", "--seq-batch-size", "1", "--trace-samples", "2",
            "--dynamic-batch-size", "2", "--smoke", "--threads", "1"]
    assert cli.main(argv) == 0
    res = cli.read_json(out / "analysis.json")
    assert set(res["results"]) == set(cli.ANALYSES) and res["config"]["smoke"] is True
    assert {p.name for p in out.glob("*.png")} == {f"{a}.png" for a in cli.ANALYSES}
    assert "SMOKE OUTPUT" in (out / "summary.md").read_text()
    dyn = res["results"]["dynamic"]
    n_batches = -(-dyn["n"] // 2)
    assert dyn["fixed"]["layers_per_batch"] == [[0, 2]] * n_batches
    assert len(dyn["dynamic"]["layers_per_batch"]) == n_batches
    assert all(a in (0, 1) and b in (1, 2) and a < b for a, b in dyn["dynamic"]["layers_per_batch"])
    assert all(sel["chosen"] == pair for sel, pair in zip(dyn["dynamic"]["selection"], dyn["dynamic"]["layers_per_batch"]))
    cos = res["results"]["cosine"]["original"]["mean"]
    assert cos["2"] == pytest.approx(1.0)
    calls = []
    original = cli.run_analysis
    monkeypatch.setattr("benchmarks.analysis.cli.run_analysis", lambda name, ctx: calls.append(name) or original(name, ctx))
    assert cli.main(argv) == 0
    assert calls == []  # everything reused
    argv[argv.index("--trace-samples") + 1] = "1"
    assert cli.main(argv) == 0
    assert calls == ["tracing"]  # only the analysis whose options changed
    assert cli.read_json(out / "analysis.json")["results"]["tracing"]["mlp"]["samples"] == 1
    with pytest.raises(ValueError, match="unknown analysis"):
        cli.parse_what("cosine,attention")
    assert cli.parse_int_list("0-2,5", "x") == [0, 1, 2, 5]
