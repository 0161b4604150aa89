"""Resumable progress of a sequential run, under ``OUT/progress/``.

``config.json`` holds the identity of the run (its hash): a folder holding progress of another
configuration is refused. Per method, ``<METHOD>/session/`` is a saved
:class:`blue_plugin.editing.session.EditSession` (edited matrices and sequential state) and
``<METHOD>/progress.json`` the benchmark's own bookkeeping (wall times, curve, curve points); a
finished method is kept in ``<METHOD>/done.json``; the chunks of an evaluation of all cases saved
so far are in ``eval_*.json`` (:mod:`~benchmarks.sequential.chunked`) until it is complete. Files
that hold one-off measurements of the first invocation (``statistics.json``, ``pre.json``) and the
held-out documents with the unedited model's perplexity on them (``heldout.json``,
``pre_heldout.json``) are read back instead of measured again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from blue_plugin.editing.replay import TargetLog
from blue_plugin.editing.session import EditSession
from blue_plugin.editing.state import fingerprint
from blue_plugin.model.layout import resolve_layout

from benchmarks.common import jsonable, read_json, write_json

logger = logging.getLogger("benchmarks.sequential")

#: configuration keys that are informational (names and paths); identity is content
INFORMATIONAL = ("data", "model", "hparams_file")
#: configuration keys added with results schema 2 (held-out perplexity, curve points): progress
#: written before them (its hash is that of the configuration without them) is resumed
LATER_KEYS = ("heldout_docs", "curve_every", "curve_cases", "curve_fluency_cases", "curve_heldout_docs")


def weights_digest(tensors: dict[int, torch.Tensor]) -> str:
    """16 hex digits identifying the critical layers' weights (per-layer fingerprints)."""
    h = hashlib.sha256()
    for l in sorted(tensors):
        h.update(str(l).encode())
        h.update(fingerprint(tensors[l]).numpy().tobytes())
    return h.hexdigest()[:16]


#: entries of :func:`weights_sample`
SAMPLE_SIZE = 1024


def weights_sample(w: torch.Tensor, n: int = SAMPLE_SIZE) -> torch.Tensor:
    """``n`` entries of ``w`` at a fixed stride (float64, CPU): the state's weight fingerprint, smaller."""
    return fingerprint(w, n)


def change_difference(now: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> Optional[float]:
    """The largest, over layers, relative difference ``|now - kept| / |kept|`` of two change
    samples (:meth:`SessionCheckpoints.change_sample`); None when ``kept`` lacks a layer."""
    if not now or set(now) - set(kept):
        return None
    diffs = []
    for name, a in now.items():
        b = kept[name].to(torch.float64)
        diffs.append(float((a - b).norm() / b.norm()) if b.norm() > 0 else 0.0 if torch.equal(a, b) else float("inf"))
    return max(diffs)


def config_hash(config: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the configuration's content (without :data:`INFORMATIONAL`)."""
    content = {k: v for k, v in config.items() if k not in INFORMATIONAL}
    return hashlib.sha256(json.dumps(jsonable(content), sort_keys=True).encode()).hexdigest()[:16]


def config_diff(config: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """The keys (not :data:`INFORMATIONAL`) whose values differ between ``config`` and a stored
    configuration (as read back from JSON)."""
    return sorted(k for k in set(config) | set(stored)
                  if k not in INFORMATIONAL and jsonable(config.get(k)) != stored.get(k))


def open_progress(out: Path, config: dict[str, Any], restart: bool) -> tuple[Path, str]:
    """The progress folder of ``out`` for ``config`` and the configuration's hash; a new folder
    records the configuration, an existing one must hold the same (else ValueError)."""
    chash = config_hash(config)
    prog_dir = out / "progress"
    if restart and prog_dir.exists():
        shutil.rmtree(prog_dir)
    cfg_file = prog_dir / "config.json"
    if cfg_file.is_file():
        old = read_json(cfg_file)
        if old.get("hash") != chash and old.get("hash") == config_hash({k: v for k, v in config.items()
                                                                        if k not in LATER_KEYS}):
            logger.warning("%s holds progress from before held-out perplexity and curve points: resuming it; "
                           "methods finished before have neither, the others only from here on", out)
            write_json(cfg_file, {"hash": chash, "config": config})
        elif old.get("hash") != chash:
            diff = config_diff(config, old.get("config", {}))
            raise ValueError(
                f"{str(out)!r} holds progress of a different run (differs in {diff}); pass --restart "
                "(restart=True) to discard it, or choose another --out"
            )
        logger.info("resuming the run in %s", out)
    else:
        write_json(cfg_file, {"hash": chash, "config": config})
    return prog_dir, chash


#: files of ``progress/`` measured once per run configuration (not per method)
RUN_LEVEL_FILES = ("statistics.json", "pre.json", "heldout.json", "pre_heldout.json")


def adopt_run_files(prog_dir: Path, source_out: Path, chash: str) -> list[str]:
    """Copy :data:`RUN_LEVEL_FILES` from the progress of ``source_out`` (a run of the same
    configuration hash ``chash``) into ``prog_dir`` where it lacks them; returns the names copied.

    Raises:
        ValueError: ``source_out`` holds no progress, or progress of another configuration.
    """
    src = Path(source_out) / "progress"
    cfg = src / "config.json"
    if not cfg.is_file():
        raise ValueError(f"pre_from: {str(source_out)!r} holds no progress/config.json; pass the --out folder "
                         "of a run that has measured the unedited model")
    stored = read_json(cfg)
    if stored.get("hash") != chash:
        here = read_json(prog_dir / "config.json").get("config", {})
        diff = config_diff(here, stored.get("config", {}))
        raise ValueError(f"pre_from: {str(source_out)!r} is a run of another configuration (differs in {diff}); "
                         "its unedited evaluation does not apply")
    copied = []
    for name in RUN_LEVEL_FILES:
        if (src / name).is_file() and not (prog_dir / name).is_file():
            shutil.copy2(src / name, prog_dir / name)
            copied.append(name)
    logger.info("taken from %s: %s", source_out, ", ".join(copied) or "nothing (present here or missing there)")
    return copied


def measured_once(path: Path, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """What ``path`` holds; else ``measure()``, written there first."""
    if path.is_file():
        return read_json(path)
    value = measure()
    write_json(path, value)
    return value


class SessionCheckpoints:
    """Per-method progress with :class:`blue_plugin.editing.session.EditSession` (``save`` /
    ``load``); the benchmark's own bookkeeping (wall times, curve) goes to ``progress.json`` next
    to it. With ``kept`` (a :class:`~benchmarks.sequential.kept.KeptBatches`), every batch's
    targets and the bookkeeping are kept too, and a method without a saved session replays the
    kept batches (:meth:`resume`)."""

    kind = "EditSession"

    def __init__(self, folder: Path, model, tok, hp, kept: Any = None, replay_tolerance: float = 0.0):
        self.folder, self.model, self.tok, self.hp, self.kept = folder, model, tok, hp, kept
        self.replay_tolerance = float(replay_tolerance)
        self.session_dir = folder / "session"
        self.session = None
        self.base: dict[int, torch.Tensor] = {}  # a sample of the unedited weights

    def _weights(self) -> dict[int, torch.Tensor]:
        params, layout = dict(self.model.named_parameters()), resolve_layout(self.model, self.hp)
        return {l: params[layout.weight_name(l)] for l in self.hp.layers}

    def digest(self) -> str:
        """:func:`weights_digest` of the critical layers' stored weights, as they are now."""
        return weights_digest(self._weights())

    def change_sample(self) -> dict[str, torch.Tensor]:
        """``change<layer>``: a strided sample of each critical layer's change from the unedited
        weights (float64), kept with every batch to measure how far a replay is from the run."""
        return {f"change{l}": weights_sample(w) - self.base[l] for l, w in self._weights().items()}

    def resume(self, batch_requests: Optional[Callable[[int], list[dict]]] = None) -> Optional[dict[str, Any]]:
        """Load the saved session onto the (unedited) model; without one, replay the kept batches
        (``batch_requests(b)``: the requests of 0-based batch ``b``), or start a new session (then
        None). Returns ``batches_done``, ``batch_wall_s``, ``curve`` and ``curves`` (curve points)
        of the saved progress.

        Raises:
            ValueError: a replayed batch does not give the weights it gave when it ran.
        """
        if not (self.session_dir / "manifest.json").is_file():
            if (self.folder / "checkpoint.json").is_file():
                logger.warning("%s holds progress in the removed local checkpoint format; this method starts "
                               "again from its first batch", self.folder)
            self.session = EditSession(self.model, self.tok, self.hp, undo_depth=0)
            self.session.target_log = TargetLog()
            self.base = {l: weights_sample(w) for l, w in self._weights().items()}
            return self.replay(batch_requests) if self.kept is not None and batch_requests is not None else None
        self.base = {l: weights_sample(w) for l, w in self._weights().items()}  # still unedited
        self.session = EditSession.load(self.session_dir, self.model, self.tok, self.hp, undo_depth=0)
        self.session.target_log = TargetLog()
        done = int(self.session.n_batches)
        prog_file = self.folder / "progress.json"
        prog = read_json(prog_file) if prog_file.is_file() else {}
        if prog.get("batches_done") != done:  # interrupted between the two writes of save()
            logger.warning("progress.json is out of step with the saved session (%s vs %d batches); "
                           "using the session", prog.get("batches_done"), done)
        return self._meta(prog, done)

    def _meta(self, prog: dict[str, Any], done: int) -> dict[str, Any]:
        wall = list(prog.get("batch_wall_s", []))[:done]
        wall += [float(r["time"].get("total", 0.0)) for r in self.session.state.history[len(wall):done]]
        curve = [c for c in prog.get("curve", []) if c["n_edits"] <= done * self.hp.batch_size]
        curves = [c for c in prog.get("curves", []) if c["n_edits"] <= done * self.hp.batch_size]
        return {"batches_done": done, "batch_wall_s": wall, "curve": curve, "curves": curves}

    def replay(self, batch_requests: Callable[[int], list[dict]]) -> Optional[dict[str, Any]]:
        """Run the kept batches again with their kept targets (no optimisation), check each
        against the weights digest it had, restore the batch's recorded timings and save the
        session; None when nothing is kept."""
        prog = self.kept.read_progress() or {}
        n = min(self.kept.count(), int(prog.get("batches_done", 0)))
        if n == 0:
            return None
        log = self.session.target_log
        logger.info("%s: replaying %d kept batch(es) from %s", self.folder.name, n, self.kept.folder)
        for b in range(n):
            digest, results, meta, extra = self.kept.read_batch(b + 1)
            log.queue(digest, results)
            self.session.edit(batch_requests(b))
            log.pop_batch()
            record = self.session.state.history[-1]
            if self.digest() == meta["weights_digest"]:
                if not extra:  # kept before the change sample was: add it
                    self.kept.write_batch(b + 1, digest, results, meta, self.change_sample())
            else:
                diff = change_difference(self.change_sample(), extra)
                if diff is None or diff > self.replay_tolerance or self.replay_tolerance == 0:
                    raise ValueError(
                        f"replaying batch {b + 1} kept in {str(self.kept.folder)!r} gave other weights than the run "
                        f"that kept it (relative difference of the change {diff if diff is None else f'{diff:.3g}'}, "
                        f"tolerance {self.replay_tolerance:g}; another CPU, torch build or thread count?); run with "
                        "the same set-up, raise --replay-tolerance, or pass --restart to start the run again")
                logger.warning("%s: replayed batch %d differs from the kept run by %.3g of its change (within the "
                               "tolerance %g); continuing", self.folder.name, b + 1, diff, self.replay_tolerance)
                record["replay_difference"] = diff
            record["time"] = meta["time"]  # the batch's cost is the original run's
        meta = self._meta(prog, n)
        self.save(dict(prog, batches_done=n, batch_wall_s=meta["batch_wall_s"], curve=meta["curve"],
                       curves=meta["curves"]), keep=False)
        return meta

    def apply(self, requests: list[dict]) -> None:
        self.session.edit(requests)

    def save(self, progress: dict[str, Any], keep: bool = True) -> None:
        """Save the session and ``progress``; keep the last batch's targets first (``keep``)."""
        digest, results = self.session.target_log.pop_batch()
        if keep and self.kept is not None and results:
            self.kept.write_batch(int(progress["batches_done"]), digest, results,
                                  {"weights_digest": self.digest(), "time": self.session.state.history[-1]["time"]},
                                  self.change_sample() if self.base else None)
        self.session.save(self.session_dir)
        self.save_progress(progress)

    def save_progress(self, progress: dict[str, Any]) -> None:
        """The bookkeeping only (the session is unchanged since :meth:`save`)."""
        write_json(self.folder / "progress.json", progress)
        if self.kept is not None:
            self.kept.write_progress(progress)

    def cleanup(self) -> None:
        shutil.rmtree(self.session_dir, ignore_errors=True)
