"""Evaluations of all N cases, resumable: the cases are scored in chunks and each chunk is saved.

At N = 2,000 an evaluation of all cases takes as long as several batches (on one CPU core about 50
minutes: the unedited model's, and each method's after its last batch, twice for PRUNE, restrained
and unrestrained), and a process stopped during it used to lose all of it.
:class:`ChunkedEvaluation` keeps, per evaluated variant (``pre``, ``served``, ``unrestrained``),
the per-case scores of the chunks done so far in ``eval_<variant>.json`` and the held-out
perplexity in ``eval_<variant>_heldout.json`` of its folder, each tagged with the number of edits
and a digest of the critical layers' weights that were evaluated: a saved part is used only for
the same weights.

The chunks are consecutive slices of ``chunk_cases`` cases; a resumed evaluation scores exactly the
slices an uninterrupted one would, so both give the same scores. Against a single evaluation of
all cases at once, scores can differ by floating-point rounding where prompts of neighbouring
cases would have shared a batch.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from benchmarks.common import read_json, write_json

logger = logging.getLogger("benchmarks.sequential")


class ChunkedEvaluation:
    """Evaluations of one model state (``n_edits`` edits), saved under ``folder``.

    Args:
        folder: where the parts are kept (a method's ``progress/<METHOD>``; ``progress`` for the
            unedited model).
        n_edits: edits the evaluated weights carry.
        digest: returns a digest of the weights being served now (called per variant, so the
            restrained and unrestrained weights of PRUNE get their own).
        chunk_cases: cases per saved chunk.
    """

    def __init__(self, folder: Path, n_edits: int, digest: Callable[[], str], chunk_cases: int = 100):
        if chunk_cases < 1:
            raise ValueError(f"chunk_cases must be >= 1, got {chunk_cases}")
        self.folder, self.n_edits, self.digest, self.chunk = Path(folder), int(n_edits), digest, int(chunk_cases)

    def _key(self) -> dict[str, Any]:
        return {"n_edits": self.n_edits, "weights": self.digest()}

    def _saved(self, path: Path, key: dict[str, Any]) -> dict[str, Any]:
        if not path.is_file():
            return {}
        saved = read_json(path)
        if saved.get("key") != key:
            logger.warning("%s belongs to other weights (%s, now %s); evaluating again", path, saved.get("key"), key)
            return {}
        return saved

    def scores(self, variant: str, cases: Sequence[Any], loc: Optional[Sequence[Any]],
               evaluate: Callable[[Sequence[Any], Optional[Sequence[Any]]], list[dict[str, Any]]],
               ) -> tuple[list[dict[str, Any]], float]:
        """Per-case scores of ``cases`` (``evaluate(cases_slice, loc_slice)`` per chunk) and the
        evaluation's seconds, over all invocations; chunks saved earlier are read back."""
        path = self.folder / f"eval_{variant}.json"
        key = self._key()
        saved = self._saved(path, key)
        scores: list[dict[str, Any]] = list(saved.get("scores", []))
        eval_s = float(saved.get("eval_s", 0.0))
        if scores:
            logger.info("evaluation (%s): %d of %d cases saved earlier", variant, len(scores), len(cases))
        for start in range(len(scores), len(cases), self.chunk):
            t0 = time.perf_counter()
            part = slice(start, start + self.chunk)
            scores += evaluate(cases[part], loc[part] if loc is not None else None)
            eval_s += time.perf_counter() - t0
            write_json(path, {"key": key, "scores": scores, "eval_s": eval_s})
        return scores, eval_s

    def heldout(self, variant: str, measure: Callable[[], Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
        """``measure()`` (the held-out perplexity), or what an earlier invocation saved for the same weights."""
        path = self.folder / f"eval_{variant}_heldout.json"
        key = self._key()
        saved = self._saved(path, key)
        if "value" in saved:
            return saved["value"]
        value = measure()
        write_json(path, {"key": key, "value": value})
        return value

    def cleanup(self) -> None:
        """Remove the saved parts in the folder (their results are written elsewhere)."""
        for path in self.folder.glob("eval_*.json"):
            path.unlink()
