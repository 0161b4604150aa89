"""Plots of a sequential run: optimisation steps per edited layer, metrics against the number of
sequential edits (``--eval-every``: ``metrics_vs_edits.png``) and the curve points
(``--curve-every``: one ``curve_<metric>.png`` per metric, every method in it, each base method in
one colour with its original mode solid and its BLUE mode dashed, 95% intervals shaded)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sequential.config import CF_FORMATS, METRIC_LABELS
from benchmarks.sequential.curves import CURVE_METRICS
from benchmarks.sequential.report import metric_keys

CURVE_LABELS = {**METRIC_LABELS, "perplexity": "Held-out perplexity"}


def base_method(name: str) -> str:
    return name[: -len("_BLUE")] if name.endswith("_BLUE") else name


def curve_note(result: dict[str, Any], key: str) -> str:
    """What a curve point of ``key`` averages over, for the plot's title."""
    plan = result.get("curve_plan") or {}
    if key == "perplexity":
        docs = (result.get("heldout_documents") or {}).get("n_docs")
        per = plan.get("heldout_docs")
        n = docs if per is None or docs is None else min(per, docs)
        return f" ({n} documents)" if n else ""
    n = plan.get("fluency_cases") if key == "fluency" else plan.get("cases")
    return f" (up to {n} edited cases per point)" if n else ""


def curve_plots(result: dict[str, Any], out: Path, plt) -> dict[str, str]:
    """``curve_<metric>.png`` for every metric the curve points of ``result`` hold (x100 but
    perplexity); returns ``{"curve_<metric>_plot": path}``."""
    methods = {name: m for name, m in result["methods"].items() if m.get("curves")}
    bases = list(dict.fromkeys(base_method(n) for n in methods))
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}
    keys = [k for k in CURVE_METRICS if k != "fluency" or result["config"]["format"] in CF_FORMATS]
    written: dict[str, str] = {}
    for key in keys:
        scale = 1.0 if key == "perplexity" else 100.0
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        drawn = False
        for name, m in methods.items():
            pts = [(p["n_edits"], p["summary"].get(key) or {}) for p in m["curves"]]
            pts = [(x, s) for x, s in pts if s.get("mean") is not None]
            if not pts:
                continue
            x = [p[0] for p in pts]
            colour, style = colors[base_method(name)], "--" if name.endswith("_BLUE") else "-"
            ax.plot(x, [scale * s["mean"] for _, s in pts], style, color=colour, marker="o", ms=3, label=name)
            ax.fill_between(x, [scale * s["ci_low"] for _, s in pts], [scale * s["ci_high"] for _, s in pts],
                            color=colour, alpha=0.12, linewidth=0)
            if any("unrestrained" in p for p in m["curves"]):  # PRUNE: the sequence without its restraint
                u = [(p["n_edits"], (p.get("unrestrained") or p)["summary"].get(key) or {}) for p in m["curves"]]
                u = [(x_, s) for x_, s in u if s.get("mean") is not None]
                ax.plot([p[0] for p in u], [scale * s["mean"] for _, s in u], ":", color=colour, marker="x", ms=3,
                        label=f"{name} unrestrained")
            drawn = True
        if drawn:
            ax.set_title(CURVE_LABELS[key] + curve_note(result, key), fontsize=10)
            ax.set_xlabel("sequential edits")
            ax.set_ylabel("perplexity" if key == "perplexity" else "x100")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"curve_{key}.png"
            fig.savefig(path, dpi=120)
            written[f"curve_{key}_plot"] = str(path)
        plt.close(fig)
    return written


def make_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    """``steps_per_layer.png``, ``metrics_vs_edits.png`` when intermediate evaluations of all
    edited cases exist and ``curve_<metric>.png`` when curve points exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    methods = result["methods"]
    # steps per layer
    all_layers = sorted({int(l) for m in methods.values() for l in (m["costs"].get("steps_per_layer") or {})})
    if methods and all_layers:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(methods) + 2), 3.6))
        width = 0.8 / len(all_layers)
        x = np.arange(len(methods))
        for j, l in enumerate(all_layers):
            vals = [(m["costs"].get("steps_per_layer") or {}).get(str(l), {}).get("mean", np.nan) for m in methods.values()]
            ax.bar(x + (j - (len(all_layers) - 1) / 2) * width, vals, width, label=f"layer {l}")
        ax.set_xticks(x, list(methods), rotation=20, ha="right")
        ax.set_ylabel("mean optimisation steps per request")
        ax.set_title("Target-optimisation steps per edited layer")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "steps_per_layer.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written["steps_plot"] = str(p)
    # metrics vs number of edits
    if any(m.get("curve") for m in methods.values()):
        keys = [k for k in metric_keys(result["config"]["format"]) if k != "consistency"]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
        pre = result["pre"]["summary"]
        for ax, k in zip(axes[0], keys):
            for name, m in methods.items():
                pts = [(0, pre.get(k, {}).get("mean"))] + [(c["n_edits"], c["summary"].get(k, {}).get("mean")) for c in m.get("curve", [])]
                pts = [(x, 100 * y) for x, y in pts if y is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
            ax.set_title(METRIC_LABELS[k])
            ax.set_xlabel("sequential edits")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("x100")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        p = out / "metrics_vs_edits.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written["curve_plot"] = str(p)
    if any(m.get("curves") for m in methods.values()):
        written.update(curve_plots(result, out, plt))
    return written
