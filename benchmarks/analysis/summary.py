"""``summary.md``: the key numbers of every analysis present in a result."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np


def fmt(x: Any, nd: int = 3) -> str:
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
              {f"{kind}, via {via}": (lambda l, v=via, k=kind: fmt(g(c[v][k]["mean"], l), 4))
               for via in ("hidden", "weight") for kind in ("distributed", "direct")})
    if "cosine" in r:
        c = r["cosine"]
        table("(2) Cosine similarity of distributed and direct residual", c["original"]["layers"],
              {f"{k} (mean +- std)": (lambda l, k=k: f"{fmt(g(c[k]['mean'], l))} +- {fmt(g(c[k]['std'], l))}") for k in c})
    if "single_layer" in r:
        s = r["single_layer"]
        table("(3) Single-layer editing efficacy (x100)", s["weight"]["layers"],
              {f"{kind}, via {via}": (lambda l, v=via, k=kind: fmt(100 * g(s[v][k], l) if g(s[v][k], l) is not None else None, 1))
               for via in ("weight", "hidden") for kind in ("distributed", "direct")})
        lines += [f"Unedited efficacy: {fmt(100 * s['weight']['efficacy_orig'] if s['weight']['efficacy_orig'] is not None else None, 1)}.", ""]
    if "steps" in r:
        s = r["steps"]
        table(f"(4) Mean optimisation steps (max {s['updated']['max_steps']})", s["updated"]["layers"],
              {"earlier layers updated": lambda l: fmt(g(s["updated"]["mean_steps"], l), 2),
               "unedited model": lambda l: fmt(g(s["unedited"]["mean_steps"], l), 2)})
    if "deviation" in r:
        d = r["deviation"]
        dist = d["distance"]
        table("(5) Residual deviation (relative to ||R^l||)", dist["layers"],
              {"distance L - l": lambda l: str(g(dist["distance"], l)),
               "||R^l - R^L||": lambda l: fmt(g(dist["mean"]["to_last_rel"], l)),
               "||R^l - R_dist||": lambda l: fmt(g(dist["mean"]["to_distributed_rel"], l))})
        bs = d["batch_size"]
        table("(5) Weight-deviation error ||dW(R_dist) - dW(R^l)||_F vs batch size", bs["layers"],
              {f"B={b}": (lambda l, b=b: fmt(g(bs["error"][str(b)], l), 4)) for b in bs["batch_sizes"]})
        sq = d["sequence"]
        table(f"(5) Weight-deviation error along a sequence (B={sq['batch_size']}): per batch / cumulative", sq["layers"],
              {f"batch {t + 1} ({e} earlier edits)": (lambda l, t=t: f"{fmt(g(sq['error'], l)[t], 4)} / {fmt(g(sq['cumulative'], l)[t], 4)}")
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
                      f"mean P_clean {fmt(float(np.mean(tr['p_clean'])))}, P_corrupt {fmt(float(np.mean(tr['p_corrupt'])))}; "
                      f"model's answer = true object in {sum(known)}/{len(known)} prompts; "
                      f"best windows {tr['suggested_layers']}."]
        lines += [f"- configured critical layers: {t.get('critical_layers')}", ""]
    if "dynamic" in r:
        dy = r["dynamic"]
        lines += [f"## (7) Fixed vs dynamic boundary layers (N={dy['n']}, B={dy['batch_size']}, criterion "
                  f"{dy['criterion']}, window {dy['window']})", "", "| | efficacy | generalization | specificity | time (s) |",
                  "|---|---|---|---|---|"]
        lines.append("| pre | " + " | ".join(fmt(100 * dy["pre"][k] if dy["pre"][k] is not None else None, 1)
                                            for k in ("efficacy", "generalization", "specificity")) + " | |")
        for mode in ("fixed", "dynamic"):
            s = dy[mode]["summary"]
            lines.append(f"| {mode} | " + " | ".join(fmt(100 * s[k] if s[k] is not None else None, 1)
                                                   for k in ("efficacy", "generalization", "specificity"))
                         + f" | {fmt(dy[mode]['time_s'], 1)} |")
        lines += ["", f"Layers chosen per batch: {dy['dynamic']['layers_per_batch']}", ""]
    lines += ["## Timings (s)", ""] + [f"- {k}: {fmt(v, 1)}" for k, v in result.get("timings", {}).items()] + [""]
    return "\n".join(lines)
