"""Token-level perplexity of a model on plain documents (e.g. held-out corpus text), with
percentile bootstrap intervals over documents.

Definition. Each document is tokenised with the tokenizer's default special tokens (a BOS first
where the tokenizer adds one, e.g. Llama / SmolLM2; none for GPT-2) and cut to its first
``max_length`` tokens. Every position but the last predicts the next token, so a document of
``L`` tokens has ``L - 1`` predicted tokens (with a BOS: all of its text tokens; without, all but
the first). A document contributes the sum of ``-log p(token | preceding tokens)`` in nats over
its predicted tokens and their number. The perplexity of a set of documents is

    exp( sum of the documents' NLL sums / sum of their predicted tokens ),

the token-weighted corpus perplexity (not the mean of per-document perplexities). Its interval
resamples documents with replacement and recomputes that ratio (:func:`perplexity_summary`); a
difference between two models on the same documents resamples the documents jointly
(:func:`paired_perplexity_difference`).

The documents are given as plain texts: which documents (held out from C_0) is the caller's
choice, e.g. :func:`blue_plugin.stats.heldout.heldout_documents`. Runs under ``torch.no_grad`` in
eval mode (the training flag restored); padding is on the right and masked; log-probabilities are
computed in float32 from the model's logits, one document at a time.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .generation import check_batch_size, inference
from ..model.devices import input_device
from ..model.tokens import pad_token_id

def encode_documents(tok: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (default special tokens), cut to the first ``max_length``.

    The tokenizer is called without ``truncation`` (a shared fast tokenizer keeps that setting on
    its backend); the ids are cut here.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (one token predicts the next), got {max_length!r}")
    out = []
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"documents must be strings, got {type(t).__name__}")
        out.append(list(tok(t)["input_ids"])[:max_length])
    return out


def document_nll(
    model: torch.nn.Module, tok: Any, texts: Sequence[str], max_length: int = 128, batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Per document: the summed negative log-likelihood (nats) of its predicted tokens and their
    number (see the module docstring). Documents are batched by length (longest first), padded on
    the right; the result does not depend on ``batch_size`` beyond float rounding."""
    check_batch_size(batch_size)
    encoded = encode_documents(tok, texts, max_length)
    nll = [0.0] * len(encoded)
    counts = [max(0, len(ids) - 1) for ids in encoded]
    todo = sorted((i for i in range(len(encoded)) if counts[i] > 0), key=lambda i: -len(encoded[i]))
    pad = pad_token_id(tok)
    device = input_device(model)
    with inference(model):
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            width = len(encoded[idx[0]])
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, i in enumerate(idx):  # one row at a time: a float32 copy of one row's logits at most
                n = counts[i]
                labels = ids[r, 1 : n + 1].to(logits.device)
                nll[i] = float(F.cross_entropy(logits[r, :n].float(), labels, reduction="sum").double())
    return nll, counts


def perplexity(nll: Sequence[float], tokens: Sequence[int]) -> float:
    """``exp(sum(nll) / sum(tokens))``; ValueError when no token is predicted."""
    total = int(sum(tokens))
    if total <= 0:
        raise ValueError("no predicted token: every document has fewer than two tokens")
    return float(math.exp(float(sum(nll)) / total))


def _arrays(nll: Sequence[float], tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    a, t = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if a.shape != t.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need one NLL sum per document and one token count per document, got {a.shape} and {t.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("non-finite NLL sums")
    return a, t


def _boot_ppl(a: np.ndarray, t: np.ndarray, idx: np.ndarray) -> np.ndarray:
    tok = t[idx].sum(axis=1)
    return np.exp(np.divide(a[idx].sum(axis=1), tok, out=np.full(tok.shape, np.nan), where=tok > 0))


def _check_boot(n_boot: int, alpha: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def perplexity_summary(
    nll: Sequence[float], tokens: Sequence[int], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, Any]:
    """Perplexity of the documents and a ``1 - alpha`` percentile bootstrap interval (documents
    resampled ``n_boot`` times by a numpy Generator seeded with ``seed``).

    Returns:
        ``{"mean": perplexity, "ci_low", "ci_high", "n": documents, "tokens": predicted tokens,
        "nll_per_token": nats}`` (``mean`` is the point estimate, named as the other summaries).
    """
    _check_boot(n_boot, alpha)
    a, t = _arrays(nll, tokens)
    ppl = perplexity(a, t)
    boots = _boot_ppl(a, t, np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size)))
    lo, hi = np.nanquantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"mean": ppl, "ci_low": float(lo), "ci_high": float(hi), "n": int(a.size),
            "tokens": int(t.sum()), "nll_per_token": float(a.sum() / t.sum())}


def paired_perplexity_difference(
    nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[int], n_boot: int = 1000,
    alpha: float = 0.05, seed: int = 0,
) -> dict[str, Any]:
    """Perplexity of model B minus that of model A on the same documents (same ``tokens``), with a
    percentile bootstrap interval resampling the documents jointly.

    Returns:
        ``{"mean": ppl_b - ppl_a, "ci_low", "ci_high", "n": documents}``.
    """
    _check_boot(n_boot, alpha)
    a, t = _arrays(nll_a, tokens)
    b, _ = _arrays(nll_b, tokens)
    diff = perplexity(b, t) - perplexity(a, t)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    boots = _boot_ppl(b, t, idx) - _boot_ppl(a, t, idx)
    lo, hi = np.nanquantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(diff), "ci_low": float(lo), "ci_high": float(hi), "n": int(a.size)}


def heldout_perplexity(
    model: torch.nn.Module, tok: Any, texts: Sequence[str], max_length: int = 128, batch_size: int = 16,
    seed: int = 0, n_boot: int = 1000,
) -> dict[str, Any]:
    """:func:`document_nll` and :func:`perplexity_summary` in one: ``{"summary", "doc_nll",
    "doc_tokens"}`` (the per-document values let a caller take subsets or paired differences)."""
    nll, counts = document_nll(model, tok, texts, max_length, batch_size)
    return {"summary": perplexity_summary(nll, counts, n_boot=n_boot, seed=seed), "doc_nll": nll, "doc_tokens": counts}
