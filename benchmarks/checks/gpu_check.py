"""GPU check: one BLUE edit of 100 requests on a randomly initialised Llama-3-8B-shaped model.

Timing does not need trained weights, so nothing is downloaded: the model is a ``LlamaConfig``
with Llama-3-8B's shape (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads, vocabulary
128,256), initialised at random directly on the GPU in bfloat16 (no CPU copy); the tokenizer is a
word-level tokenizer built in memory; requests, subjects and targets are synthetic. The
hyperparameters are ``hparams/BLUE/llama3-8b.yaml`` (critical layers 4-8, so BLUE updates layers 4
and 8; 25 optimisation steps; ``v_max_batch_tokens`` as there unless ``--max-batch-tokens``).

Synthetic statistics are injected into the model's :class:`~blue_plugin.editing.state.EditState` instead
of a corpus pass: for each edited layer, C0 = A A^T / m + 1e-3 I in float64, with A a d x m
Gaussian matrix (d = MLP width, m = d / 2). Its range has eigenvalues of order 1 and its null space
(eigenvalue 1e-3, below AlphaEdit's threshold 2e-2) has dimension d / 2, so AlphaEdit's projector
is non-trivial. Context prefixes are injected as well (five fixed sentences), so nothing is
generated. A random model never reaches the early-stopping loss, so every request uses all
optimisation steps: the figures are the worst case for the target phase.

For each method (default MEMIT_BLUE and AlphaEdit_BLUE) the script restores the edited weights,
runs ``apply_blue_to_model`` on all requests as one batch and records the batch time, the
engine's phase times (targets / keys / update), the optimisation steps per layer and request, the
peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each method) and whether the
weights changed and stayed finite. AlphaEdit's null-space projectors (an eigendecomposition of
each d x d C0) are computed before the timed batch and reported as ``projector_s``. Results go
to ``--out`` as JSON after every method, so a crash or time-out keeps what finished; an
out-of-memory error in one method is recorded and the next one still runs.

Run on a machine with one CUDA GPU, from the repository root (no network needed)::

    python benchmarks/gpu_check.py --out benchmarks/results/speed/gpu_check.json

``--small`` runs the same code path on the CPU with a tiny config (10 layers, hidden 64) for a
smoke test; ``--n-requests`` / ``--steps`` shrink the work further.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BLUE_PLUGIN_NO_EASYEDIT", "1")

import torch
import transformers

from blue_plugin.editing.editor import Editor, apply_blue_to_model
from blue_plugin.editing.state import get_state, reset_state
from blue_plugin.hparams import BLUEHyperParams

from benchmarks.checks.synthetic import (
    C0_EPS,
    LLAMA3_8B_SHAPE,
    PREFIXES,
    SMALL_SHAPE,
    build_model,
    make_requests,
    make_tokenizer,
    synthetic_c0,
)
from benchmarks.common import METHODS, REPO_ROOT, parse_methods, recorded_path, write_json

logger = logging.getLogger("benchmarks.gpu_check")

DEFAULT_HPARAMS = REPO_ROOT / "hparams" / "BLUE" / "llama3-8b.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu_mib(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                    memory_total_mib=round(props.total_memory / 2**20), device_count=torch.cuda.device_count())
    else:
        import platform

        info.update(name=platform.processor() or "cpu", threads=torch.get_num_threads())
    info["transformers"] = transformers.__version__
    return info


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------
def run_check(
    out: str | os.PathLike,
    small: bool = False,
    device: Optional[str] = None,
    dtype: str = "bfloat16",
    n_requests: int = 100,
    methods: Sequence[str] = ("MEMIT_BLUE", "AlphaEdit_BLUE"),
    steps: Optional[int] = None,
    max_batch_tokens: Optional[int] = None,
    hparams: str | os.PathLike = DEFAULT_HPARAMS,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the model, inject statistics and prefixes, edit, and write the JSON report to ``out``
    (also after every method). Returns the report; ``report["ok"]`` is False when a method failed."""
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    methods = parse_methods(methods)
    if isinstance(n_requests, bool) or not isinstance(n_requests, int) or n_requests < 1:
        raise ValueError(f"n_requests must be a positive integer, got {n_requests!r}")
    dev = torch.device(device or ("cpu" if small else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device is available; run on a GPU machine, or pass --small (CPU, tiny config)")
    out = Path(out)
    shape = dict(SMALL_SHAPE if small else LLAMA3_8B_SHAPE)
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": device_info(dev),
        "config": {"small": small, "shape": shape, "dtype": dtype, "n_requests": n_requests, "methods": list(methods),
                   "seed": seed, "hparams_file": recorded_path(hparams), "c0": f"A A^T/m + {C0_EPS} I, A ~ N(0,1) (d x d/2), float64"},
        "runs": {},
        "ok": False,
    }
    t_all = time.perf_counter()

    def save() -> None:
        report["wall_s"] = time.perf_counter() - t_all
        write_json(out, report)

    # --- model, tokenizer, hyperparameters ---------------------------------------------------------
    reset_gpu_peak(dev)
    t0 = time.perf_counter()
    model = build_model(shape, dev, dtypes[dtype], seed)
    sync(dev)
    report["build_s"] = time.perf_counter() - t0
    report["n_params"] = sum(p.numel() for p in model.parameters())
    report["model_memory_mib"] = peak_gpu_mib(dev)
    tok = make_tokenizer(n_requests)
    base = BLUEHyperParams.from_hparams(hparams)
    changes: dict[str, Any] = {"model_name": model.config._name_or_path, "batch_size": n_requests,
                               "v_loss_layer": shape["num_hidden_layers"] - 1, "stats_dir": None, "seed": seed}
    if steps is not None:
        changes["v_num_grad_steps"] = steps
    if max_batch_tokens is not None:
        changes["v_max_batch_tokens"] = max_batch_tokens
    base = base.replace(**changes)
    report["config"]["hparams"] = {k: base.to_dict()[k] for k in (
        "layers", "v_num_grad_steps", "v_lr", "v_max_batch_tokens", "v_replay_lower_layers", "clamp_norm_factor",
        "kl_factor", "mom2_update_weight", "nullspace_threshold", "L2", "solve_dtype", "context_template_length_params")}
    requests = make_requests(n_requests, seed)
    report["example_request"] = requests[0]

    # --- synthetic statistics and prefixes, injected into the state ------------------------------
    state = get_state(model)
    editor = Editor(model, tok, base.replace(blue=False))
    layers = sorted({l for m in methods for l in base.replace(base_method=METHODS[m][0], blue=METHODS[m][1]).edit_layers})
    t0 = time.perf_counter()
    for l in layers:
        d_in = editor.W(l).shape[1]
        state.second_moments[editor.c0_key(l)] = synthetic_c0(d_in, dev, seed + l)
    sync(dev)
    report["c0_s"] = time.perf_counter() - t0
    state.prefixes[(tuple(map(tuple, base.context_template_length_params)), base.seed)] = [""] + list(PREFIXES)
    originals = {l: editor.weight(l).detach().clone() for l in layers}
    save()

    projector_s: dict[str, float] = {}
    all_ok = True
    for name in methods:
        base_method, blue = METHODS[name]
        hp = base.replace(base_method=base_method).for_mode(blue)
        run: dict[str, Any] = {"ok": False, "n_requests": n_requests, "base_method": base_method, "blue": blue,
                               "edit_layers": hp.edit_layers}
        report["runs"][name] = run
        try:
            editor.restore(originals)
            reset_state(model)  # forget earlier edits; C0, projectors and prefixes stay
            if base_method == "AlphaEdit":
                ed = Editor(model, tok, hp)
                todo = [l for l in hp.edit_layers if str(l) not in projector_s]
                reset_gpu_peak(dev)
                t0 = time.perf_counter()
                for l in todo:
                    ed.projector(l)
                sync(dev)
                if todo:
                    projector_s.update({str(l): (time.perf_counter() - t0) / len(todo) for l in todo})
                run["projector_s"] = sum(projector_s[str(l)] for l in hp.edit_layers)
                run["projector_peak_gpu_mib"] = peak_gpu_mib(dev)
            else:
                run["projector_s"] = None
            reset_gpu_peak(dev)
            sync(dev)
            t0 = time.perf_counter()
            apply_blue_to_model(model, tok, requests, hp)
            sync(dev)
            run["batch_time_s"] = time.perf_counter() - t0
            run["peak_gpu_mib"] = peak_gpu_mib(dev)
            rec = state.history[-1]
            run["phase_time_s"] = {k: float(v) for k, v in rec["time"].items()}
            run["steps"] = {str(l): list(s) for l, s in rec["steps"].items()}
            run["steps_mean"] = {str(l): sum(s) / len(s) for l, s in rec["steps"].items()}
            run["nll_mean"] = {str(l): sum(v) / len(v) for l, v in rec["nll"].items()}
            run["delta_norm"] = {str(l): float(v) for l, v in rec.get("delta_norm", {}).items()}
            changed = [l for l in hp.edit_layers if not torch.equal(editor.weight(l), originals[l])]
            run["weights_changed"] = changed == list(hp.edit_layers)
            run["weights_finite"] = all(bool(torch.isfinite(editor.weight(l)).all()) for l in hp.edit_layers)
            run["ok"] = run["weights_changed"] and run["weights_finite"]
            logger.info("%s: %d requests in %.1f s (targets %.1f s, keys %.1f s, update %.1f s), peak GPU %s MiB",
                        name, n_requests, run["batch_time_s"], run["phase_time_s"].get("targets", 0.0),
                        run["phase_time_s"].get("keys", 0.0), run["phase_time_s"].get("update", 0.0), run["peak_gpu_mib"])
        except Exception as exc:  # OOM or anything else: record it, go on with the next method
            run["error"] = f"{type(exc).__name__}: {exc}"
            run["traceback"] = traceback.format_exc()[-4000:]
            logger.error("%s failed: %s", name, run["error"])
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        all_ok &= run["ok"]
        save()
    editor.restore(originals)
    report["ok"] = all_ok
    report["peak_gpu_mib_overall"] = (round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)
                                      if dev.type == "cuda" else None)
    save()
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "speed" / "gpu_check.json"),
                   help="JSON report (written after every method)")
    p.add_argument("--small", action="store_true", help="tiny config on the CPU (smoke test of the same code path)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --small)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--n-requests", type=int, default=100, help="requests in the one batch (default 100)")
    p.add_argument("--methods", default="MEMIT_BLUE,AlphaEdit_BLUE", help=f"comma-separated, of {list(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps (default: the YAML's, 25)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="override v_max_batch_tokens (chunk size)")
    p.add_argument("--hparams", default=str(DEFAULT_HPARAMS), help="BLUE YAML (default: llama3-8b.yaml)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        report = run_check(args.out, small=args.small, device=args.device, dtype=args.dtype,
                           n_requests=args.n_requests, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                           steps=args.steps, max_batch_tokens=args.max_batch_tokens, hparams=args.hparams, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dev = report["device"]
    print(f"device: {dev.get('name')} ({dev['type']}), model {report['n_params'] / 1e9:.2f}B params, "
          f"build {report['build_s']:.1f} s, C0 {report['c0_s']:.1f} s")
    for name, run in report["runs"].items():
        if "error" in run:
            print(f"{name}: FAILED {run['error']}")
            continue
        ph = run["phase_time_s"]
        print(f"{name}: {run['n_requests']} requests in {run['batch_time_s']:.1f} s (targets {ph.get('targets', 0):.1f}, "
              f"keys {ph.get('keys', 0):.1f}, update {ph.get('update', 0):.1f}); steps/layer {run['steps_mean']}; "
              f"projector {run['projector_s']}; peak GPU {run['peak_gpu_mib']} MiB")
    print(f"report: {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
