"""What one batch changes, kept apart until the whole batch has succeeded.

The editor walks the layers writing each layer's new weight at once (later layers see it); what
the sequential state learns from the batch (accumulated K K^T, the first-edit facts of a layer,
PRUNE's unrestrained weights) waits in a :class:`PendingBatch` and reaches the
:class:`~blue_plugin.editing.state.EditState` only through :meth:`PendingBatch.commit`. When the
batch fails, :attr:`PendingBatch.originals` puts every weight it may have written back.
:meth:`PendingBatch.write` is the whole-batch step after the walk (RECT's masks, PRUNE's served
weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..model.layout import as_out_in
from .state import EditState, fingerprint, serve_restrained


@dataclass
class PendingBatch:
    """Changes of one batch, applied to the state only once the whole batch has succeeded."""

    originals: dict[int, torch.Tensor]  # stored weights before the batch of every layer it may write
    kkt: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_init: dict[int, dict[str, Any]] = field(default_factory=dict)  # first-edit facts (fingerprint, PRUNE original)
    dense: dict[int, torch.Tensor] = field(default_factory=dict)  # the batch's dense update (RECT 'batch')
    unrestrained: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)  # PRUNE 'sequence'

    def note_first_edit(self, state: EditState, layer: int) -> None:
        """Remember the fingerprint of ``layer``'s weight before its first edit."""
        ls = state.layers.get(layer)
        init = self.layer_init.setdefault(layer, {})
        if (ls is None or ls.orig_fp is None) and "orig_fp" not in init:
            init["orig_fp"] = fingerprint(self.originals[layer])

    def original(self, state: EditState, module: torch.nn.Module, layer: int, solve_dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        """PRUNE's ``W_orig`` (d_out, d_in; solve dtype) and ``sigma_max``: the state's, or those
        of the weight before this batch (its first edit)."""
        ls = state.layers.get(layer)
        if ls is not None and ls.W_orig is not None:
            return ls.W_orig, ls.sigma_max
        init = self.layer_init.setdefault(layer, {})
        if "W_orig" not in init:
            init["W_orig"] = as_out_in(module, self.originals[layer].to(solve_dtype))
            init["sigma_max"] = float(torch.linalg.matrix_norm(init["W_orig"], ord=2))
        return init["W_orig"], init["sigma_max"]

    def add(self, layer: int, W: torch.Tensor, W_new: torch.Tensor, Kt: torch.Tensor, keep_dense: bool) -> None:
        """Record ``layer``'s update ``W -> W_new`` for keys ``Kt`` (d_in, n)."""
        if keep_dense:
            self.dense[layer] = self.dense.get(layer, 0) + (W_new - W)
        self.kkt[layer] = self.kkt.get(layer, 0) + Kt @ Kt.T

    def write(self, editor, layers: Sequence[int], record: dict) -> None:
        """After the walk: RECT's masked updates; PRUNE's served weights (unrestrained ones kept).
        ``editor``: the :class:`~blue_plugin.editing.editor.Editor` that walked the batch."""
        rule, hp = editor.rule, editor.hp
        if rule.adjusts_batch(hp):
            for l in layers:
                W_before = as_out_in(editor.module(l), self.originals[l]).to(editor.solve_dtype)
                D = rule.batch_update(self.dense[l], W_before, hp)
                editor.write(l, W_before + D)
                record["delta_norm"][l] = float(D.norm())
                record.setdefault("kept_fraction", {})[l] = float((D != 0).sum()) / D.numel()
        if rule.restrains_sequence(hp):
            for l in sorted(self.originals):
                if l not in layers:  # resumed, not edited by this batch: served weight and state stay
                    with torch.no_grad():
                        editor.weight(l).copy_(self.originals[l])
                    continue
                unrestrained = editor.weight(l).detach().clone()
                W_orig, sigma_max = self.original(editor.state, editor.module(l), l, editor.solve_dtype)
                info = serve_restrained(editor.module(l), unrestrained, W_orig, sigma_max, editor.solve_dtype)
                record.setdefault("change_sigma", {})[l] = info
                self.unrestrained[l] = unrestrained if info["above"] else None

    def commit(self, state: EditState, weight_of, restrains_sequence: bool, n: int) -> None:
        """Apply the batch to ``state`` (``weight_of(layer)``: the stored weight now; ``n``
        requests; ``restrains_sequence``: PRUNE's 'sequence' timing, whose unrestrained weights
        are kept for the next batch)."""
        for layer, init in self.layer_init.items():
            ls = state.layer(layer)
            for key, value in init.items():
                if getattr(ls, key) is None:
                    setattr(ls, key, value)
        for layer, kkt in self.kkt.items():
            ls = state.layer(layer)
            ls.kpkp = kkt.clone() if ls.kpkp is None else ls.kpkp + kkt
        if not restrains_sequence:  # another method goes on from the served weights
            for ls in state.layers.values():
                ls.W_unrestrained = None
        for layer, W in self.unrestrained.items():
            state.layer(layer).W_unrestrained = W
        for layer in self.originals:
            state.layer(layer).post_fp = fingerprint(weight_of(layer))
        state.n_edits += n
