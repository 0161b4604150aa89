"""Numerical tests for blue_plugin.evaluation.metrics on tiny random GPT-2 / Llama models with a self-made tokenizer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from blue_plugin.evaluation import metrics
from blue_plugin.evaluation.data import EditCase
from blue_plugin.evaluation.metrics import (
    answer_argmax_tokens,
    answer_nll,
    answer_token_accuracy,
    bootstrap_ci,
    case_fluency,
    counterfact_case_scores,
    encode_prompt_target,
    fluency_scores,
    generate_greedy,
    ngram_entropy,
    summarize,
    word_tokens,
    zsre_case_scores,
    zsre_locality_predictions,
)

TEXTS = [
    "The capital of France is Paris.",
    "The mother tongue of Danielle Darrieux is French.",
    "Michel Rocard is a native speaker of English.",
    "Berlin is the capital of Germany and Rome is the capital of Italy.",
    "When was the inception of the Events Challenge? It was in 2006.",
]
VOCAB = 300


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (ids 0/1/2 = <pad>/<s>/</s>), BOS prepended when add_bos."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(TEXTS, trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=2, eos_token_id=2, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_tok(request):
    if request.param == "llama":
        return make_llama(), make_tokenizer(add_bos=True)
    return make_gpt2(), make_tokenizer(add_bos=False)


PROMPTS = [
    "The capital of France is",
    "Berlin is the capital of",
    "The mother tongue of Danielle Darrieux is",
    "Michel Rocard is a native speaker of",
    "When was the inception of the Events Challenge?",
]
ANSWERS = ["Paris", "Germany and Italy", "French", "English", "2006"]


def hand_scores(model, tok, prompt, answer):
    """Unbatched reference: (mean NLL, argmax list, target ids) from a plain forward pass."""
    p, t = encode_prompt_target(tok, prompt, answer)
    with torch.no_grad():
        logits = model(torch.tensor([p + t])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    nll = [-float(logp[len(p) - 1 + j, tid]) for j, tid in enumerate(t)]
    argmax = [int(logits[len(p) - 1 + j].argmax()) for j in range(len(t))]
    return sum(nll) / len(nll), argmax, t


def test_encode_prompt_target():
    tok = make_tokenizer(add_bos=True)
    p, t = encode_prompt_target(tok, "The capital of France is", "Paris")
    assert p[0] == 1 and p == tok("The capital of France is")["input_ids"]
    assert t == tok(" Paris", add_special_tokens=False)["input_ids"] and 1 not in t
    assert tok.decode(t) == " Paris"
    with pytest.raises(ValueError, match="empty answer"):
        encode_prompt_target(tok, "x", "  ")
    with pytest.raises(ValueError, match="no tokens"):
        encode_prompt_target(make_tokenizer(add_bos=False), "", "Paris")


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_answer_nll_matches_hand(model_tok, batch_size):
    model, tok = model_tok
    got = answer_nll(model, tok, PROMPTS, ANSWERS, batch_size=batch_size)
    want = torch.tensor([hand_scores(model, tok, p, a)[0] for p, a in zip(PROMPTS, ANSWERS)], dtype=torch.float32)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the values are not trivially equal to each other
    assert got.std() > 1e-3


def test_answer_nll_without_logits_to_keep(model_tok, monkeypatch):
    model, tok = model_tok
    with_keep = answer_nll(model, tok, PROMPTS, ANSWERS, batch_size=4)
    monkeypatch.setattr(metrics, "_accepts_logits_to_keep", lambda m: False)
    torch.testing.assert_close(answer_nll(model, tok, PROMPTS, ANSWERS, batch_size=4), with_keep, atol=1e-5, rtol=1e-5)


def test_accuracy_and_argmax_match_hand(model_tok):
    model, tok = model_tok
    ref = [hand_scores(model, tok, p, a) for p, a in zip(PROMPTS, ANSWERS)]
    assert answer_argmax_tokens(model, tok, PROMPTS, ANSWERS, batch_size=2) == [r[1] for r in ref]
    want = torch.tensor([sum(x == y for x, y in zip(am, t)) / len(t) for _, am, t in ref], dtype=torch.float32)
    torch.testing.assert_close(answer_token_accuracy(model, tok, PROMPTS, ANSWERS, batch_size=3), want)


def test_accuracy_is_one_when_answer_is_the_argmax(model_tok):
    model, tok = model_tok
    # Build an answer out of the model's own greedy tokens: teacher-forced accuracy must be 1.
    p = tok("The capital of France is")["input_ids"]
    ids = list(p)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = ids[len(p):]
    # Score through the internal helper with explicit ids (string round trips may re-tokenise).
    res = metrics._teacher_forced(model, _FixedTok(tok, p, greedy), ["P"], ["A"])
    assert res[0][1].tolist() == greedy and bool((res[0][1] == res[0][2]).all())


class _FixedTok:
    """Tokenizer stub returning fixed ids: prompt ids for calls with special tokens, else target ids."""

    def __init__(self, tok, prompt_ids, target_ids):
        self.tok, self.p, self.t = tok, prompt_ids, target_ids
        self.pad_token_id = tok.pad_token_id

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.p if add_special_tokens else self.t}


def test_eval_mode_restored_and_no_grad(model_tok):
    model, tok = model_tok
    model.train()
    try:
        nll_train_flag = answer_nll(model, tok, PROMPTS[:2], ANSWERS[:2])
        assert model.training
        assert not nll_train_flag.requires_grad
        # dropout must be off during scoring: identical on repeat
        torch.testing.assert_close(answer_nll(model, tok, PROMPTS[:2], ANSWERS[:2]), nll_train_flag)
    finally:
        model.eval()


def test_input_validation(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="one answer per prompt"):
        answer_nll(model, tok, PROMPTS, ANSWERS[:2])
    with pytest.raises(ValueError, match="batch_size"):
        answer_nll(model, tok, PROMPTS, ANSWERS, batch_size=0)


def _cases():
    return [
        EditCase(0, "The capital of France is", "France", "Rome", "Paris",
                 rephrase_prompts=["Paris is the capital of", "France has the capital"],
                 locality_prompts=["Berlin is the capital of", "The capital of Italy is"],
                 locality_answers=["Germany", "Rome"],
                 generation_prompts=["The capital of France is", "France is", "The capital of France is"]),
        EditCase("b", "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French",
                 locality_prompts=["Michel Rocard is a native speaker of"], locality_answers=["French"]),
    ]


def test_counterfact_case_scores_match_hand(model_tok):
    model, tok = model_tok
    cases = _cases()
    scores = counterfact_case_scores(model, tok, cases, batch_size=3)
    assert [s["case_id"] for s in scores] == [0, "b"]

    def nll(p, a):
        return hand_scores(model, tok, p, a)[0]

    for case, s in zip(cases, scores):
        new, true = nll(case.prompt, case.target_new), nll(case.prompt, case.ground_truth)
        assert s["rewrite_nll_new"] == pytest.approx(new, abs=1e-5)
        assert s["rewrite_nll_true"] == pytest.approx(true, abs=1e-5)
        assert s["efficacy"] == float(new < true)
        para = [float(nll(p, case.target_new) < nll(p, case.ground_truth)) for p in case.rephrase_prompts]
        assert s["generalization"] == (sum(para) / len(para) if para else None)
        spec = [float(nll(p, a) < nll(p, case.target_new)) for p, a in zip(case.locality_prompts, case.locality_answers)]
        assert s["specificity"] == pytest.approx(sum(spec) / len(spec))
        assert len(s["neighborhood_nll_true"]) == len(case.locality_prompts)
        assert s["consistency"] is None


def test_counterfact_efficacy_flips_with_target():
    """Swapping new and true answers flips efficacy (no ties on a random model)."""
    model, tok = make_llama(), make_tokenizer(add_bos=True)
    c = _cases()[0]
    swapped = EditCase(0, c.prompt, c.subject, c.ground_truth, c.target_new)
    a = counterfact_case_scores(model, tok, [c])[0]["efficacy"]
    b = counterfact_case_scores(model, tok, [swapped])[0]["efficacy"]
    assert {a, b} == {0.0, 1.0}


def test_counterfact_needs_ground_truth(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="ground_truth"):
        counterfact_case_scores(model, tok, [EditCase(1, "A is", "A", "x", None)])


def test_word_tokens_and_entropy_hand_example():
    assert word_tokens("Hello, world. It's 2006!") == ["Hello", ",", "world", ".", "It's", "2006", "!"]
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("a b a b") == pytest.approx(0.972765, abs=1e-6)
    # all-distinct n-grams: k bigrams -> log2 k; repetition lowers entropy.
    assert ngram_entropy("a b c d e") == pytest.approx((2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy("the the the the the") == 0.0
    assert ngram_entropy("one") == 0.0 and ngram_entropy("") == 0.0
    assert ngram_entropy("a b") == pytest.approx((2 / 3 * 0.0 + 0.0) / 2)


def _manual_greedy(model, tok, prompt, n):
    ids = list(tok(prompt)["input_ids"])
    start = len(ids)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
    return tok.decode(ids, skip_special_tokens=True), ids[start:]


def test_generate_greedy_batched_equals_manual(model_tok):
    model, tok = model_tok
    texts = generate_greedy(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    want = [_manual_greedy(model, tok, p, 6)[0] for p in PROMPTS]
    assert texts == want
    assert all(t.startswith(p) for t, p in zip(texts, PROMPTS))
    assert any(len(t) > len(p) for t, p in zip(texts, PROMPTS))


def test_fluency_scores_and_case_fluency(model_tok):
    model, tok = model_tok
    texts = generate_greedy(model, tok, PROMPTS[:3], max_new_tokens=5)
    got = fluency_scores(model, tok, PROMPTS[:3], max_new_tokens=5)
    assert got == pytest.approx([ngram_entropy(t) for t in texts])
    cases = _cases()
    per_case = case_fluency(model, tok, cases, max_new_tokens=5)
    f = dict(zip(["The capital of France is", "France is"],
                 fluency_scores(model, tok, ["The capital of France is", "France is"], max_new_tokens=5)))
    assert per_case[0] == pytest.approx((2 * f["The capital of France is"] + f["France is"]) / 3)
    assert per_case[1] is None  # the second case has no generation prompts
    with pytest.raises(ValueError, match="max_new_tokens"):
        fluency_scores(model, tok, PROMPTS, max_new_tokens=0)


def _zsre_cases():
    return [
        EditCase(0, "When was the inception of the Events Challenge?", "Events Challenge", "2006", "1998",
                 rephrase_prompts=["When was the Events Challenge launched?"],
                 locality_prompts=["nq question: what is the capital of France"], locality_answers=["Paris"]),
        EditCase(1, "Berlin is the capital of", "Berlin", "Italy", "Germany",
                 locality_prompts=["Michel Rocard is a native speaker of", "The capital of Italy is"],
                 locality_answers=["French", "Rome and Berlin"]),
    ]


def test_zsre_scores(model_tok):
    model, tok = model_tok
    cases = _zsre_cases()
    pre = zsre_locality_predictions(model, tok, cases, batch_size=2)
    assert [len(p) for p in pre] == [1, 2]
    same = zsre_case_scores(model, tok, cases, pre, batch_size=2)
    assert [s["specificity"] for s in same] == [1.0, 1.0]  # unchanged model agrees with itself
    acc = answer_token_accuracy(model, tok, [c.prompt for c in cases], [c.target_new for c in cases])
    assert [s["efficacy"] for s in same] == pytest.approx(acc.tolist())
    reph = answer_token_accuracy(model, tok, cases[0].rephrase_prompts, [cases[0].target_new])
    assert same[0]["generalization"] == pytest.approx(float(reph[0]))
    assert same[1]["generalization"] is None
    loc_acc = answer_token_accuracy(model, tok, cases[1].locality_prompts, cases[1].locality_answers)
    assert same[1]["locality_answer_accuracy"] == pytest.approx(float(loc_acc.mean()))

    # Perturb the model: specificity = pooled fraction of unchanged argmax tokens.
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for p in edited.parameters():
            p.add_(0.3 * torch.randn_like(p))
    post = zsre_locality_predictions(edited, tok, cases)
    scores = zsre_case_scores(edited, tok, cases, pre)
    for s, a, b in zip(scores, pre, post):
        flat_a, flat_b = sum(a, []), sum(b, [])
        assert s["specificity"] == pytest.approx(sum(x == y for x, y in zip(flat_a, flat_b)) / len(flat_a))
    assert any(s["specificity"] < 1.0 for s in scores)


def test_zsre_rejects_mismatched_predictions(model_tok):
    model, tok = model_tok
    cases = _zsre_cases()
    pre = zsre_locality_predictions(model, tok, cases)
    with pytest.raises(ValueError, match="entries"):
        zsre_case_scores(model, tok, cases, pre[:1])
    bad = [pre[0], [pre[1][0]]]
    with pytest.raises(ValueError, match="recompute"):
        zsre_case_scores(model, tok, cases, bad)


def test_bootstrap_ci():
    assert bootstrap_ci([0.7] * 13) == (0.7, 0.7, 0.7)
    values = [0.0, 1.0] * 50
    mean, lo, hi = bootstrap_ci(values, n_boot=2000, seed=3)
    assert mean == 0.5 and lo < 0.5 < hi
    # normal approximation: half-width ~ 1.96 * 0.5 / 10 = 0.098
    assert hi - lo == pytest.approx(2 * 0.098, abs=0.03)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 0.0], alpha=1.5)


def test_summarize():
    scores = [
        {"efficacy": 1.0, "generalization": 0.5, "specificity": None, "consistency": None},
        {"efficacy": 0.0, "generalization": 1.0, "specificity": 1.0, "consistency": None},
        {"efficacy": 1.0, "generalization": None, "specificity": 1.0, "consistency": None},
    ]
    s = summarize(scores)
    assert set(s) == {"efficacy", "generalization", "specificity", "fluency", "consistency"}
    assert s["efficacy"]["mean"] == pytest.approx(2 / 3) and s["efficacy"]["n"] == 3
    assert s["generalization"]["mean"] == pytest.approx(0.75) and s["generalization"]["n"] == 2
    assert s["specificity"] == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 2}
    assert s["consistency"] == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    assert s["fluency"]["n"] == 0
    assert s["efficacy"]["ci_low"] <= s["efficacy"]["mean"] <= s["efficacy"]["ci_high"]


def test_smollm2_knows_paris_and_batching_is_exact(smollm2):
    """Integration: the embedded model prefers the true capital; padding does not change NLLs."""
    model, tok = smollm2
    edit = EditCase(0, "The capital of France is", "France", "Rome", "Paris",
                    locality_prompts=["The capital of Germany is"], locality_answers=["Berlin"])
    s = counterfact_case_scores(model, tok, [edit])[0]
    assert s["efficacy"] == 0.0 and s["rewrite_nll_true"] < s["rewrite_nll_new"]
    assert s["specificity"] == 1.0
    prompts = ["The capital of France is", "The mother tongue of Danielle Darrieux is", "Berlin is in"]
    answers = ["Paris", "French", "the country of Germany"]
    batched = answer_nll(model, tok, prompts, answers, batch_size=3)
    single = torch.cat([answer_nll(model, tok, [p], [a]) for p, a in zip(prompts, answers)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    (flu,) = fluency_scores(model, tok, ["The capital of France is"], max_new_tokens=5)
    assert flu > 0.3
