"""What the research analyses share: validated layers, an editor with requests and prefixes,
and small statistics of lists (:mod:`blue_plugin.research.analysis`)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from ..editing.editor import Editor
from ..editing.requests import EditRequest, prepare_requests
from ..editing.state import EditState

#: The two residuals the analyses compare: ``R^L / (m - i + 1)`` and ``R^l``.
KINDS = ("distributed", "direct")
#: How a residual is applied: added to the block's output, or as the layer's weight update.
VIA = ("hidden", "weight")


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Validated, ascending list of distinct layer indices inside the model."""
    layers = list(layers)
    if not layers:
        raise ValueError("give at least one layer.")
    if not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        raise ValueError(f"layers must be integers, got {layers!r}.")
    if layers != sorted(set(layers)):
        raise ValueError(f"layers must be ascending and distinct, got {layers!r}.")
    if layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers {layers!r} are outside the model, which has layers 0..{n_layers - 1}.")
    return layers


def setup(model, tok, hparams: Any, requests: Sequence[dict], state: Optional[EditState] = None) -> tuple[Editor, list[EditRequest], list[str]]:
    """An :class:`~blue_plugin.editing.editor.Editor` on ``model`` (its own state unless ``state``;
    ``hparams``: anything :meth:`~blue_plugin.hparams.BLUEHyperParams.coerce` takes), the
    validated requests and the context prefixes (the first is ``""``)."""
    editor = Editor(model, tok, hparams, state)
    reqs = prepare_requests(tok, requests, editor.hp)
    return editor, reqs, editor.prefixes()


def mean_of(xs: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None or NaN (None if there are none)."""
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(vals) / len(vals) if vals else None


def std_of(xs: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (0.0 for one value, None for none)."""
    vals = [float(x) for x in xs]
    if len(vals) < 2:
        return 0.0 if vals else None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
