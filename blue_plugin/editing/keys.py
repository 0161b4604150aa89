"""Keys K_l (input of the FFN output projection at the edited token, averaged over the context
prefixes as every reference's ``compute_ks`` does) and current block outputs h_l, from one forward
pass that stops early."""
from __future__ import annotations

from typing import Sequence

import torch

from ..model.layout import ModelLayout
from .contexts import ContextPrefixes
from ..model.hooks import capture, run_until
from ..model.devices import input_device
from ..model.tokens import pad_token_id
from .requests import Row, pad_rows


def group_mean(k: torch.Tensor, prefixes: Sequence[str]) -> torch.Tensor:
    """(n_requests, n_prefixes, d) -> (n_requests, d): the mean within each context-template group
    of ``prefixes`` (:class:`~blue_plugin.editing.contexts.ContextPrefixes`; a plain list counts as the
    bare prompt and one group of the rest), then the mean across the groups."""
    if isinstance(prefixes, int):
        raise TypeError("keys need the context prefixes (with their groups), not their number")
    groups = prefixes.groups if isinstance(prefixes, ContextPrefixes) else ContextPrefixes(prefixes).groups
    if k.shape[1] != sum(groups):
        raise ValueError(f"{k.shape[1]} rows per request for {sum(groups)} context prefixes")
    return torch.stack([part.mean(dim=1) for part in torch.split(k, list(groups), dim=1)], dim=1).mean(dim=1)


@torch.no_grad()
def keys_and_outputs(
    model,
    tok,
    layout: ModelLayout,
    rows: Sequence[Row],
    n_requests: int,
    prefixes: Sequence[str],
    key_layers: Sequence[int],
    out_layers: Sequence[int] = (),
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Return ``keys[l]`` of shape (n_requests, d_in) and ``outs[l]`` of shape (n_requests, d_model).

    ``rows`` come from :func:`blue_plugin.editing.requests.key_rows` with ``prefixes`` (request-major, first
    prefix empty). Keys are :func:`group_mean` over the prefixed rows; outputs are read from the
    bare-prompt row. The forward pass stops after the highest block needed. Each ``keys[l]`` /
    ``outs[l]`` stays on the device of its own module (layers may sit on different devices with an
    accelerate ``device_map``).
    """
    n_prefixes = len(prefixes)
    if len(rows) != n_requests * n_prefixes:
        raise ValueError(f"{len(rows)} key rows for {n_requests} request(s) x {n_prefixes} prefixes")
    device = input_device(model)
    pad_id = pad_token_id(tok)
    batch = pad_rows(rows, pad_id, device)
    idx = torch.arange(len(rows), device=device)
    pos = torch.tensor([r.lookup for r in rows], device=device)
    key_names = [layout.rewrite(l) for l in key_layers]
    out_names = [layout.block(l) for l in out_layers]
    top = layout.block(max(list(key_layers) + list(out_layers)))
    with capture(model, inputs_of=key_names, outputs_of=out_names, stop_after=top) as store:
        run_until(model, **batch)
    keys = {}
    for l, name in zip(key_layers, key_names):
        x = store[f"in:{name}"]
        k = x[idx.to(x.device), pos.to(x.device)].float()
        keys[l] = group_mean(k.view(n_requests, n_prefixes, -1), prefixes)
    outs = {}
    bare = torch.arange(0, len(rows), n_prefixes, device=device)
    for l, name in zip(out_layers, out_names):
        y = store[f"out:{name}"]
        outs[l] = y[bare.to(y.device), pos[bare].to(y.device)].float()
    return keys, outs
