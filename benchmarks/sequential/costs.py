"""Costs of a sequential run: the key-statistics timing, per-batch times and phase times from the
engine's history, and target-optimisation steps per edited layer."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from blue_plugin.model.loading import default_cache_dir
from blue_plugin.stats.moments import get_second_moments

logger = logging.getLogger("benchmarks.sequential")


def _snapshot(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}


def prepare_statistics(editor, hp, measure_cold: bool = False, progress: bool = True) -> dict[str, Any]:
    """Load C0 for all critical layers into the editor's state and time it (``progress``: a bar
    while a pass over the corpus runs).

    Returns:
        ``first_call_s`` (the run's first load: ``source`` = "memory" when the model's state
        already held it, "disk" for the cache, "computed" when a pass over the corpus ran for
        all layers, "partial" when it ran for the layers missing from the cache),
        ``cached_s`` (a second call served from the disk cache), ``cold_s`` (a full pass: the first
        call when it computed, else a pass without cache if ``measure_cold``, else None).
    """
    layers = list(hp.layers)
    info: dict[str, Any] = {"layers": layers, "mom2_adjustment": hp.mom2_adjustment,
                            "corpus": hp.mom2_dataset, "n_samples": hp.mom2_n_samples,
                            "max_length": hp.mom2_max_length}
    in_memory = all(editor.statistics.loaded(l) for l in layers)  # C0, or an imported projection where it serves
    cache_dir = Path(hp.stats_dir) if hp.stats_dir is not None else default_cache_dir() / "stats"
    info["cache_dir"] = str(cache_dir)
    before = _snapshot(cache_dir)
    t0 = time.perf_counter()
    editor.ensure_second_moments(layers, progress=progress)
    info["first_call_s"] = time.perf_counter() - t0
    if not hp.mom2_adjustment:
        info.update(source="identity", cached_s=None, cold_s=None)
        return info
    after = _snapshot(cache_dir)
    written = [k for k, v in after.items() if before.get(k) != v]
    if in_memory:
        source = "memory"
    elif not written:
        source = "disk"
    else:  # "partial": some layers were cached, the pass computed only the others
        source = "computed" if len(written) >= len(layers) else "partial"
    info["source"] = source
    info["files_written"] = len(written)
    names = [editor.layout.rewrite(l) for l in layers]
    model_id = str(getattr(editor.model.config, "_name_or_path", None) or hp.model_name)
    kwargs = dict(corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples, max_length=hp.mom2_max_length,
                  model_id=model_id, progress=False)
    t0 = time.perf_counter()
    get_second_moments(editor.model, editor.tok, names, cache_dir=cache_dir, **kwargs)
    info["cached_s"] = time.perf_counter() - t0
    info["cold_s"] = info["first_call_s"] if source == "computed" else None
    if measure_cold and info["cold_s"] is None:
        t0 = time.perf_counter()
        get_second_moments(editor.model, editor.tok, names, cache_dir=None, **kwargs)
        info["cold_s"] = time.perf_counter() - t0
    logger.info("key statistics for layers %s: first call %.2fs (%s), cached %.2fs, cold %s",
                layers, info["first_call_s"], source, info["cached_s"],
                "n/a" if info["cold_s"] is None else f"{info['cold_s']:.1f}s")
    return info


def steps_per_layer(history: Sequence[dict[str, Any]], max_steps: int) -> dict[int, dict[str, Any]]:
    """Target-optimisation steps per layer over all batches of a run, layers in ascending order.

    Returns:
        ``{layer: {"mean", "max", "total", "n", "not_converged"}}`` where ``n`` counts requests and
        ``not_converged`` those that used all ``max_steps`` steps.
    """
    per: dict[int, list[int]] = {}
    for record in history:
        for l, steps in record.get("steps", {}).items():
            per.setdefault(int(l), []).extend(int(s) for s in steps)
    return {
        l: {"mean": float(np.mean(v)), "max": int(max(v)), "total": int(sum(v)), "n": len(v),
            "not_converged": int(sum(1 for s in v if s >= max_steps))}
        for l, v in sorted(per.items()) if v
    }


def batch_costs(history: Sequence[dict[str, Any]], wall: Sequence[float]) -> dict[str, Any]:
    """Per-batch times from the engine's history (``time``) and the benchmark's own wall clock."""
    totals = [float(r["time"].get("total", 0.0)) for r in history]
    phases = {k: float(sum(r["time"].get(k, 0.0) for r in history)) for k in ("targets", "keys", "update")}
    return {
        "n_batches": len(history),
        "batch_time_s": totals,
        "batch_wall_s": list(wall),
        "batch_time_s_mean": float(np.mean(totals)) if totals else None,
        "edit_time_s_total": float(sum(totals)),
        "phase_time_s": phases,
    }
