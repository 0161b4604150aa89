"""Held-out perplexity (blue_plugin.evaluation.perplexity) on tiny random models: closed forms,
a hand computation, batching and padding, truncation, and the bootstrap summaries."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blue_plugin.evaluation.perplexity import (
    document_nll,
    encode_documents,
    heldout_perplexity,
    paired_perplexity_difference,
    perplexity,
    perplexity_summary,
)
from tests.tiny import VOCAB, make_gpt2, make_llama, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    "The capital of France is Paris.",
    "A cat sat on the mat.",
    "Berlin is the capital of Germany and Rome is the capital of Italy.",
    "I see a dog.",
    "You like the red house. Because the river is big, the city is old.",
]


@pytest.fixture(scope="module")
def llama():
    return make_llama(n_layers=2, hidden=32, intermediate=64, seed=3, init=0.5), make_tokenizer(add_bos=True)


def by_hand(model, tok, text: str, max_length: int = 128) -> tuple[float, int]:
    """Summed NLL of one document from one unpadded forward pass, with log_softmax in float64."""
    ids = torch.tensor(tok(text)["input_ids"][:max_length])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return float(-logp.gather(1, ids[1:, None]).sum()), len(ids) - 1


def test_uniform_logits_give_the_vocabulary_size():
    """A model whose logits are all zero predicts every token with probability 1/V: perplexity V."""
    model, tok = make_llama(n_layers=2, hidden=32, intermediate=64), make_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    nll, counts = document_nll(model, tok, DOCS, batch_size=2)
    for n, c in zip(nll, counts):
        assert n == pytest.approx(c * math.log(VOCAB), rel=1e-6)
    assert perplexity(nll, counts) == pytest.approx(VOCAB, rel=1e-6)
    s = heldout_perplexity(model, tok, DOCS, batch_size=3)["summary"]
    assert s["mean"] == pytest.approx(VOCAB, rel=1e-6)
    assert s["ci_low"] == pytest.approx(VOCAB, rel=1e-6) and s["ci_high"] == pytest.approx(VOCAB, rel=1e-6)
    assert s["n"] == len(DOCS) and s["tokens"] == sum(counts)


def test_matches_exp_of_the_mean_nll_computed_by_hand(llama):
    model, tok = llama
    nll, counts = document_nll(model, tok, DOCS, batch_size=16)
    hand = [by_hand(model, tok, d) for d in DOCS]
    assert counts == [c for _, c in hand]
    # with a BOS the predicted tokens are all the text tokens
    assert counts == [len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    for got, (want, _) in zip(nll, hand):
        assert got == pytest.approx(want, rel=1e-5)
    total = sum(n for n, _ in hand) / sum(c for _, c in hand)
    assert perplexity(nll, counts) == pytest.approx(math.exp(total), rel=1e-5)
    assert perplexity(nll, counts) > 1.0


def test_padding_and_batch_size_do_not_change_the_values(llama):
    """Documents of different lengths share a right-padded batch; the values are those of one
    document at a time (the order of the input is kept)."""
    model, tok = llama
    one = document_nll(model, tok, DOCS, batch_size=1)
    for bs in (2, 3, 16):
        many = document_nll(model, tok, DOCS, batch_size=bs)
        assert many[1] == one[1]
        assert np.allclose(many[0], one[0], rtol=1e-5, atol=1e-5)
    rev = document_nll(model, tok, DOCS[::-1], batch_size=4)
    assert np.allclose(rev[0][::-1], one[0], rtol=1e-5, atol=1e-5)


def test_truncation_without_bos_and_short_documents():
    model, tok = make_gpt2(n_layers=2, hidden=32), make_tokenizer(add_bos=False)
    lengths = [len(tok(d)["input_ids"]) for d in DOCS]
    nll, counts = document_nll(model, tok, DOCS + ["", "I"], max_length=4, batch_size=3)
    assert counts == [min(n, 4) - 1 for n in lengths] + [0, 0]  # without BOS the first token is not predicted
    assert nll[-2:] == [0.0, 0.0]
    for text, got in zip(DOCS, nll):
        assert got == pytest.approx(by_hand(model, tok, text, max_length=4)[0], rel=1e-5)
    assert [len(ids) for ids in encode_documents(tok, DOCS, 4)] == [min(n, 4) for n in lengths]
    with pytest.raises(ValueError, match="max_length"):
        document_nll(model, tok, DOCS, max_length=1)
    with pytest.raises(ValueError, match="strings"):
        document_nll(model, tok, [3])
    with pytest.raises(ValueError, match="no predicted token"):
        perplexity(*document_nll(model, tok, ["", "I"]))


def test_training_flag_is_restored(llama):
    model, tok = llama
    model.train()
    try:
        document_nll(model, tok, DOCS[:2])
        assert model.training
    finally:
        model.eval()


def test_summaries_and_paired_differences():
    nll, tokens = [2.0, 6.0, 3.0, 9.0], [2, 4, 3, 5]
    s = perplexity_summary(nll, tokens, n_boot=500, seed=1)
    assert s["mean"] == pytest.approx(math.exp(20 / 14)) and s["nll_per_token"] == pytest.approx(20 / 14)
    assert s["ci_low"] <= s["mean"] <= s["ci_high"] and s["ci_low"] < s["ci_high"]
    assert perplexity_summary(nll, tokens, n_boot=500, seed=1) == s  # seeded
    same = paired_perplexity_difference(nll, nll, tokens)
    assert (same["mean"], same["ci_low"], same["ci_high"], same["n"]) == (0.0, 0.0, 0.0, 4)
    worse = [x + t * 0.1 for x, t in zip(nll, tokens)]  # 0.1 nats more per token on every document
    d = paired_perplexity_difference(nll, worse, tokens, n_boot=500)
    assert d["mean"] == pytest.approx(math.exp(20 / 14 + 0.1) - math.exp(20 / 14))
    assert 0 < d["ci_low"] <= d["ci_high"]  # paired: the shared document noise cancels
    with pytest.raises(ValueError, match="one NLL sum per document"):
        perplexity_summary([1.0], [1, 2])
    with pytest.raises(ValueError, match="n_boot"):
        perplexity_summary(nll, tokens, n_boot=0)
