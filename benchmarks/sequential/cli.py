"""``python -m benchmarks.sequential``: the command line of the sequential benchmark."""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

import torch

from benchmarks.common import DEFAULT_HPARAMS, DEFAULT_MODEL, METHODS, REPO_ROOT, parse_overrides
from benchmarks.sequential.config import CHECKPOINT_CHOICES, DTYPES, SequentialConfig
from benchmarks.sequential.evidence import write_evidence
from benchmarks.sequential.kept import KEPT_DIR, keep_finished, keep_results
from benchmarks.sequential.report import compare_runs, render_table
from benchmarks.sequential.status import write_status
from benchmarks.sequential.run import run_benchmark

DESCRIPTION = "Sequential batch editing benchmark (the BLUE paper's protocol), all methods side by side."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sequential", description=DESCRIPTION,
                                epilog="Methods: " + ", ".join(METHODS))
    p.add_argument("--data", help="dataset JSON (CounterFact EasyEdit/ROME format, or zsRE; format detected), or a "
                   "dataset name: counterfact, zsre (found via $BLUE_PLUGIN_DATA or the cache, else downloaded)")
    p.add_argument("--methods", help="comma-separated, e.g. MEMIT,MEMIT_BLUE,AlphaEdit,AlphaEdit_BLUE")
    p.add_argument("--n", type=int, help="number of edits (the first N cases of the file)")
    p.add_argument("--batch-size", type=int, help="edits per batch B")
    p.add_argument("--seed", type=int, default=0, help="seed (RNGs, context prefixes, bootstrap); default 0")
    p.add_argument("--out", required=True, help="output folder (also holds the resumable progress)")
    p.add_argument("--hparams", default=None, help=f"YAML (default {DEFAULT_HPARAMS.relative_to(REPO_ROOT)})")
    p.add_argument("--model", default=None, help=f"embedded model name or local HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="move the model here, e.g. cuda, cuda:1, cpu (default: where it loads, the CPU)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="model dtype (default: checkpoint's)")
    p.add_argument("--mom2-n-samples", type=int, default=None, help="override mom2_n_samples (documents for C0)")
    p.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps")
    p.add_argument("--stats-dir", default=None, help="override stats_dir (cache of the key statistics)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any hyperparameter of the YAML (value parsed as YAML), e.g. --set L2=80; repeatable")
    p.add_argument("--fluency-tokens", type=int, default=100, help="new tokens per greedy generation (0: no fluency); default 100")
    p.add_argument("--eval-every", type=int, default=None, help="also evaluate all edited-so-far cases every K edits (curve plot)")
    p.add_argument("--heldout-docs", type=int, default=500,
                   help="documents of the C0 corpus held out from C0 for the held-out perplexity of the unedited and "
                        "every final model (0: none); default 500")
    p.add_argument("--curve-every", type=int, default=None,
                   help="a curve point every K edits: efficacy, generalization, specificity on a seeded sample of the "
                        "cases edited so far, fluency on part of it, held-out perplexity; plus points 0 and N")
    p.add_argument("--curve-cases", type=int, default=200, help="cases per curve point (default 200)")
    p.add_argument("--curve-fluency-cases", type=int, default=50,
                   help="of those, cases whose fluency a curve point measures (default 50)")
    p.add_argument("--curve-heldout-docs", type=int, default=None,
                   help="held-out documents per curve point, the first of --heldout-docs (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="prompts per forward pass in evaluation")
    p.add_argument("--gen-batch-size", type=int, default=16, help="prompts per generate() call for fluency")
    p.add_argument("--eval-chunk-cases", type=int, default=100,
                   help="evaluations of all cases save their scores every this many cases (resumable within them)")
    p.add_argument("--measure-cold-stats", action="store_true", help="also time a statistics pass without cache")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the saved sessions of finished methods")
    p.add_argument("--replay-tolerance", type=float, default=1e-3,
                   help="a method replaying its kept batches on another machine continues when a batch's weights "
                        "differ from the kept run's by at most this fraction of their change (0: bit-identical "
                        "only); default 1e-3")
    p.add_argument("--restart", action="store_true", help="discard progress in --out instead of resuming")
    p.add_argument("--pre-from", default=None, metavar="DIR",
                   help="take the unedited evaluation (and statistics timing, held-out documents) from the --out folder "
                        "of another run of the same configuration, e.g. the other pair of methods, instead of measuring it")
    p.add_argument("--checkpoints", default="session", choices=list(CHECKPOINT_CHOICES),
                   help="progress format: blue_plugin.editing.session.EditSession (the only one; 'auto' means the "
                        "same, the former 'local' format was removed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR", help="merge earlier runs into one table in --out")
    p.add_argument("--evidence", nargs="+", default=None, metavar="DIR",
                   help="write the evidence summary of finished runs (BLUE minus base: better / worse / tie by the "
                        "95%% interval) to --out/evidence.md")
    p.add_argument("--evidence-points", default="", metavar="N,N",
                   help="with --evidence: also the curve points after these numbers of edits, e.g. 200,1000")
    p.add_argument("--status", action="store_true",
                   help="say where the run in --out stands (methods, batches, curve points so far) without running it; "
                        "writes --out/status.md and status.json, and copies finished measurements to --out/kept")
    p.add_argument("--keep-results", action="store_true",
                   help="copy the finished methods of --out/results.json to --out/kept (for a folder whose methods "
                        "finished before kept/ existed), so that a run of the folder's other methods, or the pair's "
                        "command, restores them instead of editing again; runs nothing")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def config_from_args(args: argparse.Namespace) -> SequentialConfig:
    """The :class:`SequentialConfig` of parsed command-line arguments."""
    return SequentialConfig(
        data=args.data, methods=args.methods, n=args.n, batch_size=args.batch_size, seed=args.seed,
        out=args.out, hparams=args.hparams, model_name=args.model, device=args.device, dtype=args.dtype,
        mom2_n_samples=args.mom2_n_samples, steps=args.steps, stats_dir=args.stats_dir,
        overrides=parse_overrides(args.set),
        fluency_tokens=args.fluency_tokens, eval_every=args.eval_every, heldout_docs=args.heldout_docs,
        curve_every=args.curve_every, curve_cases=args.curve_cases, curve_fluency_cases=args.curve_fluency_cases,
        curve_heldout_docs=args.curve_heldout_docs, eval_batch_size=args.eval_batch_size,
        gen_batch_size=args.gen_batch_size, eval_chunk_cases=args.eval_chunk_cases,
        measure_cold_stats=args.measure_cold_stats,
        keep_checkpoints=args.keep_checkpoints, replay_tolerance=args.replay_tolerance, restart=args.restart, progress=not args.no_progress,
        plots=not args.no_plots, checkpoints=args.checkpoints, pre_from=args.pre_from,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.status:
        try:
            res = write_status(args.out)
            kept = keep_finished(args.out)
        except ValueError as exc:
            parser.exit(2, f"error: {exc}\n")
        print(res["table"])
        print(f"kept in {args.out}/{KEPT_DIR}: {', '.join(kept) or 'nothing new'}")
        return 0
    if args.keep_results:
        try:
            kept = keep_results(args.out)
        except ValueError as exc:
            parser.exit(2, f"error: {exc}\n")
        print(f"kept in {args.out}/{KEPT_DIR}: {', '.join(kept) or 'nothing new'}")
        return 0
    if args.evidence:
        try:
            points = [int(x) for x in str(args.evidence_points).split(",") if x.strip()]
        except ValueError:
            parser.error(f"--evidence-points {args.evidence_points!r}: numbers of edits separated by commas, e.g. 200,1000")
        try:
            res = write_evidence(args.evidence, args.out, points)
        except ValueError as exc:
            parser.exit(2, f"error: {exc}\n")
        print(res["table"])
        print(f"wrote {res['paths']['table']} and {res['paths']['json']}")
        return 0
    if args.compare:
        res = compare_runs(args.compare, args.out)
        print(res["table"])
        print(f"wrote {res['paths']['table']} and {res['paths']['json']}")
        return 0
    missing = [f"--{k.replace('_', '-')}" for k in ("data", "methods", "n", "batch_size") if getattr(args, k) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (needed unless --compare, --evidence, --status or --keep-results is given)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        res = run_benchmark(config_from_args(args))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(render_table(res))
    for k, v in res["paths"].items():
        print(f"{k}: {v}")
    return 0
