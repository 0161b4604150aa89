"""Where a sequential run stands, read from its progress folder without loading a model
(``python -m benchmarks.sequential --status OUT``): per method, finished or how many batches are
done, the mean wall time per batch, the curve points measured so far and, for PRUNE, how the
accumulated change compares with sigma_max after the last batch and, at curve points where the
restraint acts, the served minus the unrestrained model paired over the same cases and documents.
Writes ``OUT/status.md`` and ``OUT/status.json`` so the partial curves of a long run can be
committed while it runs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from blue_plugin.editing.state import decode_value

from benchmarks.common import read_json
from benchmarks.sequential.curves import CURVE_METRICS
from benchmarks.sequential.report import (PPL_LABEL, cell, diff_cell, paired_differences, point_heldout, ppl_cell,
                                         write_outputs)
from benchmarks.sequential.restraint import first_acting, sigma_trace

LABELS = {"efficacy": "Efficacy", "generalization": "Generalization", "specificity": "Specificity",
          "fluency": "Fluency", "perplexity": PPL_LABEL}


def restraint_effect(point: dict[str, Any], doc_tokens: Optional[Sequence[int]], seed: int) -> Optional[dict[str, Any]]:
    """Restrained minus unrestrained at one curve point, paired per case and per held-out document
    (:func:`~benchmarks.sequential.report.paired_differences`); None where the point has no
    unrestrained evaluation (the restraint did not act)."""
    other = point.get("unrestrained")
    if not other:
        return None
    return paired_differences(point["scores"], other["scores"], point_heldout(point, doc_tokens),
                              point_heldout(other, doc_tokens), seed)


def method_status(folder: Path, n: int, batch_size: int, doc_tokens: Optional[Sequence[int]] = None,
                  seed: int = 0) -> dict[str, Any]:
    """The state of one method's progress folder (``finished``, ``in progress`` or ``not started``;
    a folder cannot tell whether a process is working on it now)."""
    done, prog = folder / "done.json", folder / "progress.json"
    if done.is_file():
        r = read_json(done)
        history, curves, state, edits = r.get("history") or [], r.get("curves") or [], "finished", n
        if not curves and r.get("summary"):  # a run without curve points: its final evaluation of all cases
            curves = [{"n_edits": n, "source": "final", "summary": r["summary"]}]
        wall = (r.get("costs") or {}).get("batch_wall_s") or []
    elif prog.is_file():
        p = read_json(prog)
        edits, state = min(n, int(p["batches_done"]) * batch_size), "in progress"
        curves, wall = p.get("curves") or [], p.get("batch_wall_s") or []
        manifest = folder / "session" / "manifest.json"
        history = decode_value(read_json(manifest)["state"].get("history") or []) if manifest.is_file() else []
    else:
        return {"state": "not started", "edits": 0, "curves": []}
    trace = sigma_trace(history)
    return {
        "state": state, "edits": edits,
        "batch_wall_s_mean": sum(wall) / len(wall) if wall else None,
        "curves": [{"n_edits": c["n_edits"], "source": c["source"], "summary": c["summary"],
                    "unrestrained": (c.get("unrestrained") or {}).get("summary"),
                    "restrained_minus_unrestrained": restraint_effect(c, doc_tokens, seed)} for c in curves],
        "sigma_last": trace[-1] if trace else None, "first_acting_n_edits": first_acting(trace) if trace else None,
    }


def run_status(out: str | os.PathLike) -> dict[str, Any]:
    """The status of the run in ``out`` (see the module docstring).

    Raises:
        ValueError: ``out`` holds no progress of a run.
    """
    prog = Path(out) / "progress"
    if not (prog / "config.json").is_file():
        raise ValueError(f"{str(out)!r} holds no progress/config.json: not the --out folder of a started run")
    cfg = read_json(prog / "config.json")["config"]
    n, bs = int(cfg["n"]), int(cfg["batch_size"])
    pre_held = read_json(prog / "pre_heldout.json") if (prog / "pre_heldout.json").is_file() else None
    tokens = (pre_held or {}).get("doc_tokens")
    methods = {d.name: method_status(d, n, bs, tokens, int(cfg.get("seed", 0)))
               for d in sorted(prog.iterdir()) if d.is_dir()}
    pre = read_json(prog / "pre.json")["summary"] if (prog / "pre.json").is_file() else None
    if pre is not None and pre_held is not None:
        pre = {**pre, "perplexity": pre_held["summary"]}
    return {"out": str(out), "n": n, "batch_size": bs, "model": Path(str(cfg.get("model"))).name,
            "data": cfg.get("format"), "pre": pre, "methods": methods}


def render_status(status: dict[str, Any]) -> str:
    """Markdown: one line per method, then its curve points so far (x100 but perplexity)."""
    def cells(summary):
        return [ppl_cell(summary.get(k)) if k == "perplexity" else cell(summary.get(k)) for k in CURVE_METRICS]

    lines = [f"## Status of {status['out']}: {status['data']}, {status['model']}, N = {status['n']}, "
             f"B = {status['batch_size']}", ""]
    for name, m in status["methods"].items():
        wall = m.get("batch_wall_s_mean")
        line = f"* {name}: {m['state']}, {m['edits']} of {status['n']} edits"
        line += f", {wall / 60:.1f} min per batch" if wall else ""
        if m.get("sigma_last"):
            ratios = ", ".join(f"L{l}: {v['max_over_sigma_max']:.3f}" for l, v in m["sigma_last"]["layers"].items())
            first = m.get("first_acting_n_edits")
            line += (f"; largest singular value of the change / sigma_max after {m['sigma_last']['n_edits']} edits: "
                     f"{ratios}; restraint {'acting since ' + str(first) + ' edits' if first else 'not acting yet'}")
        lines.append(line)
    lines += ["", "| Method | edits | " + " | ".join(LABELS[k] for k in CURVE_METRICS) + " |",
              "|---|---|" + "---|" * len(CURVE_METRICS)]
    if status.get("pre"):
        lines.append("| pre | 0 | " + " | ".join(cells(status["pre"])) + " |")
    for name, m in status["methods"].items():
        for c in m["curves"]:
            lines.append(f"| {name} | {c['n_edits']} | " + " | ".join(cells(c["summary"])) + " |")
            if c.get("unrestrained"):
                lines.append(f"| {name} unrestrained | {c['n_edits']} | " + " | ".join(cells(c["unrestrained"])) + " |")
            effect = c.get("restrained_minus_unrestrained")
            if effect:
                lines.append(f"| {name} restrained minus unrestrained, paired | {c['n_edits']} | " + " | ".join(
                    ppl_cell(effect.get(k), signed=True) if k == "perplexity" else diff_cell(effect.get(k))
                    for k in CURVE_METRICS) + " |")
    lines += ["", "Curve points: efficacy, generalization, specificity on the point's seeded sample of edited cases, "
              "fluency on the first of them, held-out perplexity (not x100); mean x100 with 95% bootstrap CI. "
              "Point 0 of each method is the unedited model (the pre row, on all N cases). \"Restrained minus "
              "unrestrained, paired\": PRUNE's served model minus its unrestrained sequence on the same cases "
              "and documents (an interval that excludes 0 is an effect these cases resolve)."]
    return "\n".join(lines) + "\n"


def write_status(out: str | os.PathLike) -> dict[str, Any]:
    """Write ``out/status.md`` and ``out/status.json``; returns the status with ``table`` and ``paths``."""
    status = run_status(out)
    table = render_status(status)
    return {**status, "table": table, "paths": write_outputs(out, "status", table, status)}
