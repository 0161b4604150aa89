"""Merge the cost-growth sweeps of several ``benchmarks.speed`` runs into one table and plot.

A full sweep (B = 1, 5, 10, 20, 50 for two systems and two methods) takes hours on a small CPU,
so it can be split: one run per system (``--scaling-systems easyedit`` / ``ours``), run side by
side on different cores or one after the other. Each source contributes the per-batch times
(``scaling``) and the statistics times of the systems named in its own ``scaling_systems``, so a
run that also measured the other system incidentally (e.g. ours in an EasyEdit-only sweep) does
not mix into the result.

    python -m benchmarks.speed_combine --out benchmarks/results/speed/smollm2-growth-b50 \\
        benchmarks/results/speed/smollm2-growth-b50/easyedit benchmarks/results/speed/smollm2-growth-b50/ours

Writes ``results.json`` (the merged entries, each tagged with its source, and every source's
command, machine and load averages), ``table.md`` and the plots of :func:`benchmarks.speed.report.make_plots`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.common import write_json
from benchmarks.speed.config import OUR_METHODS
from benchmarks.speed.report import fmt, make_plots, summarize

logger = logging.getLogger(__name__)


def _load(path: str | Path) -> tuple[Path, dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ValueError(f"{p} does not exist: pass a results.json of benchmarks.speed or its folder")
    data = json.loads(p.read_text(encoding="utf-8"))
    if data.get("benchmark") != "speed":
        raise ValueError(f"{p} is not a results.json of benchmarks.speed (benchmark={data.get('benchmark')!r})")
    return p, data


def combine(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The merged result of the sources (see the module docstring)."""
    if not paths:
        raise ValueError("give at least one results.json (or its folder)")
    merged: dict[str, Any] = {"benchmark": "speed-combined", "sources": [], "scaling": [], "statistics": []}
    seen: dict[tuple[str, str, int], str] = {}
    for path in paths:
        p, data = _load(path)
        systems = list(data.get("config", {}).get("scaling_systems") or ["ours", "easyedit"])
        merged["sources"].append({
            "path": str(p), "command": data.get("command"), "systems": systems,
            "machine": data.get("machine"), "versions": data.get("versions"),
            "load_average_start": data.get("load_average_start"), "load_average_end": data.get("load_average_end"),
            "wall_s": data.get("wall_s"), "hparams": data.get("hparams"),
        })
        for run in data.get("scaling", []):
            if run["system"] not in systems:
                continue
            key = (run["system"], run["method"], int(run["batch_size"]))
            if key in seen:
                raise ValueError(f"{key[0]}/{key[1]} at B={key[2]} is in both {seen[key]} and {p}; pass each once")
            seen[key] = str(p)
            merged["scaling"].append(dict(run, source=str(p)))
        merged["statistics"] += [dict(s, source=str(p)) for s in data.get("statistics", []) if s["system"] in systems]
    if not merged["scaling"] and not merged["statistics"]:
        raise ValueError("the sources hold no sweep (scaling) or statistics entries of their scaling_systems")
    merged["summary"] = summarize(merged)
    return merged


def render(merged: dict[str, Any]) -> str:
    s = merged["summary"]
    lines = ["## Cost growth: blue_plugin vs EasyEdit (merged sweeps)", "", "Sources:", ""]
    for src in merged["sources"]:
        mach = src.get("machine") or {}
        lines.append(
            f"- `{src['path']}` ({', '.join(src['systems'])}): `{src.get('command') or 'n/a'}`; "
            f"{mach.get('cpu')} ({mach.get('cpu_count')} CPUs); load average at start "
            f"{[round(x, 2) for x in src.get('load_average_start') or []]}, at end "
            f"{[round(x, 2) for x in src.get('load_average_end') or []]}; wall {fmt(src.get('wall_s'), '{:.0f}')} s")
    sc = s["scaling"]
    if sc:
        Bs = sorted({int(b) for v in sc.values() for b in v})
        lines += ["", "| s / batch (one batch from the unedited weights) | " + " | ".join(f"B={b}" for b in Bs) + " |",
                  "|---|" + "---|" * len(Bs)]
        for key in sorted(sc):
            lines.append(f"| {key} | " + " | ".join(fmt(sc[key].get(str(b))) for b in Bs) + " |")
        for method, (base, _) in OUR_METHODS.items():
            ours, ee = sc.get(f"ours/{method}"), sc.get(f"easyedit/{base}")
            if not ours or not ee:
                continue
            cells = []
            for b in Bs:
                o, e = ours.get(str(b)), ee.get(str(b))
                cells.append(fmt(None if o is None or e is None else o / e, "{:.3f}"))
            lines.append(f"| ratio ours {method} / EasyEdit {base} | " + " | ".join(cells) + " |")
        lines += ["", "| mean steps per request (layer: steps) | " + " | ".join(f"B={b}" for b in Bs) + " |",
                  "|---|" + "---|" * len(Bs)]
        steps: dict[str, dict[int, str]] = {}
        for run in merged["scaling"]:
            per_layer: dict[str, list[int]] = {}
            for ph in run.get("phases", []):
                for layer, xs in (ph.get("steps") or {}).items():
                    per_layer.setdefault(str(layer), []).extend(xs)
            steps.setdefault(f"{run['system']}/{run['method']}", {})[int(run["batch_size"])] = ", ".join(
                f"{l}: {sum(v) / len(v):.1f}" for l, v in per_layer.items() if v) or "n/a"
        for key in sorted(steps):
            lines.append(f"| {key} | " + " | ".join(steps[key].get(b, "n/a") for b in Bs) + " |")
    st = s["statistics"]
    if st:
        lines += ["", "| statistics (cold, all critical layers) | samples | seconds (median) | peak RSS MiB (tree) |",
                  "|---|---|---|---|"]
        for sys_, by in st.items():
            for n, v in sorted(by.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {sys_} | {n} | {fmt(v['seconds']['median'])} | {fmt(v['peak_rss_tree_mib'], '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed_combine", description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", help="results.json files of benchmarks.speed (or their folders)")
    p.add_argument("--out", required=True, help="output folder (results.json, table.md, plots)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        merged = combine(args.sources)
    except ValueError as exc:
        p.exit(2, f"error: {exc}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", merged)
    table = render(merged)
    (out / "table.md").write_text(table, encoding="utf-8")
    paths = make_plots(merged, out)
    print(table)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
