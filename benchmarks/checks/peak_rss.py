"""Peak resident memory of one edit, as a user's process sees it.

Each configuration runs in a fresh Python process that loads the model (``--model``), builds the
hyperparameters from ``--hparams`` (with ``--set`` overrides), and applies ONE batch of the first
``--batch-size`` CounterFact edits with :func:`blue_plugin.apply_blue_to_model`, exactly as a user
would: the engine loads the statistics it needs (from the cache), generates the context prefixes
and, for AlphaEdit, computes the projectors of the layers it edits. Reported per configuration:
the process's peak RSS over its whole life (kernel high-water mark ``VmHWM``: interpreter,
libraries, model, statistics, prefixes and the edit), the RSS after loading the model, the edit's
wall time and phase times, and the optimisation steps. ``--chunk-tokens`` lists the
``v_max_batch_tokens`` values to compare (the activation memory of the target optimisation grows
with it).

Unlike :mod:`benchmarks.speed` (one long-lived worker that prepares every critical layer for all
methods it times, and keeps EasyEdit's side comparable), this measures one method per process, so
the figure is what editing with that method costs in memory.

Example (the committed run, from the repository root)::

    python -m benchmarks.peak_rss --methods MEMIT,AlphaEdit_BLUE --chunk-tokens 256,1024 \\
        --batch-size 10 --threads 1 --out benchmarks/results/speed/peak-rss
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from blue_plugin import BLUEHyperParams, apply_blue_to_model, get_state, load_model
from blue_plugin.evaluation.data import load_cases

from benchmarks.common import (
    DEFAULT_HPARAMS,
    DEFAULT_MODEL,
    REPO_ROOT,
    current_rss_mib,
    default_cf_data,
    machine_info,
    method_hparams,
    parse_methods,
    peak_rss_mib,
    versions,
    write_json,
)

logger = logging.getLogger("benchmarks.peak_rss")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process (called in a fresh subprocess) and return figures."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    model, tok = load_model(spec["model"])
    after_load = current_rss_mib()
    hp = method_hparams(BLUEHyperParams.from_hparams(spec["hparams"]), spec["method"]).replace(
        v_max_batch_tokens=int(spec["chunk_tokens"]), **spec.get("overrides", {}))
    _, cases = load_cases(spec["data"], int(spec["batch_size"]))
    t1 = time.perf_counter()
    apply_blue_to_model(model, tok, [c.to_request() for c in cases], hp)
    edit_s = time.perf_counter() - t1
    rec = get_state(model).history[-1]
    return {
        "method": spec["method"], "chunk_tokens": int(spec["chunk_tokens"]), "batch_size": int(spec["batch_size"]),
        "peak_rss_mib": peak_rss_mib(), "rss_after_load_mib": after_load, "rss_end_mib": current_rss_mib(),
        "edit_s": edit_s, "load_s": t1 - t0, "phase_s": {k: float(v) for k, v in rec["time"].items()},
        "steps": {str(l): list(s) for l, s in rec["steps"].items()},
    }


def run(methods: Sequence[str], chunk_tokens: Sequence[int], batch_size: int, out: Path, *, model: str,
        hparams: str, data: str, threads: Optional[int], overrides: dict[str, Any]) -> dict[str, Any]:
    """Every (method, chunk) pair in its own subprocess, one after the other; JSON + markdown in ``out``."""
    methods = parse_methods(methods)
    rows = []
    load = {"start": os.getloadavg()}
    for m in methods:
        for ct in chunk_tokens:
            spec = {"method": m, "chunk_tokens": ct, "batch_size": batch_size, "model": model, "hparams": hparams,
                    "data": data, "threads": threads, "overrides": overrides}
            env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            logger.info("%s, v_max_batch_tokens %d ...", m, ct)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.checks.peak_rss", "--child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env, cwd=str(REPO_ROOT))
            if proc.returncode != 0:
                raise RuntimeError(f"{m} / {ct} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            logger.info("  peak RSS %.0f MiB, edit %.1f s", row["peak_rss_mib"], row["edit_s"])
            rows.append(row)
    load["end"] = os.getloadavg()
    result = {"benchmark": "peak_rss", "command": " ".join(["python -m benchmarks.peak_rss"] + sys.argv[1:]),
              "model": model, "hparams": hparams, "data": data, "threads": threads, "overrides": overrides,
              "load_average": load, "machine": machine_info(), "versions": versions(), "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    (out / "table.md").write_text(render(result), encoding="utf-8")
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"## Peak RSS of one edit of {result['runs'][0]['batch_size'] if result['runs'] else '?'} CounterFact requests "
             f"({Path(str(result['model'])).name}, one process per row)", "",
             "| method | v_max_batch_tokens | process peak RSS (MiB) | RSS after model load (MiB) | edit s | targets s |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['chunk_tokens']} | {r['peak_rss_mib']:.0f} | {r['rss_after_load_mib']:.0f} | "
                     f"{r['edit_s']:.1f} | {r['phase_s'].get('targets', float('nan')):.1f} |")
    la = result["load_average"]
    lines += ["", f"Load average at start / end: {la['start'][0]:.2f} / {la['end'][0]:.2f}; command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peak_rss", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="MEMIT,AlphaEdit_BLUE", help="comma-separated, e.g. MEMIT,AlphaEdit_BLUE")
    p.add_argument("--chunk-tokens", default="256,1024", help="v_max_batch_tokens values to compare")
    p.add_argument("--batch-size", type=int, default=10, help="requests in the one edit (default 10)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--hparams", default=str(DEFAULT_HPARAMS))
    p.add_argument("--data", default=None, help="CounterFact JSON (default: the counterfact dataset, see docs/data.md)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child")
    p.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps (memory peaks in the first step)")
    p.add_argument("--out", default=None, help="folder for results.json and table.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.out is None:
        p.error("--out is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"v_num_grad_steps": args.steps} if args.steps else {}
    try:
        chunks = [int(x) for x in args.chunk_tokens.split(",") if x.strip()]
    except ValueError:
        p.error(f"--chunk-tokens must be comma-separated integers, got {args.chunk_tokens!r}")
    if not chunks or min(chunks) < 1 or args.batch_size < 1:
        p.error("--chunk-tokens values and --batch-size must be >= 1")
    try:
        result = run(args.methods, chunks, args.batch_size, Path(args.out),
                     model=args.model, hparams=args.hparams, data=args.data or str(default_cf_data()), threads=args.threads, overrides=overrides)
    except ValueError as exc:
        p.error(str(exc))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
