"""Answer probabilities ``P(o|p)`` and efficacy, optionally with a residual added to a block's output
(:func:`answer_probabilities`; definitions in :mod:`blue_plugin.research.analysis`)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace as dc_replace
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..editing.editor import Editor
from ..editing.requests import EditRequest, Row, pad_rows, target_rows
from ..editing.targets import head_logits, last_hidden
from ..model.devices import input_device
from ..model.hooks import add_delta
from ..model.tokens import encode_target, pad_token_id


@torch.no_grad()
def _row_logprobs(editor: Editor, rows: Sequence[Row], block: Optional[str], deltas: Optional[torch.Tensor], max_rows: int = 64) -> torch.Tensor:
    """Mean log-probability of each row's target tokens, shape (len(rows),), float64 CPU.
    With ``block``, ``deltas[k]`` (d_model) is added to that block's output at row k's lookup."""
    model, tok = editor.model, editor.tok
    device = input_device(model)
    pad_id = pad_token_id(tok)
    out = []
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        batch = pad_rows(chunk, pad_id, device)
        ctx = nullcontext()
        if block is not None:
            idx = torch.arange(len(chunk), device=device)
            pos = torch.tensor([r.lookup for r in chunk], device=device)
            ctx = add_delta(model, block, idx, pos, deltas[start:start + len(chunk)].to(device))
        with ctx:
            hidden = last_hidden(model, batch)
        t_row, t_pos, t_tok = [], [], []
        for k, r in enumerate(chunk):
            t_row += [k] * len(r.targets)
            t_pos += range(r.target_start - 1, r.target_start - 1 + len(r.targets))
            t_tok += r.targets
        t_row_t = torch.tensor(t_row, device=device)
        logp = F.log_softmax(head_logits(model, hidden[t_row_t, torch.tensor(t_pos, device=device)]), dim=-1)
        lp = logp.gather(1, torch.tensor(t_tok, device=device).unsqueeze(1)).squeeze(1).double()
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, t_row_t, lp)
        counts = torch.tensor([len(r.targets) for r in chunk], dtype=torch.float64, device=device)
        out.append((sums / counts).cpu())
    return torch.cat(out)


def _with_target(tok, req: EditRequest, answer: str) -> EditRequest:
    return dc_replace(req, target_new=answer, target_ids=encode_target(tok, answer))


def answer_probabilities(
    editor: Editor,
    reqs: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: Optional[int] = None,
    R: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """``P(o*|p)`` per request (mean over prefixes of exp(mean token log-prob)), and the bare-prompt
    NLLs of o* and of the true object with efficacy ``NLL(o*) < NLL(o_true)`` (None where a request
    has no ground truth). With ``layer`` and ``R`` (n, d_model), ``R[j]`` is added to the output of
    block ``layer`` at request j's edited token in every prefixed row (the way the target
    optimisation applies its delta) -- the "hidden" way of applying a residual.

    Returns ``{"p": (n,) float64, "nll_new": (n,), "nll_true": list (None where unknown),
    "efficacy": list of 0/1/None}``."""
    n, n_pre = len(reqs), len(prefixes)
    block = editor.layout.block(layer) if layer is not None else None
    if (layer is None) != (R is None):
        raise ValueError("give both layer and R (or neither).")
    if R is not None and R.shape[0] != n:
        raise ValueError(f"R has {R.shape[0]} rows for {n} requests.")
    deltas = R.float().repeat_interleave(n_pre, dim=0) if R is not None else None
    rows = target_rows(editor.tok, reqs, prefixes, editor.hp.fact_token)[: n * n_pre]
    lp_new = _row_logprobs(editor, rows, block, deltas).view(n, n_pre)
    p = lp_new.exp().mean(dim=1)
    nll_new = -lp_new[:, 0]
    with_gt = [j for j, r in enumerate(reqs) if r.ground_truth]
    nll_true: list[Optional[float]] = [None] * n
    if with_gt:
        true_reqs = [_with_target(editor.tok, reqs[j], reqs[j].ground_truth) for j in with_gt]
        bare = [target_rows(editor.tok, [r], [""], editor.hp.fact_token)[0] for r in true_reqs]
        for r, j in zip(bare, with_gt):
            r.request = j
        d_true = R.float()[with_gt] if R is not None else None
        lp_true = _row_logprobs(editor, bare, block, d_true)
        for k, j in enumerate(with_gt):
            nll_true[j] = float(-lp_true[k])
    efficacy = [None if t is None else float(float(nll_new[j]) < t) for j, t in enumerate(nll_true)]
    return {"p": p, "nll_new": nll_new, "nll_true": nll_true, "efficacy": efficacy}
