"""The prefix cache of the target optimisation (``v_prefix_cache``).

Attention is causal and the optimised delta enters at the edited token, so every layer's keys and
values at the positions *before* that token are the same in every optimisation step, and so is
the edited block's output from the edited token on when the blocks below it are replayed.
:class:`PrefixCache` computes them once per target optimisation, with the unedited forward pass,
and serves each step's chunk of rows a fresh key/value cache holding them
(:mod:`blue_plugin.editing.targets`).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers import DynamicCache

from ..model.hooks import block_index, capture
from .requests import Row, pad_rows


class NoPrefixCache(Exception):
    """The model's key/value cache cannot serve as a prefix cache (see :class:`PrefixCache`)."""


class PrefixCache:
    """Per row: every attention layer's keys and values at the positions before the edited token
    (``lookup``), and the edited block's output from the edited token on. Neither depends on the
    delta (it is added at ``lookup``, attention is causal), so both are computed once, with the
    unedited forward pass, and reused in every step.

    Stored padded, so that a chunk is gathered with one ``index_select`` per layer:
    ``keys[l]`` / ``values[l]``: (rows, heads, P, head_dim) with row i's ``lookup_i`` positions
    right-aligned against P = the longest prefix (zeros before them), or None for the layers a
    replayed step never runs (all blocks up to the edited one except the first, and in a hybrid
    model the first of each attention kind, whose cache lengths tell the model how many positions
    are cached: :func:`first_of_each_kind`); ``out``: (rows, S, d_model) with
    row i's output from its edited token on left-aligned (None without replay).
    """

    def __init__(self, keys: list, values: list, out: Optional[torch.Tensor], prefix_len: int):
        self.keys, self.values, self.out, self.prefix_len = keys, values, out, prefix_len

    @classmethod
    @torch.no_grad()
    def build(cls, model, block_name: str, rows: list[Row], pad_id: int, device, max_tokens: int,
              replay: bool) -> "PrefixCache":
        edited = block_index(block_name)
        p_all = max(r.lookup for r in rows)
        s_all = max(len(r.ids) - r.lookup for r in rows)
        keys: list = []
        values: list = []
        out: Optional[torch.Tensor] = None
        for group in budget_groups(range(len(rows)), lambda i: len(rows[i].ids), max_tokens):
            batch = pad_rows([rows[i] for i in group], pad_id, device)
            cache = DynamicCache(config=model.config)
            with capture(model, outputs_of=[block_name]) as store:
                try:
                    model.base_model(**batch, **{cache_kwarg(model): cache}, use_cache=True)
                except TypeError as exc:  # a decoder without a key/value cache argument
                    raise NoPrefixCache(f"{type(model).__name__} takes no key/value cache ({exc})") from exc
            layers = list(getattr(cache, "layers", []))
            width = batch["input_ids"].shape[1]
            if len(layers) <= edited or any(
                getattr(layer, "keys", None) is None or layer.keys.dim() != 4 or layer.keys.shape[-2] != width
                or layer.values.shape[:-1] != layer.keys.shape[:-1]
                for layer in layers
            ):
                raise NoPrefixCache(
                    f"{type(model).__name__} does not keep a per-layer key/value cache of the usual shape "
                    "(batch, heads, positions, head_dim) for these rows"
                )
            if not keys:  # first group: allocate the padded stores
                kept = {*first_of_each_kind(model, len(layers)), *range(edited + 1, len(layers))} if replay \
                    else set(range(len(layers)))
                for l, layer in enumerate(layers):
                    if l not in kept:
                        keys.append(None)
                        values.append(None)
                        continue
                    k, v = layer.keys, layer.values
                    keys.append(k.new_zeros((len(rows), k.shape[1], p_all, k.shape[-1])))
                    values.append(v.new_zeros((len(rows), v.shape[1], p_all, v.shape[-1])))
            # (row, position) pairs of this group's prefixes: source (batch row, position) and
            # destination (row, right-aligned position); the same for the outputs from lookup on
            src_b, src_p, dst_r, dst_p, out_b, out_p, out_r, out_t = [], [], [], [], [], [], [], []
            for b, i in enumerate(group):
                p, n = rows[i].lookup, len(rows[i].ids)
                src_b += [b] * p
                src_p += range(p)
                dst_r += [i] * p
                dst_p += range(p_all - p, p_all)
                out_b += [b] * (n - p)
                out_p += range(p, n)
                out_r += [i] * (n - p)
                out_t += range(n - p)
            on_device: dict = {}  # the index tensors, once per device the layers sit on
            for l, layer in enumerate(layers):
                if keys[l] is None or not src_b:
                    continue
                dev = layer.keys.device
                if dev not in on_device:
                    on_device[dev] = [torch.tensor(x, device=dev) for x in (src_b, src_p, dst_r, dst_p)]
                sb, sp, dr, dp = on_device[dev]
                keys[l][dr, :, dp] = layer.keys[sb, :, sp]
                values[l][dr, :, dp] = layer.values[sb, :, sp]
            if replay:
                block_out = store[f"out:{block_name}"]
                dev = block_out.device
                if out is None:
                    out = block_out.new_zeros((len(rows), s_all, block_out.shape[-1]))
                out[torch.tensor(out_r, device=dev), torch.tensor(out_t, device=dev)] = block_out[
                    torch.tensor(out_b, device=dev), torch.tensor(out_p, device=dev)]
        return cls(keys, values, out, p_all)

    def fill_chunk(self, chunk, index: list[int], all_rows: list[Row], pad_id: int, device,
                   replay: bool) -> None:
        """Turn ``chunk`` (a chunk of :mod:`~blue_plugin.editing.targets`: rows ``index`` of ``all_rows``) into a step over the tokens from the
        edited token on: inputs, positions, a mask over [cached prefix | step tokens] with each
        row's prefix right-aligned against its first step token, which prefix rows to gather
        for its cache (see :meth:`cache_data`) and (replay) the edited block's output."""
        rows = [all_rows[i] for i in index]
        p_max = max(r.lookup for r in rows)
        s_max = max(len(r.ids) - r.lookup for r in rows)
        n = len(rows)
        ids = torch.full((n, s_max), pad_id, dtype=torch.long)
        pos = torch.zeros((n, s_max), dtype=torch.long)
        mask = torch.zeros((n, p_max + s_max), dtype=torch.long)
        for k, r in enumerate(rows):
            p, s = r.lookup, len(r.ids) - r.lookup
            ids[k, :s] = torch.tensor(r.ids[p:], dtype=torch.long)
            pos[k, :s] = torch.arange(p, p + s)
            mask[k, p_max - p: p_max + s] = 1
        chunk.batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
        if replay:
            chunk.cached = self.out.index_select(0, torch.tensor(index, device=self.out.device))[:, :s_max]
        if p_max > 0:  # else every row edits its first token: nothing before it to cache
            chunk.kv = (self, index, p_max)

    def cache_data(self, index: list[int], p_max: int) -> list[tuple]:
        """Per layer (keys, values) of rows ``index``, the last ``p_max`` prefix positions (or
        (None, None) for layers a step does not run): the data of a fresh cache for one step."""
        data = []
        on_device: dict = {}
        for k, v in zip(self.keys, self.values):
            if k is None:
                data.append((None, None))
                continue
            if k.device not in on_device:
                on_device[k.device] = torch.tensor(index, device=k.device)
            idx = on_device[k.device]
            data.append((k.index_select(0, idx)[:, :, self.prefix_len - p_max:],
                         v.index_select(0, idx)[:, :, self.prefix_len - p_max:]))
        return data


def first_of_each_kind(model, n_layers: int) -> set[int]:
    """The layers whose cache length sizes the attention masks: layer 0 and, in a hybrid model
    (Gemma 3: sliding-window and full attention, ``config.layer_types``), the first layer of each
    attention kind, from which transformers sizes that kind's mask."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = list(getattr(config, "layer_types", None) or [])
    return {0} | ({types.index(t) for t in set(types)} if len(types) == n_layers else set())


def budget_groups(items, width, max_tokens: int) -> list[list]:
    """``items`` sorted by ``width(item)`` and cut into consecutive groups whose padded size
    (widest item x group size) stays within ``max_tokens`` (a wider item gets a group alone)."""
    groups, cur = [], []
    for item in sorted(items, key=width):
        if cur and width(item) * (len(cur) + 1) > max_tokens:  # sorted: this item is the widest
            groups.append(cur)
            cur = []
        cur.append(item)
    if cur:
        groups.append(cur)
    return groups


def cache_kwarg(model) -> str:
    """Name of the key/value-cache argument of the decoder's forward: ``cache`` in recent
    transformers, ``past_key_values`` before (still accepted there, with a deprecation warning)."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
