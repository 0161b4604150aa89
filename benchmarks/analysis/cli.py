"""``python -m benchmarks.analysis``: run the chosen analyses, keep finished ones, write
``analysis.json``, ``summary.md`` and the plots."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from blue_plugin.evaluation.data import load_cases
from blue_plugin.model.loading import load_model

from benchmarks.analysis.config import (
    ANALYSES,
    DEFAULT_WHAT,
    RESULTS_FILE,
    SCHEMA_VERSION,
    build_hparams,
    parse_what,
    valid_requests,
)
from benchmarks.analysis.plots import make_plots
from benchmarks.analysis.runners import run_analysis, strip_tensors
from benchmarks.analysis.summary import render_summary
from benchmarks.common import (
    DEFAULT_HPARAMS,
    DEFAULT_MODEL,
    REPO_ROOT,
    default_cf_data,
    json_roundtrip,
    machine_info,
    read_json,
    versions,
    write_json,
)

logger = logging.getLogger("benchmarks.analysis")

DESCRIPTION = ("The BLUE paper's residual-distribution analyses, causal tracing and dynamic boundary layers, "
               "for one model and config (default: the embedded SmolLM2-135M-Instruct and its YAML).")
EPILOG = "Analyses: " + ", ".join(ANALYSES) + " (see python -c 'import benchmarks.analysis; help(benchmarks.analysis)')."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.analysis", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default=",".join(DEFAULT_WHAT), help=f"comma-separated from {', '.join(ANALYSES)}, or 'all' (default: all but dynamic)")
    p.add_argument("--n", type=int, default=20, help="CounterFact requests for analyses 1-5 (default 20)")
    p.add_argument("--out", required=True, help="output folder (analysis.json, summary.md, PNGs)")
    p.add_argument("--data", default=str(default_cf_data()), help="CounterFact JSON (any format blue_plugin.evaluation.data reads)")
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
        if old.get("config", {}) == json_roundtrip(config):
            same = {k for k, v in old.get("results", {}).items()
                    if old.get("options", {}).get(k) == json_roundtrip(options.get(k))}
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
        result["results"][name] = strip_tensors(run_analysis(name, ctx))
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
