"""``python -m benchmarks.speed``: the command line of the speed benchmark."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks.common import DEFAULT_HPARAMS, REPO_ROOT, parse_overrides, resolve_data_arg, resolve_repo_path
from benchmarks.speed.config import DEFAULT_DATA, EE_METHODS, OUR_METHODS, SYSTEMS, SpeedConfig
from benchmarks.speed.processes import WorkerError
from benchmarks.speed.report import render_table
from benchmarks.speed.run import run_speed

DESCRIPTION = "Speed benchmark: blue_plugin against EasyEdit's own MEMIT and AlphaEdit, side by side (issue 5)."


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,5,10, got {text!r}") from None


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=DESCRIPTION)
    p.add_argument("--out", required=True, help="output folder (results.json, table.md, plots, worker logs)")
    p.add_argument("--easyedit_root", "--easyedit-root", default=None,
                   help="EasyEdit checkout; default $EASYEDIT_ROOT; without it only ours is measured")
    p.add_argument("--ee-python", default=None, help="Python for the EasyEdit worker process (default: this one)")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    p.add_argument("--hparams", default=str(DEFAULT_HPARAMS.relative_to(REPO_ROOT)), help="our YAML (default: SmolLM2's)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="CounterFact JSON or a dataset name (default: counterfact, see docs/data.md); the first N cases are edited")
    p.add_argument("--n", type=int, default=10, help="edits per repetition (default 10)")
    p.add_argument("--batch-size", type=int, default=10, help="edits per batch B (default 10)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of the timed edits (default 2)")
    p.add_argument("--methods", type=name_list, default=list(OUR_METHODS), help=f"ours, of {list(OUR_METHODS)}")
    p.add_argument("--ee-methods", type=name_list, default=list(EE_METHODS), help=f"EasyEdit's, of {list(EE_METHODS)}")
    p.add_argument("--mom2-n-samples", type=int, default=None, help="corpus documents for C0 (default: the YAML's)")
    p.add_argument("--corpus", default=None, help="corpus file (default: the YAML's mom2_dataset)")
    p.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter (YAML value)")
    p.add_argument("--scaling", type=int_list, default=[], help="batch sizes for the cost-growth sweep, e.g. 1,5,10,20,50")
    p.add_argument("--scaling-methods", type=name_list, default=["MEMIT", "AlphaEdit_BLUE"],
                   help="our methods in the sweep (EasyEdit's method of the same base runs beside each)")
    p.add_argument("--scaling-systems", type=name_list, default=list(SYSTEMS),
                   help="systems in the sweep: ours, easyedit or both (to split a long sweep over two runs; "
                        "merge them with python -m benchmarks.speed_combine)")
    p.add_argument("--stats-curve", type=int_list, default=[], help="extra sample counts for statistics time vs samples")
    p.add_argument("--stats-reps", type=int, default=1, help="repetitions of the cold statistics at the main count")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker")
    p.add_argument("--isolation", choices=["process", "none"], default="process",
                   help="process: each system in its own process (clean memory peaks); none: same process and model object")
    p.add_argument("--plain-iters", type=int, default=3, help="timed plain forward+backward calls per shape")
    p.add_argument("--no-eval", action="store_true", help="skip the efficacy evaluation")
    p.add_argument("--no-restart", action="store_true",
                   help="process isolation: keep the workers of the statistics phase for the edits (by default "
                        "they are restarted, so editing memory is measured in processes with cached statistics)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> SpeedConfig:
    root = args.easyedit_root or os.environ.get("EASYEDIT_ROOT") or None
    return SpeedConfig(
        model=args.model, hparams=resolve_repo_path(args.hparams), data=str(resolve_data_arg(args.data)), n=args.n,
        batch_size=args.batch_size, reps=args.reps, methods=args.methods, ee_methods=args.ee_methods,
        easyedit_root=root, ee_python=args.ee_python, mom2_n_samples=args.mom2_n_samples, corpus=args.corpus,
        steps=args.steps, overrides=parse_overrides(args.set), scaling=args.scaling,
        scaling_methods=args.scaling_methods, scaling_systems=args.scaling_systems, stats_curve=args.stats_curve, stats_reps=args.stats_reps,
        threads=args.threads, isolation=args.isolation, plain_iters=args.plain_iters, evaluate=not args.no_eval,
        restart_workers=not args.no_restart,
        seed=args.seed,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["BLUE_PLUGIN_NO_EASYEDIT"] = "1"  # EasyEdit is imported explicitly, in its worker only
    try:
        cfg = config_from_args(args)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "benchmarks.speed",
                                                    *(sys.argv[1:] if argv is None else argv)])
        res = run_speed(cfg, args.out, command=command)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    except WorkerError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(render_table(res))
    for k, v in res["paths"].items():
        print(f"{k}: {v}")
    return 0
