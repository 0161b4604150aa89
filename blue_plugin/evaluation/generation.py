"""Greedy generation and its fluency score (ROME's weighted bi/tri-gram entropy).

Shared by the scores of :mod:`blue_plugin.evaluation.metrics`: :func:`inference` (no_grad and eval
mode, the training flag restored) and :func:`check_batch_size`.

With ``chat_template=True`` (keyword-only) each prompt is put into the tokenizer's chat template as
one user message with the generation prompt (:func:`blue_plugin.model.prompts.format_prompt`), and
the text returned and scored is the prompt followed by the model's reply (the template's own text,
such as a system prompt, is left out).
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from typing import Any, Iterator, Sequence

import torch
from transformers import GenerationConfig

from .data import EditCase
from .summary import mean_or_none
from ..model.devices import input_device
from ..model.prompts import format_prompt
from ..model.tokens import pad_token_id

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """``torch.no_grad`` + eval mode, restoring the model's training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def check_batch_size(batch_size: Any) -> None:
    """Raise :class:`ValueError` unless ``batch_size`` is a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]", re.UNICODE)


def word_tokens(text: str) -> list[str]:
    """Split text into words (letters/digits, inner apostrophes kept) and single punctuation marks.

    A dependency-free stand-in for ``nltk.word_tokenize`` (which ROME used); it differs only in
    details such as contraction splitting ("don't" stays one token here).
    """
    return _WORD_RE.findall(text)


def ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """Weighted n-gram entropy of one text (ROME's fluency measure), in bits.

    Definition: with ``f_n`` the relative frequencies of the distinct word n-grams of the text,
    ``H_n = -sum f_n log2 f_n``; the score is the arithmetic mean of ``w_n * H_n`` over n, i.e.
    with the defaults ``(2/3 * H_2 + 4/3 * H_3) / 2``. A text with fewer than n words has
    ``H_n = 0``. Paper tables report this value x100 (e.g. 6.2 bits -> 620).
    """
    if len(orders) != len(weights) or not orders:
        raise ValueError(f"need one weight per n-gram order, got orders={orders!r} weights={weights!r}")
    words = word_tokens(text)
    total = 0.0
    for n, w in zip(orders, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        m = sum(counts.values())
        h = -sum((c / m) * math.log2(c / m) for c in counts.values()) if m else 0.0
        total += w * h
    return total / len(orders)


def _eos_ids(model: torch.nn.Module, tok: Any) -> list[int]:
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(e) for e in eos]


def generate_greedy(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], max_new_tokens: int = 100, batch_size: int = 64,
    *, chat_template: bool = False,
) -> list[str]:
    """Greedy continuation of each prompt, returned as the decoded prompt + continuation.

    Prompts are tokenised with default special tokens, left-padded in batches of ``batch_size``
    (sorted by length) and extended by up to ``max_new_tokens`` tokens; generation of a row stops
    at the model's EOS token (which is not included in the text).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_batch_size(batch_size)
    encoded = []
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"prompts must be strings, got {p!r}")
        ids = list(tok(format_prompt(tok, p, chat_template))["input_ids"])
        if not ids:
            raise ValueError(f"prompt {p!r} tokenises to no tokens; give a non-empty prompt")
        encoded.append(ids)
    pad = pad_token_id(tok)
    eos = _eos_ids(model, tok)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=pad, eos_token_id=eos or None,
    )
    device = input_device(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    with inference(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                n = len(encoded[i])
                ids[r, width - n :] = torch.tensor(encoded[i])
                mask[r, width - n :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
            new = out[:, width:].cpu().tolist()
            for r, i in enumerate(idx):
                cont = new[r]
                for j, t in enumerate(cont):
                    if t in eos:
                        cont = cont[:j]
                        break
                if chat_template:
                    reply = tok.decode(cont, skip_special_tokens=True).strip()
                    texts[i] = f"{prompts[i]} {reply}" if reply else prompts[i]
                else:
                    texts[i] = tok.decode(encoded[i] + cont, skip_special_tokens=True)
    return texts


def fluency_scores(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], max_new_tokens: int = 100, batch_size: int = 64,
    *, chat_template: bool = False,
) -> list[float]:
    """Weighted bi/tri-gram entropy (:func:`ngram_entropy`, bits) of the greedy generation per prompt.

    The scored text is the prompt followed by up to ``max_new_tokens`` greedily generated tokens
    (ROME scored prompt + generation too, but sampled with top-k 5 up to 100 tokens in total).
    A case's fluency is the mean over its generation prompts; tables report it x100.
    """
    texts = generate_greedy(model, tok, prompts, max_new_tokens, batch_size, chat_template=chat_template)
    return [ngram_entropy(t) for t in texts]


def case_fluency(
    model: torch.nn.Module, tok: Any, cases: Sequence[EditCase], max_new_tokens: int = 100, batch_size: int = 64,
    *, chat_template: bool = False,
) -> list[float | None]:
    """Per case, the mean :func:`fluency_scores` over its ``generation_prompts`` (None if it has none).

    Repeated prompts are generated once (greedy decoding is deterministic) but keep their weight.
    """
    unique = list(dict.fromkeys(p for c in cases for p in c.generation_prompts))
    flu = fluency_scores(model, tok, unique, max_new_tokens, batch_size, chat_template=chat_template) if unique else []
    scores = dict(zip(unique, flu))
    return [mean_or_none([scores[p] for p in c.generation_prompts]) for c in cases]
