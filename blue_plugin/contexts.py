"""Context prefixes: short texts sampled from the model and put before the edit prompt, so that
targets and keys do not depend on the prompt's exact start.

The first prefix is always ``""`` (the bare prompt). Generation uses left padding with a matching
attention mask; :func:`looks_like_text` guards against the garbled prefixes a wrong mask gives.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .requests import pad_token_id

logger = logging.getLogger(__name__)

STARTERS = ("The", "Therefore", "Because", "I", "You")


def looks_like_text(s: str) -> bool:
    """A cheap sanity check: mostly letters, and some words of two or more letters."""
    chars = [c for c in s if not c.isspace()]
    if not chars:
        return False
    letters = sum(c.isalpha() for c in chars)
    words = [w for w in s.split() if sum(c.isalpha() for c in w) >= 2]
    return letters / len(chars) >= 0.6 and len(words) >= 1


def _encode_starters(tok, starters: Sequence[str], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left-padded starter words. A model trained on documents that begin with a BOS token
    writes garbage after a bare first word (SmolLM2: 'The-the-key-to-the-'), so the BOS token is
    put in front when the tokenizer does not add one itself."""
    seqs = [tok(s)["input_ids"] for s in starters]
    bos = tok.bos_token_id
    if bos is not None:
        seqs = [ids if ids[:1] == [bos] else [bos] + ids for ids in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, width - len(s):] = torch.tensor(s)
        mask[k, width - len(s):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def generate_prefixes(model, tok, length_params: Sequence[Sequence[int]], seed: int = 0) -> list[str]:
    """``[""]`` plus, for each ``[n_tokens, n_prefixes]``, ``n_prefixes`` sampled texts of about
    ``n_tokens`` tokens (top-k 5 sampling from the starters), each ending in ``". "``."""
    prefixes = [""]
    device = next(model.parameters()).device
    pad_id = pad_token_id(tok)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for n_tokens, n_prefixes in length_params:
            if n_prefixes == 0:
                continue
            starters = [STARTERS[k % len(STARTERS)] for k in range(n_prefixes)]
            enc = _encode_starters(tok, starters, pad_id, device)
            out = model.generate(
                **enc,
                do_sample=True,
                top_k=5,
                max_new_tokens=max(int(n_tokens) - 1, 1),
                min_new_tokens=max(int(n_tokens) - 1, 1),
                pad_token_id=pad_id,
                eos_token_id=None,
            )
            new = out[:, enc["input_ids"].shape[1]:]
            for starter, ids in zip(starters, new):
                text = starter + tok.decode(ids, skip_special_tokens=True)
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                prefixes.append(text + ". ")
    bad = [p for p in prefixes[1:] if not looks_like_text(p)]
    if bad:
        logger.warning("%d of %d context prefixes do not look like text: %r", len(bad), len(prefixes) - 1, bad[:3])
    logger.info("context prefixes: %r", prefixes)
    return prefixes
