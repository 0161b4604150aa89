"""Tables of sequential runs: ``table.md`` of one run (metrics with 95% intervals, BLUE minus its
base method, costs) and ``comparison.md`` of several."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from blue_plugin.evaluation.metrics import bootstrap_ci
from blue_plugin.evaluation.perplexity import paired_perplexity_difference

from benchmarks.common import read_json, write_json
from benchmarks.sequential.config import CF_FORMATS, METRIC_LABELS, RESULTS_FILE

PPL_LABEL = "Held-out PPL"


def metric_keys(fmt: str) -> list[str]:
    return list(METRIC_LABELS) if fmt in CF_FORMATS else ["efficacy", "generalization", "specificity"]


def cell(s: Optional[dict[str, Any]]) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{100 * s['mean']:.1f} [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"


def ppl_cell(s: Optional[dict[str, Any]], signed: bool = False) -> str:
    """A perplexity (not x100) with its interval; ``signed``: a difference."""
    if not s or s.get("mean") is None:
        return "n/a"
    f = "+.2f" if signed else ".2f"
    return f"{s['mean']:{f}} [{s['ci_low']:{f}}, {s['ci_high']:{f}}]"


def metric_cells(summary: dict[str, Any], keys: Sequence[str]) -> str:
    """The metrics table's cells of one row: ``keys`` x100, then the held-out perplexity."""
    return " | ".join([cell(summary.get(k)) for k in keys] + [ppl_cell(summary.get("perplexity"))])


def heldout_note(result: dict[str, Any]) -> str:
    """A sentence on the held-out documents of a run ("" for runs without them)."""
    rec = result.get("heldout_documents")
    if not rec:
        return ""
    return (f"{PPL_LABEL}: token-level perplexity (not x100) of {rec['n_docs']} documents of "
            f"{Path(str(rec['source'])).name} held out from the {rec['c0_n_samples']} of C0, 95% bootstrap CI "
            "over documents.")


def steps_cell(costs: dict[str, Any]) -> str:
    spl = costs.get("steps_per_layer") or {}
    return ", ".join(f"L{l}: {v['mean']:.1f}" for l, v in sorted(spl.items(), key=lambda kv: int(kv[0]))) or "n/a"


def fmt_s(x: Any) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def mean_or_none(xs: Optional[Sequence[float]]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def blue_vs_base(result: dict[str, Any], n_boot: int = 1000) -> dict[str, dict[str, dict[str, Any]]]:
    """For every method X run together with X_BLUE: per metric, the mean over cases of the
    per-case difference (X_BLUE - X) with a 95% percentile bootstrap interval (cases resampled
    together, seeded with the run's seed), and how many cases entered (both scored).

    Held-out perplexity (where both methods have it, on the same documents): the difference of
    the two perplexities with an interval resampling the documents jointly, under ``perplexity``.

    Returns ``{X: {metric: {"mean", "ci_low", "ci_high", "n"}}}`` (fractions; fluency in bits).
    """
    methods = result["methods"]
    seed = int(result.get("config", {}).get("seed", 0))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for base in methods:
        if base.endswith("_BLUE") or f"{base}_BLUE" not in methods:
            continue
        blue = methods[f"{base}_BLUE"]
        out[base] = paired_differences(blue["scores"], methods[base]["scores"], blue.get("heldout"),
                                       methods[base].get("heldout"), seed, n_boot)
    return out


def point_heldout(point: dict[str, Any], doc_tokens: Optional[Sequence[int]]) -> Optional[dict[str, Any]]:
    """A curve point's held-out NLLs with the token counts of its documents (the first ones of the
    run's ``doc_tokens``), as :func:`paired_differences` takes them; None without either."""
    if not doc_tokens or not point.get("doc_nll"):
        return None
    return {"doc_nll": point["doc_nll"], "doc_tokens": doc_tokens[:len(point["doc_nll"])]}


def paired_differences(scores_b: Sequence[dict[str, Any]], scores_a: Sequence[dict[str, Any]],
                       heldout_b: Optional[dict[str, Any]], heldout_a: Optional[dict[str, Any]],
                       seed: int, n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Per metric, B minus A over the cases both scored (matched by ``case_id``): mean and 95%
    percentile bootstrap interval (cases resampled together) and ``n``; with the held-out NLL sums
    of both on the same documents, the perplexity difference under ``perplexity``."""
    a = {s["case_id"]: s for s in scores_a}
    b = {s["case_id"]: s for s in scores_b}
    per: dict[str, dict[str, Any]] = {}
    for key in METRIC_LABELS:
        d = [float(b[c][key]) - float(a[c][key]) for c in a
             if c in b and a[c].get(key) is not None and b[c].get(key) is not None]
        if d:
            mean, lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
            per[key] = {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(d)}
    if heldout_a and heldout_b and heldout_a.get("doc_tokens") == heldout_b.get("doc_tokens"):
        per["perplexity"] = paired_perplexity_difference(heldout_a["doc_nll"], heldout_b["doc_nll"],
                                                         heldout_a["doc_tokens"], n_boot=n_boot, seed=seed)
    return per


def diff_cell(s: Optional[dict[str, Any]]) -> str:
    if not s:
        return "n/a"
    return f"{100 * s['mean']:+.1f} [{100 * s['ci_low']:+.1f}, {100 * s['ci_high']:+.1f}]"


def render_table(result: dict[str, Any]) -> str:
    """Markdown: a header, the metrics table (methods as rows, "pre" first, x100 with 95% CIs) and
    a cost table."""
    cfg = result["config"]
    keys = metric_keys(cfg["format"])
    lines = [
        f"## Sequential editing: {Path(cfg['data']).name} ({cfg['format']}), model {Path(str(cfg['model'])).name}",
        "",
        f"N = {cfg['n']} edits, batch size B = {cfg['batch_size']}, seed {cfg['seed']}; all N evaluated "
        f"on the final model. Mean x100 with 95% bootstrap CI (fluency: bi/tri-gram entropy x100). "
        + heldout_note(result),
        "",
        "| Method | " + " | ".join(METRIC_LABELS[k] for k in keys) + f" | {PPL_LABEL} |",
        "|---|" + "---|" * (len(keys) + 1),
        "| pre | " + metric_cells(result["pre"]["summary"], keys) + " |",
    ]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | " + metric_cells(m["summary"], keys) + " |")
    diffs = result.get("blue_vs_base") or blue_vs_base(result)  # stored by run_benchmark; older results lack it
    if diffs:
        lines += ["", "BLUE minus its base method, paired over the same cases: mean x100 with 95% bootstrap CI "
                  "(an interval that excludes 0 is a difference these cases resolve).", "",
                  "| Base | " + " | ".join(METRIC_LABELS[k] for k in keys) + f" | {PPL_LABEL} |",
                  "|---|" + "---|" * (len(keys) + 1)]
        for base, d in diffs.items():
            lines.append(f"| {base}_BLUE - {base} | " + " | ".join(diff_cell(d.get(k)) for k in keys)
                         + f" | {ppl_cell(d.get('perplexity'), signed=True)} |")
    lines += restraint_lines(result, keys)
    st = result["costs"]["statistics"]
    lines += [
        "",
        f"Key statistics ({st.get('n_samples')} docs of {Path(str(st.get('corpus'))).name}, layers "
        f"{st.get('layers')}): first call {fmt_s(st.get('first_call_s'))} s ({st.get('source')}), "
        f"cached {fmt_s(st.get('cached_s'))} s, cold {fmt_s(st.get('cold_s'))} s.",
        "",
        "| Method | s / batch (mean) | edit s (total) | targets / keys / update s | eval s | held-out s "
        "| curve s / point | steps per layer (mean) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        c = m["costs"]
        ph = c.get("phase_time_s", {})
        lines.append(
            f"| {name} | {fmt_s(c.get('batch_time_s_mean'))} | {fmt_s(c.get('edit_time_s_total'))} | "
            f"{fmt_s(ph.get('targets'))} / {fmt_s(ph.get('keys'))} / {fmt_s(ph.get('update'))} | "
            f"{fmt_s(c.get('eval_time_s'))} | {fmt_s(c.get('heldout_eval_s'))} | "
            f"{fmt_s(mean_or_none(c.get('curve_eval_s')))} | "
            f"{steps_cell(c)} | {c.get('peak_rss_mib')} |"
        )
    return "\n".join(lines) + "\n"


def restraint_lines(result: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """Markdown lines on PRUNE's restraint for methods that record it (none for other runs): where
    the accumulated change first exceeded sigma_max, the largest ratio at the end per layer, and
    the served (restrained) model minus the unrestrained one on the same cases."""
    rows = [(name, m["restraint"]) for name, m in result["methods"].items() if m.get("restraint")]
    if not rows:
        return []
    lines = ["", "PRUNE's restraint (served weights W_orig + restrain(W - W_orig); W, the unrestrained sequence, "
             "evaluated on the same cases where they differ): restrained minus unrestrained, x100 with 95% "
             "bootstrap CI.", "",
             "| Method | first acted (edits) | largest singular value / sigma_max at the end | "
             + " | ".join(METRIC_LABELS[k] for k in keys) + f" | {PPL_LABEL} |",
             "|---|---|---|" + "---|" * (len(keys) + 1)]
    for name, r in rows:
        trace = r.get("sigma_trace") or []
        last = ", ".join(f"L{l}: {v['max_over_sigma_max']:.2f}" for l, v in trace[-1]["layers"].items()) if trace else "n/a"
        first = r.get("first_acting_n_edits")
        d = (r.get("final") or {}).get("restrained_minus_unrestrained") or {}
        cells = [diff_cell(d.get(k)) if d else "equal" for k in keys]
        lines.append(f"| {name} | {first if first is not None else 'never'} | {last} | " + " | ".join(cells)
                     + f" | {ppl_cell(d.get('perplexity'), signed=True) if d else 'equal'} |")
    return lines


def read_run_results(d: str | os.PathLike) -> dict[str, Any]:
    """The ``results.json`` of a run folder (or that file itself); ValueError when there is none."""
    p = Path(d)
    f = p / RESULTS_FILE if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"{str(d)!r} holds no {RESULTS_FILE}; pass output folders of finished runs")
    return read_json(f)


def compare_runs(dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Merge the ``results.json`` of several runs into ``out/comparison.{md,json}``.

    Rows are grouped by run (dataset, N, B, model); each group starts with its "pre" row.
    """
    if not dirs:
        raise ValueError("--compare needs at least one run folder")
    runs = [(str(d), read_run_results(d)) for d in dirs]
    keys = list(METRIC_LABELS)
    lines = [
        "## Sequential editing: comparison",
        "",
        "Mean x100 with 95% bootstrap CI; n/a where a metric does not apply.",
        "",
        "| Run | Method | " + " | ".join(METRIC_LABELS[k] for k in keys) + f" | {PPL_LABEL} | s / batch |",
        "|---|---|" + "---|" * (len(keys) + 2),
    ]
    merged = []
    for d, r in runs:
        cfg = r["config"]
        label = f"{Path(d).name}: {Path(cfg['data']).stem} N={cfg['n']} B={cfg['batch_size']}"
        lines.append(f"| {label} | pre | " + metric_cells(r["pre"]["summary"], keys) + " | |")
        rows = {"run": d, "label": label, "config": cfg, "pre": r["pre"]["summary"], "methods": {}}
        for name, m in r["methods"].items():
            lines.append(f"| {label} | {name} | " + metric_cells(m["summary"], keys)
                         + f" | {fmt_s(m['costs'].get('batch_time_s_mean'))} |")
            rows["methods"][name] = {"summary": m["summary"], "costs": {k: v for k, v in m["costs"].items()
                                                                        if k not in ("batch_time_s", "batch_wall_s")}}
        merged.append(rows)
    table = "\n".join(lines) + "\n"
    return {"table": table, "runs": merged, "paths": write_outputs(out, "comparison", table, {"runs": merged})}


def write_outputs(out: str | os.PathLike, stem: str, table: str, payload: dict[str, Any]) -> dict[str, str]:
    """Write ``out/<stem>.md`` (``table``) and ``out/<stem>.json`` (``payload``); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    write_json(out / f"{stem}.json", payload)
    return {"table": str(out / f"{stem}.md"), "json": str(out / f"{stem}.json")}
