"""BLUE on the real embedded model: SmolLM2-135M-Instruct, 5 CounterFact edits in one batch,
each base method with ``blue: true``.

Checks per method: the new object beats the true one (mean-token NLL, as in the paper's
Efficacy) on the edit prompts for at least 4 of 5 cases; ``weights_copy`` holds exactly the two
boundary-layer matrices; restoring from it gives the original weights bit for bit; with
``copy=True`` (MEMIT) the input model is not touched at all.

Cost: these are the expensive tests of the suite (one batched target optimisation per boundary
layer through all 30 layers). To keep them lean they use hparams/BLUE/smollm2-135m.yaml with
``mom2_n_samples=200`` (statistics computed once per module into a temporary folder),
``v_num_grad_steps=10`` instead of 25 and 2 context prefixes instead of 5. Measured on this
2-core CPU, quiet, one thread, one 5-request edit (efficacy / NLL(new) - NLL(true) range):
25 steps, 5 prefixes (the YAML): 78 s, 5/5, -6.4 to -13.1 nats;
10 steps, 5 prefixes: 48 s, 5/5, -3.7 to -15.6;
10 steps, 2 prefixes (used here): 26-29 s for every method, 5/5, -2.5 to -17.0.
BLUE's second boundary layer makes up for the first layer's unfinished targets.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blue_plugin import BLUEHyperParams, apply_blue_to_model
from blue_plugin.datafiles import locate
from blue_plugin.evaluation.metrics import answer_nll
from blue_plugin.editing.state import EditState
from tests.tiny import restore

ROOT = Path(__file__).resolve().parents[2]
# found by blue_plugin.datafiles ($BLUE_PLUGIN_DATA, then the cache; never downloaded here); None if missing
COUNTERFACT = locate("counterfact")
CORPUS = locate("wordnet-glosses")
HPARAMS = ROOT / "hparams" / "BLUE" / "smollm2-135m.yaml"
N_CASES = 5
N_STEPS = 10
CONTEXT = [[10, 2]]  # the YAML has [[10, 5]]; see the module docstring for the cost of each
METHODS = ["MEMIT", "RECT", "PRUNE", "AlphaEdit"]


@pytest.fixture(scope="module")
def edit_setup(smollm2, tmp_path_factory):
    """Model, tokenizer, hyperparameters, requests, the original weights, the unedited
    model's efficacy, and one EditState for the module (the fixture model's own state is left
    alone; C0 and the context prefixes are computed once and reused by all methods)."""
    if COUNTERFACT is None or CORPUS is None:
        pytest.skip("CounterFact or the WordNet corpus not found: set BLUE_PLUGIN_DATA to the data folder (docs/data.md)")
    model, tok = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CPU: more threads cost more CPU time than they save here
    cases = json.loads(COUNTERFACT.read_text(encoding="utf-8"))[:N_CASES]
    requests = [{k: c[k] for k in ("prompt", "subject", "target_new", "ground_truth", "case_id")} for c in cases]
    hp = BLUEHyperParams.from_hparams(HPARAMS).replace(
        blue=True, mom2_n_samples=200, mom2_dataset=str(CORPUS),
        stats_dir=str(tmp_path_factory.mktemp("smollm2-stats")), v_num_grad_steps=N_STEPS,
        context_template_length_params=CONTEXT,
    )
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    baseline = _wins(model, tok, requests)
    yield model, tok, hp, requests, original, baseline, EditState()
    torch.set_num_threads(threads)


def _wins(model, tok, requests) -> list[bool]:
    """Per case: NLL(target_new | prompt) < NLL(ground_truth | prompt) (mean over tokens)."""
    prompts = [r["prompt"] for r in requests]
    new = answer_nll(model, tok, prompts, [r["target_new"] for r in requests])
    true = answer_nll(model, tok, prompts, [r["ground_truth"] for r in requests])
    return (new < true).tolist()


def _same_weights(model, original) -> list[str]:
    """Names of parameters that differ from ``original`` (empty: bit-identical)."""
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), original[n])]


@pytest.mark.parametrize("method", METHODS)
def test_blue_edit_on_smollm2(edit_setup, method):
    model, tok, hp, requests, original, baseline, state = edit_setup
    assert _same_weights(model, original) == [], "an earlier test left the shared model edited"
    use_copy = method == "MEMIT"  # one method exercises copy=True, the others restore in place
    weights_copy: dict = {}
    try:
        edited, weights_copy = apply_blue_to_model(
            model, tok, requests, hp.replace(base_method=method), copy=use_copy,
            return_orig_weights=True, state=state,
        )
        wins = _wins(edited, tok, requests)
        record = state.history[-1]
        assert sum(wins) >= 4 and sum(wins) > sum(baseline), (
            f"{method}: efficacy {wins} (before: {baseline}); steps {record['steps']}, nll {record['nll']}"
        )
        expected = {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (hp.layers[0], hp.layers[-1])}
        assert set(weights_copy) == expected
        for name, w in weights_copy.items():
            assert torch.equal(w, original[name])
        if use_copy:
            assert edited is not model
            assert _same_weights(model, original) == []  # the input model is untouched
            assert sorted(_same_weights(edited, original)) == sorted(expected)
        else:
            assert edited is model
            assert sorted(_same_weights(model, original)) == sorted(expected)
    finally:
        if not use_copy:
            restore(model, weights_copy)
    assert _same_weights(model, original) == []  # restored bit for bit
