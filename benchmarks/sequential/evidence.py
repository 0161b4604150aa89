"""The evidence summary of several sequential runs: per model, dataset, N and base method, whether
BLUE's paired difference from its base method is resolved by the run's cases (the 95 % bootstrap
interval excludes 0) and in which direction, with the interval.

A verdict says no more than the interval: "BLUE better" / "BLUE worse" when it excludes 0 (for the
held-out perplexity lower is better, for every other metric higher), "tie" otherwise; a fluency
raised above the unedited model's interval is "above pre", not "better". Runs are read
from their ``results.json`` (``blue_vs_base`` as :func:`benchmarks.sequential.report.blue_vs_base`
stores it; older results without it are computed from their per-case scores)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.sequential.config import METRIC_LABELS
from benchmarks.sequential.report import (PPL_LABEL, blue_vs_base, metric_keys, paired_differences, point_heldout,
                                         read_run_results, write_outputs)

#: metrics where a lower value is the better one
LOWER_IS_BETTER = ("perplexity",)
#: verdict for a fluency that BLUE raises above the unedited model's interval: more n-gram entropy
#: than the unedited model has is a departure from it, not an improvement
ABOVE_PRE = "above pre"


def verdict(diff: Optional[dict[str, Any]], metric: str) -> Optional[str]:
    """"better" / "worse" (for BLUE) when the interval of ``diff`` (BLUE minus base) excludes 0,
    "tie" when it does not, None when there is no difference to judge."""
    if not diff or diff.get("mean") is None:
        return None
    lo, hi = float(diff["ci_low"]), float(diff["ci_high"])
    if lo <= 0 <= hi:
        return "tie"
    higher = lo > 0
    return "better" if higher != (metric in LOWER_IS_BETTER) else "worse"


def curve_point(result: dict[str, Any], method: str, n_edits: int) -> Optional[dict[str, Any]]:
    """``method``'s curve point after ``n_edits`` edits (point 0 is the unedited model's); None if
    it has none."""
    return next((p for p in result["methods"][method].get("curves") or []
                 if p["n_edits"] == n_edits and (n_edits == 0 or p["source"] != "pre")), None)


def fluency_levels(result: dict[str, Any], method: str, n_edits: Optional[int] = None) -> tuple[Any, Any]:
    """(upper end of the unedited model's 95 % interval, ``method``'s mean) of fluency: on all cases
    (``n_edits`` None) or on the sample of the curve point after ``n_edits`` edits (point 0 holds
    the unedited model's on it)."""
    def get(summary, key):
        return ((summary or {}).get("fluency") or {}).get(key)

    if n_edits is None:
        pre = (result.get("pre") or {}).get("summary")
        return get(pre, "ci_high"), get(result["methods"][method].get("summary"), "mean")
    zero, at = curve_point(result, method, 0) or {}, curve_point(result, method, n_edits) or {}
    return get(zero.get("summary"), "ci_high"), get(at.get("summary"), "mean")


def fluency_verdict(result: dict[str, Any], base: str, n_edits: Optional[int], v: Optional[str]) -> Optional[str]:
    """``v``, except :data:`ABOVE_PRE` for a "better" fluency where BLUE's mean is above the unedited
    model's interval."""
    if v != "better":
        return v
    pre_high, blue = fluency_levels(result, f"{base}_BLUE", n_edits)
    return ABOVE_PRE if pre_high is not None and blue is not None and blue > pre_high else v


def point_differences(result: dict[str, Any], base: str, n_edits: int) -> Optional[dict[str, Any]]:
    """BLUE minus ``base`` at the curve point after ``n_edits`` edits (both methods' points hold the
    same seeded sample of cases and the same held-out documents), paired per case / document;
    None when either method has no such point."""
    pa, pb = curve_point(result, base, n_edits), curve_point(result, f"{base}_BLUE", n_edits)
    if pa is None or pb is None:
        return None
    tokens = (result["pre"].get("heldout") or {}).get("doc_tokens")
    per = paired_differences(pb["scores"], pa["scores"], point_heldout(pb, tokens), point_heldout(pa, tokens),
                             int(result["config"].get("seed", 0)))
    return {"per": per, "cases": pa["n_cases"]}


def evidence_rows(dirs: Sequence[str | os.PathLike], points: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One row per (run, base method run with its BLUE mode): the run's model, dataset, N, B and,
    per metric, the difference and its verdict, on all N cases of the final evaluation; and, for
    each of ``points`` (numbers of edits) where both methods have a curve point, a row on that
    point's sample of cases."""
    rows = []
    for d in dirs:
        result = read_run_results(d)
        cfg = result["config"]
        diffs = result.get("blue_vs_base") or blue_vs_base(result)
        if not diffs:
            raise ValueError(f"{str(d)!r} has no method run in both modes (e.g. MEMIT and MEMIT_BLUE)")
        keys = metric_keys(cfg["format"]) + ["perplexity"]
        for base, per in diffs.items():
            found = [(n, point_differences(result, base, n)) for n in points if n < cfg["n"]]
            for n, cases, per_n in [(n, pd["cases"], pd["per"]) for n, pd in found if pd] + [(cfg["n"], cfg["n"], per)]:
                metrics = {k: {"diff": per_n.get(k), "verdict": verdict(per_n.get(k), k)} for k in keys}
                if "fluency" in metrics:
                    metrics["fluency"]["verdict"] = fluency_verdict(result, base, None if n == cfg["n"] else n,
                                                                    metrics["fluency"]["verdict"])
                rows.append({
                    "run": str(d), "model": Path(str(cfg["model"])).name, "data": cfg["format"],
                    "n": n, "of_n": cfg["n"], "cases": cases, "batch_size": cfg["batch_size"], "base": base,
                    "metrics": metrics,
                })
    return rows


def evidence_cell(entry: dict[str, Any], metric: str) -> str:
    d, v = entry["diff"], entry["verdict"]
    if v is None:
        return "n/a"
    if metric == "perplexity":
        num = f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
    else:
        num = f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"
    return f"**{v}** {num}" if v != "tie" else f"tie {num}"


def render_evidence(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per base method and run, BLUE minus base per metric with its verdict
    (metrics no run has are left out)."""
    keys = [k for k in list(METRIC_LABELS) + ["perplexity"]
            if any(r["metrics"].get(k, {}).get("verdict") for r in rows)]
    labels = {**METRIC_LABELS, "perplexity": PPL_LABEL}
    lines = [
        "| Model | Data | N (B) | cases | Base | " + " | ".join(labels[k] for k in keys) + " |",
        "|---|---|---|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        cells = [evidence_cell(r["metrics"][k], k) if k in r["metrics"] else "n/a" for k in keys]
        n = f"{r['n']} of {r['of_n']}" if r.get("of_n", r["n"]) != r["n"] else str(r["n"])
        lines.append(f"| {r['model']} | {r['data']} | {n} ({r['batch_size']}) | {r.get('cases', r['n'])} | {r['base']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "BLUE minus its base method, paired over the same cases (held-out perplexity: over the same "
              "documents), x100 except perplexity, 95 % bootstrap interval. **better** / **worse**: the interval "
              "excludes 0 (lower perplexity is better); tie: it does not; **above pre**: BLUE's fluency is resolved "
              "above its base method's and lies above the unedited model's interval, a departure from the unedited "
              "model rather than an improvement. \"N of M\": the curve point after N of a run's M edits, on its seeded "
              "sample of the cases edited so far (fluency on the first 50 of them)."]
    return "\n".join(lines) + "\n"


def write_evidence(dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                   points: Sequence[int] = ()) -> dict[str, Any]:
    """Write ``out/evidence.md`` and ``out/evidence.json`` for the runs in ``dirs`` (and their
    curve points after ``points`` edits)."""
    rows = evidence_rows(dirs, points)
    table = render_evidence(rows)
    return {"table": table, "rows": rows, "paths": write_outputs(out, "evidence", table, {"rows": rows})}
