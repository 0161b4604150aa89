"""An optional observer of the editor's phases, with their timings and token counts.

Pass one as ``observer=`` to :class:`~blue_plugin.editing.editor.Editor`,
:func:`~blue_plugin.editing.editor.apply_blue_to_model` or
:class:`~blue_plugin.editing.session.EditSession`. Every batch reports, in order:

- ``"statistics"`` (layer None): C0 of the layers the batch may edit is in memory (loaded from
  the statistics cache or computed when missing); info ``{"layers": [...], "missing": [...]}``
  (``missing``: the layers whose C0 was not in memory yet);
- ``"prefixes"`` (layer None): the context prefixes (generated once per model, then cached);
  info ``{"prefixes": n}``;
- per edited layer, in the order the engine walks them: ``"targets"`` (BLUE: at every edited
  layer; the original method: once, at the last layer, before the first ``"keys"``), info
  ``{"rows", "tokens", "steps", "requests"}``; ``"keys"``, info ``{"rows", "tokens",
  "requests", "out_layer"}``; ``"update"``, info ``{"requests", "delta_norm"}``;
- ``"write"`` (layer None): the batch is written (RECT's masks, PRUNE's served weights);
  info ``{"layers": [...]}``.

``rows`` counts the padded sequences a phase runs (``"targets"``: one per request and context
prefix plus one KL row per request; ``"keys"``: one per request and context prefix), ``tokens``
the tokens in those rows (without padding), ``steps`` the optimisation steps of each request.
``seconds`` of ``"targets"``, ``"keys"`` and ``"update"`` are the same measurements that
``get_state(model).history[-1]["time"]`` sums per phase. A phase that raises is not finished.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import BLUEConfigError

#: The phases an :class:`EditObserver` is told about, in the order a batch runs them.
PHASES = ("statistics", "prefixes", "targets", "keys", "update", "write")


class EditObserver:
    """Receives the phases of every batch the editor runs; subclass it and override what you
    need (both methods do nothing here)."""

    def phase_started(self, phase: str, layer: int | None) -> None:
        """``phase`` (one of :data:`PHASES`) starts, at ``layer`` (None for whole-batch phases)."""

    def phase_finished(self, phase: str, layer: int | None, seconds: float, info: dict) -> None:
        """``phase`` at ``layer`` took ``seconds``; ``info`` holds its counts (module docstring)."""


def check_observer(observer) -> Optional[EditObserver]:
    """``observer`` if it is None or has both callbacks, else a :class:`~blue_plugin.errors.BLUEConfigError`."""
    if observer is not None and not all(callable(getattr(observer, m, None)) for m in ("phase_started", "phase_finished")):
        raise BLUEConfigError(
            f"observer must have phase_started and phase_finished methods (subclass blue_plugin.editing.EditObserver), "
            f"got {type(observer).__name__}"
        )
    return observer


@contextmanager
def observed(observer: Optional[EditObserver], phase: str, layer: Optional[int],
             times: Optional[dict] = None) -> Iterator[dict]:
    """Time the body as ``phase`` at ``layer``: tell ``observer`` (if any) that it starts and,
    when the body returns, how long it took with the info dict the body filled; add the seconds
    to ``times[phase]`` when ``times`` is given (the batch record's timings)."""
    info: dict = {}
    if observer is not None:
        observer.phase_started(phase, layer)
    t0 = time.perf_counter()
    yield info
    seconds = time.perf_counter() - t0
    if times is not None:
        times[phase] = times.get(phase, 0.0) + seconds
    if observer is not None:
        observer.phase_finished(phase, layer, seconds, info)
