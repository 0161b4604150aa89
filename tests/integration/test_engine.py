"""The editing engine (blue_plugin.editing.editor) on tiny random GPT-2 (Conv1D) and Llama models.

The rule's inputs and the target results are recorded by wrapping ``rule.delta`` and
``engine.compute_targets`` (see tests/tiny.py); every expected value is recomputed here from
the model itself (block outputs from plain unpadded forward passes, closed forms with explicit
inverses), not read back from the engine.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from blue_plugin import apply_blue_to_model, get_state
from blue_plugin.model.layout import resolve_layout
from blue_plugin.editing.state import EditState
from blue_plugin.stats.moments import get_second_moments
from tests.tiny import (
    ARCHS,
    all_requests,
    block_outputs,
    changed_params,
    d_in,
    inject_c0,
    inject_prefixes,
    low_rank_c0,
    make_hparams,
    make_model,
    module_apply,
    restore,
    rule_spy,
    spd,
    targets_spy,
    weight_name,
    weights,
    write_corpus,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]



def _setup(arch: str, **hp_overrides):
    model, tok = make_model(arch)
    hp = make_hparams(**hp_overrides)
    inject_prefixes(model, hp)
    return model, tok, hp


def _block(model, hp, layer):
    return resolve_layout(model, hp).block(layer)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    """allclose with an absolute tolerance scaled to the tensors' size."""
    a, b = a.double(), b.double()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return torch.allclose(a, b, rtol=rtol, atol=rtol * scale)


# ---- residual distribution ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_original_method_spreads_one_residual_uniformly(arch, monkeypatch):
    """blue: false, MEMIT, layers [0, 1, 2]: one z at layer 2; the update of the i-th layer
    (1-based) uses R_i = (z - h_2(current model)) / (m - i + 1)."""
    model, tok, hp = _setup(arch, blue=False, layers=[0, 1, 2])
    reqs = all_requests()
    events: list = []
    targets = targets_spy(monkeypatch, events)
    calls = rule_spy(monkeypatch, "MEMIT", callback=lambda: block_outputs(model, tok, hp, 2, reqs), events=events)
    h_orig = block_outputs(model, tok, hp, 2, reqs)

    apply_blue_to_model(model, tok, reqs, hp)

    assert [e[0] for e in events] == ["targets", "update", "update", "update"]
    assert targets[0][0] == _block(model, hp, 2)
    z = targets[0][1].z.double()
    assert _close(targets[0][1].h, h_orig)
    m = 3
    for i, call in enumerate(calls, start=1):
        h_now = call["extra"]
        assert _close(call["R"].T, (z - h_now) / (m - i + 1)), f"layer {i - 1}"
    # The current model matters: each update moves h_2, so later residuals are not (z - h_orig)/k.
    assert not _close(calls[1]["extra"], h_orig, rtol=1e-3)
    assert not _close(calls[1]["R"].T, (z - h_orig) / (m - 1), rtol=1e-3)
    record = get_state(model).history[-1]
    assert record["mode"] == "original" and record["layers"] == [0, 1, 2]
    for layer, call in zip([0, 1, 2], calls):
        assert record["residual_norm"][layer] == pytest.approx(call["R"].norm(dim=0).tolist(), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_blue_computes_full_residuals_at_each_boundary_layer(arch, monkeypatch):
    """blue: true, layers [0, 1, 2]: z_0 on the unedited model, update layer 0 with the full
    R_0 = z_0 - h_0; then z_2 on the edited model, R_2 = z_2 - h_2(edited), update layer 2."""
    model, tok, hp = _setup(arch, blue=True, layers=[0, 1, 2])
    reqs = all_requests()
    events: list = []
    targets = targets_spy(monkeypatch, events)
    h2_orig = block_outputs(model, tok, hp, 2, reqs)
    layer_now = {}

    def current_h():
        layer = len(layer_now)
        layer_now[layer] = True
        return block_outputs(model, tok, hp, [0, 2][layer], reqs)

    calls = rule_spy(monkeypatch, "MEMIT", callback=current_h, events=events)
    apply_blue_to_model(model, tok, reqs, hp)

    assert [e[0] for e in events] == ["targets", "update", "targets", "update"]
    assert [t[0] for t in targets] == [_block(model, hp, 0), _block(model, hp, 2)]
    for (_, res), call in zip(targets, calls):
        assert _close(res.h, call["extra"])  # z starts from the current model's output
        assert _close(call["R"].T, res.z.double() - call["extra"])  # full residual, no division
    # The second target was optimised on the model edited at layer 0.
    assert not _close(targets[1][1].h, h2_orig, rtol=1e-3)
    assert get_state(model).history[-1]["layers"] == [0, 2]


# ---- which weights change -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("blue", [True, False])
def test_exactly_the_edit_layers_change(arch, blue):
    model, tok, hp = _setup(arch, blue=blue, layers=[0, 1, 2])
    before = weights(model)
    _, weights_copy = apply_blue_to_model(model, tok, all_requests(), hp, return_orig_weights=True)
    edited = [0, 2] if blue else [0, 1, 2]
    expected = {weight_name(model, hp, layer) for layer in edited}
    assert changed_params(before, model) == expected  # everything else bit-identical
    assert set(weights_copy) == expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("blue", [True, False])
def test_single_layer(arch, blue, monkeypatch):
    """layers: [1] works in both modes: one matrix changes, with the full residual."""
    model, tok, hp = _setup(arch, blue=blue, layers=[1])
    reqs = all_requests()
    targets = targets_spy(monkeypatch)
    calls = rule_spy(monkeypatch, "MEMIT", callback=lambda: block_outputs(model, tok, hp, 1, reqs))
    before = weights(model)
    apply_blue_to_model(model, tok, reqs, hp)
    assert changed_params(before, model) == {weight_name(model, hp, 1)}
    assert len(targets) == 1 and len(calls) == 1
    assert _close(calls[0]["R"].T, targets[0][1].z.double() - calls[0]["extra"])


@pytest.mark.parametrize("arch", ["gpt2", "gpt2-square", "llama", "llama-square"])
def test_update_acts_in_the_right_orientation(arch, monkeypatch):
    """Unregularised limit (C0 = I, lambda = 1e-6): after the edit the rewrite module maps each
    edited key k to old_module(k) + R, through the module's own forward (GPT-2's Conv1D computes
    x @ W with W stored (d_in, d_out); on square matrices a transposition would go unnoticed by
    shape checks)."""
    model, tok, hp = _setup(arch, blue=True, layers=[0, 2], mom2_update_weight=1e-6)
    calls = rule_spy(monkeypatch, "MEMIT")
    new_model, _ = apply_blue_to_model(model, tok, all_requests(), hp, copy=True)
    for layer, call in zip([0, 2], calls):
        K, R = call["K"].T, call["R"].T  # (n, d_in), (n, d_out)
        change = module_apply(new_model, hp, layer, K) - module_apply(model, hp, layer, K)
        assert _close(change, R, rtol=1e-3), f"layer {layer}"
        assert float(R.norm()) > 1e-3


# ---- EasyEdit contract --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_return_orig_weights_and_restore(arch):
    model, tok, hp = _setup(arch)
    before = weights(model)
    _, weights_copy = apply_blue_to_model(model, tok, all_requests(), hp, return_orig_weights=True)
    changed = changed_params(before, model)
    assert set(weights_copy) == changed and len(changed) == 2
    for name, w in weights_copy.items():
        assert torch.equal(w, before[name])  # exactly the pre-edit tensors
        assert w.data_ptr() != model.get_parameter(name).data_ptr()
    restore(model, weights_copy)
    assert changed_params(before, model) == set()  # bit-identical

    _, nothing = apply_blue_to_model(model, tok, all_requests(), hp, return_orig_weights=False)
    assert nothing == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_copy_leaves_the_input_untouched(arch):
    model, tok, hp = _setup(arch)
    before = weights(model)
    flags = [p.requires_grad for p in model.parameters()]
    new_model, weights_copy = apply_blue_to_model(
        model, tok, all_requests(), hp, copy=True, return_orig_weights=True, keep_original_weight=True
    )
    assert new_model is not model
    assert changed_params(before, model) == set()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert get_state(model).history == [] and get_state(model).n_edits == 0
    assert changed_params(before, new_model) == set(weights_copy) and len(weights_copy) == 2
    assert get_state(new_model).n_edits == 3


# ---- sequential editing -------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [True, False])
def test_sequential_memit_includes_earlier_keys(accumulate, monkeypatch):
    """Second call: the MEMIT solve includes K_1 K_1^T of the first batch (MEMIT_seq); the new
    weight equals W + R K^T (lambda C0 + K_1 K_1^T + K K^T)^-1 (explicit inverse)."""
    model, tok, hp = _setup("llama", layers=[0, 2], mom2_adjustment=True, mom2_update_weight=2.0,
                            accumulate_keys=accumulate)
    c0 = {layer: spd(d_in(model, hp, layer), seed=layer) for layer in (0, 2)}
    inject_c0(model, tok, hp, c0)
    calls = rule_spy(monkeypatch, "MEMIT")
    reqs = all_requests()
    apply_blue_to_model(model, tok, reqs[:2], hp)
    first = {0: calls[0], 2: calls[1]}
    assert first[0]["KpKp"] is None and first[2]["KpKp"] is None
    W_before = {layer: model.get_parameter(weight_name(model, hp, layer)).detach().double().clone() for layer in (0, 2)}

    apply_blue_to_model(model, tok, reqs[2:], hp)
    second = {0: calls[2], 2: calls[3]}
    state = get_state(model)
    for layer in (0, 2):
        K1, K2, R2 = first[layer]["K"], second[layer]["K"], second[layer]["R"]
        assert torch.allclose(second[layer]["C0"], c0[layer])
        if accumulate:
            assert torch.allclose(second[layer]["KpKp"], K1 @ K1.T, rtol=1e-12)
            A = 2.0 * c0[layer] + K1 @ K1.T + K2 @ K2.T
        else:
            assert second[layer]["KpKp"] is None
            A = 2.0 * c0[layer] + K2 @ K2.T
        expected = W_before[layer] + R2 @ K2.T @ torch.linalg.inv(A)
        W_after = model.get_parameter(weight_name(model, hp, layer)).detach().double()
        assert _close(W_after, expected, rtol=1e-5)
        assert torch.allclose(state.layers[layer].kpkp, K1 @ K1.T + K2 @ K2.T, rtol=1e-10)
    assert state.n_edits == 3 and len(state.history) == 2


def test_alphaedit_accumulates_keys_even_without_accumulate_keys(monkeypatch):
    model, tok, hp = _setup("llama", layers=[1], base_method="AlphaEdit", mom2_adjustment=True,
                            accumulate_keys=False)
    C0, _ = low_rank_c0(d_in(model, hp, 1), rank=40)
    inject_c0(model, tok, hp, {1: C0})
    calls = rule_spy(monkeypatch, "AlphaEdit")
    reqs = all_requests()
    apply_blue_to_model(model, tok, reqs[:2], hp)
    apply_blue_to_model(model, tok, reqs[2:], hp)
    assert calls[0]["KpKp"] is None
    assert torch.allclose(calls[1]["KpKp"], calls[0]["K"] @ calls[0]["K"].T, rtol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_easyedit_restore_starts_a_fresh_sequence(arch, monkeypatch, caplog):
    """EasyEdit's non-sequential edit restores weights_copy after each edit: the next call must
    not see the restored batch's keys; without a restore, calls accumulate silently."""
    model, tok, hp = _setup(arch, layers=[0, 2])
    calls = rule_spy(monkeypatch, "MEMIT")
    reqs = all_requests()
    state = get_state(model)

    _, weights_copy = apply_blue_to_model(model, tok, reqs[:1], hp, return_orig_weights=True)
    restore(model, weights_copy)
    with caplog.at_level(logging.WARNING, logger="blue_plugin"):
        _, weights_copy = apply_blue_to_model(model, tok, reqs[1:2], hp, return_orig_weights=True)
    assert calls[2]["KpKp"] is None and calls[3]["KpKp"] is None
    assert state.n_edits == 1 and len(state.history) == 1

    # Sequential (no restore): the next call includes the previous batch, and nothing is logged.
    with caplog.at_level(logging.WARNING, logger="blue_plugin"):
        apply_blue_to_model(model, tok, reqs[2:], hp)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("blue_plugin")]
    assert torch.allclose(calls[4]["KpKp"], calls[2]["K"] @ calls[2]["K"].T, rtol=1e-12)
    assert state.n_edits == 2 and len(state.history) == 2

    # Restoring the weights of the very first call (EasyEdit after a sequence) resets too.
    restore(model, weights_copy)  # back to the state after call 1's restore = original weights
    apply_blue_to_model(model, tok, reqs[:1], hp)
    assert calls[6]["KpKp"] is None and state.n_edits == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_outside_weight_change_keeps_state_and_warns(arch, monkeypatch, caplog):
    model, tok, hp = _setup(arch, layers=[0, 2])
    calls = rule_spy(monkeypatch, "MEMIT")
    reqs = all_requests()
    apply_blue_to_model(model, tok, reqs[:1], hp)
    with torch.no_grad():
        model.get_parameter(weight_name(model, hp, 2)).mul_(1.01)  # neither original nor edited
    with caplog.at_level(logging.WARNING, logger="blue_plugin"):
        apply_blue_to_model(model, tok, reqs[1:2], hp)
    assert any("outside" in r.getMessage() for r in caplog.records)
    assert calls[2]["KpKp"] is not None
    assert get_state(model).n_edits == 2


def test_explicit_state_object_is_used():
    model, tok, hp = _setup("llama")
    state = EditState()
    inject_prefixes(model, hp, state=state)
    apply_blue_to_model(model, tok, all_requests(), hp, state=state)
    assert state.n_edits == 3 and len(state.history) == 1
    assert get_state(model).n_edits == 0


# ---- the other base methods inside the engine ---------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_alphaedit_keeps_preserved_keys_outputs(arch, monkeypatch):
    """C0 = U diag(..) U^T: keys in span(U) (preserved knowledge) keep their outputs exactly,
    the edited keys move, and the update is the closed form with P = I - U U^T."""
    model, tok, hp = _setup(arch, layers=[0, 2], base_method="AlphaEdit", mom2_adjustment=True, L2=0.1)
    d = d_in(model, hp, 0)
    c0, basis = {}, {}
    for layer in (0, 2):
        c0[layer], basis[layer] = low_rank_c0(d, rank=d // 2, seed=layer)
    inject_c0(model, tok, hp, c0)
    calls = rule_spy(monkeypatch, "AlphaEdit")
    new_model, _ = apply_blue_to_model(model, tok, all_requests(), hp, copy=True)
    g = torch.Generator().manual_seed(0)
    for layer, call in zip((0, 2), calls):
        U = basis[layer]
        P = torch.eye(d, dtype=torch.float64) - U @ U.T
        assert torch.allclose(call["P"], P, atol=1e-10)
        K, R = call["K"], call["R"]
        expected = R @ K.T @ P @ torch.linalg.inv(K @ K.T @ P + 0.1 * torch.eye(d, dtype=torch.float64))
        assert _close(call["delta"], expected, rtol=1e-6)
        preserved = (U @ torch.randn(U.shape[1], 16, generator=g, dtype=torch.float64)).T
        preserved = preserved * (float(K.norm(dim=0).mean()) / preserved.norm(dim=1, keepdim=True))
        old, new = module_apply(model, hp, layer, preserved), module_apply(new_model, hp, layer, preserved)
        edit_change = module_apply(new_model, hp, layer, K.T) - module_apply(model, hp, layer, K.T)
        assert float((new - old).abs().max()) < 1e-4 * float(edit_change.abs().max())
        assert float(edit_change.norm()) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fraction", [0.1, 0.4])
def test_rect_changes_at_most_the_kept_fraction(arch, fraction):
    model, tok, hp = _setup(arch, layers=[0, 2], base_method="RECT", rect_keep_fraction=fraction)
    before = weights(model)
    apply_blue_to_model(model, tok, all_requests(), hp)
    for layer in (0, 2):
        name = weight_name(model, hp, layer)
        n_changed = int((model.state_dict()[name] != before[name]).sum())
        assert 0 < n_changed <= math.ceil(fraction * before[name].numel())
        assert n_changed >= 0.9 * round(fraction * before[name].numel())


# PRUNE (both timings) and RECT's mask timings: tests/integration/test_reference_timings.py


# ---- statistics from a corpus file -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_second_moments_from_corpus_file(arch, tmp_path, monkeypatch):
    """mom2_dataset = a local text file, stats_dir in tmp_path: C0 is computed once, cached as
    safetensors, and is what the update rule receives; prefixes are generated (not injected)."""
    corpus = write_corpus(tmp_path / "corpus.txt", n=24)
    stats_dir = tmp_path / "stats"
    model, tok = make_model(arch)
    hp = make_hparams(layers=[0, 2], mom2_adjustment=True, mom2_dataset=str(corpus), stats_dir=str(stats_dir),
                      mom2_n_samples=24, mom2_max_length=16, context_template_length_params=[[4, 2]])
    calls = rule_spy(monkeypatch, "MEMIT")
    new_model, _ = apply_blue_to_model(model, tok, all_requests(), hp, copy=True)
    files = sorted(p.name for p in stats_dir.glob("*.safetensors"))
    assert len(files) == 2, files
    layout = resolve_layout(model, hp)
    names = [layout.rewrite(0), layout.rewrite(2)]
    expected = get_second_moments(model, tok, names, corpus=str(corpus), n_samples=24, max_length=16,
                                  cache_dir=stats_dir, progress=False)
    for call, name in zip(calls, names):
        assert torch.allclose(call["C0"], expected[name].double(), rtol=1e-6, atol=1e-9)
        assert not torch.allclose(call["C0"], torch.eye(call["C0"].shape[0], dtype=torch.float64))
    prefixes = get_state(new_model).prefixes
    assert len(prefixes) == 1
    (texts,) = prefixes.values()
    assert texts[0] == "" and len(texts) == 3
