"""Plots of a sequential run: optimisation steps per edited layer and metrics against the number
of sequential edits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sequential.config import METRIC_LABELS
from benchmarks.sequential.report import metric_keys


def make_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    """``steps_per_layer.png`` and, when intermediate evaluations exist, ``metrics_vs_edits.png``."""
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
    return written
