"""blue_plugin.editing.selection (dynamic boundary layers) on a tiny random Llama, against hand computations:
relative residuals from plain unpadded forward passes, the first layer's MEMIT update (C0 = I)
with an explicit inverse; the targets are read through a spy on compute_targets."""
from __future__ import annotations

import copy

import pytest
import torch

from blue_plugin.editing import selection as S
from blue_plugin.editing.editor import Editor
from blue_plugin.model.layout import resolve_layout
from blue_plugin.editing.requests import prepare_requests
from tests.integration.test_analysis import hand_add, hand_h, hand_keys, hand_memit, spy_targets
from tests.tiny import all_requests, changed_params, inject_prefixes, make_hparams, make_model, weights

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]



def _editor(layers, window, n_layers=4, **kw):
    model, tok = make_model("llama", n_layers=n_layers)
    hp = make_hparams(layers=layers, layer_selection="dynamic", dynamic_window=window, **kw)
    inject_prefixes(model, hp)
    editor = Editor(model, tok, hp)
    return editor, prepare_requests(tok, all_requests(), hp), editor.prefixes()


def test_candidates_stay_inside_and_ordered():
    hp = make_hparams(layers=[2, 3, 4, 5, 6], layer_selection="dynamic", dynamic_window=1)
    assert S.boundary_candidates(hp) == ([2, 3], [5, 6])
    assert S.window_layers(hp) == [2, 3, 5, 6]
    hp = hp.replace(dynamic_window=10)
    firsts, lasts = S.boundary_candidates(hp)
    assert firsts == [2, 3, 4, 5] and lasts == [3, 4, 5, 6]
    assert S.boundary_candidates(hp.replace(layers=[4, 8], dynamic_window=0)) == ([4], [8])
    assert S.boundary_candidates(hp.replace(layers=[4])) == ([4], [4])


def test_window_zero_needs_no_computation(monkeypatch):
    editor, reqs, prefixes = _editor([0, 3], 0)
    calls = spy_targets(monkeypatch)
    details: dict = {}
    assert S.choose_boundary_layers(editor, reqs, prefixes, details=details) == (0, 3)
    assert calls == [] and details["chosen"] == [0, 3]


@pytest.mark.parametrize("criterion", ["residual_norm", "steps", "update_norm"])
def test_choice_is_the_hand_argmin(criterion, monkeypatch):
    """First boundary from {0, 1} on the unedited model; then, with the chosen first layer's update
    in the model, last boundary from {2, 3}; each by the criterion computed by hand."""
    editor, reqs, prefixes = _editor([0, 3], 1, v_early_stop_loss=5.9)
    model, tok, hp = editor.model, editor.tok, editor.hp
    raw = all_requests()
    before = weights(model)
    calls = spy_targets(monkeypatch)
    details: dict = {}
    first, last = S.choose_boundary_layers(editor, reqs, prefixes, criterion=criterion, details=details)
    assert changed_params(before, model) == set()
    blocks = [resolve_layout(model, hp).block(l) for l in (0, 1, 2, 3)]
    assert [c[0] for c in calls] == blocks
    z = {l: c[1] for l, c in zip((0, 1, 2, 3), calls)}
    lam = hp.mom2_update_weight

    def score(m, l):
        h = hand_h(m, tok, hp, l, raw)
        R = z[l].z.double() - h
        rel = float((R.norm(dim=1) / h.norm(dim=1)).mean())
        steps = sum(z[l].steps) / len(z[l].steps)
        W = Editor(m, tok, hp).W(l).double()
        upd = float(hand_memit(hand_keys(m, tok, hp, l, raw), R, lam).norm() / W.norm())
        assert details_for(l)["relative_residual"] == pytest.approx(rel, rel=1e-4, abs=1e-6)
        assert details_for(l)["mean_steps"] == steps
        if criterion == "update_norm":
            assert details_for(l)["relative_update"] == pytest.approx(upd, rel=1e-4, abs=1e-9)
        return {"residual_norm": (rel,), "steps": (steps, rel), "update_norm": (upd,)}[criterion]

    def details_for(l):
        return details["first"][l] if l in details["first"] else details["last"][l]

    expect_first = min((0, 1), key=lambda l: score(model, l) + (l,))
    assert first == expect_first
    edited = copy.deepcopy(model)
    R1 = z[first].z.double() - hand_h(edited, tok, hp, first, raw)
    hand_add(edited, hp, first, hand_memit(hand_keys(edited, tok, hp, first, raw), R1, lam))
    # the last-boundary targets were optimised on the model with the first update in it
    for l in (2, 3):
        assert torch.allclose(z[l].h.double(), hand_h(edited, tok, hp, l, raw), rtol=1e-4, atol=1e-5)
    expect_last = min((2, 3), key=lambda l: score(edited, l) + (-l,))  # ties: the configured last layer
    assert last == expect_last
    assert details["chosen"] == [first, last] and details["criterion"] == criterion


def test_edit_with_the_chosen_layers_changes_exactly_them():
    """How the engine will use it: BLUE with layers=[first, last] for this batch."""
    editor, reqs, prefixes = _editor([0, 3], 1)
    first, last = S.choose_boundary_layers(editor, reqs, prefixes)
    before = weights(editor.model)
    Editor(editor.model, editor.tok, editor.hp.replace(layers=[first, last], layer_selection="all")).apply(all_requests())
    layout = resolve_layout(editor.model, editor.hp)
    assert changed_params(before, editor.model) == {layout.weight_name(first), layout.weight_name(last)}


def test_bad_input():
    editor, reqs, prefixes = _editor([0, 3], 1)
    with pytest.raises(ValueError, match="criterion"):
        S.choose_boundary_layers(editor, reqs, prefixes, criterion="random")
    with pytest.raises(ValueError, match="at least one request"):
        S.choose_boundary_layers(editor, [], prefixes)


def test_ties_go_to_the_configured_boundaries(monkeypatch):
    """Equal scores everywhere (e.g. every target clamped): (layers[0], layers[-1])."""
    editor, reqs, prefixes = _editor([0, 3], 1)
    seen = []

    def flat(editor, reqs, prefixes, layer, criterion):
        seen.append(layer)
        K = torch.zeros(len(reqs), editor.W(layer).shape[1])
        R = torch.zeros(len(reqs), editor.W(layer).shape[0])
        return {"relative_residual": 4.0, "mean_steps": 8.0, "relative_update": 0.0, "K": K, "R": R}

    monkeypatch.setattr(S, "_evaluate", flat)
    for criterion in S.CRITERIA:
        seen.clear()
        assert S.choose_boundary_layers(editor, reqs, prefixes, criterion=criterion) == (0, 3)
        assert seen == [0, 1, 2, 3]
