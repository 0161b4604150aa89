"""One PNG per analysis present in a result."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


def layer_values(d: dict, layers: Sequence[int]) -> list[float]:
    return [np.nan if d.get(str(l), d.get(l)) is None else float(d.get(str(l), d.get(l))) for l in layers]


def make_plots(results: dict[str, Any], out: Path, label: str) -> dict[str, str]:
    """One PNG per analysis present in ``results`` (JSON form: layer keys are strings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}

    def save(fig, name):
        fig.suptitle(label, fontsize=8, y=0.995)
        fig.tight_layout()
        p = out / f"{name}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written[name] = str(p)

    def bars(ax, layers, series: dict[str, tuple[list, Optional[list]]], ylabel):
        x = np.arange(len(layers))
        w = 0.8 / max(1, len(series))
        for k, (name, (vals, err)) in enumerate(series.items()):
            ax.bar(x + (k - (len(series) - 1) / 2) * w, vals, w, yerr=err, capsize=3, label=name)
        ax.set_xticks(x, [str(l) for l in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)

    r = results
    if "contribution" in r:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, via in zip(axes, ("hidden", "weight")):
            c = r["contribution"][via]
            layers = c["layers"]
            bars(ax, layers, {k: (layer_values(c[k]["mean"], layers), layer_values(c[k]["std"], layers)) for k in ("distributed", "direct")},
                 "P_edited(o*) - P_orig(o*)")
            ax.set_title(f"(1) contribution, residual applied via {via}", fontsize=9)
        save(fig, "contribution")
    if "cosine" in r:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        series = {}
        for k, c in r["cosine"].items():
            series[k] = (layer_values(c["mean"], c["layers"]), layer_values(c["std"], c["layers"]))
        bars(ax, r["cosine"]["original"]["layers"], series, "cos(R^L/(m-i+1), R^l)")
        ax.set_title("(2) distributed vs direct residual", fontsize=9)
        save(fig, "cosine")
    if "single_layer" in r:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, via in zip(axes, ("weight", "hidden")):
            s = r["single_layer"][via]
            bars(ax, s["layers"], {k: ([100 * v for v in layer_values(s[k], s["layers"])], None) for k in ("distributed", "direct")},
                 "efficacy (%)")
            if s.get("efficacy_orig") is not None:
                ax.axhline(100 * s["efficacy_orig"], color="gray", ls="--", lw=1, label="unedited")
                ax.legend(fontsize=7)
            ax.set_title(f"(3) single-layer edit via {via}", fontsize=9)
        save(fig, "single_layer")
    if "steps" in r:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        s = r["steps"]
        layers = s["updated"]["layers"]
        bars(ax, layers, {"earlier layers updated": (layer_values(s["updated"]["mean_steps"], layers), None),
                          "unedited model": (layer_values(s["unedited"]["mean_steps"], layers), None)}, "mean optimisation steps")
        ax.set_title(f"(4) steps layer by layer (max {s['updated']['max_steps']})", fontsize=9)
        save(fig, "steps")
    if "deviation" in r:
        d = r["deviation"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        dist = d["distance"]
        layers = dist["layers"]
        xs = [dist["distance"][str(l)] if str(l) in dist["distance"] else dist["distance"][l] for l in layers]
        for key, name in (("to_last_rel", "||R^l - R^L|| / ||R^l||"), ("to_distributed_rel", "||R^l - R_dist|| / ||R^l||")):
            axes[0].plot(xs, layer_values(dist["mean"][key], layers), marker="o", label=name)
        axes[0].set_xlabel("distribution distance L - l")
        axes[0].set_title("(5) residual deviation", fontsize=9)
        axes[0].legend(fontsize=7)
        bs = d["batch_size"]
        sizes = bs["batch_sizes"]
        for l in bs["layers"][:-1] or bs["layers"]:
            axes[1].plot(sizes, [bs["error"][str(b)][str(l)] for b in sizes], marker="o", label=f"layer {l}")
        axes[1].set_xticks(sizes)
        axes[1].set_xlabel("batch size")
        axes[1].set_ylabel("||dW(R_dist) - dW(R^l)||_F")
        axes[1].set_title("(5) weight deviation vs batch size", fontsize=9)
        axes[1].legend(fontsize=7)
        sq = d["sequence"]
        steps = list(range(1, len(sq["edits"]) + 1))
        for k, l in enumerate(sq["layers"][:-1] or sq["layers"]):
            axes[2].plot(steps, sq["error"][str(l)], marker="o", color=f"C{k}", label=f"layer {l}, this batch")
            axes[2].plot(steps, sq["cumulative"][str(l)], ls="--", color=f"C{k}", label=f"layer {l}, cumulative")
        axes[2].set_xticks(steps)
        axes[2].set_xlabel(f"batch t of the sequence ({sq['batch_size']} edits each, earlier batches applied)")
        axes[2].set_title("(5) weight deviation vs sequential length", fontsize=9)
        axes[2].legend(fontsize=6)
        for ax in axes:
            ax.grid(alpha=0.3)
        save(fig, "deviation")
    if "tracing" in r:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        crit = r["tracing"].get("critical_layers", [])
        for kind, t in r["tracing"].items():
            if kind == "critical_layers":
                continue
            ax.plot(t["layers"], t["indirect_effect"], marker="o", ms=3, label=f"{kind} (window {t['window']})")
        if crit:
            ax.axvspan(min(crit) - 0.5, max(crit) + 0.5, color="orange", alpha=0.15, label="configured critical layers")
        ax.set_xlabel("layer")
        ax.set_ylabel("average indirect effect")
        ax.set_title("(6) causal tracing at the subject's last token", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "tracing")
    if "dynamic" in r:
        dy = r["dynamic"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        keys = ["efficacy", "generalization", "specificity"]
        x = np.arange(len(keys))
        for k, mode in enumerate(("pre", "fixed", "dynamic")):
            summ = dy[mode] if mode == "pre" else dy[mode]["summary"]
            axes[0].bar(x + (k - 1) * 0.27, [100 * (summ[m] or 0) for m in keys], 0.27, label=mode)
        axes[0].set_xticks(x, keys)
        axes[0].set_ylabel("x100")
        axes[0].legend(fontsize=7)
        axes[0].set_title(f"(7) fixed vs dynamic boundaries (N={dy['n']}, B={dy['batch_size']})", fontsize=9)
        pairs = [tuple(p) for p in dy["dynamic"]["layers_per_batch"]]
        uniq = sorted(set(pairs))
        axes[1].bar(range(len(uniq)), [pairs.count(u) for u in uniq])
        axes[1].set_xticks(range(len(uniq)), [str(list(u)) for u in uniq])
        axes[1].set_ylabel("batches")
        axes[1].set_title(f"chosen layers ({dy['criterion']}, window {dy['window']})", fontsize=9)
        save(fig, "dynamic")
    return written
