"""The analyses themselves (:mod:`blue_plugin.research`), one call each, and the fixed vs dynamic
boundary-layer comparison."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from blue_plugin.editing.editor import Editor
from blue_plugin.editing.selection import window_layers
from blue_plugin.editing.state import get_state
from blue_plugin.evaluation.metrics import counterfact_case_scores
from blue_plugin.research import analysis as A
from blue_plugin.research import tracing as T
from blue_plugin.research.analysis import scratch_state, weights_restored

from benchmarks.analysis.config import parse_int_list

logger = logging.getLogger("benchmarks.analysis")


def strip_tensors(obj: Any) -> Any:
    """Drop tensors (kept out of the JSON)."""
    if isinstance(obj, dict):
        return {k: strip_tensors(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if isinstance(obj, list):
        return [strip_tensors(v) for v in obj]
    return obj


def run_dynamic(model, tok, hp, cases, batch_size: int, criterion: str, window: int) -> dict[str, Any]:
    """Sequential CounterFact edits in batches of ``batch_size`` with BLUE's fixed boundary layers
    (``layers[0]``, ``layers[-1]``) and with ``layer_selection: dynamic`` (the engine chooses them
    per batch), each from the unedited model in a scratch state; efficacy / generalization /
    specificity of all cases at the end of each run, and the layers the engine chose."""
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
