"""The README's main job: a BLUE edit on the embedded SmolLM2 model, with before/after predictions,
followed by a short sequential-editing benchmark (BLUE vs. the original method) and its table.

    python -m benchmarks.demo [--quick] [--data counterfact|PATH] [--n 5] [--bench-n 10] [--no-bench]

It needs no data: the edit facts are CounterFact when it is found without a download
($BLUE_PLUGIN_DATA or the cache, see docs/data.md), else the 20 counterfactual facts that ship with
the package (``blue_plugin/resources/counterfacts.json``); the key statistics C_0 come from the
configured corpus (the YAML's ``mom2_dataset``) when it can be read, else from text sampled from
the model itself (``sampled``). The job says which facts and which corpus it used. ``--quick`` is
the short run CI makes on a fresh machine (fewer edits, documents and steps).
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
from blue_plugin.stats.corpus import read_corpus  # noqa: E402
from blue_plugin.stats.sources import SAMPLED, source_parts  # noqa: E402
from blue_plugin.evaluation.data import BUILTIN_FACTS, load_cases  # noqa: E402
from blue_plugin.datafiles import DataFileError, resolve_data  # noqa: E402
from blue_plugin.evaluation.metrics import answer_nll  # noqa: E402
from benchmarks.common import DEFAULT_HPARAMS  # noqa: E402

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


def choose_facts(data: str | None) -> tuple[Path, str]:
    """The edit facts: ``--data`` when given (a dataset name or a path; it must be found), else
    CounterFact when it is found without a download, else the facts that ship with the package."""
    if data is not None:
        path = resolve_data(data)
        return path, f"{data} ({path})"
    try:
        path = resolve_data("counterfact", download=False)
        return path, f"CounterFact ({path})"
    except DataFileError as exc:
        logger.info("CounterFact not found without a download (%s)", str(exc).splitlines()[0])
        return BUILTIN_FACTS, (f"the 20 counterfactual facts that ship with blue_plugin ({BUILTIN_FACTS}); "
                               "`python -m blue_plugin.datafiles fetch counterfact` gets CounterFact")


def choose_corpus(hp: BLUEHyperParams) -> tuple[str, str]:
    """The configured corpus when it can be read, else the embedded ``sampled`` corpus (this job
    falls back on purpose and says so; the library never does)."""
    source = hp.mom2_dataset
    if any(str(part).strip().lower() == SAMPLED for part in source_parts(source)):
        return source, f"{source!r} (text sampled from the model itself)"
    try:
        read_corpus(source, 1, subset="first")
        return source, f"{source!r} (configured in the YAML)"
    except ValueError as exc:
        return SAMPLED, (f"{SAMPLED!r}, text sampled from the model itself: the configured corpus {source!r} "
                         f"cannot be read here ({exc})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hparams", default=str(DEFAULT_HPARAMS), help="YAML path or shipped name")
    ap.add_argument("--data", default=None, help="counterfact, zsre or a path (default: CounterFact if found, "
                    "else the facts that ship with the package)")
    ap.add_argument("--n", type=int, default=None, help="edits in the single BLUE batch (default 5)")
    ap.add_argument("--bench-n", type=int, default=None, help="edits in the short sequential benchmark (default 10)")
    ap.add_argument("--bench-batch-size", type=int, default=None, help="default 5")
    ap.add_argument("--bench-methods", default="MEMIT,MEMIT_BLUE")
    ap.add_argument("--quick", action="store_true", help="a short run (CI): 4 edits, 200 corpus documents, 10 steps, "
                    "a 4-edit benchmark in batches of 2, held-out perplexity on 50 documents (else 200)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo"))
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quick = {"n": 4, "bench_n": 4, "bench_batch_size": 2} if args.quick else {"n": 5, "bench_n": 10, "bench_batch_size": 5}
    for key, value in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    hp = BLUEHyperParams.from_hparams(args.hparams)
    overrides = {"mom2_n_samples": 200, "v_num_grad_steps": 10} if args.quick else {}
    corpus, corpus_note = choose_corpus(hp)
    if corpus != hp.mom2_dataset:
        overrides["mom2_dataset"] = corpus
    hp = hp.replace(**overrides)
    data_path, facts_note = choose_facts(args.data)
    _, cases = load_cases(data_path, n=args.n)
    print(f"edit facts: {facts_note}\nC_0 corpus: {corpus_note}; {hp.mom2_n_samples} documents")
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
    cmd = [sys.executable, "-m", "benchmarks.sequential", "--data", str(data_path), "--methods", args.bench_methods,
           "--n", str(args.bench_n), "--batch-size", str(args.bench_batch_size), "--seed", "0", "--out", args.out,
           "--hparams", args.hparams, "--fluency-tokens", "20" if args.quick else "30",
           "--heldout-docs", "50" if args.quick else "200", "--restart"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    print("\n$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
