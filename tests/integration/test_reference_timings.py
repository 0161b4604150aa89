"""Where the engine follows the reference code: keys averaged per context-template group, RECT's
mask applied when the batch is written, PRUNE's restraint applied once per sequence.

Tiny random GPT-2 (Conv1D) and Llama models of :mod:`tests.tiny`; expected values are computed
here from hooked activations, independent SVDs and runs of plain MEMIT.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from blue_plugin import apply_blue_to_model, get_state
from blue_plugin.model.layout import as_out_in, find_module, resolve_layout
from blue_plugin.editing.contexts import ContextPrefixes, with_groups
from blue_plugin.editing.editor import Editor
from blue_plugin.editing.keys import group_mean
from blue_plugin.editing.rules import rect_sparsify
from blue_plugin.editing.session import EditSession
from blue_plugin.editing.state import EditState
from tests.tiny import (
    ARCHS,
    all_requests,
    changed_params,
    full_prompt,
    inject_prefixes,
    make_hparams,
    make_model,
    restore,
    rule_spy,
    weights,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

#: Three groups: the bare prompt, two prefixes of [4, 2], one of [6, 1].
GROUPED = ["", "The cat sat on the mat. ", "I see a dog. ", "You like the red house. "]
GROUP_PARAMS = [[4, 2], [6, 1]]


def _setup(arch: str, prefixes=None, **hp_overrides):
    model, tok = make_model(arch)
    hp = make_hparams(**hp_overrides)
    if prefixes is None:
        inject_prefixes(model, hp)
    else:
        inject_prefixes(model, hp, prefixes)
    return model, tok, hp


def _W(model, hp, layer: int) -> torch.Tensor:
    """(d_out, d_in) float64 copy of the rewrite weight of ``layer``."""
    module = find_module(model, resolve_layout(model, hp).rewrite(layer))
    return as_out_in(module, module.weight).detach().double().clone()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    a, b = a.double(), b.double()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return torch.allclose(a, b, rtol=rtol, atol=rtol * scale)


# ---- 1. keys: mean within each context-template group, then across the groups ------------------


@torch.no_grad()
def _hooked_keys(model, tok, hp, layer: int, request: dict, prefixes) -> list[torch.Tensor]:
    """Input of the rewrite module at the subject's last token, one unpadded forward per prefix."""
    module = find_module(model, resolve_layout(model, hp).rewrite(layer))
    prompt, subject = full_prompt(request), request["subject"]
    head = prompt[: prompt.index(subject) + len(subject)]
    out = []
    for prefix in prefixes:
        store = {}
        handle = module.register_forward_pre_hook(lambda m, args: store.__setitem__("k", args[0]))
        try:
            model(input_ids=torch.tensor([tok(prefix + prompt)["input_ids"]]), use_cache=False)
        finally:
            handle.remove()
        out.append(store["k"][0, len(tok(prefix + head)["input_ids"]) - 1].double())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_are_group_means_of_hooked_activations(arch, monkeypatch):
    """K = mean over groups of the mean within each group: (k_bare + (k_1 + k_2) / 2 + k_3) / 3
    for groups (1, 2, 1), not the flat mean (k_bare + k_1 + k_2 + k_3) / 4."""
    model, tok, hp = _setup(arch, prefixes=GROUPED, layers=[1], context_template_length_params=GROUP_PARAMS)
    editor = Editor(model, tok, hp)
    assert editor.prefixes() == GROUPED and editor.prefixes().groups == (1, 2, 1)
    calls = rule_spy(monkeypatch, "MEMIT")
    reqs = all_requests()
    apply_blue_to_model(model, tok, reqs, hp, copy=True)  # ``model`` itself stays unedited
    K = calls[0]["K"].T  # (n, d_in), taken on the unedited model (layer 1 is the first update)
    for j, req in enumerate(reqs):
        k = _hooked_keys(model, tok, hp, 1, req, GROUPED)
        expected = (k[0] + (k[1] + k[2]) / 2 + k[3]) / 3
        flat = sum(k) / 4
        assert _close(K[j], expected, rtol=1e-4)
        assert float((K[j] - flat).norm()) > 100 * float((K[j] - expected).norm())


def test_group_mean_and_groups():
    k = torch.arange(2 * 4 * 3, dtype=torch.float64).view(2, 4, 3) ** 2
    out = group_mean(k, ContextPrefixes(GROUPED, (1, 2, 1)))
    assert torch.allclose(out, (k[:, 0] + (k[:, 1] + k[:, 2]) / 2 + k[:, 3]) / 3)
    # a plain list: the bare prompt and one group of the rest (MEMIT's [[10, 5]] weighting)
    assert torch.allclose(group_mean(k, GROUPED), (k[:, 0] + k[:, 1:].mean(dim=1)) / 2)
    assert with_groups(GROUPED, GROUP_PARAMS).groups == (1, 2, 1)
    assert with_groups(GROUPED, [[4, 3], [9, 0]]).groups == (1, 3)
    with pytest.raises(TypeError):
        group_mean(k, 4)
    with pytest.raises(ValueError):
        ContextPrefixes(["x", ""])
    with pytest.raises(ValueError):
        ContextPrefixes(GROUPED, (1, 2))


def test_prefix_cache_keeps_or_derives_groups(caplog):
    """A plain list in the state (an older cache, or prefixes put in by hand) is grouped by the
    parameters of its key; a count that does not fit falls back to two groups with a warning.
    Saved states keep the groups; states saved without them get them back from the key."""
    model, tok = make_model("llama")
    hp = make_hparams(context_template_length_params=GROUP_PARAMS)
    inject_prefixes(model, hp, GROUPED)
    state = get_state(model)
    prefixes = Editor(model, tok, hp).prefixes()
    assert isinstance(prefixes, ContextPrefixes) and prefixes.groups == (1, 2, 1)
    (key,) = state.prefixes
    assert state.prefixes[key] is prefixes  # migrated in place

    tensors, meta = state.to_tensors()
    back = EditState.from_tensors(tensors, meta)
    assert back.prefixes[key] == GROUPED and back.prefixes[key].groups == (1, 2, 1)
    meta["prefixes"] = [entry[:2] for entry in meta["prefixes"]]  # the layout before groups were saved
    old = EditState.from_tensors(tensors, meta)
    assert type(old.prefixes[key]) is list
    assert Editor(model, tok, hp, state=old).prefixes().groups == (1, 2, 1)

    odd = make_hparams(context_template_length_params=[[4, 5]])
    inject_prefixes(model, odd, GROUPED)
    with caplog.at_level(logging.WARNING, logger="blue_plugin"):
        assert Editor(model, tok, odd).prefixes().groups == (1, 3)
    assert any("do not fit" in r.getMessage() for r in caplog.records)


# ---- 2. RECT: dense walk, mask when the batch is written ----------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("blue", [True, False])
def test_rect_mask_timing(arch, blue, monkeypatch):
    """'batch' (default): while layer 2's target and update are computed, layer 0 carries its
    DENSE update; what is written is, per layer, W_before + the top-k fraction of the layer's
    update by |Delta| / |W_before| (exactly k entries change). 'layer': layer 0 carries its
    masked update already, so layer 2 is computed on another model."""
    fraction = 0.4
    last = {}
    for timing in ("batch", "layer"):
        model, tok, hp = _setup(arch, layers=[0, 2], blue=blue, base_method="RECT",
                                rect_keep_fraction=fraction, rect_mask_timing=timing)
        assert not hp.accumulates_keys
        before = {l: _W(model, hp, l) for l in (0, 2)}
        calls = rule_spy(monkeypatch, "RECT", callback=lambda: _W(model, hp, 0))
        apply_blue_to_model(model, tok, all_requests(), hp)
        d0, d2 = calls[0]["delta"], calls[1]["delta"]
        k = round(fraction * d0.numel())
        # what layer 2 was computed with: W0 + the walk's update of layer 0, rounded to float32
        assert torch.equal(calls[1]["extra"], (before[0] + d0).float().double())
        if timing == "batch":
            assert int((d0 != 0).sum()) > 2 * k  # dense during the walk
            for l, d in ((0, d0), (2, d2)):
                written = _W(model, hp, l)
                assert int((written != before[l]).sum()) == k
                assert torch.equal(written, (before[l] + rect_sparsify(d, before[l], fraction)).float().double())
            rec = get_state(model).history[-1]
            assert rec["kept_fraction"] == {0: k / d0.numel(), 2: k / d0.numel()}
        else:
            assert int((d0 != 0).sum()) == k and int((d2 != 0).sum()) == k  # masked at once
            for l, d in ((0, d0), (2, d2)):
                assert torch.equal(_W(model, hp, l), (before[l] + d).float().double())
        last[timing] = _W(model, hp, 2)
    assert not _close(last["batch"], last["layer"], rtol=1e-3)


@pytest.mark.parametrize("method", ["RECT", "PRUNE"])
def test_rect_and_prune_do_not_accumulate_keys_by_default(method, monkeypatch):
    model, tok, hp = _setup("llama", layers=[0, 2], base_method=method)
    calls = rule_spy(monkeypatch, method)
    reqs = all_requests()
    apply_blue_to_model(model, tok, reqs[:1], hp)
    apply_blue_to_model(model, tok, reqs[1:], hp)
    assert calls[2]["KpKp"] is None and calls[3]["KpKp"] is None
    hp_acc = hp.replace(accumulate_keys=True)
    apply_blue_to_model(model, tok, reqs[:1], hp_acc)
    assert calls[4]["KpKp"] is not None


# ---- 3. PRUNE: restrain the sequence's change once -----------------------------------------------


def _restrained(W: torch.Tensor, W0: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Independent PRUNE: W0 + restrain(W - W0), with (top singular value / sigma_max, count above)."""
    sigma_max = float(torch.linalg.svdvals(W0)[0])
    U, S, Vh = torch.linalg.svd(W - W0, full_matrices=False)
    S2 = torch.tensor([math.log(s) - math.log(sigma_max) + sigma_max if s > sigma_max else s for s in S.tolist()],
                      dtype=W.dtype)
    return W0 + U @ torch.diag(S2) @ Vh, float(S[0]) / sigma_max, int((S > sigma_max).sum())


def _prune_setup(arch: str, method: str = "PRUNE", **hp_overrides):
    """Rewrite weights scaled to sigma_max = 1.5 and weak regularisation: the accumulated change
    of two batches has singular values above sigma_max, so the restraint is active."""
    model, tok, hp = _setup(arch, layers=[0, 2], base_method=method, mom2_update_weight=1e-6, **hp_overrides)
    layout = resolve_layout(model, hp)
    with torch.no_grad():
        for l in (0, 2):
            w = model.get_parameter(layout.weight_name(l))
            w.mul_(1.5 / float(torch.linalg.svdvals(w)[0]))
    return model, tok, hp


BATCHES = [all_requests()[:2], all_requests()[2:], all_requests()[:1]]


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_serves_the_restraint_of_memit_without_accumulation(arch):
    """After every batch: PRUNE's unrestrained state is bit-for-bit MEMIT's weights (MEMIT without
    K_p K_p^T), and the model serves exactly W_orig + restrain(W_memit - W_orig)."""
    prune, tok, hp = _prune_setup(arch)
    memit, _, hp_memit = _prune_setup(arch, "MEMIT", accumulate_keys=False)
    W0 = {l: _W(prune, hp, l) for l in (0, 2)}
    state = get_state(prune)
    for t, batch in enumerate(BATCHES[:2]):
        apply_blue_to_model(prune, tok, batch, hp)
        apply_blue_to_model(memit, tok, batch, hp_memit)
        rec = state.history[-1]
        for l in (0, 2):
            ls = state.layers[l]
            W_memit = _W(memit, hp, l)
            expected, top, above = _restrained(W_memit, W0[l])
            assert ls.W_unrestrained is not None and above >= 1  # the restraint is active
            stored_memit = memit.get_parameter(resolve_layout(memit, hp).weight_name(l))
            assert torch.equal(ls.W_unrestrained, stored_memit)
            assert _close(_W(prune, hp, l), expected)
            assert not _close(_W(prune, hp, l), W_memit, rtol=1e-3)
            assert rec["change_sigma"][l]["max_over_sigma_max"] == pytest.approx(top, rel=1e-6)
            assert rec["change_sigma"][l]["above"] == above


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_finalize_is_idempotent_and_does_not_disturb_the_sequence(arch, caplog):
    prune, tok, hp = _prune_setup(arch)
    memit, _, hp_memit = _prune_setup(arch, "MEMIT", accumulate_keys=False)
    W0 = {l: _W(prune, hp, l) for l in (0, 2)}
    for batch in BATCHES[:2]:
        apply_blue_to_model(prune, tok, batch, hp)
        apply_blue_to_model(memit, tok, batch, hp_memit)
    state = get_state(prune)
    served, snap = weights(prune), state.snapshot()
    info = Editor(prune, tok, hp).finalize()
    assert info == state.history[-1]["change_sigma"]
    assert changed_params(served, prune) == set() and state.same_edits(snap)
    assert EditSession(prune, tok, hp, adopt_edits=True).finalize() == info  # again: nothing changes
    assert changed_params(served, prune) == set() and state.same_edits(snap)
    assert Editor(memit, tok, hp_memit).finalize() == {}

    # Served weights replaced outside by the unrestrained ones: finalize restrains them again
    # (with a warning about the outside change) and the state holds them as unrestrained.
    for l in (0, 2):
        restore(prune, {resolve_layout(prune, hp).weight_name(l): state.layers[l].W_unrestrained.clone()})
    with caplog.at_level(logging.WARNING, logger="blue_plugin"):
        assert Editor(prune, tok, hp).finalize() == info
    assert any("outside" in r.getMessage() for r in caplog.records)
    for l in (0, 2):
        assert _close(_W(prune, hp, l), _restrained(_W(memit, hp, l), W0[l])[0])
        assert torch.equal(state.layers[l].W_unrestrained, snap.layers[l].W_unrestrained)

    # the sequence goes on from the unrestrained weights, as MEMIT does
    apply_blue_to_model(prune, tok, BATCHES[2], hp)
    apply_blue_to_model(memit, tok, BATCHES[2], hp_memit)
    for l in (0, 2):
        W_memit = memit.get_parameter(resolve_layout(memit, hp).weight_name(l))
        assert torch.equal(state.layers[l].W_unrestrained, W_memit)
        assert _close(_W(prune, hp, l), _restrained(_W(memit, hp, l), W0[l])[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_easyedit_restore_starts_a_fresh_sequence(arch):
    """EasyEdit restores weights_copy (the served weights before the call): the unrestrained
    weights are dropped with the rest of the sequence, and the next call is a first batch."""
    model, tok, hp = _prune_setup(arch)
    state = get_state(model)
    _, weights_copy = apply_blue_to_model(model, tok, BATCHES[0], hp, return_orig_weights=True)
    assert state.unrestrained_layers() == [0, 2]
    restore(model, weights_copy)
    apply_blue_to_model(model, tok, BATCHES[1], hp)
    assert state.n_edits == len(BATCHES[1])
    again, _, _ = _prune_setup(arch)
    apply_blue_to_model(again, tok, BATCHES[1], hp)
    assert changed_params(weights(again), model) == set()
    assert state.same_edits(get_state(again), compare_history=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_batch_timing_restrains_every_batch(arch, monkeypatch):
    """prune_timing 'batch' (the behaviour before 'sequence' became the default, with keys
    accumulated as they were then): every written weight is W_orig + restrain(W_prev + Delta -
    W_orig), W_prev being the restrained weight the previous batch left; no unrestrained state."""
    model, tok, hp = _prune_setup(arch, prune_timing="batch", accumulate_keys=True)
    calls = rule_spy(monkeypatch, "PRUNE")
    W0 = {l: _W(model, hp, l) for l in (0, 2)}
    for t, batch in enumerate(BATCHES[:2]):
        W_prev = {l: _W(model, hp, l) for l in (0, 2)}
        apply_blue_to_model(model, tok, batch, hp)
        for i, l in enumerate((0, 2)):
            call = calls[2 * t + i]
            assert (call["KpKp"] is None) == (t == 0)
            raw = W_prev[l] + call["delta"]
            expected, top, above = _restrained(raw, W0[l])
            assert above >= 1 and _close(_W(model, hp, l), expected)
            assert get_state(model).history[-1]["change_sigma"][l]["max_over_sigma_max"] == pytest.approx(top, rel=1e-6)
            sigma_max = float(torch.linalg.svdvals(W0[l])[0])  # the restraint only shrinks here (sigma_max > 1)
            s_new = float(torch.linalg.svdvals(_W(model, hp, l) - W0[l])[0])
            assert s_new < top * sigma_max and s_new <= sigma_max + math.log(top) + 1e-4
        assert get_state(model).unrestrained_layers() == []
    for l in (0, 2):
        assert torch.allclose(get_state(model).layers[l].W_orig, W0[l])
