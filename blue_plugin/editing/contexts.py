"""Context prefixes: short texts sampled from the model and put before the edit prompt, so that
targets and keys do not depend on the prompt's exact start.

The first prefix is always ``""`` (the bare prompt). Generation uses left padding with a matching
attention mask; :func:`looks_like_text` guards against the garbled prefixes a wrong mask gives.

The prefixes come in groups, one per ``[n_tokens, n_prefixes]`` entry of
``context_template_length_params``, after the bare prompt's own group. Keys average within each
group and then across the groups (every reference's ``compute_ks``), so with ``[[10, 5]]`` the bare
prompt weighs 1/2 and each prefixed row 1/10; the target loss averages over all rows alike.
:class:`ContextPrefixes` is the list of prefixes that carries this group structure.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..model.tokens import pad_token_id

logger = logging.getLogger(__name__)

STARTERS = ("The", "Therefore", "Because", "I", "You")


class ContextPrefixes(list):
    """The context prefixes (a ``list`` of str, the first ``""``) and their groups.

    ``groups`` holds the number of prefixes of each context-template group in order, the bare
    prompt's group ``1`` first: ``("", p1, .., p5)`` made with ``[[10, 5]]`` has groups ``(1, 5)``.
    Being a list, it goes wherever a list of prefixes does (rows, counts, equality, JSON).
    """

    def __init__(self, prefixes: Sequence[str] = ("",), groups: Optional[Sequence[int]] = None):
        super().__init__(prefixes)
        if not self or self[0] != "":
            raise ValueError(f"the first context prefix must be the empty one (the bare prompt), got {list(self)[:1]!r}")
        if groups is None:
            groups = (1, len(self) - 1) if len(self) > 1 else (1,)
        groups = tuple(int(g) for g in groups)
        if groups[0] != 1 or any(g < 1 for g in groups) or sum(groups) != len(self):
            raise ValueError(f"context prefix groups {groups} do not fit {len(self)} prefixes (the first group is the bare prompt alone)")
        self.groups = groups

    def __repr__(self) -> str:
        return f"ContextPrefixes({list(self)!r}, groups={self.groups})"


def group_sizes(length_params: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Group sizes of the prefixes made from ``length_params``: the bare prompt, then one group
    per ``[n_tokens, n_prefixes]`` with ``n_prefixes > 0``."""
    return (1,) + tuple(int(n) for _, n in length_params if int(n) > 0)


def with_groups(prefixes: Sequence[str], length_params: Sequence[Sequence[int]]) -> ContextPrefixes:
    """``prefixes`` as :class:`ContextPrefixes`: unchanged when they already are, else grouped by
    ``length_params`` (the parameters they were made with: a cache filled by an older version, or
    prefixes put into the state by hand). When the counts do not fit, all prefixed rows form one
    group (with a warning)."""
    if isinstance(prefixes, ContextPrefixes):
        return prefixes
    groups = group_sizes(length_params)
    if sum(groups) != len(prefixes):
        logger.warning(
            "%d context prefixes do not fit context_template_length_params %s; averaging the keys over the "
            "bare prompt and all prefixed rows as two groups", len(prefixes), [list(p) for p in length_params],
        )
        groups = None
    return ContextPrefixes(prefixes, groups)


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
def generate_prefixes(model, tok, length_params: Sequence[Sequence[int]], seed: int = 0) -> ContextPrefixes:
    """``[""]`` plus, for each ``[n_tokens, n_prefixes]``, ``n_prefixes`` sampled texts of about
    ``n_tokens`` tokens (top-k 5 sampling from the starters), each ending in ``". "``; grouped
    by ``length_params`` (see :class:`ContextPrefixes`)."""
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
    return ContextPrefixes(prefixes, group_sizes(length_params))
