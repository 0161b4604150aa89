"""PRUNE's restraint in a sequential run: where it acts and what it changes.

With ``prune_timing: sequence`` (the reference) the sequence runs unrestrained, the edit state keeps
its weights W, and the model serves ``W_orig + restrain(W - W_orig)``; the restraint changes only
singular values of the accumulated change above sigma_max(W_orig). Every batch records, per layer,
the accumulated change's largest singular value over sigma_max and how many were above it
(``change_sigma`` in the batch history): :func:`sigma_trace` collects them. Wherever the
restraint acts (some layer has a singular value above sigma_max), the benchmark evaluates the
same cases and held-out documents a second time on W (:func:`serving_unrestrained`), so the
paired difference restrained minus unrestrained is PRUNE's effect, measured on the same sequence.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from blue_plugin.editing.editor import Editor
from blue_plugin.editing.rules import get_rule


def restrains_sequence(hp) -> bool:
    """Whether the method of ``hp`` serves a restraint of its sequence's weights (PRUNE,
    ``prune_timing: sequence``)."""
    return get_rule(hp.base_method).restrains_sequence(hp)


@contextmanager
def serving_unrestrained(model, tok, hp) -> Iterator[list[int]]:
    """Serve the sequence's unrestrained weights inside the block (the restrained ones are put back
    on exit, also on errors); yields the layers where the two differ (empty: nothing to compare)."""
    editor = Editor(model, tok, hp)
    layers = editor.state.unrestrained_layers()
    with editor.weights_restored(layers):
        editor.restore({l: editor.state.layers[l].W_unrestrained for l in layers})
        yield layers


def sigma_trace(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch: edits so far and, per layer, ``max_over_sigma_max`` and ``above`` (from the
    batch records; batches without the record, e.g. other methods, are left out)."""
    out, n_edits = [], 0
    for i, rec in enumerate(history):
        n_edits += int(rec.get("n_requests", 0))
        cs = rec.get("change_sigma")
        if cs:
            out.append({"batch": i + 1, "n_edits": n_edits,
                        "layers": {str(l): {"max_over_sigma_max": float(v["max_over_sigma_max"]),
                                            "above": int(v["above"])} for l, v in cs.items()}})
    return out


def first_acting(trace: Sequence[dict[str, Any]]) -> Any:
    """Edits after the first batch where some layer had a singular value above sigma_max (None: never)."""
    for t in trace:
        if any(v["above"] for v in t["layers"].values()):
            return t["n_edits"]
    return None
