"""The speed run: workers started, statistics cold (and the curve), the prepare phase, the
timed alternating repetitions, plain forward+backward at the target phase's shapes, the
cost-growth sweep; then ``results.json``, ``table.md`` and the plots."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import machine_info, versions, write_json
from benchmarks.speed.config import OUR_METHODS, SCHEMA_VERSION, TARGETS, SpeedConfig, base_hparams, job_order
from benchmarks.speed.processes import WorkerError, start_workers
from benchmarks.speed.report import make_plots, render_table, summarize

logger = logging.getLogger("benchmarks.speed")


def run_speed(cfg: SpeedConfig, out: str | os.PathLike, command: Optional[str] = None) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``, write ``results.json`` / ``table.md`` / plots to
    ``out`` and return the results (see the module docstring)."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "speed",
        "command": command,
        "config": dataclasses.asdict(cfg),
        "load_average_start": list(os.getloadavg()),
        "machine": machine_info(),
        "versions": versions(),
        "targets": TARGETS,
    }
    work_dir = tempfile.mkdtemp(prefix="speed-run-")
    cfg = dataclasses.replace(cfg, work_dir=work_dir)
    workers: dict[str, Any] = {}

    def start(label: str) -> dict[str, Any]:
        ws = start_workers(cfg, out)
        result[label] = {s: w.info for s, w in ws.items()}
        digests = {w.info["weights_digest"] for w in ws.values()}
        result["same_weights"] = len(digests) == 1
        if len(digests) != 1:
            for w in ws.values():
                w.close()
            raise WorkerError(f"the workers loaded different weights: {result[label]}")
        return ws

    try:
        workers = start("workers")
        have_ee = "easyedit" in workers
        hp = base_hparams(cfg, None)
        n_samples = hp.mom2_n_samples
        result["hparams"] = {k: v for k, v in hp.to_dict().items() if k not in ("base_method", "blue", "stats_dir")}
        order = list(workers)

        # statistics, cold: the first repetition fills the cache the edits use
        stats: list[dict[str, Any]] = []
        for r in range(cfg.stats_reps):
            for s in (order if r % 2 == 0 else order[::-1]):
                logger.info("statistics (cold) %s, %d samples, repetition %d", s, n_samples, r)
                stats.append(workers[s].call("stats_cold", n_samples=n_samples, into_cache=(r == 0)))
        for count in cfg.stats_curve:
            if count == n_samples:
                continue
            for s in order:
                logger.info("statistics (cold) %s, %d samples (curve)", s, count)
                stats.append(workers[s].call("stats_cold", n_samples=count, into_cache=False))
        result["statistics"] = stats

        if cfg.isolation == "process" and cfg.restart_workers:
            # edit in fresh processes that find the statistics in the cache, as a user session
            # does ("warm"): the heap left by the cold pass would otherwise count as editing memory
            for w in workers.values():
                w.close()
            workers = {}
            workers = start("workers_edit")
        result["restarted_workers"] = cfg.isolation == "process" and cfg.restart_workers

        # caches of the first batch (statistics from disk, templates, projectors)
        prep = {"ours": workers["ours"].call("prepare")}
        if have_ee:
            prep["easyedit"] = workers["easyedit"].call("prepare", prefixes=prep["ours"]["prefixes"])
        result["prepare"] = prep

        # the timed, alternating repetitions
        runs: list[dict[str, Any]] = []
        for r in range(cfg.reps):
            jobs = job_order(cfg, have_ee)
            for system, method in (jobs if r % 2 == 0 else jobs[::-1]):
                logger.info("repetition %d: %s %s, N=%d, B=%d", r, system, method, cfg.n, cfg.batch_size)
                res = workers[system].call("edit_run", method=method, n=cfg.n, batch_size=cfg.batch_size,
                                           evaluate=cfg.evaluate and r == 0)
                res["rep"] = r
                res["load_1m"] = os.getloadavg()[0]
                runs.append(res)
        result["runs"] = runs

        # plain forward+backward at the shapes each system's target phase used
        plain: dict[str, dict[str, Any]] = {}
        for run in runs:
            key = f"{run['system']}/{run['method']}"
            if run["rep"] == 0 and run["shapes"]:
                plain[key] = workers[run["system"]].call("plain_fb", shapes=run["shapes"])
        result["plain"] = plain

        # cost growth
        scaling: list[dict[str, Any]] = []
        for B in cfg.scaling:
            for m in cfg.scaling_methods:
                pair = [("ours", m)] if "ours" in cfg.scaling_systems else []
                base = OUR_METHODS[m][0]
                if have_ee and base in cfg.ee_methods and "easyedit" in cfg.scaling_systems:
                    pair.append(("easyedit", base))
                for system, method in (pair if B % 2 else pair[::-1]):
                    logger.info("scaling B=%d: %s %s", B, system, method)
                    res = workers[system].call("edit_run", method=method, n=B, batch_size=B, evaluate=False)
                    res["load_1m"] = os.getloadavg()[0]
                    scaling.append(res)
        result["scaling"] = scaling
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    result["config"]["work_dir"] = None
    result["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t_run
    result["summary"] = summarize(result)
    write_json(out / "results.json", result)
    (out / "table.md").write_text(render_table(result), encoding="utf-8")
    result["paths"] = {"results": str(out / "results.json"), "table": str(out / "table.md")}
    result["paths"].update(make_plots(result, out))
    return result
