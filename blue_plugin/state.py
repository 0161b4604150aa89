"""Sequential editing state, held in an explicit object attached to the model.

Per edited layer it keeps the accumulated K_p K_p^T of earlier batches, and it caches what only
depends on the unedited model: the key second moment C0, AlphaEdit's null-space projector P,
PRUNE's original weight and its largest singular value, and the context prefixes.

The state notices when the edited weights were changed outside the plugin (for example EasyEdit
restoring the weights after a non-sequential edit): if they are back at their original values, the
accumulated edit history is dropped, so non-sequential edits never leak into each other.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

_ATTR = "_blue_edit_state"


def fingerprint(W: torch.Tensor, n: int = 65536) -> torch.Tensor:
    """A strided sample of the weight's entries (exact values), to detect outside changes."""
    flat = W.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].to("cpu", torch.float64).clone()


@dataclass
class LayerState:
    """State of one edited layer; tensors live on the layer's device."""

    kpkp: Optional[torch.Tensor] = None
    W_orig: Optional[torch.Tensor] = None
    sigma_max: Optional[float] = None
    orig_fp: Optional[torch.Tensor] = None
    post_fp: Optional[torch.Tensor] = None


@dataclass
class EditState:
    """Everything a sequence of :func:`~blue_plugin.apply_blue_to_model` calls on one model
    needs to remember. Get it with :func:`get_state`; forget edits with :meth:`reset`."""

    layers: dict[int, LayerState] = field(default_factory=dict)
    second_moments: dict[tuple, torch.Tensor] = field(default_factory=dict)
    projectors: dict[tuple, tuple[torch.Tensor, int]] = field(default_factory=dict)
    prefixes: dict[tuple, list[str]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    n_edits: int = 0

    def layer(self, layer: int) -> LayerState:
        return self.layers.setdefault(layer, LayerState())

    def reset(self) -> None:
        """Forget all edits (accumulated keys, history). Caches that depend only on the unedited
        model (C0, projectors, prefixes, original weights) are kept."""
        for ls in self.layers.values():
            ls.kpkp = None
            ls.post_fp = None
        self.history.clear()
        self.n_edits = 0

    def sync_with_weights(self, weight_of) -> None:
        """Compare the current weights (``weight_of(layer)``) with what the last edit left. If
        every edited layer is back at its original values, drop the edit history; if they were
        changed in another way, warn and keep the state."""
        tracked = {l: ls for l, ls in self.layers.items() if ls.post_fp is not None}
        if not tracked:
            return
        now = {l: fingerprint(weight_of(l)) for l in tracked}
        changed = [l for l, ls in tracked.items() if not torch.equal(now[l], ls.post_fp)]
        if not changed:
            return
        if all(ls.orig_fp is not None and torch.equal(now[l], ls.orig_fp) for l, ls in tracked.items()):
            logger.info("edited weights were restored to the original; starting a fresh edit sequence")
            self.reset()
            return
        logger.warning(
            "weights of layers %s were changed outside blue_plugin since the last edit; keeping the "
            "accumulated state (call blue_plugin.reset_state(model) to start afresh)",
            changed,
        )
        for l in changed:
            tracked[l].post_fp = now[l]


def get_state(model) -> EditState:
    """The :class:`EditState` attached to ``model`` (created on first use)."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        state = EditState()
        model.__dict__[_ATTR] = state
    return state


def reset_state(model) -> None:
    """Forget the edit history of ``model`` (its weights are not touched)."""
    get_state(model).reset()
