"""Finished measurements of a run, kept beside its results so that they outlive the progress folder.

``OUT/progress/`` holds everything a run needs to resume, but it is large (saved sessions hold
edited matrices) and is not committed; a run on a new machine starts from nothing. Yet most of what
a long run measures is finished long before the run is: the key statistics' timing, the unedited
model's evaluation of all N cases, the held-out documents with their unedited perplexity (an hour
on one CPU core at N = 2,000), and each method that has completed its sequence and final evaluation
(several hours each). :func:`keep_finished` copies those files, gzip-compressed, to ``OUT/kept/``
(small enough to commit: about a sixth of their JSON); :func:`restore_kept` puts back into a
progress folder the ones it lacks, so a run started on another machine resumes after the last
finished method instead of from nothing.

A method in progress keeps, in ``OUT/kept/<METHOD>/``, the targets of every batch it has run
(``targets/batch-<b>.safetensors``, :mod:`blue_plugin.editing.replay`; a few hundred KB each) and
its bookkeeping (``progress.json.gz``: wall times, curve points): :class:`KeptBatches`. Its saved
session (the edited matrices and the sequential state, tens of MB) is not kept; on another machine
the method replays the kept batches from the unedited model without optimising their targets (a
few times faster than running them), checks that each gives the weights it gave when it ran, and
continues after the last. The saved chunks of its final evaluation (``eval_*.json``) are kept like
the finished files, so an evaluation stopped half way continues on another machine. A finished
method's kept batches and chunks are removed: its ``done.json`` is kept.

A folder whose methods finished before ``kept/`` existed holds them only in its ``results.json``:
:func:`keep_results` keeps them from there (``--keep-results``).

``kept/config.json`` records the configuration hash: a progress folder of another configuration
neither writes nor restores kept files (the run refuses it before, see
:func:`~benchmarks.sequential.checkpoints.open_progress`).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

from blue_plugin.editing.replay import read_targets, write_targets

from benchmarks.common import read_json, write_json
from benchmarks.sequential.checkpoints import RUN_LEVEL_FILES, config_diff, config_hash
from benchmarks.sequential.config import RESULTS_FILE, SCHEMA_VERSION

logger = logging.getLogger("benchmarks.sequential")

KEPT_DIR = "kept"
#: a method's file that marks it finished (and holds its scores, curve and costs)
DONE_FILE = "done.json"
#: in ``kept/<METHOD>/`` of a method in progress: its bookkeeping and the targets of its batches
PROGRESS_FILE = "progress.json.gz"
TARGETS_DIR = "targets"
#: the saved chunks of a method's final evaluation (:mod:`~benchmarks.sequential.chunked`)
EVAL_PARTS = "eval_*.json"
#: keys that ``results.json``'s configuration adds to the run's (the invocation's, not the run's;
#: :func:`benchmarks.sequential.run.run_benchmark` adds them)
INVOCATION_KEYS = ("methods", "device", "dtype", "stats_dir")


def finished_files(prog_dir: Path) -> list[str]:
    """Names (relative to ``prog_dir``) of the finished measurements present in ``prog_dir``."""
    names = [n for n in RUN_LEVEL_FILES if (prog_dir / n).is_file()]
    for d in sorted(p for p in prog_dir.iterdir() if p.is_dir()):
        if (d / DONE_FILE).is_file():
            names.append(f"{d.name}/{DONE_FILE}")
        else:  # the saved chunks of a final evaluation under way
            names += sorted(f"{d.name}/{f.name}" for f in d.glob(EVAL_PARTS))
    return names


def _gzip_copy(src: Path, dst: Path) -> None:
    """``src`` gzip-compressed to ``dst`` (no timestamp in the header, so equal content gives equal
    bytes), written atomically."""
    with src.open("rb") as fin, _atomic(dst) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                                   mtime=0) as fout:
        shutil.copyfileobj(fin, fout)


def _gunzip_copy(src: Path, dst: Path) -> None:
    with gzip.open(src, "rb") as fin, _atomic(dst) as fout:
        shutil.copyfileobj(fin, fout)


@contextmanager
def _atomic(dst: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``dst`` when the block ends without an exception (a temporary
    file of its own, so two processes keeping the same folder do not collide)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keep_finished(out: str | Path) -> list[str]:
    """Copy the finished measurements of ``out/progress`` to ``out/kept`` (gzip) where the kept
    copy is missing or older; returns the names copied. Nothing happens without a progress folder.

    Raises:
        ValueError: ``out/kept`` holds files of another configuration.
    """
    out = Path(out)
    prog_dir, kept = out / "progress", out / KEPT_DIR
    if not (prog_dir / "config.json").is_file():
        return []
    config = read_json(prog_dir / "config.json")
    check_kept(out, config.get("config", {}))
    copied = []
    for name in finished_files(prog_dir):
        src, dst = prog_dir / name, kept / (name + ".gz")
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
            _gzip_copy(src, dst)
            copied.append(name)
        if name.endswith("/" + DONE_FILE):  # finished: its batches are not needed to resume any more
            KeptBatches(dst.parent).discard()
    if copied or not (kept / "config.json").is_file():
        write_json(kept / "config.json", config)
    if copied:
        logger.info("kept in %s: %s", kept, ", ".join(copied))
    return copied


def restore_kept(out: str | Path, config: dict[str, Any]) -> list[str]:
    """Put the kept measurements of ``out/kept`` into ``out/progress`` where it lacks them (the
    progress folder of the run's configuration ``config`` must exist); returns the names restored.

    Raises:
        ValueError: ``out/kept`` holds files of another configuration (pass ``restart=True`` to
            discard them, or choose another ``out``).
    """
    out = Path(out)
    prog_dir, kept = out / "progress", out / KEPT_DIR
    if not (kept / "config.json").is_file():
        return []
    check_kept(out, config)
    restored = []
    for src in sorted(kept.rglob("*.json.gz")):
        name = src.relative_to(kept).as_posix()[:-len(".gz")]
        if name not in RUN_LEVEL_FILES and not name.endswith("/" + DONE_FILE) and not Path(name).match(EVAL_PARTS):
            continue  # a method's kept batches are replayed by the method (KeptBatches)
        dst = prog_dir / name
        if dst.is_file():
            continue
        if name.endswith("/" + DONE_FILE) and (dst.parent / "session").exists():
            # a method finished elsewhere while this folder holds a sequence of its own: keep the
            # finished one, whose scores are those of all N edits
            logger.warning("%s: finished in the kept copy; the saved session here is not used", dst.parent.name)
        _gunzip_copy(src, dst)
        restored.append(name)
    if restored:
        logger.info("restored from %s: %s", kept, ", ".join(restored))
    return restored


def keep_results(out: str | Path) -> list[str]:
    """Keep the finished methods of ``out/results.json`` in ``out/kept`` where it lacks them (as
    ``<METHOD>/done.json.gz``, the entry of ``results.json``'s ``methods``, which is what the method's
    ``done.json`` held); returns the methods kept. For a folder whose methods finished before
    ``kept/`` existed: a later run of the folder (its other methods, or the pair's command) then
    restores them instead of editing again. The unedited evaluation is not in ``results.json`` in
    its progress form; take it with ``pre_from``.

    Raises:
        ValueError: ``results.json`` is missing or broken, of another schema version, or its
            configuration does not give its recorded hash; ``out/kept`` holds another configuration.
    """
    out = Path(out)
    path = out / RESULTS_FILE
    results = read_json(path)
    version = results.get("schema_version") if isinstance(results, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(f"{str(path)!r}: schema version {version!r}, this code writes {SCHEMA_VERSION}; its "
                         "methods cannot be kept for a run of this code")
    if not isinstance(results.get("config"), dict) or not isinstance(results.get("methods"), dict):
        raise ValueError(f"{str(path)!r} lacks the run's configuration or its methods; it is not a results file "
                         "of this benchmark")
    config = {k: v for k, v in results["config"].items() if k not in INVOCATION_KEYS}
    chash = results.get("config_hash")
    if config_hash(config) != chash:
        raise ValueError(f"{str(path)!r}: its configuration does not give its recorded hash {chash!r}; "
                         "the file was changed after the run wrote it")
    check_kept(out, config)
    entries = results["methods"]
    for method, entry in entries.items():  # all checked before anything is written
        if not isinstance(entry, dict) or entry.get("method") != method or "scores" not in entry:
            raise ValueError(f"{str(path)!r}: methods[{method!r}] is not a finished method's record")
    kept, methods = out / KEPT_DIR, []
    for method, entry in entries.items():
        dst = kept / method / (DONE_FILE + ".gz")
        if not dst.is_file():
            write_json_gz(dst, entry)
            methods.append(method)
    if not (kept / "config.json").is_file():
        write_json(kept / "config.json", {"hash": chash, "config": config})
    logger.info("kept from %s: %s", path, ", ".join(methods) or "nothing new")
    return methods


def discard_kept(out: str | Path) -> None:
    """Remove ``out/kept`` (a restarted run discards what it kept, as it discards its progress)."""
    shutil.rmtree(Path(out) / KEPT_DIR, ignore_errors=True)


def check_kept(out: str | Path, config: dict[str, Any]) -> None:
    """Refuse ``out/kept`` when it holds measurements of a configuration other than ``config``
    (the run's configuration, whose hash :func:`~benchmarks.sequential.checkpoints.config_hash` is).

    Raises:
        ValueError: naming the folder, the keys that differ and what to do.
    """
    kept = Path(out) / KEPT_DIR / "config.json"
    if not kept.is_file():
        return
    stored = read_json(kept)
    if stored.get("hash") != config_hash(config):
        diff = config_diff(config, stored.get("config", {}))
        raise ValueError(f"{str(kept.parent)!r} holds finished measurements of a different run (differs in {diff}); "
                         "pass --restart (restart=True) to discard them, or choose another --out")


def write_json_gz(path: Path, value: Any) -> None:
    """``value`` as gzip-compressed JSON (no timestamp in the header), written atomically."""
    with _atomic(path) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fout:
        fout.write(json.dumps(value, indent=1).encode("utf-8"))


def read_json_gz(path: Path) -> Any:
    with gzip.open(path, "rb") as fh:
        return json.loads(fh.read().decode("utf-8"))


class KeptBatches:
    """The kept batches of one method in progress, in ``OUT/kept/<METHOD>/`` (module docstring):
    ``targets/batch-<b>.safetensors`` for batches 1, 2, ... and ``progress.json.gz``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def batch_path(self, b: int) -> Path:
        """The targets file of batch ``b`` (1-based)."""
        return self.folder / TARGETS_DIR / f"batch-{b:05d}.safetensors"

    def count(self) -> int:
        """How many batches, from the first without a gap, have their targets kept."""
        b = 0
        while self.batch_path(b + 1).is_file():
            b += 1
        return b

    def write_batch(self, b: int, digest: str, results: dict, meta: dict[str, Any],
                    extra: Optional[dict[str, Any]] = None) -> None:
        """Keep the targets of batch ``b`` (``{layer: TargetResult}`` of requests ``digest``),
        ``meta`` (the weights digest after the batch, its timings) and ``extra`` tensors (a sample
        of the weights' change)."""
        write_targets(self.batch_path(b), digest, results, meta, extra)

    def read_batch(self, b: int) -> tuple[str, dict, dict[str, Any], dict[str, Any]]:
        """Digest, ``{layer: TargetResult}``, metadata and extra tensors of batch ``b``."""
        return read_targets(self.batch_path(b))

    def write_progress(self, progress: dict[str, Any]) -> None:
        write_json_gz(self.folder / PROGRESS_FILE, progress)

    def read_progress(self) -> Optional[dict[str, Any]]:
        path = self.folder / PROGRESS_FILE
        return read_json_gz(path) if path.is_file() else None

    def discard(self) -> None:
        """Remove the kept batches and bookkeeping (not ``done.json``)."""
        shutil.rmtree(self.folder / TARGETS_DIR, ignore_errors=True)
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        for part in self.folder.glob(EVAL_PARTS + ".gz"):
            part.unlink()
