"""The sequential run: statistics, the unedited model's scores ("pre"), then every method from
the unedited weights, batch by batch with a checkpoint after each, and the outputs."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from blue_plugin.editing.editor import Editor
from blue_plugin.editing.state import get_state, reset_state
from blue_plugin.evaluation.data import load_cases
from blue_plugin.model.loading import load_model
from blue_plugin.stats.accumulate import effective_max_length
from blue_plugin.stats.importer import file_sha256

from benchmarks.common import (
    DEFAULT_HPARAMS,
    DEFAULT_MODEL,
    build_base_hparams,
    cuda_peak_mib,
    current_rss_mib,
    machine_info,
    method_hparams,
    peak_rss_mib,
    read_json,
    recorded_path,
    reset_peak_rss,
    resolve_data_arg,
    versions,
    write_json,
)
from benchmarks.sequential.checkpoints import (
    SessionCheckpoints,
    adopt_run_files,
    measured_once,
    open_progress,
    weights_digest,
)
from benchmarks.sequential.chunked import ChunkedEvaluation
from benchmarks.sequential.config import METRIC_LABELS, RESULTS_FILE, SCHEMA_VERSION, SequentialConfig
from benchmarks.sequential.costs import batch_costs, prepare_statistics, steps_per_layer
from benchmarks.sequential.curves import CurvePlan, evaluate_point, heldout_eval, point_from_scores, select_heldout
from benchmarks.sequential.evaluate import evaluate_cases, pre_locality, summarize
from benchmarks.sequential.kept import KEPT_DIR, KeptBatches, check_kept, discard_kept, keep_finished, restore_kept
from benchmarks.sequential.plots import make_plots
from benchmarks.sequential.report import blue_vs_base, paired_differences, render_table
from benchmarks.sequential.restraint import first_acting, restrains_sequence, serving_unrestrained, sigma_trace

logger = logging.getLogger("benchmarks.sequential")


class BenchmarkInterrupted(RuntimeError):
    """Raised by an ``on_batch`` callback to stop a run after a checkpoint (used by tests)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _model(cfg: SequentialConfig, model, tok) -> tuple[Any, Any, str]:
    """The run's model and tokenizer on ``cfg.device`` / ``cfg.dtype``, and its name."""
    if model is None:
        name = cfg.model_name or DEFAULT_MODEL
        model, tok = load_model(name, device=cfg.device, dtype=cfg.torch_dtype())
        return model, tok, name
    if cfg.device is not None:
        model.to(cfg.device)
    if cfg.dtype is not None:
        model.to(cfg.torch_dtype())
    return model, tok, str(getattr(model.config, "_name_or_path", "") or "<model object>")


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        from tqdm import tqdm
    return tqdm


def run_benchmark(
    config: Optional[SequentialConfig] = None,
    *,
    model: Any = None,
    tok: Any = None,
    on_batch: Optional[Callable[[str, int], None]] = None,
    **fields: Any,
) -> dict[str, Any]:
    """Run the sequential editing benchmark of ``config`` and write its outputs to ``config.out``.

    Args:
        config: the run (:class:`SequentialConfig`); ``**fields`` are fields of it, given instead
            (``run_benchmark(data=..., methods=..., n=..., batch_size=...)``) or changed in it.
        model, tok: an already loaded model and tokenizer (e.g. a test fixture). Its weights must
            be unedited; they are restored to their values at the start before this returns.
            None: load ``config.model_name``.
        on_batch: called as ``on_batch(method, batches_done)`` after each saved checkpoint, with
            the model in its edited state (a test hook; raising stops the run, progress is kept).

    Returns:
        the content of ``out/results.json`` plus ``"paths"`` (the files written).

    Raises:
        ValueError: bad arguments, or ``out`` holding progress of a different configuration
            (pass ``restart=True`` or another ``out``).
    """
    cfg = SequentialConfig(**fields) if config is None else config.replace(**fields)
    method_list = cfg.validate()
    if (model is None) != (tok is None):
        raise ValueError("pass both model and tok, or neither (then the model is loaded by name)")
    if model is not None and cfg.model_name is not None:
        raise ValueError("pass either model/tok or model_name, not both")

    t_run = time.perf_counter()
    out = Path(cfg.out)
    data_path = resolve_data_arg(cfg.data).resolve()
    fmt, cases = load_cases(data_path, cfg.n)
    base_hp = build_base_hparams(cfg.hparams, cfg.batch_size, cfg.seed, cfg.mom2_n_samples, cfg.steps,
                                 cfg.stats_dir, cfg.overrides)
    model, tok, model_name = _model(cfg, model, tok)
    dev = next(model.parameters()).device
    seed_everything(cfg.seed)

    editor0 = Editor(model, tok, base_hp)
    layers = list(base_hp.layers)
    originals = {l: editor0.weight(l).detach().clone() for l in layers}
    if any(ls.post_fp is not None for ls in get_state(model).layers.values()):
        logger.warning("the model carries edits from earlier calls; the benchmark treats its current weights as unedited")
    reset_state(model)

    config = {
        "data": recorded_path(data_path),
        "data_sha256": file_sha256(data_path),
        "format": fmt,
        "n": cfg.n,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "model": model_name,
        "model_weights_digest": weights_digest(originals),
        "hparams_file": recorded_path(cfg.hparams if cfg.hparams is not None else DEFAULT_HPARAMS),
        "hparams": {k: v for k, v in base_hp.to_dict().items() if k not in ("base_method", "blue", "device", "stats_dir")},
        "fluency_tokens": cfg.fluency_tokens,
        "eval_every": cfg.eval_every,
        "eval_batch_size": cfg.eval_batch_size,
        "heldout_docs": cfg.heldout_docs,
        "curve_every": cfg.curve_every,
        "curve_cases": cfg.curve_cases,
        "curve_fluency_cases": cfg.curve_fluency_cases,
        "curve_heldout_docs": cfg.curve_heldout_docs,
    }
    if cfg.restart:
        discard_kept(out)
    elif not (out / "progress" / "config.json").is_file():
        check_kept(out, config)  # before anything is written to ``out``
    prog_dir, chash = open_progress(out, config, cfg.restart)
    restore_kept(out, config)  # what finished in an earlier run of this folder, elsewhere
    if cfg.pre_from is not None:
        adopt_run_files(prog_dir, Path(cfg.pre_from), chash)
    logger.info("checkpoints: blue_plugin.editing.session.EditSession")

    def evaluate(sub_cases, loc) -> list[dict[str, Any]]:
        return evaluate_cases(model, tok, fmt, sub_cases, loc, cfg.fluency_tokens, cfg.eval_batch_size,
                              cfg.gen_batch_size, chat_template=base_hp.use_chat_template)

    def pre_scores() -> dict[str, Any]:
        t0 = time.perf_counter()
        loc = pre_locality(model, tok, fmt, cases, cfg.eval_batch_size, base_hp.use_chat_template)
        loc_s = time.perf_counter() - t0
        scores, eval_s = pre_parts.scores("pre", cases, loc, evaluate)
        return {"scores": scores, "summary": summarize(scores, cfg.seed), "pre_locality": loc,
                "eval_time_s": loc_s + eval_s}

    def served_digest() -> str:
        return weights_digest({l: editor0.weight(l) for l in layers})

    pre_parts = ChunkedEvaluation(prog_dir, 0, served_digest, cfg.eval_chunk_cases)  # the unedited evaluation

    def restore() -> None:
        editor0.restore(originals)
        reset_state(model)

    ppl_length = effective_max_length(model, base_hp.mom2_max_length)
    plan = CurvePlan(cfg.n, cfg.seed, cfg.curve_every, cfg.curve_cases, cfg.curve_fluency_cases, cfg.curve_heldout_docs)
    heldout: Optional[dict[str, Any]] = None

    def heldout_scores() -> Optional[dict[str, Any]]:
        if heldout is None:
            return None
        return heldout_eval(model, tok, heldout["texts"], ppl_length, cfg.eval_batch_size, cfg.seed)

    def curve_point(done: int) -> dict[str, Any]:
        return evaluate_point(plan, done, model, tok, fmt, cases, pre.get("pre_locality"),
                              heldout["texts"] if heldout else None, fluency_tokens=cfg.fluency_tokens,
                              max_length=ppl_length, batch_size=cfg.eval_batch_size, gen_batch_size=cfg.gen_batch_size,
                              chat_template=base_hp.use_chat_template)

    method_results: dict[str, dict[str, Any]] = {}
    try:
        reset_peak_rss()
        stats_info = prepare_statistics(editor0, base_hp, cfg.measure_cold_stats, cfg.progress)
        stats_info["peak_rss_mib"] = peak_rss_mib()
        # the first invocation's timing is the one to report
        stats_first = measured_once(prog_dir / "statistics.json", lambda: stats_info)
        pre = measured_once(prog_dir / "pre.json", pre_scores)
        pre_parts.cleanup()
        pre_held = None
        if cfg.heldout_docs:  # chosen and measured on the unedited model, once per run
            heldout = measured_once(prog_dir / "heldout.json",
                                    lambda: select_heldout(model, tok, base_hp, cfg.heldout_docs, cfg.progress))
            pre_held = measured_once(prog_dir / "pre_heldout.json", heldout_scores)
            pre["summary"]["perplexity"] = pre_held["summary"]
        keep_finished(out)
        point0 = point_from_scores(plan, 0, "pre", pre["scores"], pre_held) if cfg.curve_every else None
        pre_peak = peak_rss_mib()  # statistics + pre evaluation
        for method in method_list:
            done_file = prog_dir / method / "done.json"
            if done_file.is_file():
                logger.info("%s: already finished in an earlier invocation", method)
                method_results[method] = read_json(done_file)
                continue
            restore()
            seed_everything(cfg.seed)
            hp = method_hparams(base_hp, method)
            ckpt = SessionCheckpoints(prog_dir / method, model, tok, hp, KeptBatches(out / KEPT_DIR / method),
                                      cfg.replay_tolerance)
            reset_peak_rss()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            restrains = restrains_sequence(hp)

            def method_point(done: int) -> dict[str, Any]:
                point = curve_point(done)
                if restrains:  # PRUNE: the same point on the unrestrained weights, where they differ
                    with serving_unrestrained(model, tok, hp) as acting:
                        if acting:
                            point["unrestrained"] = curve_point(done) | {"layers": acting}
                return point

            wall, curve, curves = _edit_batches(cfg, method, ckpt, cases, evaluate, pre.get("pre_locality"), on_batch,
                                                method_point if cfg.curve_every else None, plan)
            final = ChunkedEvaluation(prog_dir / method, cfg.n, served_digest, cfg.eval_chunk_cases)
            scores, eval_s = final.scores("served", cases, pre.get("pre_locality"), evaluate)
            summary = summarize(scores, cfg.seed)
            held = final.heldout("served", heldout_scores)
            if held is not None:
                summary["perplexity"] = held["summary"]
            restraint = None
            if restrains:
                trace = sigma_trace(get_state(model).history)
                restraint = {"sigma_trace": trace, "first_acting_n_edits": first_acting(trace), "final": None}
                with serving_unrestrained(model, tok, hp) as acting:
                    if acting:
                        u_scores, _ = final.scores("unrestrained", cases, pre.get("pre_locality"), evaluate)
                        u_held = final.heldout("unrestrained", heldout_scores)
                        u_summary = summarize(u_scores, cfg.seed)
                        if u_held is not None:
                            u_summary["perplexity"] = u_held["summary"]
                        restraint["final"] = {
                            "layers": acting, "summary": u_summary, "scores": u_scores, "heldout": u_held,
                            "restrained_minus_unrestrained": paired_differences(scores, u_scores, held, u_held, cfg.seed)}
            if cfg.eval_every is not None:
                curve.append({"n_edits": cfg.n, "summary": summary})
            if cfg.curve_every is not None:
                curves = [point0] + curves + [point_from_scores(plan, cfg.n, "final", scores, held)]
                if restraint and restraint["final"]:
                    fin = restraint["final"]
                    curves[-1]["unrestrained"] = point_from_scores(plan, cfg.n, "final", fin["scores"], fin["heldout"])
            history = get_state(model).history
            costs = batch_costs(history, wall)
            costs.update(steps_per_layer=steps_per_layer(history, hp.v_num_grad_steps), eval_time_s=eval_s,
                         heldout_eval_s=held["eval_s"] if held else None,
                         curve_eval_s=[p["eval_s"] for p in curves if p["source"] == "evaluated"],
                         peak_rss_mib=peak_rss_mib(), cuda_peak_mib=cuda_peak_mib())
            write_json(done_file, {
                "method": method, "base_method": hp.base_method, "blue": hp.blue, "edit_layers": hp.edit_layers,
                "summary": summary, "scores": scores, "curve": curve, "curves": curves, "heldout": held,
                "costs": costs, "history": history, "restraint": restraint,
                "checkpoints": ckpt.kind,
            })
            keep_finished(out)
            final.cleanup()
            if not cfg.keep_checkpoints:
                ckpt.cleanup()
            method_results[method] = read_json(done_file)  # same (JSON) form as a resumed method
            logger.info("%s: %s", method, {k: v["mean"] for k, v in summary.items()})
    finally:
        restore()

    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "sequential",
        "config": config | {"methods": method_list, "device": str(dev),
                            "dtype": str(next(model.parameters()).dtype), "stats_dir": base_hp.stats_dir},
        "config_hash": chash,
        "versions": versions(),
        "machine": machine_info(),
        "metrics": list(METRIC_LABELS),
        "scale_note": "values are fractions (fluency: entropy in bits); tables show x100",
        "pre": {"summary": pre["summary"], "scores": pre["scores"], "eval_time_s": pre.get("eval_time_s"),
                "heldout": pre_held},
        "heldout_documents": heldout["record"] if heldout else None,
        "curve_plan": plan.describe() if cfg.curve_every else None,
        "methods": method_results,
        "costs": {"statistics": stats_first,
                  "statistics_this_invocation": stats_info,
                  "peak_rss_mib_max": max([pre_peak] + [m["costs"]["peak_rss_mib"] for m in method_results.values()]),
                  "current_rss_mib": current_rss_mib(),
                  "invocation_wall_s": time.perf_counter() - t_run},
    }
    result["blue_vs_base"] = blue_vs_base(result)
    paths = {"results": str(write_json(out / RESULTS_FILE, result))}
    (out / "table.md").write_text(render_table(result), encoding="utf-8")
    paths["table"] = str(out / "table.md")
    if cfg.plots:
        paths.update(make_plots(result, out))
    result["paths"] = paths
    return result


def _edit_batches(cfg: SequentialConfig, method: str, ckpt: SessionCheckpoints, cases, evaluate, pre_loc,
                  on_batch, curve_point,
                  plan: CurvePlan) -> tuple[list[float], list[dict[str, Any]], list[dict[str, Any]]]:
    """Edit ``cases`` batch by batch from where ``ckpt`` left off, saving after each batch,
    evaluating the cases edited so far every ``cfg.eval_every`` edits and a curve point
    (``curve_point(n_edits)``, when given) where ``plan`` says one is due, after the batch's
    checkpoint (a point missing after a stop is taken on resuming). Returns the per-batch wall
    times, the curve of intermediate summaries and the curve points (saved ones first)."""
    n, bs = cfg.n, cfg.batch_size
    n_batches = (n + bs - 1) // bs
    meta = ckpt.resume(lambda b: [c.to_request() for c in cases[b * bs:(b + 1) * bs]])
    start = int(meta["batches_done"]) if meta else 0
    wall: list[float] = list(meta["batch_wall_s"]) if meta else []
    curve: list[dict[str, Any]] = list(meta["curve"]) if meta else []
    curves: list[dict[str, Any]] = list(meta.get("curves", [])) if meta else []

    def progress(batches: int) -> dict[str, Any]:
        return {"method": method, "batches_done": batches, "batch_wall_s": wall, "curve": curve, "curves": curves}

    def evaluations_due(b: int) -> bool:
        """The evaluations due after batch ``b`` (0-based) that are not recorded yet; True if any ran."""
        done, ran = min(n, (b + 1) * bs), False
        every = cfg.eval_every
        if (every is not None and done // every > (b * bs) // every and done < n
                and not any(c["n_edits"] == done for c in curve)):
            sc = evaluate(cases[:done], pre_loc[:done] if pre_loc else None)
            curve.append({"n_edits": done, "summary": summarize(sc, cfg.seed)})
            ran = True
        if curve_point is not None and plan.due(b * bs, done) and not any(c["n_edits"] == done for c in curves):
            curves.append(curve_point(done))
            ran = True
        return ran

    if meta:
        logger.info("%s: resuming after batch %d of %d", method, start, n_batches)
        if start and evaluations_due(start - 1):  # stopped between the batch's checkpoint and its evaluation
            ckpt.save_progress(progress(start))
    bar = _tqdm()(total=n_batches, initial=start, desc=method, unit="batch", disable=not cfg.progress)
    try:
        for b in range(start, n_batches):
            t0 = time.perf_counter()
            ckpt.apply([c.to_request() for c in cases[b * bs:(b + 1) * bs]])
            wall.append(time.perf_counter() - t0)
            done = min(n, (b + 1) * bs)
            ckpt.save(progress(b + 1))  # the edit is kept even if the process stops during the evaluations
            if evaluations_due(b):
                ckpt.save_progress(progress(b + 1))
            bar.update(1)
            bar.set_postfix(edits=done, s_per_batch=f"{wall[-1]:.1f}")
            if on_batch is not None:
                on_batch(method, b + 1)
    finally:
        bar.close()
    return wall, curve, curves
