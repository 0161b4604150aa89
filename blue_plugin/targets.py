"""Target values z_l: optimise one delta per request, added to the output of block ``l`` at the
edited token, so that the model predicts ``target_new``.

All requests of a batch are optimised together: one forward/backward per step over the rows of
every still-active request. The loss is the SUM of per-request losses, and Adam is elementwise,
so each request's delta follows exactly the trajectory it would follow alone (up to float
rounding of the padded batch). A request stops as soon as its own loss is below
``v_early_stop_loss``; its rows then leave the batch.

Per-request loss (as in ROME/MEMIT): mean over context prefixes of the mean target-token NLL
+ ``kl_factor`` * KL(p_now || p_start) on ``"{subject} is a"`` at the edited token
+ ``v_weight_decay`` * ||delta|| / ||h||^2; after each step ||delta|| is clamped to
``clamp_norm_factor`` * ||h||.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hooks import add_delta, capture
from .hparams import BLUEHyperParams
from .requests import Row, pad_rows

logger = logging.getLogger(__name__)


@dataclass
class TargetResult:
    """``z``: (n_requests, d_model) target values; ``h``: the unedited outputs they start from;
    ``steps``: optimisation iterations each request needed (``v_num_grad_steps`` = never
    converged); ``nll``: final target NLL per request."""

    z: torch.Tensor
    h: torch.Tensor
    steps: list[int]
    nll: list[float]


class RowAdam:
    """Adam (same update as ``torch.optim.Adam`` with default betas/eps) over the rows of a
    (n, d) parameter, with a separate step count per row so rows can stop independently."""

    def __init__(self, n: int, d: int, lr: float, device, dtype, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = torch.zeros(n, d, device=device, dtype=dtype)
        self.v = torch.zeros(n, d, device=device, dtype=dtype)
        self.t = torch.zeros(n, device=device, dtype=torch.long)

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
        """Update ``param[rows]`` with ``grad`` of shape (len(rows), d)."""
        self.t[rows] += 1
        t = self.t[rows].to(param.dtype).unsqueeze(1)
        m = self.m[rows].mul_(self.b1).add_(grad, alpha=1 - self.b1)
        v = self.v[rows].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        self.m[rows], self.v[rows] = m, v
        bc1 = 1 - self.b1 ** t
        bc2 = 1 - self.b2 ** t
        denom = v.sqrt() / bc2.sqrt() + self.eps
        param[rows] -= (self.lr / bc1) * m / denom


def compute_targets(
    model,
    tok,
    block_name: str,
    rows: list[Row],
    n_requests: int,
    n_prefixes: int,
    hparams: BLUEHyperParams,
) -> TargetResult:
    """Optimise the targets at block ``block_name`` for ``n_requests`` requests.

    ``rows`` come from :func:`blue_plugin.requests.target_rows`: ``n_prefixes`` rewriting rows
    per request (request-major, the first one with the empty prefix) followed by one KL row per
    request. The model's parameters must not require grad (see :func:`blue_plugin.hooks.frozen`).
    """
    param = next(model.parameters())
    device = param.device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_rw = n_requests * n_prefixes
    rw_rows, kl_rows = rows[:n_rw], rows[n_rw:]
    if len(kl_rows) != n_requests:
        raise ValueError(f"expected one KL row per request, got {len(kl_rows)} for {n_requests} requests")

    # Current output h at the edited token (bare prompt) and the starting KL distributions.
    with torch.no_grad():
        first_rows = [rw_rows[j * n_prefixes] for j in range(n_requests)]
        batch = pad_rows(first_rows + kl_rows, pad_id, device)
        lookups = torch.tensor([r.lookup for r in first_rows + kl_rows], device=device)
        with capture(model, outputs_of=[block_name]) as store:
            hidden = last_hidden(model, batch)
        out = store[f"out:{block_name}"]
        h = out[torch.arange(n_requests, device=device), lookups[:n_requests]].float()
        kl_idx = torch.arange(n_requests, 2 * n_requests, device=device)
        kl_start = F.log_softmax(head_logits(model, hidden[kl_idx, lookups[n_requests:]]), dim=-1)

    d = h.shape[1]
    delta = torch.zeros(n_requests, d, device=device, dtype=torch.float32)
    opt = RowAdam(n_requests, d, hparams.v_lr, device, torch.float32)
    h_norm = h.norm(dim=1)
    max_norm = hparams.clamp_norm_factor * h_norm
    steps = [hparams.v_num_grad_steps] * n_requests
    nll_final = [math.nan] * n_requests
    active = list(range(n_requests))
    plan = None

    for it in range(hparams.v_num_grad_steps):
        if plan is None or plan.active != active:
            plan = _BatchPlan(rw_rows, kl_rows, active, n_prefixes, pad_id, device)
        d_act = delta[plan.active_t].clone().requires_grad_(True)
        with add_delta(model, block_name, plan.row_idx, plan.row_pos, d_act[plan.row_req]):
            hidden = last_hidden(model, plan.batch)
        # Log-probabilities only where they are needed: target positions and KL positions.
        tgt_logp = F.log_softmax(head_logits(model, hidden[plan.tgt_row, plan.tgt_pos]), dim=-1)
        tok_nll = -tgt_logp.gather(1, plan.tgt_tok.unsqueeze(1)).squeeze(1)
        row_nll = torch.zeros(plan.n_rw, device=device).index_add_(0, plan.tgt_row, tok_nll) / plan.tgt_count
        nll = row_nll.view(len(active), n_prefixes).mean(dim=1)
        kl_lp = F.log_softmax(head_logits(model, hidden[plan.kl_row, plan.kl_pos]), dim=-1)
        kl = F.kl_div(kl_start[plan.active_t], kl_lp, log_target=True, reduction="none").sum(dim=1)
        wd = hparams.v_weight_decay * d_act.norm(dim=1) / h_norm[plan.active_t] ** 2
        loss = nll + hparams.kl_factor * kl + wd

        done = (loss.detach() < hparams.v_early_stop_loss).tolist()
        for k, j in enumerate(active):
            nll_final[j] = float(nll[k].detach())
            if done[k]:
                steps[j] = it
        keep = [k for k in range(len(active)) if not done[k]]
        if not keep or it == hparams.v_num_grad_steps - 1:
            break
        loss[keep].sum().backward()
        keep_t = torch.tensor(keep, device=device)
        rows_t = plan.active_t[keep_t]
        opt.step(delta, d_act.grad[keep_t], rows_t)
        with torch.no_grad():
            norms = delta[rows_t].norm(dim=1)
            scale = torch.where(norms > max_norm[rows_t], max_norm[rows_t] / norms, torch.ones_like(norms))
            delta[rows_t] *= scale.unsqueeze(1)
        active = [active[k] for k in keep]

    logger.debug("targets at %s: steps=%s nll=%s", block_name, steps, [round(x, 3) for x in nll_final])
    return TargetResult(z=(h + delta).detach(), h=h.detach(), steps=steps, nll=nll_final)


class _BatchPlan:
    """Padded batch and index tensors for the rows of the active requests (rewriting rows of
    each active request, then their KL rows). Rebuilt only when the active set changes."""

    def __init__(self, rw_rows: list[Row], kl_rows: list[Row], active: list[int], n_prefixes: int, pad_id: int, device):
        self.active = list(active)
        self.active_t = torch.tensor(active, device=device)
        act_rw = [rw_rows[j * n_prefixes + p] for j in active for p in range(n_prefixes)]
        act_kl = [kl_rows[j] for j in active]
        rows = act_rw + act_kl
        self.n_rw = len(act_rw)
        self.batch = pad_rows(rows, pad_id, device)
        local = {j: k for k, j in enumerate(active)}
        self.row_req = torch.tensor([local[r.request] for r in rows], device=device)
        self.row_pos = torch.tensor([r.lookup for r in rows], device=device)
        self.row_idx = torch.arange(len(rows), device=device)
        tgt_row, tgt_pos, tgt_tok, count = [], [], [], []
        for k, r in enumerate(act_rw):
            n = len(r.targets)
            tgt_row += [k] * n
            tgt_pos += list(range(r.target_start - 1, r.target_start - 1 + n))
            tgt_tok += list(r.targets)
            count.append(n)
        self.tgt_row = torch.tensor(tgt_row, device=device)
        self.tgt_pos = torch.tensor(tgt_pos, device=device)
        self.tgt_tok = torch.tensor(tgt_tok, device=device)
        self.tgt_count = torch.tensor(count, device=device, dtype=torch.float32)
        self.kl_row = torch.arange(self.n_rw, len(rows), device=device)
        self.kl_pos = self.row_pos[self.n_rw:]


def last_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (after the final norm), without computing logits for every position."""
    return model.base_model(**batch, use_cache=False).last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (float32) of selected hidden states, shape (n, vocab)."""
    return model.get_output_embeddings()(hidden).float()
