"""Record the targets of a batch, or replay recorded ones instead of optimising them again.

Finding the targets ``z`` (gradient steps through the model per request) is most of a batch's
cost; keys and the update are cheap. Given the targets a batch found, the batch can be run again
on the same model without the optimisation, and it writes the same weights. A long sequential
run can then keep only the targets of its batches (a few hundred KB each, where the edited
matrices and the sequential state are tens of MB) and be rebuilt on another machine in a
fraction of the time it took.

Pass a :class:`TargetLog` as ``target_log=`` to :class:`~blue_plugin.editing.editor.Editor` or
:func:`~blue_plugin.apply_blue_to_model`, or set
:attr:`EditSession.target_log <blue_plugin.editing.session.EditSession.target_log>`. The editor
then hands it every target it computes (:meth:`TargetLog.put`; :meth:`TargetLog.pop_batch`
returns the batch's and clears them) and, before computing a target, asks it for a replayed one
(:meth:`TargetLog.take`), which :meth:`TargetLog.queue` provides. A replayed target is accepted
only for the requests it was recorded for (same prompts, subjects and new targets; else a
:class:`~blue_plugin.errors.BLUEEditError`). Dynamic layer selection's probe targets are not
logged. A replayed :class:`~blue_plugin.editing.targets.TargetResult` has no ``h`` (the unedited
block outputs; NaN), which the editor does not use.

:func:`write_targets` / :func:`read_targets` store one batch's targets in a safetensors file
(float32 targets kept exactly, no pickle) with a JSON metadata string and any tensors of the
caller's.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import safetensors.torch
import torch

from ..errors import BLUEEditError
from .requests import EditRequest
from .targets import TargetResult


def requests_digest(reqs: Sequence[EditRequest]) -> str:
    """16 hex digits identifying a batch's requests (prompt parts and new targets, in order)."""
    h = hashlib.sha256()
    for r in reqs:
        h.update(json.dumps([r.before, r.subject, r.after, r.target_new, r.target_ids]).encode("utf-8"))
    return h.hexdigest()[:16]


class TargetLog:
    """The targets of one batch: recorded as the editor computes them, or queued to be replayed."""

    def __init__(self) -> None:
        self._recorded: dict[int, TargetResult] = {}
        self._recorded_for: Optional[str] = None
        self._queued: dict[int, TargetResult] = {}
        self._queued_for: Optional[str] = None

    def put(self, reqs: Sequence[EditRequest], layer: int, result: TargetResult) -> None:
        """Record ``result``, the targets of ``reqs`` at ``layer`` (a new batch starts a new record)."""
        digest = requests_digest(reqs)
        if digest != self._recorded_for:
            self._recorded, self._recorded_for = {}, digest
        self._recorded[layer] = result

    def pop_batch(self) -> tuple[Optional[str], dict[int, TargetResult]]:
        """The requests digest and ``{layer: result}`` recorded since the last call; clears them."""
        out = (self._recorded_for, self._recorded)
        self._recorded, self._recorded_for = {}, None
        return out

    def queue(self, digest: str, results: dict[int, TargetResult]) -> None:
        """Replay ``results`` (``{layer: result}``) for the batch whose requests have ``digest``."""
        self._queued, self._queued_for = dict(results), digest

    def pending(self) -> list[int]:
        """Layers whose queued targets were not taken (an incomplete replay when non-empty)."""
        return sorted(self._queued)

    def take(self, reqs: Sequence[EditRequest], layer: int) -> Optional[TargetResult]:
        """The queued targets of ``reqs`` at ``layer`` (removed from the queue), or None when none
        are queued.

        Raises:
            BLUEEditError: targets are queued for other requests, or not for this layer.
        """
        if not self._queued:
            return None
        if requests_digest(reqs) != self._queued_for:
            raise BLUEEditError("the queued targets were recorded for other requests than this batch's; "
                                "replay the batches in the order they were recorded")
        if layer not in self._queued:
            raise BLUEEditError(f"no queued targets for layer {layer} (queued: {sorted(self._queued)}); "
                                "the batch was recorded with other hyperparameters")
        return self._queued.pop(layer)


def write_targets(path: str | os.PathLike, digest: str, results: dict[int, TargetResult],
                  meta: dict[str, Any], extra: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write one batch's targets (``{layer: result}``, requests ``digest``), ``meta`` (JSON
    values) and ``extra`` tensors of the caller's (names without a dot) to ``path`` atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in (extra or {}).items():
        if "." in name:
            raise ValueError(f"extra tensor names may not contain '.', got {name!r}")
        tensors[name] = t.detach().to("cpu").contiguous()
    for layer, res in results.items():
        tensors[f"z.{layer}"] = res.z.detach().to("cpu").contiguous()
        tensors[f"steps.{layer}"] = torch.tensor(res.steps, dtype=torch.int64)
        tensors[f"nll.{layer}"] = torch.tensor(res.nll, dtype=torch.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"digest": digest, "meta": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_targets(path: str | os.PathLike) -> tuple[str, dict[int, TargetResult], dict[str, Any], dict[str, torch.Tensor]]:
    """The requests digest, ``{layer: result}``, metadata and extra tensors written by
    :func:`write_targets`.

    Raises:
        BLUEEditError: the file is not such a file.
    """
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        digest, meta = header["digest"], json.loads(header["meta"])
        layers = sorted(int(k.split(".", 1)[1]) for k in tensors if k.startswith("z."))
        results = {}
        for l in layers:
            z = tensors[f"z.{l}"]
            results[l] = TargetResult(z=z, h=torch.full_like(z, float("nan")), steps=tensors[f"steps.{l}"].tolist(),
                                      nll=tensors[f"nll.{l}"].tolist())
        extra = {k: v for k, v in tensors.items() if "." not in k}
    except (OSError, KeyError, ValueError, safetensors.SafetensorError) as e:
        raise BLUEEditError(f"{str(path)!r} is not a readable target file ({type(e).__name__}: {e})") from None
    return digest, results, meta, extra
