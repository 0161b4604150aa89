"""Keys K_l (input of the FFN output projection at the edited token, averaged over context
prefixes) and current block outputs h_l, from one forward pass that stops early."""
from __future__ import annotations

from typing import Sequence

import torch

from .arch import ModelLayout
from .hooks import capture, run_until
from .requests import Row, pad_rows, pad_token_id
from .targets import input_device


@torch.no_grad()
def keys_and_outputs(
    model,
    tok,
    layout: ModelLayout,
    rows: Sequence[Row],
    n_requests: int,
    n_prefixes: int,
    key_layers: Sequence[int],
    out_layers: Sequence[int] = (),
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Return ``keys[l]`` of shape (n_requests, d_in) and ``outs[l]`` of shape (n_requests, d_model).

    ``rows`` come from :func:`blue_plugin.requests.key_rows` (request-major, first prefix empty).
    Keys average over all prefixes; outputs are read from the bare-prompt row. The forward pass
    stops after the highest block needed. Each ``keys[l]`` / ``outs[l]`` stays on the device of
    its own module (layers may sit on different devices with an accelerate ``device_map``).
    """
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
        keys[l] = k.view(n_requests, n_prefixes, -1).mean(dim=1)
    outs = {}
    bare = torch.arange(0, len(rows), n_prefixes, device=device)
    for l, name in zip(out_layers, out_names):
        y = store[f"out:{name}"]
        outs[l] = y[bare.to(y.device), pos[bare].to(y.device)].float()
    return keys, outs
