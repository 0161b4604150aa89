"""The README's main job: a BLUE edit on the embedded SmolLM2 model, with before/after predictions,
followed by a short sequential-editing benchmark (BLUE vs. the original method) and its table.

    python -m benchmarks.demo [--n 5] [--bench-n 10] [--bench-batch-size 5] [--no-bench]
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from blue_plugin import BLUEHyperParams, apply_blue_to_model, get_state, load_model  # noqa: E402
from blue_plugin.data import load_cases  # noqa: E402
from blue_plugin.metrics import answer_nll  # noqa: E402
from benchmarks.common import DEFAULT_CF_DATA as DEFAULT_DATA  # noqa: E402

logger = logging.getLogger("benchmarks.demo")


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int = 6) -> str:
    enc = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def show(model, tok, cases, title: str) -> int:
    new = answer_nll(model, tok, [c.prompt for c in cases], [c.target_new for c in cases])
    old = answer_nll(model, tok, [c.prompt for c in cases], [c.ground_truth for c in cases])
    print(f"\n== {title}")
    wins = 0
    for c, a, b in zip(cases, new.tolist(), old.tolist()):
        wins += a < b
        print(f"  {c.prompt!r:60.60} -> {greedy(model, tok, c.prompt)!r:28.28} "
              f"P(new {c.target_new!r})={torch.tensor(-a).exp():.3f}  P(true {c.ground_truth!r})={torch.tensor(-b).exp():.3f}")
    print(f"  new object preferred on {wins}/{len(cases)} prompts")
    return wins


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hparams", default=str(ROOT / "hparams" / "BLUE" / "smollm2-135m.yaml"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n", type=int, default=5, help="edits in the single BLUE batch")
    ap.add_argument("--bench-n", type=int, default=10, help="edits in the short sequential benchmark")
    ap.add_argument("--bench-batch-size", type=int, default=5)
    ap.add_argument("--bench-methods", default="MEMIT,MEMIT_BLUE")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo"))
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    hp = BLUEHyperParams.from_hparams(args.hparams)
    _, cases = load_cases(args.data, n=args.n)
    t0 = time.perf_counter()
    model, tok = load_model(hp.model_name)
    print(f"model loaded in {time.perf_counter() - t0:.1f}s")
    show(model, tok, cases, "before the edit")
    t0 = time.perf_counter()
    model, weights_copy = apply_blue_to_model(model, tok, [c.to_request() for c in cases], hp, return_orig_weights=True)
    total = time.perf_counter() - t0
    rec = get_state(model).history[-1]
    show(model, tok, cases, f"after one BLUE/{hp.base_method} batch of {len(cases)} edits")
    print(f"\nedited {sorted(weights_copy)}; {total:.1f}s in all (targets {rec['time']['targets']:.1f}s, "
          f"keys {rec['time']['keys']:.1f}s, solves {rec['time']['update']:.1f}s; statistics and context prefixes "
          f"the rest); optimisation steps per layer {rec['steps']}")
    if args.no_bench:
        return 0
    cmd = [sys.executable, "-m", "benchmarks.sequential", "--data", args.data, "--methods", args.bench_methods,
           "--n", str(args.bench_n), "--batch-size", str(args.bench_batch_size), "--seed", "0", "--out", args.out,
           "--hparams", args.hparams, "--fluency-tokens", "30"]
    print("\n$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
