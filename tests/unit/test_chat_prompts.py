"""``use_chat_template``: prompts wrapped in the tokenizer's chat template (blue_plugin.model.prompts),
the subject found inside the wrapped prompt, the evaluation's ``chat_template`` option, and the
default (off) leaving every prompt as it was."""
from __future__ import annotations

import pytest
import torch

from blue_plugin.editing.requests import encode_prompt, key_rows, prepare_requests, target_rows
from blue_plugin.errors import BLUEConfigError
from blue_plugin.evaluation.generation import generate_greedy
from blue_plugin.evaluation.metrics import answer_nll, encode_prompt_target
from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.model.prompts import chat_prompt, chat_span, format_prompt, format_prompts, has_chat_template
from tests.tiny import PREFIXES, REQUESTS, make_llama, make_tokenizer

#: As SmolLM2-Instruct's: a default system message, the message written as it is.
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nYou are a cat.<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: As Llama 3's: the BOS written by the template, the message trimmed.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _tok(template: str | None, add_bos: bool = False):
    """A fresh tiny tokenizer (not the shared one of tests.tiny) with ``template``."""
    tok = make_tokenizer.__wrapped__(add_bos=add_bos)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    return _tok(CHATML)


def _hp(**kw):
    return BLUEHyperParams(layers=[1, 2], v_loss_layer=3, **kw)


def test_message_is_found_in_the_wrapped_prompt(chat_tok):
    content = "I see a dog. The capital of France is"
    text, offset = chat_span(chat_tok, content)
    assert text == ("<|im_start|>system\nYou are a cat.<|im_end|>\n<|im_start|>user\n" + content
                    + "<|im_end|>\n<|im_start|>assistant\n")
    assert text[offset:offset + len(content)] == content
    assert chat_prompt(chat_tok, content) == text == format_prompt(chat_tok, content, True)
    assert format_prompts(chat_tok, [content, "x"], True) == [text, chat_prompt(chat_tok, "x")]


def test_trimming_template_and_its_own_bos():
    tok = _tok(LLAMA3, add_bos=True)  # the tokenizer adds <s> itself, and the template writes it
    content = "  The capital of France is "
    text, offset = chat_span(tok, content)
    assert not text.startswith("<s>") and "The capital of France is<|eot_id|>" in text
    assert text[offset + 2:offset + len(content) - 1] == content.strip()  # positions of the untrimmed message
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS, not two
    bare = _tok(LLAMA3, add_bos=False)  # no BOS of its own: the template's is kept
    assert chat_prompt(bare, content).startswith("<s>")


def test_templates_that_cannot_be_used_are_refused():
    with pytest.raises(BLUEConfigError, match="use_chat_template: true needs a tokenizer with a chat template"):
        chat_span(_tok(None), "The capital of France is")
    rewrites = _tok("{% for m in messages %}{{ m['content'] | replace('France', 'Spain') }}{% endfor %}")
    with pytest.raises(BLUEConfigError, match="changes the user message"):
        chat_span(rewrites, "The capital of France is")
    twice = _tok("{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}")
    with pytest.raises(BLUEConfigError, match="exactly once"):
        chat_span(twice, "The capital of France is")
    assert not has_chat_template(_tok(None)) and has_chat_template(twice)
    with pytest.raises(ValueError, match="chat_template must be True or False"):
        format_prompt(twice, "x", "yes")


@pytest.mark.parametrize("fact_token", ["subject_last", "subject_first"])
def test_subject_tokens_are_found_inside_the_wrapped_prompt(chat_tok, fact_token):
    plain = prepare_requests(chat_tok, REQUESTS, _hp(fact_token=fact_token))
    wrapped = prepare_requests(chat_tok, REQUESTS, _hp(fact_token=fact_token, use_chat_template=True))
    assert [r.chat_template for r in plain + wrapped] == [False] * 3 + [True] * 3
    for p, w in zip(plain, wrapped):
        for prefix in PREFIXES:
            p_ids, p_pos = encode_prompt(chat_tok, prefix, p, fact_token)
            w_ids, w_pos = encode_prompt(chat_tok, prefix, w, fact_token)
            assert w_ids[w_pos] == p_ids[p_pos]  # the same subject token
            assert chat_tok.decode(w_ids) == chat_prompt(chat_tok, prefix + p.prompt)
            # the wrapped prompt up to the edited token ends with the bare one up to it
            assert chat_tok.decode(w_ids[:w_pos + 1]).endswith("user\n" + chat_tok.decode(p_ids[:p_pos + 1]))
        if fact_token == "subject_last":
            ids, pos = encode_prompt(chat_tok, PREFIXES[1], w, fact_token)
            assert chat_tok.decode(ids[:pos + 1]).endswith("user\n" + PREFIXES[1] + w.before + w.subject)


def test_target_and_kl_rows_follow_the_generation_prompt(chat_tok):
    reqs = prepare_requests(chat_tok, REQUESTS, _hp(use_chat_template=True))
    rows = target_rows(chat_tok, reqs, PREFIXES, "subject_last")
    n = len(reqs) * len(PREFIXES)
    for row in rows[:n]:
        req = reqs[row.request]
        prompt = chat_tok.decode(row.ids[:row.target_start])
        assert prompt.endswith(req.prompt + "<|im_end|>\n<|im_start|>assistant\n")
        assert row.ids[row.target_start:] == req.target_ids[:-1] and row.targets == req.target_ids
    for row, req in zip(rows[n:], reqs):  # the KL prompt is wrapped too
        assert chat_tok.decode(row.ids) == chat_prompt(chat_tok, f"{req.subject} is a")
    keys = key_rows(chat_tok, reqs, PREFIXES, "subject_last")
    assert [(k.ids, k.lookup) for k in keys] == [(r.ids[:r.target_start], r.lookup) for r in rows[:n]]


def test_default_off_leaves_every_prompt_as_it_was(chat_tok):
    hp = _hp()
    assert hp.use_chat_template is False
    reqs = prepare_requests(chat_tok, REQUESTS, hp)
    for req in reqs:
        for prefix in PREFIXES:
            assert encode_prompt(chat_tok, prefix, req, "subject_last")[0] == chat_tok(prefix + req.prompt)["input_ids"]
    for row, req in zip(target_rows(chat_tok, reqs, [""], "subject_last")[len(reqs):], reqs):
        assert row.ids == chat_tok(f"{req.subject} is a")["input_ids"]
    prompt = "The capital of France is"
    assert format_prompt(chat_tok, prompt) is prompt and format_prompts(chat_tok, [prompt]) == [prompt]
    assert encode_prompt_target(chat_tok, prompt, "Rome")[0] == chat_tok(prompt)["input_ids"]
    assert encode_prompt_target(chat_tok, prompt, "Rome", chat_template=True)[0] == chat_tok(chat_prompt(chat_tok, prompt))["input_ids"]


def test_hyperparameter_is_validated_and_round_trips(tmp_path):
    hp = _hp(use_chat_template=True)
    assert BLUEHyperParams.from_dict(hp.to_dict()) == hp and hp.to_dict()["use_chat_template"] is True
    assert hp.replace(use_chat_template=False).use_chat_template is False
    with pytest.raises(BLUEConfigError, match="'use_chat_template' must be true or false"):
        _hp(use_chat_template="yes")
    path = tmp_path / "instruct.yaml"  # an EasyEdit-style YAML with its key
    path.write_text("alg_name: BLUE\nmodel_name: m\nlayers: [1, 2]\nbase_method: MEMIT\nblue: true\nuse_chat_template: true\n")
    assert BLUEHyperParams.from_hparams(path).use_chat_template is True


@pytest.mark.usefixtures("one_thread")
def test_evaluation_scores_the_wrapped_prompt(chat_tok):
    model = make_llama()
    prompts, answers = ["The capital of France is", "I see a dog."], ["Rome", "cat"]
    plain = answer_nll(model, chat_tok, prompts, answers)
    wrapped = answer_nll(model, chat_tok, prompts, answers, chat_template=True)
    by_hand = answer_nll(model, chat_tok, format_prompts(chat_tok, prompts, True), answers)
    assert torch.equal(wrapped, by_hand) and not torch.allclose(plain, wrapped)
    (text,) = generate_greedy(model, chat_tok, prompts[:1], max_new_tokens=3, chat_template=True)
    assert text.startswith(prompts[0]) and "You are a cat" not in text  # the prompt and the reply, no scaffolding
    (bare,) = generate_greedy(model, chat_tok, prompts[:1], max_new_tokens=3)
    assert bare.startswith(prompts[0])
