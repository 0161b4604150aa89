"""``use_chat_template`` on the embedded SmolLM2-135M-Instruct: the subject is found inside the
wrapped prompt, and an edit made with the template is measured with it.

The edit (``slow``) uses the built-in facts (no data files) and, as ``test_smollm2_edits``, the
shipped YAML with 200 corpus documents for C_0, 10 optimisation steps and 2 context prefixes.
"""
from __future__ import annotations

import pytest
import torch

from blue_plugin import BLUEHyperParams, apply_blue_to_model
from blue_plugin.editing.requests import encode_prompt, prepare_requests
from blue_plugin.editing.state import EditState
from blue_plugin.evaluation.data import BUILTIN_FACTS, load_cases
from blue_plugin.evaluation.metrics import counterfact_case_scores
from blue_plugin.model.prompts import has_chat_template
from blue_plugin.stats.sources import find_wordnet
from tests.tiny import restore

pytestmark = pytest.mark.usefixtures("one_thread")
N_CASES = 5


def _cases():
    _, cases = load_cases(BUILTIN_FACTS, n=N_CASES)
    return cases


def test_subject_is_found_in_smollm2_chat_prompts(smollm2):
    _, tok = smollm2
    assert has_chat_template(tok)
    hp = BLUEHyperParams.from_hparams("smollm2-135m").replace(use_chat_template=True)
    reqs = prepare_requests(tok, [c.to_request() for c in _cases()], hp)
    for req in reqs:
        for prefix in ("", "I see a dog. "):
            ids, pos = encode_prompt(tok, prefix, req, "subject_last")
            template = tok.apply_chat_template([{"role": "user", "content": prefix + req.prompt}],
                                               tokenize=False, add_generation_prompt=True)
            assert tok.decode(ids) == template  # SmolLM2's tokenizer adds no BOS of its own
            assert tok.decode(ids[:pos + 1]).endswith("<|im_start|>user\n" + prefix + req.before + req.subject)
            assert tok.decode(ids[pos + 1:]) == req.after + "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_edit_with_chat_template_is_measured_with_it(smollm2, tmp_path):
    try:
        find_wordnet()
    except ValueError as exc:
        pytest.skip(f"no corpus for C_0: {exc}")
    model, tok = smollm2
    cases = _cases()
    hp = BLUEHyperParams.from_hparams("smollm2-135m").replace(
        use_chat_template=True, mom2_dataset="wordnet", mom2_n_samples=200, stats_dir=str(tmp_path),
        v_num_grad_steps=10, context_template_length_params=[[10, 2]],
    )
    before = counterfact_case_scores(model, tok, cases, chat_template=True)
    weights_copy: dict = {}
    try:
        _, weights_copy = apply_blue_to_model(model, tok, [c.to_request() for c in cases], hp,
                                              return_orig_weights=True, state=EditState())
        chat = counterfact_case_scores(model, tok, cases, chat_template=True)
        bare = counterfact_case_scores(model, tok, cases)
    finally:
        restore(model, weights_copy)
    wins_before = [s["efficacy"] for s in before]
    wins = [s["efficacy"] for s in chat]
    gap = [round(s["rewrite_nll_new"] - s["rewrite_nll_true"], 2) for s in chat]
    assert sum(wins) >= N_CASES - 1 and sum(wins) > sum(wins_before), f"efficacy {wins} (before: {wins_before}), gap {gap}"
    for b, a in zip(before, chat):  # the new object's probability rose, under the template
        assert a["rewrite_nll_new"] < b["rewrite_nll_new"]
    # The option changes what is measured: the same edited model, scored without the template.
    chat_nll = torch.tensor([s["rewrite_nll_new"] for s in chat])
    bare_nll = torch.tensor([s["rewrite_nll_new"] for s in bare])
    assert not torch.allclose(chat_nll, bare_nll, atol=1e-2), (chat_nll, bare_nll)
