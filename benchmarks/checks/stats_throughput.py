"""Throughput of the key-statistics pass: tokens/s per process for 1 and 2 processes.

Runs ``torchrun --standalone --nproc_per_node P -m blue_plugin.stats`` (gloo on the CPU, T torch
threads per process) for each ``PxT`` configuration, each into a fresh statistics folder
(``--overwrite``), and reads the per-rank timings from the CLI's ``--report``. A rank's time is
its accumulation pass only (model loading and start-up excluded); the aggregate rate is all
tokens over the slowest rank's time. The machine's load average is recorded before and after
each run (the machine may be shared).

    python benchmarks/stats_throughput.py --configs 1x1,2x1,1x2 --repeats 2

Writes ``benchmarks/results/stats_throughput/results.json`` and ``README.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from blue_plugin.datafiles import resolve_data

from benchmarks.common import REPO_ROOT

REPO = REPO_ROOT
OUT = REPO / "benchmarks" / "results" / "stats_throughput"
#: Default corpus: the ``wordnet-glosses`` dataset of blue_plugin.datafiles ($BLUE_PLUGIN_DATA or the cache),
#: resolved when the benchmark runs.
CORPUS = "wordnet-glosses"
NOTES = [
    "Notes: a rank's time is its accumulation pass only; each launch also spends ~15-25 s on "
    "start-up (measured 15-21 s here: imports, loading the model in every process), which is why the wall times of 1 and "
    "2 processes are close for a corpus this small. `1x2` (one process, two OpenMP threads) is "
    "pathological on this shared machine: with more runnable jobs than cores, a descheduled OpenMP "
    "thread stalls its partner at every barrier. Separate single-threaded processes do not "
    "synchronise during the pass and degrade gracefully.",
]


def command(procs: int, threads: int, args, stats_dir: Path, report: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", str(procs),
        "-m", "blue_plugin.stats", "--hparams", args.hparams, "--model", args.model,
        "--layers", args.layers, "--n-samples", str(args.n_samples), "--corpus", args.corpus,
        "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--device", "cpu", "--threads", str(threads),
        "--stats-dir", str(stats_dir), "--overwrite", "--no-progress", "--report", str(report),
    ]


def run_one(procs: int, threads: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="stats_tp_") as tmp:
        report = Path(tmp) / "report.json"
        cmd = command(procs, threads, args, Path(tmp) / "stats", report)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        rep = json.loads(report.read_text())
    ranks = rep["ranks"]
    tokens = sum(r["tokens"] for r in ranks)
    slowest = max(r["seconds"] for r in ranks)
    return {
        "procs": procs, "threads": threads,
        "tokens": tokens, "docs": sum(r["docs"] for r in ranks),
        "per_rank": [{**r, "tokens_per_s": r["tokens"] / r["seconds"]} for r in ranks],
        "tokens_per_s_per_process": sum(r["tokens"] / r["seconds"] for r in ranks) / len(ranks),
        "tokens_per_s_total": tokens / slowest,
        "accumulation_s": slowest, "wall_s": wall,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "command": shlex.join(["torchrun"] + cmd[cmd.index("--standalone"):]).replace(tmp, "$TMP"),
    }


def markdown(res: dict) -> str:
    lines = [
        "# Key-statistics throughput (SmolLM2-135M, CPU)",
        "",
        f"Measured {res['date']} on `{res['machine']['platform']}`, {res['machine']['cpus']} CPU cores, "
        f"torch {res['machine']['torch']}. {res['n_samples']} WordNet glosses "
        f"(`{res['corpus']}`), layers {res['layers']} (`down_proj` inputs, d_in 1536), "
        f"max length {res['max_length']}, batch size {res['batch_size']} per process.",
        "",
        "The machine is shared with other jobs: load average (1 min) before/after each run is shown; "
        "a load above the core count means the processes did not have the cores to themselves.",
        "",
        "| processes x threads | tokens | accumulation s (slowest rank) | tokens/s per process | tokens/s total | speed-up vs mean 1x1 | wall s | load before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ones = [r["tokens_per_s_total"] for r in res["runs"] if (r["procs"], r["threads"]) == (1, 1)]
    base = sum(ones) / len(ones) if ones else float("nan")
    for r in res["runs"]:
        sp = r["tokens_per_s_total"] / base
        lines.append(
            f"| {r['procs']}x{r['threads']} | {r['tokens']} | {r['accumulation_s']:.1f} | "
            f"{r['tokens_per_s_per_process']:.0f} | {r['tokens_per_s_total']:.0f} | {sp:.2f} | {r['wall_s']:.1f} | "
            f"{r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f} |"
        )
    lines += ["", "Summary (mean over repeats):", ""]
    groups: dict = {}
    for r in res["runs"]:
        groups.setdefault((r["procs"], r["threads"]), []).append(r)
    for (procs, threads), rs in sorted(groups.items()):
        per = sum(r["tokens_per_s_per_process"] for r in rs) / len(rs)
        tot = sum(r["tokens_per_s_total"] for r in rs) / len(rs)
        lines.append(f"- {procs} process(es) x {threads} thread(s): {per:.0f} tokens/s per process, "
                     f"{tot:.0f} tokens/s in total ({tot / base:.2f}x one single-threaded process)")
    if res.get("notes"):
        lines += ["", *res["notes"]]
    lines += ["", "Commands (one per configuration):", ""]
    seen = set()
    for r in res["runs"]:
        if r["command"] not in seen:
            seen.add(r["command"])
            lines.append(f"    OMP_NUM_THREADS={r['threads']} PYTHONPATH=. {r['command']}")
    lines += ["", f"Produced by `python benchmarks/stats_throughput.py {res['argv']}`.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="1x1,2x1", help="comma-separated PROCSxTHREADS, e.g. 1x1,2x1,1x2")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--hparams", default="hparams/BLUE/smollm2-135m.yaml")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="4,8")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--corpus", default=CORPUS, help="corpus text file, or a dataset name (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--render-only", action="store_true", help="rewrite README.md from the existing results.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.render_only:
        res = json.loads((out / "results.json").read_text())
        (out / "README.md").write_text(markdown(res), encoding="utf-8")
        return 0
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    args.corpus = str(resolve_data(args.corpus))
    runs = []
    for rep in range(args.repeats):
        order = configs if rep % 2 == 0 else list(reversed(configs))  # alternate against load drift
        for procs, threads in order:
            r = run_one(procs, threads, args)
            r["repeat"] = rep
            runs.append(r)
            print(f"{procs}x{threads} rep {rep}: {r['tokens_per_s_total']:.0f} tok/s total, "
                  f"{r['tokens_per_s_per_process']:.0f} per process, load {r['loadavg_before'][0]:.1f}", flush=True)
    runs.sort(key=lambda r: (r["procs"], r["threads"], r["repeat"]))
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "model": args.model, "corpus": args.corpus, "n_samples": args.n_samples, "layers": args.layers,
        "max_length": args.max_length, "batch_size": args.batch_size,
        "argv": " ".join(sys.argv[1:]), "runs": runs, "notes": NOTES,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(markdown(res), encoding="utf-8")
    print(f"wrote {out / 'results.json'} and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
