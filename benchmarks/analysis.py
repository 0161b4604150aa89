"""The BLUE paper's residual-distribution analyses, causal tracing and dynamic boundary layers,
for one model and config (default: the embedded SmolLM2-135M-Instruct and its YAML).

Analyses (``--what``, comma-separated; ``all`` = every one):

``contribution``  (1) contribution score per critical layer, distributed vs direct residual,
                  applied to the hidden state (the paper's procedure) and as a weight update;
``cosine``        (2) cosine similarity of the distributed and the directly computed residual;
``single_layer``  (3) efficacy of editing one layer with the direct vs the distributed residual;
``steps``         (4) target-optimisation steps per layer, layer by layer with earlier layers
                  updated (and, as a baseline, on the unedited model);
``deviation``     (5) residual deviation vs distribution distance, weight-deviation error vs batch
                  size and vs sequential edit length;
``tracing``       (6) causal tracing (average indirect effect of MLP outputs, and of the other
                  kinds given in ``--trace-kinds``) with suggested critical layers;
``dynamic``       (7) sequential CounterFact edits with fixed vs dynamically chosen boundary layers.

Definitions: :mod:`blue_plugin.research.analysis`, :mod:`blue_plugin.research.tracing`, :mod:`blue_plugin.editing.selection`.
Outputs in ``--out``: ``analysis.json`` (config, versions, machine, timings, every result),
``summary.md`` and one PNG per analysis. A finished analysis is kept in ``analysis.json`` and
skipped when the command runs again with the same settings (other ``--what`` lists add to the same
folder; ``--restart`` recomputes everything).

Examples::

    python -m benchmarks.analysis --what all --n 50 --out benchmarks/results/analysis/smollm2-135m
    python -m benchmarks.analysis --what contribution,cosine --n 2 --steps 5 --mom2-n-samples 50 \\
        --trace-n 2 --out /tmp/analysis-smoke --smoke
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import DEFAULT_CF_DATA as DEFAULT_DATA
from benchmarks.common import DEFAULT_HPARAMS, DEFAULT_MODEL, REPO_ROOT, machine_info, read_json, versions, write_json

logger = logging.getLogger("benchmarks.analysis")

ANALYSES = ("contribution", "cosine", "single_layer", "steps", "deviation", "tracing", "dynamic")
DEFAULT_WHAT = ANALYSES[:-1]
RESULTS_FILE = "analysis.json"
SCHEMA_VERSION = 1


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def parse_what(spec: str) -> list[str]:
    """``"cosine,steps"`` / ``"all"`` -> analysis names in canonical order."""
    items = [s.strip().lower().replace("-", "_") for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--what needs at least one of {', '.join(ANALYSES)} (or 'all')")
    if "all" in items:
        return list(ANALYSES)
    unknown = [s for s in items if s not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {unknown}; choose from {', '.join(ANALYSES)} or 'all'")
    return [a for a in ANALYSES if a in items]


def parse_int_list(spec: str, name: str) -> list[int]:
    """``"1,2,5"`` or a range ``"0-8"`` -> a list of ints."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"{name}: expected integers such as '1,2,5' or '0-8', got {spec!r}") from None
    if not out:
        raise ValueError(f"{name}: give at least one integer, got {spec!r}")
    return out


def _resolve_corpus(corpus: str) -> str:
    p = Path(os.path.expanduser(corpus))
    if p.is_absolute() or p.exists():
        return corpus
    candidate = (REPO_ROOT / p).resolve()
    return str(candidate) if candidate.exists() else corpus


def build_hparams(args) -> Any:
    from benchmarks.sequential import parse_overrides
    from blue_plugin.hparams import BLUEHyperParams

    hp = BLUEHyperParams.from_hparams(args.hparams or DEFAULT_HPARAMS)
    changes: dict[str, Any] = {"seed": args.seed, "mom2_dataset": _resolve_corpus(hp.mom2_dataset)}
    if args.steps is not None:
        changes["v_num_grad_steps"] = args.steps
    if args.mom2_n_samples is not None:
        changes["mom2_n_samples"] = args.mom2_n_samples
    if args.stats_dir is not None:
        changes["stats_dir"] = args.stats_dir
    changes.update(parse_overrides(args.set))
    return hp.replace(**changes)


def valid_requests(tok, hp, cases: Sequence[Any]) -> tuple[list[dict], list[Any]]:
    """The cases whose edit requests the engine accepts (others are logged and skipped)."""
    from blue_plugin.editing.requests import prepare_requests

    reqs, kept = [], []
    for c in cases:
        r = c.to_request()
        try:
            prepare_requests(tok, [r], hp)
        except ValueError as exc:
            logger.warning("skipping case %r: %s", c.case_id, exc)
            continue
        reqs.append(r)
        kept.append(c)
    return reqs, kept


# ------------------------------------------------------------------------------------------------
# analyses
# ------------------------------------------------------------------------------------------------
def _strip(obj: Any) -> Any:
    """Drop tensors (kept out of the JSON)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def run_dynamic(model, tok, hp, cases, batch_size: int, criterion: str, window: int) -> dict[str, Any]:
    """Sequential CounterFact edits in batches of ``batch_size`` with BLUE's fixed boundary layers
    (``layers[0]``, ``layers[-1]``) and with ``layer_selection: dynamic`` (the engine chooses them
    per batch), each from the unedited model in a scratch state; efficacy / generalization /
    specificity of all cases at the end of each run, and the layers the engine chose."""
    from blue_plugin.research.analysis import scratch_state, weights_restored
    from blue_plugin.editing.editor import Editor
    from blue_plugin.evaluation.metrics import counterfact_case_scores
    from blue_plugin.editing.selection import window_layers
    from blue_plugin.editing.state import get_state

    dyn_hp = hp.replace(blue=True, layer_selection="dynamic", dynamic_window=window, dynamic_criterion=criterion)
    fixed_hp = dyn_hp.replace(layer_selection="all")
    touched = sorted(set(window_layers(dyn_hp)) | set(fixed_hp.edit_layers))
    base = Editor(model, tok, fixed_hp)
    base.ensure_second_moments(touched)
    batches = [cases[s:s + batch_size] for s in range(0, len(cases), batch_size)]

    def summary(scores):
        keys = ("efficacy", "generalization", "specificity")
        return {k: float(np.mean([s[k] for s in scores if s[k] is not None])) if any(s[k] is not None for s in scores) else None for k in keys}

    out: dict[str, Any] = {"batch_size": batch_size, "criterion": criterion, "window": window, "n": len(cases),
                           "pre": summary(counterfact_case_scores(model, tok, cases))}
    for mode, mode_hp in (("fixed", fixed_hp), ("dynamic", dyn_hp)):
        state = scratch_state(get_state(model))
        editor = Editor(model, tok, mode_hp, state)
        t0 = time.perf_counter()
        with weights_restored(base, touched):
            for batch in batches:
                editor.apply([c.to_request() for c in batch])
            scores = counterfact_case_scores(model, tok, cases)
        records = state.history[-len(batches):]
        out[mode] = {"summary": summary(scores), "layers_per_batch": [list(r["layers"]) for r in records],
                     "time_s": time.perf_counter() - t0, "edit_time_s": sum(r["time"]["total"] for r in records),
                     "mean_steps": {str(l): float(np.mean([np.mean(r["steps"][l]) for r in records if l in r["steps"]]))
                                    for l in sorted({l for r in records for l in r["steps"]})},
                     "selection": [r.get("layer_selection") for r in records], "scores": scores}
        logger.info("dynamic comparison: %s -> %s", mode, out[mode]["summary"])
    return out


def run_analysis(name: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Compute one analysis; ``ctx`` holds the model, tokenizer, hparams, requests and options."""
    from blue_plugin.research import analysis as A
    from blue_plugin.research import tracing as T

    model, tok, hp, reqs, args = ctx["model"], ctx["tok"], ctx["hp"], ctx["requests"], ctx["args"]

    def shared():
        if "residuals" not in ctx:
            t0 = time.perf_counter()
            ctx["residuals"] = A.residual_analysis(model, tok, hp, reqs)
            ctx["residuals_time"] = time.perf_counter() - t0
        return ctx["residuals"]

    def effects(via):
        key = f"effects_{via}"
        if key not in ctx:
            kw = {"batch_size": args.batch_size} if via == "weight" else {}
            ctx[key] = A.single_layer_effects(model, tok, hp, reqs, analysis=shared(), via=via, **kw)
        return ctx[key]

    if name == "contribution":
        return {via: A.contribution_scores(model, tok, hp, reqs, via=via, effects=effects(via)) for via in ("hidden", "weight")} | {
            "residuals": A.summarize_analysis(shared())}
    if name == "cosine":
        out = {"original": A.residual_cosine(model, tok, hp, reqs, analysis=shared())}
        if args.sequential_cosine:
            out["sequential"] = A.residual_cosine(model, tok, hp, reqs, sequential=True)
        return out
    if name == "single_layer":
        return {via: A.single_layer_efficacy(model, tok, hp, reqs, via=via, effects=effects(via)) for via in ("weight", "hidden")}
    if name == "steps":
        return {"updated": A.optimisation_steps(model, tok, hp, reqs, update=True),
                "unedited": A.optimisation_steps(model, tok, hp, reqs, update=False)}
    if name == "deviation":
        dev_layers = parse_int_list(args.deviation_layers, "--deviation-layers") if args.deviation_layers else None
        if dev_layers and dev_layers != list(hp.layers):
            a_dist = A.residual_analysis(model, tok, hp, reqs, layers=dev_layers)
        else:
            a_dist = shared()
        sizes = [b for b in parse_int_list(args.batch_sizes, "--batch-sizes") if b <= len(reqs)] or [len(reqs)]
        seq_n = min(len(ctx["seq_requests"]), args.seq_batches * args.seq_batch_size)
        return {"distance": A.residual_deviation(model, tok, hp, reqs, analysis=a_dist),
                "batch_size": A.weight_deviation_vs_batch_size(model, tok, hp, reqs, sizes, analysis=shared()),
                "sequence": A.weight_deviation_vs_sequence(model, tok, hp, ctx["seq_requests"][:seq_n], args.seq_batch_size)}
    if name == "tracing":
        out = {}
        for kind in [k.strip() for k in args.trace_kinds.split(",") if k.strip()]:
            out[kind] = T.causal_trace(model, tok, hp, ctx["trace_requests"], kind=kind, window=args.trace_window,
                                       samples=args.trace_samples, seed=args.seed)
        out["critical_layers"] = list(hp.layers)
        return out
    if name == "dynamic":
        return run_dynamic(model, tok, hp, ctx["dynamic_cases"], args.dynamic_batch_size, args.dynamic_criterion, args.dynamic_window)
    raise ValueError(f"unknown analysis {name!r}")


# ------------------------------------------------------------------------------------------------
# plots and summary
# ------------------------------------------------------------------------------------------------
def _layer_vals(d: dict, layers: Sequence[int]) -> list[float]:
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
            bars(ax, layers, {k: (_layer_vals(c[k]["mean"], layers), _layer_vals(c[k]["std"], layers)) for k in ("distributed", "direct")},
                 "P_edited(o*) - P_orig(o*)")
            ax.set_title(f"(1) contribution, residual applied via {via}", fontsize=9)
        save(fig, "contribution")
    if "cosine" in r:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        series = {}
        for k, c in r["cosine"].items():
            series[k] = (_layer_vals(c["mean"], c["layers"]), _layer_vals(c["std"], c["layers"]))
        bars(ax, r["cosine"]["original"]["layers"], series, "cos(R^L/(m-i+1), R^l)")
        ax.set_title("(2) distributed vs direct residual", fontsize=9)
        save(fig, "cosine")
    if "single_layer" in r:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, via in zip(axes, ("weight", "hidden")):
            s = r["single_layer"][via]
            bars(ax, s["layers"], {k: ([100 * v for v in _layer_vals(s[k], s["layers"])], None) for k in ("distributed", "direct")},
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
        bars(ax, layers, {"earlier layers updated": (_layer_vals(s["updated"]["mean_steps"], layers), None),
                          "unedited model": (_layer_vals(s["unedited"]["mean_steps"], layers), None)}, "mean optimisation steps")
        ax.set_title(f"(4) steps layer by layer (max {s['updated']['max_steps']})", fontsize=9)
        save(fig, "steps")
    if "deviation" in r:
        d = r["deviation"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        dist = d["distance"]
        layers = dist["layers"]
        xs = [dist["distance"][str(l)] if str(l) in dist["distance"] else dist["distance"][l] for l in layers]
        for key, name in (("to_last_rel", "||R^l - R^L|| / ||R^l||"), ("to_distributed_rel", "||R^l - R_dist|| / ||R^l||")):
            axes[0].plot(xs, _layer_vals(dist["mean"][key], layers), marker="o", label=name)
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


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def render_summary(result: dict[str, Any]) -> str:
    """Markdown with the key numbers of every analysis present."""
    cfg, r = result["config"], result["results"]
    lines = [f"# Residual-distribution analysis: {Path(str(cfg['model'])).name}", ""]
    if cfg.get("smoke"):
        lines += ["**SMOKE OUTPUT** -- tiny settings to check that the pipeline runs; the numbers mean nothing.", ""]
    lines += [f"Critical layers {cfg['hparams']['layers']}, base method {cfg['hparams']['base_method']}, "
              f"{cfg['n_requests']} CounterFact requests from `{Path(cfg['data']).name}`, "
              f"v_num_grad_steps {cfg['hparams']['v_num_grad_steps']}, mom2_n_samples {cfg['hparams']['mom2_n_samples']}.", ""]

    def table(title, layers, rows: dict[str, Callable[[Any], str]]):
        lines.extend([f"## {title}", "", "| | " + " | ".join(f"layer {l}" for l in layers) + " |",
                      "|---|" + "---|" * len(layers)])
        for name, fn in rows.items():
            lines.append(f"| {name} | " + " | ".join(fn(l) for l in layers) + " |")
        lines.append("")

    g = lambda d, l: d.get(str(l), d.get(l))
    if "contribution" in r:
        c = r["contribution"]
        table("(1) Contribution score P_edited(o*) - P_orig(o*)", c["hidden"]["layers"],
              {f"{kind}, via {via}": (lambda l, v=via, k=kind: _f(g(c[v][k]["mean"], l), 4))
               for via in ("hidden", "weight") for kind in ("distributed", "direct")})
    if "cosine" in r:
        c = r["cosine"]
        table("(2) Cosine similarity of distributed and direct residual", c["original"]["layers"],
              {f"{k} (mean +- std)": (lambda l, k=k: f"{_f(g(c[k]['mean'], l))} +- {_f(g(c[k]['std'], l))}") for k in c})
    if "single_layer" in r:
        s = r["single_layer"]
        table("(3) Single-layer editing efficacy (x100)", s["weight"]["layers"],
              {f"{kind}, via {via}": (lambda l, v=via, k=kind: _f(100 * g(s[v][k], l) if g(s[v][k], l) is not None else None, 1))
               for via in ("weight", "hidden") for kind in ("distributed", "direct")})
        lines += [f"Unedited efficacy: {_f(100 * s['weight']['efficacy_orig'] if s['weight']['efficacy_orig'] is not None else None, 1)}.", ""]
    if "steps" in r:
        s = r["steps"]
        table(f"(4) Mean optimisation steps (max {s['updated']['max_steps']})", s["updated"]["layers"],
              {"earlier layers updated": lambda l: _f(g(s["updated"]["mean_steps"], l), 2),
               "unedited model": lambda l: _f(g(s["unedited"]["mean_steps"], l), 2)})
    if "deviation" in r:
        d = r["deviation"]
        dist = d["distance"]
        table("(5) Residual deviation (relative to ||R^l||)", dist["layers"],
              {"distance L - l": lambda l: str(g(dist["distance"], l)),
               "||R^l - R^L||": lambda l: _f(g(dist["mean"]["to_last_rel"], l)),
               "||R^l - R_dist||": lambda l: _f(g(dist["mean"]["to_distributed_rel"], l))})
        bs = d["batch_size"]
        table("(5) Weight-deviation error ||dW(R_dist) - dW(R^l)||_F vs batch size", bs["layers"],
              {f"B={b}": (lambda l, b=b: _f(g(bs["error"][str(b)], l), 4)) for b in bs["batch_sizes"]})
        sq = d["sequence"]
        table(f"(5) Weight-deviation error along a sequence (B={sq['batch_size']}): per batch / cumulative", sq["layers"],
              {f"batch {t + 1} ({e} earlier edits)": (lambda l, t=t: f"{_f(g(sq['error'], l)[t], 4)} / {_f(g(sq['cumulative'], l)[t], 4)}")
               for t, e in enumerate(sq.get("edits_before", [])) })
    if "tracing" in r:
        t = r["tracing"]
        lines += ["## (6) Causal tracing", ""]
        for kind, tr in t.items():
            if kind == "critical_layers":
                continue
            peak = int(np.argmax(tr["indirect_effect"]))
            known = [k for k in tr["known"] if k is not None]
            lines += [f"- {kind} (window {tr['window']}, {tr['samples']} noise samples, noise {tr['noise']:.4f} = "
                      f"{tr['noise_scale']} x sigma): peak AIE {tr['indirect_effect'][peak]:.4f} at layer {peak}; "
                      f"mean P_clean {_f(float(np.mean(tr['p_clean'])))}, P_corrupt {_f(float(np.mean(tr['p_corrupt'])))}; "
                      f"model's answer = true object in {sum(known)}/{len(known)} prompts; "
                      f"best windows {tr['suggested_layers']}."]
        lines += [f"- configured critical layers: {t.get('critical_layers')}", ""]
    if "dynamic" in r:
        dy = r["dynamic"]
        lines += [f"## (7) Fixed vs dynamic boundary layers (N={dy['n']}, B={dy['batch_size']}, criterion "
                  f"{dy['criterion']}, window {dy['window']})", "", "| | efficacy | generalization | specificity | time (s) |",
                  "|---|---|---|---|---|"]
        lines.append("| pre | " + " | ".join(_f(100 * dy["pre"][k] if dy["pre"][k] is not None else None, 1)
                                            for k in ("efficacy", "generalization", "specificity")) + " | |")
        for mode in ("fixed", "dynamic"):
            s = dy[mode]["summary"]
            lines.append(f"| {mode} | " + " | ".join(_f(100 * s[k] if s[k] is not None else None, 1)
                                                   for k in ("efficacy", "generalization", "specificity"))
                         + f" | {_f(dy[mode]['time_s'], 1)} |")
        lines += ["", f"Layers chosen per batch: {dy['dynamic']['layers_per_batch']}", ""]
    lines += ["## Timings (s)", ""] + [f"- {k}: {_f(v, 1)}" for k, v in result.get("timings", {}).items()] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.analysis", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default=",".join(DEFAULT_WHAT), help=f"comma-separated from {', '.join(ANALYSES)}, or 'all' (default: all but dynamic)")
    p.add_argument("--n", type=int, default=20, help="CounterFact requests for analyses 1-5 (default 20)")
    p.add_argument("--out", required=True, help="output folder (analysis.json, summary.md, PNGs)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CounterFact JSON (any format blue_plugin.evaluation.data reads)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model name or local HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--hparams", default=None, help=f"YAML (default {DEFAULT_HPARAMS.relative_to(REPO_ROOT)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter (repeatable)")
    p.add_argument("--device", default=None, help="move the model here, e.g. cuda (default: the CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps")
    p.add_argument("--mom2-n-samples", type=int, default=None, help="override mom2_n_samples")
    p.add_argument("--stats-dir", default=None, help="override stats_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="requests per weight update in (1)/(3) (default: the YAML's batch_size)")
    p.add_argument("--sequential-cosine", action="store_true", help="(2) also with the original method's sequential updates")
    p.add_argument("--batch-sizes", default="1,2,5,10,20", help="(5) batch sizes (<= --n)")
    p.add_argument("--seq-batches", type=int, default=5, help="(5) sequence length in batches")
    p.add_argument("--seq-batch-size", type=int, default=5, help="(5) batch size of the sequence")
    p.add_argument("--deviation-layers", default=None, help="(5) layers for the distance plot, e.g. '0-8' (default: critical layers)")
    p.add_argument("--trace-n", type=int, default=None, help="(6) prompts to trace (default --n)")
    p.add_argument("--trace-samples", type=int, default=10, help="(6) noise samples per prompt")
    p.add_argument("--trace-window", type=int, default=1, help="(6) layers restored together (ROME uses 10 for MLP)")
    p.add_argument("--trace-kinds", default="mlp", help="(6) comma-separated from mlp, attn, hidden")
    p.add_argument("--dynamic-n", type=int, default=None, help="(7) cases edited sequentially (default --n)")
    p.add_argument("--dynamic-batch-size", type=int, default=5, help="(7) batch size")
    p.add_argument("--dynamic-criterion", default="residual_norm", help="(7) residual_norm, steps or update_norm")
    p.add_argument("--dynamic-window", type=int, default=1, help="(7) dynamic_window")
    p.add_argument("--smoke", action="store_true", help="label the outputs as a smoke test")
    p.add_argument("--restart", action="store_true", help="recompute analyses already in --out")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    what = parse_what(args.what)
    for name in ("n", "seq_batches", "seq_batch_size", "trace_samples", "trace_window", "dynamic_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from blue_plugin.evaluation.data import load_cases
    from blue_plugin.model.loading import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=dtype)
    hp = build_hparams(args)
    if args.batch_size is None:
        args.batch_size = hp.batch_size
    n_cases = max(args.n, args.trace_n or 0, args.dynamic_n or 0, args.seq_batches * args.seq_batch_size)
    _, cases = load_cases(args.data, n_cases)
    requests, kept = valid_requests(tok, hp, cases)
    config = {
        "schema_version": SCHEMA_VERSION, "model": args.model, "data": args.data, "n_requests": min(args.n, len(requests)),
        "hparams": hp.to_dict(), "seed": args.seed, "smoke": args.smoke, "device": str(next(model.parameters()).device),
    }
    options = {  # per analysis: a stored result is reused only when its options are the same
        "contribution": {"batch_size": args.batch_size},
        "cosine": {"sequential_cosine": args.sequential_cosine},
        "single_layer": {"batch_size": args.batch_size},
        "steps": {},
        "deviation": {"batch_sizes": args.batch_sizes, "seq": [args.seq_batches, args.seq_batch_size],
                      "deviation_layers": args.deviation_layers},
        "tracing": {"n": args.trace_n or args.n, "samples": args.trace_samples, "window": args.trace_window,
                    "kinds": args.trace_kinds},
        "dynamic": {"n": args.dynamic_n or args.n, "batch_size": args.dynamic_batch_size,
                    "criterion": args.dynamic_criterion, "window": args.dynamic_window},
    }
    path = out / RESULTS_FILE
    result: dict[str, Any] = {"config": config, "options": {}, "results": {}, "timings": {"load_model_s": time.perf_counter() - t0}}
    if path.is_file() and not args.restart:
        old = read_json(path)
        if old.get("config", {}) == read_json_roundtrip(config):
            same = {k for k, v in old.get("results", {}).items()
                    if old.get("options", {}).get(k) == read_json_roundtrip(options.get(k))}
            result["results"] = {k: old["results"][k] for k in same}
            result["options"] = {k: old["options"][k] for k in same}
            result["timings"] = {**{k: v for k, v in old.get("timings", {}).items()}, **result["timings"]}
            logger.info("reusing finished analyses: %s", sorted(same))
        else:
            logger.warning("%s holds results of another model/data/hyperparameters; they are replaced", path)
    result["versions"], result["machine"] = versions(), machine_info()
    ctx = {"model": model, "tok": tok, "hp": hp, "args": args, "requests": requests[: args.n],
           "seq_requests": requests, "trace_requests": requests[: args.trace_n or args.n],
           "dynamic_cases": kept[: args.dynamic_n or args.n]}
    for name in what:
        if name in result["results"]:
            continue
        logger.info("running %s", name)
        t1 = time.perf_counter()
        result["results"][name] = _strip(run_analysis(name, ctx))
        result["options"][name] = options[name]
        result["timings"][f"{name}_s"] = time.perf_counter() - t1
        if "residuals_time" in ctx:
            result["timings"]["residual_analysis_s"] = ctx["residuals_time"]
        write_json(path, result)
    result = read_json(path)  # JSON form (string keys) for plots and summary
    if not args.no_plots:
        label = f"{Path(str(args.model)).name}, layers {hp.layers}, n={config['n_requests']}" + (" -- SMOKE (tiny settings)" if args.smoke else "")
        result["plots"] = make_plots(result["results"], out, label)
        write_json(path, result)
    (out / "summary.md").write_text(render_summary(result), encoding="utf-8")
    logger.info("wrote %s, summary.md and plots to %s", RESULTS_FILE, out)
    return 0


def read_json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (to compare a config with a stored one)."""
    import json

    from benchmarks.common import jsonable

    return json.loads(json.dumps(jsonable(obj)))


if __name__ == "__main__":
    sys.exit(main())
