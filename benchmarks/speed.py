"""Speed benchmark: blue_plugin against EasyEdit's own MEMIT and AlphaEdit, side by side (issue 5).

One run measures, for our engine and (with ``--easyedit_root`` / ``$EASYEDIT_ROOT``) for
EasyEdit's ``apply_memit_to_model`` / ``apply_AlphaEdit_to_model`` called with EasyEdit's own
hyperparameter classes, on the same model weights, the same first N CounterFact edits and the same
statistics settings:

* **statistics (cold)**: C_0 for all critical layers from an empty cache. Ours: one truncated
  pass (:func:`blue_plugin.stats.moments.get_second_moments`); EasyEdit: its ``layer_stats`` once per
  layer (what ``get_cov`` runs on a cache miss). Optionally against the sample count
  (``--stats-curve``).
* **per-batch edit time with statistics cached**: N edits in batches of B, sequentially, for
  several repetitions; systems and methods alternate (the order is reversed every other
  repetition) so that a change of the machine's load hits both. Before the timed batches every
  system loads its statistics from its disk cache, gets its context templates and (AlphaEdit) its
  null-space projectors (the ``prepare`` phase, timed separately).
* **phase times** of every batch: ours from the engine's history (targets / keys / update);
  EasyEdit's by wrapping its ``compute_z`` (targets), ``compute_ks`` and
  ``get_module_input_output_at_words`` (keys) and ``get_cov`` (statistics look-up).
* **target-optimisation throughput**: tokens (batch x padded length) of every forward call of the
  base model during the target phase, divided by the phase's wall time; and the plain model's
  forward+backward tokens per second at the same batch shapes (full logits, loss over all
  positions, gradient w.r.t. the input embeddings, parameters frozen as while editing). Our
  engine replays the blocks below the edited layer from a cache, so its ratio can exceed 1: the
  skipped blocks are work it does not do. With its prefix cache (``v_prefix_cache``) a step runs
  only the tokens from the subject's last token on; those are the tokens counted (and the shapes
  of the plain forward+backward), so the rows' earlier tokens, served from the cache, are not.
* **peak RSS** per phase: the kernel's high-water mark of the process (``VmHWM``, reset before each
  phase through ``/proc/self/clear_refs``) and a psutil sample (every 50 ms) of the process plus its
  children (EasyEdit's statistics use two data-loader worker processes).
* **cost growth**: per-batch time for B in ``--scaling`` (one batch of the first B cases, from the
  unedited weights).
* **efficacy** (and generalization, specificity) of the N edits on the final model, with
  :func:`blue_plugin.evaluation.metrics.counterfact_case_scores` for both systems.

With ``--isolation process`` (default) each system runs in its own process (spawned; loads the
same model files, the weights digest is checked), so the memory figures are clean; with ``none``
both run in this process on literally the same model object (faster; used by the smoke test).

Differences that cannot be removed (recorded in ``results.json``): EasyEdit's ``layer_stats`` can
only read hub datasets by name, so its ``load_dataset`` is served the same local documents under
the name ``wikitext`` (monkeypatched in the EasyEdit process only; EasyEdit's files are untouched);
it truncates documents at the model's context (8192 for SmolLM2) where ours uses
``mom2_max_length`` (the default WordNet glosses are at most 65 SmolLM2 tokens, so both see the
same tokens), accumulates in ``mom2_dtype`` (float32) where ours uses float64, and draws the
documents in a seeded random order (the same set: it is given exactly the first n). EasyEdit's
MEMIT looks the output matrix up with ``named_parameters``, which omits tied weights, so for a
model with tied embeddings (SmolLM2) ``lm_head_module`` is set to the input embedding (the same
matrix). EasyEdit's AlphaEdit picks matrix sizes from substrings of ``model_name``, so its name
gets a ``(llama)`` suffix for Llama-architecture models. Both systems use the same context
templates: EasyEdit's template cache is filled with our (seeded) prefixes. EasyEdit's MEMIT does
not accumulate earlier batches' keys (ours does, ``accumulate_keys``); with N = B this does not
matter.

Run with a Python that can import EasyEdit (see docs/easyedit.md), e.g.::

    /tmp/ee_venv/bin/python -m benchmarks.speed --easyedit_root /tmp/EasyEdit --n 10 --batch-size 10 \\
        --reps 2 --mom2-n-samples 1000 --threads 2 --out benchmarks/results/speed/smollm2-n10-b10

Outputs in ``--out``: ``results.json`` (everything, with the command, versions, machine, load
averages), ``table.md`` (medians and ratios), ``per_batch_vs_B.png`` (with ``--scaling``) and
``stats_vs_samples.png`` (with ``--stats-curve``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import logging
import multiprocessing as mp
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import REPO_ROOT, machine_info, peak_rss_mib, reset_peak_rss, resolve_data_arg, versions, write_json

logger = logging.getLogger("benchmarks.speed")

SCHEMA_VERSION = 1
#: our method name -> (base_method, blue)
OUR_METHODS: dict[str, tuple[str, bool]] = {
    "MEMIT": ("MEMIT", False),
    "MEMIT_BLUE": ("MEMIT", True),
    "AlphaEdit": ("AlphaEdit", False),
    "AlphaEdit_BLUE": ("AlphaEdit", True),
}
#: EasyEdit's algorithms this benchmark runs.
EE_METHODS = ("MEMIT", "AlphaEdit")
DEFAULT_DATA = None  # None: the "counterfact" dataset of blue_plugin.datafiles, resolved when the run starts
DEFAULT_HPARAMS = REPO_ROOT / "hparams" / "BLUE" / "smollm2-135m.yaml"
#: The issue's targets, used for the "target" column of the table.
TARGETS = {
    "stats_ratio_max": 0.1,
    "batch_ratio_max": 0.5,
    "throughput_ratio_min": 0.7,
    "peak_rss_mib_max": 1536.0,
}
_EE_CORPUS_NAME = "wikitext"  # the hub name under which EasyEdit's layer_stats is served the local corpus


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class SpeedConfig:
    """Everything a run depends on (picklable: it is sent to the worker processes).

    ``methods``: ours (names of :data:`OUR_METHODS`); ``ee_methods``: EasyEdit's (of
    :data:`EE_METHODS`), run only when ``easyedit_root`` is set. ``scaling``: batch sizes for the
    cost-growth sweep (one batch each) of ``scaling_methods`` (ours) and the EasyEdit method of the
    same base. ``stats_curve``: extra sample counts for the statistics-vs-samples curve.
    """

    model: str = "smollm2-135m"
    hparams: str = str(DEFAULT_HPARAMS)
    data: Optional[str] = DEFAULT_DATA
    n: int = 10
    batch_size: int = 10
    reps: int = 2
    methods: list = field(default_factory=lambda: list(OUR_METHODS))
    ee_methods: list = field(default_factory=lambda: list(EE_METHODS))
    easyedit_root: Optional[str] = None
    ee_python: Optional[str] = None
    mom2_n_samples: Optional[int] = None
    corpus: Optional[str] = None
    steps: Optional[int] = None
    overrides: dict = field(default_factory=dict)
    scaling: list = field(default_factory=list)
    scaling_methods: list = field(default_factory=lambda: ["MEMIT", "AlphaEdit_BLUE"])
    scaling_systems: list = field(default_factory=lambda: ["ours", "easyedit"])
    stats_curve: list = field(default_factory=list)
    stats_reps: int = 1
    threads: Optional[int] = None
    isolation: str = "process"
    plain_iters: int = 3
    plain_max_shapes: int = 8
    evaluate: bool = True
    restart_workers: bool = True
    seed: int = 0
    work_dir: Optional[str] = None  # set by run_speed: caches that outlive a worker process

    def validate(self) -> None:
        def pos(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")

        for name in ("n", "batch_size", "reps", "stats_reps", "plain_iters", "plain_max_shapes"):
            pos(name)
        pos("seed", 0)
        if self.threads is not None:
            pos("threads")
        unknown = [m for m in self.methods if m not in OUR_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {list(OUR_METHODS)}, got {self.methods!r}")
        bad = [m for m in self.ee_methods if m not in EE_METHODS]
        if bad:
            raise ValueError(f"ee_methods must be a subset of {list(EE_METHODS)}, got {self.ee_methods!r}")
        bad = [m for m in self.scaling_methods if m not in OUR_METHODS]
        if bad:
            raise ValueError(f"scaling_methods must be names of {list(OUR_METHODS)}, got {self.scaling_methods!r}")
        if not self.scaling_systems or any(s not in ("ours", "easyedit") for s in self.scaling_systems):
            raise ValueError(f"scaling_systems must be a non-empty subset of ['ours', 'easyedit'], "
                             f"got {self.scaling_systems!r}")
        for name in ("scaling", "stats_curve"):
            vals = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"{name} must list positive integers, got {vals!r}")
        if self.isolation not in ("process", "none"):
            raise ValueError(f"isolation must be 'process' or 'none', got {self.isolation!r}")
        if self.batch_size > self.n:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed n ({self.n})")

    @property
    def n_cases(self) -> int:
        """How many cases the run reads (the edits and the largest scaling batch)."""
        return max([self.n] + list(self.scaling))


def resolve_repo_path(path: str) -> str:
    """A relative path that does not exist from the current directory is tried relative to the
    repository root (the default YAML is named relative to it)."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        return str(p.resolve())
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return str((REPO_ROOT / p).resolve())
    return str(p)


def base_hparams(cfg: SpeedConfig, stats_dir: Optional[str]):
    """Our hyperparameters (YAML + the run's overrides), before ``base_method`` / ``blue``."""
    from benchmarks.sequential import build_base_hparams

    overrides = dict(cfg.overrides)
    if cfg.corpus is not None:
        overrides["mom2_dataset"] = resolve_repo_path(cfg.corpus)
    hp = build_base_hparams(cfg.hparams, cfg.batch_size, cfg.seed, cfg.mom2_n_samples, cfg.steps, stats_dir, overrides)
    return hp.replace(mom2_dataset=resolve_repo_path(hp.mom2_dataset))


def method_hparams(hp, method: str):
    base, blue = OUR_METHODS[method]
    return hp.replace(base_method=base).for_mode(blue)


def ours_for_base(base: str, methods: Sequence[str]) -> list[str]:
    return [m for m in methods if OUR_METHODS[m][0] == base]


# ------------------------------------------------------------------------------------------------
# measurement helpers
# ------------------------------------------------------------------------------------------------
def _tree_rss_mib(proc) -> float:
    total = 0
    try:
        total += proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a child that just ended
                pass
    except Exception:
        return float("nan")
    return total / 2**20


class Meter:
    """Wall time and peak memory of one phase (``with Meter() as m: ...; m.result``).

    ``peak_rss_mib``: the process's kernel high-water mark since the phase began (exact, when
    ``/proc/self/clear_refs`` can reset it; else the process-lifetime peak, flagged by
    ``rss_reset: false``); ``peak_rss_tree_mib``: the largest psutil sample (every ``interval``
    s) of the RSS of the process plus all its children.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        try:
            import psutil

            proc = psutil.Process()
        except ImportError:  # pragma: no cover - psutil is a benchmark dependency
            return
        while not self._stop.is_set():
            v = _tree_rss_mib(proc)
            if v == v:  # not NaN
                self._tree_peak = max(self._tree_peak, v)
            self._stop.wait(self.interval)

    def __enter__(self) -> "Meter":
        self._reset = reset_peak_rss()
        self._tree_peak = 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._load0 = os.getloadavg()[0]
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.result = {
            "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(),
            "peak_rss_tree_mib": round(self._tree_peak, 1),
            "rss_reset": self._reset,
            "load_1m": [round(self._load0, 2), round(os.getloadavg()[0], 2)],
        }


class TokenCounter:
    """Counts (batch, length) of every forward call of ``module`` while ``active`` is set.

    ``shapes``: {(batch, length): calls} of the calls made with gradients enabled;
    ``tokens``: batch x length summed over all counted calls (with or without gradients).
    """

    def __init__(self, module: torch.nn.Module):
        self.active = False
        self.tokens = 0
        self.calls = 0
        self.shapes: dict[tuple[int, int], int] = {}
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        if not self.active:
            return
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        b, t = int(x.shape[0]), int(x.shape[1])
        self.tokens += b * t
        self.calls += 1
        if torch.is_grad_enabled():
            self.shapes[(b, t)] = self.shapes.get((b, t), 0) + 1

    def reset(self) -> None:
        self.tokens, self.calls, self.shapes = 0, 0, {}

    def close(self) -> None:
        self._handle.remove()


def base_module(model) -> torch.nn.Module:
    """The decoder stack both systems call (``model.model`` for Llama)."""
    return getattr(model, "base_model", None) or model


@torch.no_grad()
def _random_batch(model, b: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    dev = model.get_input_embeddings().weight.device
    ids = torch.randint(0, vocab, (b, t), generator=g).to(dev)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def plain_forward_backward(model, shape: tuple[int, int], iters: int, seed: int = 0) -> float:
    """Median seconds of one plain forward+backward at ``shape`` = (batch, length): full logits,
    a loss over all positions, the gradient w.r.t. the input embeddings (parameters frozen)."""
    from blue_plugin.model.hooks import frozen

    batch = _random_batch(model, shape[0], shape[1], seed)
    emb_layer = model.get_input_embeddings()
    times = []
    with frozen(model):
        for i in range(iters + 1):  # the first call is a warm-up
            t0 = time.perf_counter()
            emb = emb_layer(batch["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = torch.log_softmax(logits.float(), dim=-1)[..., 0].mean()
            loss.backward()
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weights_digest(model) -> str:
    """sha256 (16 hex) of a strided sample of every parameter: equal digests = same weights."""
    from blue_plugin.editing.state import fingerprint

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(fingerprint(p, n=4096).numpy().tobytes())
    return h.hexdigest()[:16]


def _summary(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


# ------------------------------------------------------------------------------------------------
# workers: one per system; the same interface in-process and over a pipe
# ------------------------------------------------------------------------------------------------
class _WorkerBase:
    system = "?"

    def __init__(self, cfg: SpeedConfig, model=None, tok=None):
        from blue_plugin.evaluation.data import load_cases
        from blue_plugin.model.loading import load_model

        self.cfg = cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.work = Path(tempfile.mkdtemp(prefix=f"speed-{self.system}-"))
        # statistics caches live in the run's folder, so a restarted worker finds them
        self.cache = Path(cfg.work_dir or self.work) / self.system
        self.cache.mkdir(parents=True, exist_ok=True)
        with Meter() as m:
            if model is None:
                model, tok = load_model(cfg.model)
        self.load = m.result
        self.model, self.tok = model, tok
        self.hp = base_hparams(cfg, str(self.cache / "stats"))
        from blue_plugin.editing.editor import Editor

        self.editor0 = Editor(model, tok, self.hp.replace(blue=False))
        self.layers = list(self.hp.layers)
        self.originals = {l: self.editor0.weight(l).detach().clone() for l in self.layers}
        self.fmt, self.cases = load_cases(resolve_data_arg(cfg.data), cfg.n_cases)
        if len(self.cases) < cfg.n_cases:
            raise ValueError(f"{cfg.data} has only {len(self.cases)} cases; the run needs {cfg.n_cases}")
        self.counter = TokenCounter(base_module(model))
        self._plain_cache: dict[tuple[int, int], float] = {}

    # --- common --------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "weights_digest": weights_digest(self.model),
            "model_load": self.load,
            "dtype": str(next(self.model.parameters()).dtype),
            "device": str(next(self.model.parameters()).device),
        }

    def restore(self) -> None:
        with torch.no_grad():
            for l, W in self.originals.items():
                self.editor0.weight(l).copy_(W)

    def corpus_docs(self, n: int) -> list[str]:
        from blue_plugin.stats.moments import read_corpus

        return read_corpus(self.hp.mom2_dataset, n)

    def evaluate(self, n: int) -> dict[str, Any]:
        from blue_plugin.evaluation.metrics import counterfact_case_scores

        if self.fmt not in ("counterfact", "counterfact_rome", "counterfact_templates"):
            return {"note": f"no efficacy for dataset format {self.fmt}"}
        t0 = time.perf_counter()
        scores = counterfact_case_scores(self.model, self.tok, self.cases[:n])
        out: dict[str, Any] = {"eval_s": time.perf_counter() - t0, "per_case_efficacy": [s["efficacy"] for s in scores]}
        for key in ("efficacy", "generalization", "specificity"):
            vals = [s[key] for s in scores if s[key] is not None]
            out[key] = sum(vals) / len(vals) if vals else None
        return out

    def plain_fb(self, shapes: dict) -> dict[str, Any]:
        """Plain forward+backward tokens/s over ``shapes`` ({(b, t): calls}, or {"b,t": calls}),
        weighted by the calls; only the ``plain_max_shapes`` shapes with the most tokens are
        timed, the rest are left out of both numerator and denominator."""
        items = []
        for k, c in shapes.items():
            b, t = (int(x) for x in (k.split(",") if isinstance(k, str) else k))
            items.append(((b, t), int(c)))
        items.sort(key=lambda kv: -kv[0][0] * kv[0][1] * kv[1])
        chosen = items[: self.cfg.plain_max_shapes]
        total_tokens = sum(b * t * c for (b, t), c in items)
        tokens = seconds = 0.0
        per_shape = {}
        for (b, t), c in chosen:
            if (b, t) not in self._plain_cache:
                self._plain_cache[(b, t)] = plain_forward_backward(self.model, (b, t), self.cfg.plain_iters, self.cfg.seed)
            s = self._plain_cache[(b, t)]
            per_shape[f"{b},{t}"] = {"calls": c, "seconds_per_call": s, "tokens_per_s": b * t / s}
            tokens += b * t * c
            seconds += s * c
        return {
            "tokens_per_s": tokens / seconds if seconds else None,
            "token_coverage": tokens / total_tokens if total_tokens else None,
            "shapes": per_shape,
        }

    def close(self) -> None:
        self.counter.close()
        self.restore()
        shutil.rmtree(self.work, ignore_errors=True)

    # --- the timed edit loop ---------------------------------------------------------------------
    def edit_run(self, method: str, n: int, batch_size: int, evaluate: bool = True) -> dict[str, Any]:
        """Edit the first ``n`` cases in batches of ``batch_size`` from the unedited weights,
        sequentially; time every batch; evaluate; restore the weights."""
        self.restore()
        self._start_sequence(method)
        reqs = [c.to_request() for c in self.cases[:n]]
        batches = [reqs[i:i + batch_size] for i in range(0, n, batch_size)]
        out: dict[str, Any] = {"system": self.system, "method": method, "n": n, "batch_size": batch_size,
                               "batch_wall_s": [], "phases": [], "target_tokens": [], "target_calls": [],
                               "target_tokens_per_s": [], "shapes": {}}
        try:
            with Meter() as m:
                for batch in batches:
                    self.counter.reset()
                    t0 = time.perf_counter()
                    phases = self._apply(method, batch)
                    out["batch_wall_s"].append(time.perf_counter() - t0)
                    out["phases"].append(phases)
                    out["target_tokens"].append(self.counter.tokens)
                    out["target_calls"].append(self.counter.calls)
                    tt = phases.get("targets") or 0.0
                    out["target_tokens_per_s"].append(self.counter.tokens / tt if tt > 0 else None)
                    for (b, t), c in self.counter.shapes.items():
                        key = f"{b},{t}"
                        out["shapes"][key] = out["shapes"].get(key, 0) + c
            out["edit"] = m.result
            if evaluate:
                with Meter() as m:
                    out["quality"] = self.evaluate(n)
                out["eval"] = m.result
        finally:
            self.counter.active = False
            self.restore()
        return out

    def _start_sequence(self, method: str) -> None:
        raise NotImplementedError

    def _apply(self, method: str, batch: list[dict]) -> dict[str, Any]:
        raise NotImplementedError


class OursWorker(_WorkerBase):
    """blue_plugin's engine (:func:`blue_plugin.editing.editor.apply_blue_to_model`)."""

    system = "ours"

    def stats_cold(self, n_samples: int, into_cache: bool) -> dict[str, Any]:
        """C_0 of all critical layers from an empty cache, one truncated pass. ``into_cache``:
        write into the cache the edits use (else a temporary folder, deleted)."""
        from blue_plugin.stats.moments import get_second_moments

        names = [self.editor0.layout.rewrite(l) for l in self.layers]
        cache = Path(self.hp.stats_dir) if into_cache else Path(tempfile.mkdtemp(dir=self.work))
        if into_cache and cache.exists():
            shutil.rmtree(cache)
        model_id = str(getattr(self.model.config, "_name_or_path", None) or self.hp.model_name)
        try:
            with Meter() as m:
                get_second_moments(self.model, self.tok, names, corpus=self.hp.mom2_dataset, n_samples=n_samples,
                                   max_length=self.hp.mom2_max_length, cache_dir=cache, model_id=model_id,
                                   progress=False)
        finally:
            if not into_cache:
                shutil.rmtree(cache, ignore_errors=True)
        return {"system": self.system, "n_samples": n_samples, "layers": self.layers, **m.result}

    def prepare(self) -> dict[str, Any]:
        """Load the statistics (from the disk cache), generate the context prefixes and compute
        AlphaEdit's projectors, as the first batch of a session would. Returns the prefixes."""
        from blue_plugin.editing.editor import Editor

        with Meter() as m:
            ed = Editor(self.model, self.tok, self.hp.replace(base_method="AlphaEdit", blue=False))
            ed.ensure_second_moments(self.layers)
            prefixes = ed.prefixes()
            if any(OUR_METHODS[x][0] == "AlphaEdit" for x in self.cfg.methods):
                for l in self.layers:
                    ed.projector(l)
        return {"system": self.system, "prefixes": list(prefixes), **m.result}

    def _start_sequence(self, method: str) -> None:
        from blue_plugin.editing.state import reset_state

        reset_state(self.model)  # forgets the edits; keeps C0, projectors and prefixes

    def _apply(self, method: str, batch: list[dict]) -> dict[str, Any]:
        from blue_plugin.editing import editor as engine
        from blue_plugin.editing.state import get_state

        hp = method_hparams(self.hp, method)
        original = engine.compute_targets
        counter = self.counter

        def counted(*args, **kwargs):
            counter.active = True
            try:
                return original(*args, **kwargs)
            finally:
                counter.active = False

        engine.compute_targets = counted
        try:
            engine.apply_blue_to_model(self.model, self.tok, batch, hp)
        finally:
            engine.compute_targets = original
        rec = get_state(self.model).history[-1]
        steps = {str(l): list(s) for l, s in rec["steps"].items()}
        return {**{k: float(v) for k, v in rec["time"].items()}, "steps": steps}


class EasyEditWorker(_WorkerBase):
    """EasyEdit's own ``apply_memit_to_model`` / ``apply_AlphaEdit_to_model`` with its own
    hyperparameter classes (see the module docstring for what had to be adapted)."""

    system = "easyedit"

    def __init__(self, cfg: SpeedConfig, model=None, tok=None, log_dir: Optional[str] = None):
        super().__init__(cfg, model, tok)
        from blue_plugin.integrations.easyedit import import_easyeditor

        with contextlib.redirect_stdout(io.StringIO()):
            import_easyeditor(cfg.easyedit_root)
        # by module path: ``easyeditor.models`` as an attribute is shadowed by ``trainer.models``
        ae_main = importlib.import_module("easyeditor.models.alphaedit.AlphaEdit_main")
        memit_main = importlib.import_module("easyeditor.models.memit.memit_main")
        ls_mod = importlib.import_module("easyeditor.models.rome.layer_stats")

        self.mods = {"MEMIT": memit_main, "AlphaEdit": ae_main}
        self.ls_mod = ls_mod
        self.log_path = Path(log_dir or self.work) / "easyedit-stdout.log"
        self.log = open(self.log_path, "a", encoding="utf-8")
        self.steps: list[int] = []
        self._docs: list[str] = []
        ls_mod.load_dataset = self._load_dataset  # serve the local corpus (this process only)
        self.tok.padding_side = "right"  # as BaseEditor sets it for MEMIT/AlphaEdit on Llama
        self.ee_hp = {m: self._ee_hparams(m) for m in EE_METHODS}
        self.phase: dict[str, float] = {}
        for name, mod in self.mods.items():
            for fn, phase in (("compute_z", "targets"), ("compute_ks", "keys"),
                              ("get_module_input_output_at_words", "keys"), ("get_cov", "cov")):
                setattr(mod, fn, self._timed(getattr(mod, fn), phase, count=(phase == "targets")))

    def _load_dataset(self, *args, **kwargs):
        import datasets

        return {"train": datasets.Dataset.from_dict({"text": list(self._docs)})}

    def _timed(self, fn: Callable, phase: str, count: bool) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            calls0 = self.counter.calls
            if count:
                self.counter.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                if count:
                    self.counter.active = False
                    # compute_z runs one forward per iteration and stops after the forward whose
                    # loss is small enough: gradient steps = forwards - 1; all forwards used =
                    # never converged, recorded as v_num_grad_steps (ours' convention)
                    forwards = self.counter.calls - calls0
                    limit = self.hp.v_num_grad_steps
                    self.steps.append(limit if forwards >= limit else forwards - 1)
                self.phase[phase] = self.phase.get(phase, 0.0) + time.perf_counter() - t0

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def _ee_hparams(self, method: str):
        from blue_plugin.model.layout import resolve_layout

        hp = self.hp
        layout = resolve_layout(self.model, hp.replace(blue=False))
        lm_head = layout.templates["lm_head_module"]
        params = dict(self.model.named_parameters())
        if f"{lm_head}.weight" not in params:  # tied: named_parameters() lists only the embedding
            emb = self.model.get_input_embeddings()
            lm_head = next(n for n, mod in self.model.named_modules() if mod is emb)
        names = {k: layout.templates[k] for k in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp",
                                                   "attn_module_tmp", "ln_f_module")}
        names["lm_head_module"] = lm_head
        name = str(getattr(self.model.config, "_name_or_path", "") or hp.model_name).rstrip("/").split("/")[-1]
        if getattr(self.model.config, "model_type", "") == "llama" and "llama" not in name.lower():
            name += " (llama)"  # EasyEdit's AlphaEdit sizes its key cache by substrings of the name
        v_loss_layer = hp.v_loss_layer if hp.v_loss_layer >= 0 else self.model.config.num_hidden_layers - 1
        common = dict(
            layers=list(hp.layers), layer_selection="all", fact_token=hp.fact_token,
            v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr, v_loss_layer=v_loss_layer,
            v_weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
            mom2_adjustment=hp.mom2_adjustment, mom2_update_weight=hp.mom2_update_weight, **names,
            mom2_dataset=_EE_CORPUS_NAME, mom2_n_samples=hp.mom2_n_samples, mom2_dtype=hp.mom2_dtype,
            alg_name=method, device="cpu" if next(self.model.parameters()).device.type == "cpu" else str(next(self.model.parameters()).device),
            model_name=name, stats_dir=str(self.cache / "ee-stats"), max_length=hp.max_length,
            batch_size=self.cfg.batch_size,
        )
        if method == "MEMIT":
            from easyeditor.models.memit.memit_hparams import MEMITHyperParams  # type: ignore

            return MEMITHyperParams(**common)
        from easyeditor.models.alphaedit.AlphaEdit_hparams import AlphaEditHyperParams  # type: ignore

        return AlphaEditHyperParams(**common, nullspace_threshold=hp.nullspace_threshold, L2=hp.L2,
                                    P_loc=str(self.cache / "null_space_project.pt"))

    @contextlib.contextmanager
    def _ee_call(self):
        """EasyEdit prints a lot and writes into the working directory: send its stdout to a log
        and run it inside this worker's temporary folder."""
        cwd = os.getcwd()
        os.chdir(self.work)
        try:
            with contextlib.redirect_stdout(self.log):
                yield
        finally:
            os.chdir(cwd)
            self.log.flush()

    def stats_cold(self, n_samples: int, into_cache: bool) -> dict[str, Any]:
        """EasyEdit's ``layer_stats`` for every critical layer from an empty cache (what its
        ``get_cov`` runs on a miss), on the first ``n_samples`` documents of the same corpus."""
        self._docs = self.corpus_docs(n_samples)
        stats_dir = Path(self.ee_hp["MEMIT"].stats_dir) if into_cache else Path(tempfile.mkdtemp(dir=self.work))
        if into_cache and stats_dir.exists():
            shutil.rmtree(stats_dir)
        hp = dataclasses.replace(self.ee_hp["MEMIT"], mom2_n_samples=n_samples)
        try:
            with self._ee_call(), Meter() as m:
                for l in self.layers:
                    self.ls_mod.layer_stats(self.model, self.tok, hp.rewrite_module_tmp.format(l), str(stats_dir),
                                            _EE_CORPUS_NAME, to_collect=["mom2"], sample_size=n_samples,
                                            precision=hp.mom2_dtype, hparams=hp, progress=_no_progress)
        finally:
            if not into_cache:
                shutil.rmtree(stats_dir, ignore_errors=True)
        return {"system": self.system, "n_samples": n_samples, "layers": self.layers, "n_docs": len(self._docs),
                **m.result}

    def prepare(self, prefixes: Sequence[str]) -> dict[str, Any]:
        """Fill EasyEdit's template caches with ``prefixes`` (ours), load its covariances from its
        disk cache and compute AlphaEdit's projector P with its own ``get_project`` (kept in its
        module globals and saved to ``P_loc`` so that its apply function does not recompute it)."""
        templates = [["{}"], [p + "{}" for p in prefixes if p]]
        with self._ee_call(), Meter() as m:
            for method, mod in self.mods.items():
                mod.CONTEXT_TEMPLATES_CACHE = templates
                mod.COV_CACHE.clear()
                hp = self.ee_hp[method]
                for l in self.layers:
                    mod.get_cov(self.model, self.tok, hp.rewrite_module_tmp.format(l), hp.mom2_dataset,
                                hp.mom2_n_samples, hp.mom2_dtype, hparams=hp)
            if "AlphaEdit" in self.cfg.ee_methods:
                mod, hp = self.mods["AlphaEdit"], self.ee_hp["AlphaEdit"]
                P = torch.stack([mod.get_project(self.model, self.tok, l, hp) for l in self.layers])
                torch.save(P, hp.P_loc)
                mod.P, mod.P_loaded = P, True
        self.phase.clear()
        return {"system": self.system, "templates": templates, **m.result}

    def _start_sequence(self, method: str) -> None:
        self._reset_cache = method == "AlphaEdit"  # a new sequence: AlphaEdit forgets its K_p K_p^T

    def _apply(self, method: str, batch: list[dict]) -> dict[str, Any]:
        mod, hp = self.mods[method], self.ee_hp[method]
        self.phase, self.steps = {}, []
        t0 = time.perf_counter()
        with self._ee_call():
            if method == "MEMIT":
                mod.apply_memit_to_model(self.model, self.tok, batch, hp, copy=False, return_orig_weights=False)
            else:
                mod.apply_AlphaEdit_to_model(self.model, self.tok, batch, hp, copy=False, return_orig_weights=False,
                                             reset_cache=self._reset_cache)
                self._reset_cache = False
        total = time.perf_counter() - t0
        phases = {k: float(v) for k, v in self.phase.items()}
        phases["total"] = total
        phases["update"] = total - sum(v for k, v in phases.items() if k != "total")
        return {**phases, "steps": {str(hp.layers[-1]): list(self.steps)}}

    def close(self) -> None:
        self.log.close()
        super().close()


def _no_progress(iterable, total=None):
    """Stands in for tqdm in EasyEdit's ``layer_stats`` (its ``progress=None`` path is broken)."""
    return iterable


WORKERS = {"ours": OursWorker, "easyedit": EasyEditWorker}


def _worker_entry(conn, system: str, cfg: SpeedConfig, log_path: str) -> None:
    """Body of a worker process: build the worker, then answer ``(command, kwargs)`` messages
    with ``("ok", result)`` or ``("error", traceback)`` until ``None`` arrives."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["BLUE_PLUGIN_NO_EASYEDIT"] = "1"  # never import EasyEdit implicitly (the ours worker)
    if "fork" in mp.get_all_start_methods():
        # a spawned child inherits 'spawn' as its default; EasyEdit's data loader (local collate
        # function) needs the platform default, as in a normal EasyEdit run
        mp.set_start_method("fork", force=True)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{system}] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        kwargs = {"log_dir": str(Path(log_path).parent)} if system == "easyedit" else {}
        worker = WORKERS[system](cfg, **kwargs)
        conn.send(("ok", worker.info()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            cmd, kwargs = msg
            try:
                conn.send(("ok", getattr(worker, cmd)(**kwargs)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        worker.close()


class WorkerError(RuntimeError):
    """A worker failed; the message carries its traceback."""


class ProcessWorker:
    """A worker in its own (spawned) process, called like the in-process one."""

    def __init__(self, system: str, cfg: SpeedConfig, log_path: Path, python: Optional[str] = None):
        ctx = mp.get_context("spawn")
        self.system, self.log_path = system, log_path
        self.conn, child = ctx.Pipe()
        if python:
            ctx.set_executable(python)
        try:
            self.proc = ctx.Process(target=_worker_entry, args=(child, system, cfg, str(log_path)), daemon=False)
            self.proc.start()
        finally:
            if python:
                ctx.set_executable(sys.executable)
        child.close()
        self.info = self._receive("start")

    def _receive(self, what: str) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise WorkerError(f"the {self.system} worker died during {what}; see {self.log_path}:\n{_tail(self.log_path)}") from None
        if status != "ok":
            raise WorkerError(f"{self.system} worker failed during {what}:\n{payload}")
        return payload

    def call(self, cmd: str, **kwargs) -> Any:
        self.conn.send((cmd, kwargs))
        return self._receive(cmd)

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)


class InProcessWorker:
    def __init__(self, worker: _WorkerBase):
        self.worker, self.system = worker, worker.system
        self.info = worker.info()

    def call(self, cmd: str, **kwargs) -> Any:
        try:
            return getattr(self.worker, cmd)(**kwargs)
        except Exception:
            raise WorkerError(f"{self.system} failed during {cmd}:\n{traceback.format_exc()}") from None

    def close(self) -> None:
        self.worker.close()


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start_workers(cfg: SpeedConfig, log_dir: Path) -> dict[str, Any]:
    systems = ["ours"] + (["easyedit"] if cfg.easyedit_root else [])
    workers: dict[str, Any] = {}
    try:
        if cfg.isolation == "process":
            for s in systems:
                py = cfg.ee_python if s == "easyedit" else None
                workers[s] = ProcessWorker(s, cfg, log_dir / f"worker-{s}.log", py)
        else:
            from blue_plugin.model.loading import load_model

            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            model, tok = load_model(cfg.model)
            for s in systems:
                kwargs = {"log_dir": str(log_dir)} if s == "easyedit" else {}
                workers[s] = InProcessWorker(WORKERS[s](cfg, model, tok, **kwargs))
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def _jobs(cfg: SpeedConfig, have_ee: bool) -> list[tuple[str, str]]:
    """(system, method) pairs of one repetition: per base method, EasyEdit's run sits between
    ours (e.g. ours MEMIT, EasyEdit MEMIT, ours MEMIT_BLUE), so the systems alternate."""
    jobs: list[tuple[str, str]] = []
    for base in EE_METHODS:
        group = [("ours", m) for m in ours_for_base(base, cfg.methods)]
        if have_ee and base in cfg.ee_methods:
            group.insert(min(1, len(group)), ("easyedit", base))
        jobs += group
    return jobs


def run_speed(cfg: SpeedConfig, out: str | os.PathLike, command: Optional[str] = None) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``, write ``results.json`` / ``table.md`` / plots to
    ``out`` and return the results (see the module docstring)."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "speed",
        "command": command,
        "config": dataclasses.asdict(cfg),
        "load_average_start": list(os.getloadavg()),
        "machine": machine_info(),
        "versions": versions(),
        "targets": TARGETS,
    }
    work_dir = tempfile.mkdtemp(prefix="speed-run-")
    cfg = dataclasses.replace(cfg, work_dir=work_dir)
    workers: dict[str, Any] = {}

    def start(label: str) -> dict[str, Any]:
        ws = start_workers(cfg, out)
        result[label] = {s: w.info for s, w in ws.items()}
        digests = {w.info["weights_digest"] for w in ws.values()}
        result["same_weights"] = len(digests) == 1
        if len(digests) != 1:
            for w in ws.values():
                w.close()
            raise WorkerError(f"the workers loaded different weights: {result[label]}")
        return ws

    try:
        workers = start("workers")
        have_ee = "easyedit" in workers
        hp = base_hparams(cfg, None)
        n_samples = hp.mom2_n_samples
        result["hparams"] = {k: v for k, v in hp.to_dict().items() if k not in ("base_method", "blue", "stats_dir")}
        order = list(workers)

        # statistics, cold: the first repetition fills the cache the edits use
        stats: list[dict[str, Any]] = []
        for r in range(cfg.stats_reps):
            for s in (order if r % 2 == 0 else order[::-1]):
                logger.info("statistics (cold) %s, %d samples, repetition %d", s, n_samples, r)
                stats.append(workers[s].call("stats_cold", n_samples=n_samples, into_cache=(r == 0)))
        for count in cfg.stats_curve:
            if count == n_samples:
                continue
            for s in order:
                logger.info("statistics (cold) %s, %d samples (curve)", s, count)
                stats.append(workers[s].call("stats_cold", n_samples=count, into_cache=False))
        result["statistics"] = stats

        if cfg.isolation == "process" and cfg.restart_workers:
            # edit in fresh processes that find the statistics in the cache, as a user session
            # does ("warm"): the heap left by the cold pass would otherwise count as editing memory
            for w in workers.values():
                w.close()
            workers = {}
            workers = start("workers_edit")
        result["restarted_workers"] = cfg.isolation == "process" and cfg.restart_workers

        # caches of the first batch (statistics from disk, templates, projectors)
        prep = {"ours": workers["ours"].call("prepare")}
        if have_ee:
            prep["easyedit"] = workers["easyedit"].call("prepare", prefixes=prep["ours"]["prefixes"])
        result["prepare"] = prep

        # the timed, alternating repetitions
        runs: list[dict[str, Any]] = []
        for r in range(cfg.reps):
            jobs = _jobs(cfg, have_ee)
            for system, method in (jobs if r % 2 == 0 else jobs[::-1]):
                logger.info("repetition %d: %s %s, N=%d, B=%d", r, system, method, cfg.n, cfg.batch_size)
                res = workers[system].call("edit_run", method=method, n=cfg.n, batch_size=cfg.batch_size,
                                           evaluate=cfg.evaluate and r == 0)
                res["rep"] = r
                res["load_1m"] = os.getloadavg()[0]
                runs.append(res)
        result["runs"] = runs

        # plain forward+backward at the shapes each system's target phase used
        plain: dict[str, dict[str, Any]] = {}
        for run in runs:
            key = f"{run['system']}/{run['method']}"
            if run["rep"] == 0 and run["shapes"]:
                plain[key] = workers[run["system"]].call("plain_fb", shapes=run["shapes"])
        result["plain"] = plain

        # cost growth
        scaling: list[dict[str, Any]] = []
        for B in cfg.scaling:
            for m in cfg.scaling_methods:
                pair = [("ours", m)] if "ours" in cfg.scaling_systems else []
                base = OUR_METHODS[m][0]
                if have_ee and base in cfg.ee_methods and "easyedit" in cfg.scaling_systems:
                    pair.append(("easyedit", base))
                for system, method in (pair if B % 2 else pair[::-1]):
                    logger.info("scaling B=%d: %s %s", B, system, method)
                    res = workers[system].call("edit_run", method=method, n=B, batch_size=B, evaluate=False)
                    res["load_1m"] = os.getloadavg()[0]
                    scaling.append(res)
        result["scaling"] = scaling
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    result["config"]["work_dir"] = None
    result["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t_run
    result["summary"] = summarize(result)
    write_json(out / "results.json", result)
    (out / "table.md").write_text(render_table(result), encoding="utf-8")
    result["paths"] = {"results": str(out / "results.json"), "table": str(out / "table.md")}
    result["paths"].update(make_plots(result, out))
    return result


# ------------------------------------------------------------------------------------------------
# summary, table, plots
# ------------------------------------------------------------------------------------------------
def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians per (system, method) and the ratios the issue asks for."""
    per: dict[str, dict[str, Any]] = {}
    for run in result.get("runs", []):
        key = f"{run['system']}/{run['method']}"
        d = per.setdefault(key, {"system": run["system"], "method": run["method"], "batch_s": [], "phases": {},
                                 "tokens_per_s": [], "peak_rss_mib": [], "peak_rss_tree_mib": [], "steps": []})
        d["batch_s"] += run["batch_wall_s"]
        for ph in run["phases"]:
            for k, v in ph.items():
                if k != "steps":
                    d["phases"].setdefault(k, []).append(v)
            for s in (ph.get("steps") or {}).values():
                d["steps"] += s
        d["tokens_per_s"] += [x for x in run["target_tokens_per_s"] if x is not None]
        d["peak_rss_mib"].append(run["edit"]["peak_rss_mib"])
        d["peak_rss_tree_mib"].append(run["edit"]["peak_rss_tree_mib"])
        if "quality" in run:
            d["quality"] = {k: run["quality"].get(k) for k in ("efficacy", "generalization", "specificity")}
    methods: dict[str, Any] = {}
    for key, d in per.items():
        plain = result.get("plain", {}).get(key, {})
        tps = _summary(d["tokens_per_s"])["median"]
        methods[key] = {
            "system": d["system"], "method": d["method"],
            "batch_s": _summary(d["batch_s"]),
            "phases_s": {k: _summary(v)["median"] for k, v in d["phases"].items()},
            "steps_mean": sum(d["steps"]) / len(d["steps"]) if d["steps"] else None,
            "target_tokens_per_s": tps,
            "plain_tokens_per_s": plain.get("tokens_per_s"),
            "throughput_ratio": _ratio(tps, plain.get("tokens_per_s")),
            "peak_rss_mib": max(d["peak_rss_mib"]) if d["peak_rss_mib"] else None,
            "peak_rss_tree_mib": max(d["peak_rss_tree_mib"]) if d["peak_rss_tree_mib"] else None,
            "quality": d.get("quality"),
        }
    stats: dict[str, Any] = {}
    for s in result.get("statistics", []):
        stats.setdefault(s["system"], {}).setdefault(str(s["n_samples"]), []).append(s)
    stats_summary = {
        sys_: {n: {"seconds": _summary([x["seconds"] for x in xs]), "peak_rss_mib": max(x["peak_rss_mib"] for x in xs),
                   "peak_rss_tree_mib": max(x["peak_rss_tree_mib"] for x in xs)} for n, xs in by.items()}
        for sys_, by in stats.items()
    }
    ratios: dict[str, Any] = {}
    n_main = str(result.get("hparams", {}).get("mom2_n_samples"))
    ours_st = stats_summary.get("ours", {}).get(n_main, {}).get("seconds", {}).get("median")
    ee_st = stats_summary.get("easyedit", {}).get(n_main, {}).get("seconds", {}).get("median")
    ratios["statistics_cold"] = _ratio(ours_st, ee_st)
    for key, m in methods.items():
        if m["system"] != "ours":
            continue
        ee = methods.get(f"easyedit/{OUR_METHODS[m['method']][0]}")
        if ee is None:
            continue
        qo, qe = (m.get("quality") or {}), (ee.get("quality") or {})
        ratios[f"batch/{m['method']}"] = _ratio(m["batch_s"]["median"], ee["batch_s"]["median"])
        ratios[f"efficacy_not_lower/{m['method']}"] = (
            None if qo.get("efficacy") is None or qe.get("efficacy") is None else qo["efficacy"] >= qe["efficacy"])
    scaling: dict[str, dict[str, float]] = {}
    for run in result.get("scaling", []):
        scaling.setdefault(f"{run['system']}/{run['method']}", {})[str(run["batch_size"])] = run["batch_wall_s"][0]
    return {"methods": methods, "statistics": stats_summary, "ratios": ratios, "scaling": scaling}


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render_table(result: dict[str, Any]) -> str:
    """Markdown: the run's header (command, load, threads), the headline ratios against the
    issue's targets, and one row per (system, method)."""
    s = result["summary"]
    cfg = result["config"]
    hp = result.get("hparams", {})
    mach = result.get("machine", {})
    lines = [
        "## Speed: blue_plugin vs EasyEdit",
        "",
        f"Command: `{result.get('command') or 'n/a'}`",
        "",
        f"Model {cfg['model']}, N = {cfg['n']} CounterFact edits ({Path(cfg['data']).name}), B = {cfg['batch_size']}, "
        f"{cfg['reps']} repetitions (alternating), statistics: {hp.get('mom2_n_samples')} docs of "
        f"{Path(str(hp.get('mom2_dataset'))).name}, critical layers {hp.get('layers')}, v_num_grad_steps "
        f"{hp.get('v_num_grad_steps')}, v_lr {hp.get('v_lr')}. Isolation: {cfg['isolation']}.",
        "",
        f"Machine: {mach.get('cpu')} ({mach.get('cpu_count')} CPUs), torch threads "
        f"{ {k: v.get('torch_threads') for k, v in result.get('workers', {}).items()} }, load average at start "
        f"{[round(x, 2) for x in result.get('load_average_start', [])]}, at end "
        f"{[round(x, 2) for x in result.get('load_average_end', [])]}; wall {_f(result.get('wall_s'), '{:.0f}')} s.",
        "",
        "| quantity | ours | EasyEdit | ratio ours/EasyEdit | target |",
        "|---|---|---|---|---|",
    ]
    st = s["statistics"]
    n_main = str(hp.get("mom2_n_samples"))
    o = st.get("ours", {}).get(n_main, {})
    e = st.get("easyedit", {}).get(n_main, {})
    lines.append(
        f"| statistics, layers {hp.get('layers')}, cold (s, median) | {_f(o.get('seconds', {}).get('median'))} | "
        f"{_f(e.get('seconds', {}).get('median'))} | {_f(s['ratios'].get('statistics_cold'), '{:.3f}')} | <= {TARGETS['stats_ratio_max']} |")
    M = s["methods"]
    for key, m in M.items():
        if m["system"] != "ours":
            continue
        ee = M.get(f"easyedit/{OUR_METHODS[m['method']][0]}", {})
        r = s["ratios"].get(f"batch/{m['method']}")
        lines.append(
            f"| s / batch, ours {m['method']} vs EasyEdit {OUR_METHODS[m['method']][0]} (median) | "
            f"{_f(m['batch_s']['median'])} | {_f((ee.get('batch_s') or {}).get('median'))} | {_f(r, '{:.3f}')} | "
            f"<= {TARGETS['batch_ratio_max']} |")
    for key, m in M.items():
        if m["system"] != "ours":
            continue
        ee = M.get(f"easyedit/{OUR_METHODS[m['method']][0]}", {})
        qo, qe = (m.get("quality") or {}), (ee.get("quality") or {})
        lines.append(f"| efficacy, {m['method']} vs {OUR_METHODS[m['method']][0]} | {_f(qo.get('efficacy'))} | "
                     f"{_f(qe.get('efficacy'))} | | ours >= EasyEdit |")
    for key, m in M.items():
        if m["system"] != "ours":
            continue
        ee = M.get(f"easyedit/{OUR_METHODS[m['method']][0]}", {})
        lines.append(f"| target-opt. tokens/s / plain fwd+bwd tokens/s, {m['method']} | {_f(m['throughput_ratio'])} | "
                     f"{_f(ee.get('throughput_ratio'))} | | >= {TARGETS['throughput_ratio_min']} (ours) |")
    for key, m in M.items():
        if m["system"] != "ours":
            continue
        ee = M.get(f"easyedit/{OUR_METHODS[m['method']][0]}", {})
        lines.append(f"| peak RSS editing (MiB, process + children), {m['method']} | {_f(m['peak_rss_tree_mib'], '{:.0f}')} | "
                     f"{_f(ee.get('peak_rss_tree_mib'), '{:.0f}')} | | < {TARGETS['peak_rss_mib_max']:.0f} (ours) |")
    lines += [
        "",
        "| system / method | s / batch median [min, max] (n) | targets / keys / update s | steps (mean) | "
        "target tokens/s | plain fwd+bwd tokens/s | peak RSS MiB (VmHWM / tree) | efficacy | generalization | specificity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, m in M.items():
        b, ph, q = m["batch_s"], m["phases_s"], m.get("quality") or {}
        lines.append(
            f"| {key} | {_f(b['median'])} [{_f(b['min'])}, {_f(b['max'])}] ({b['n']}) | "
            f"{_f(ph.get('targets'))} / {_f(ph.get('keys'))} / {_f(ph.get('update'))} | {_f(m['steps_mean'], '{:.1f}')} | "
            f"{_f(m['target_tokens_per_s'], '{:.0f}')} | {_f(m['plain_tokens_per_s'], '{:.0f}')} | "
            f"{_f(m['peak_rss_mib'], '{:.0f}')} / {_f(m['peak_rss_tree_mib'], '{:.0f}')} | {_f(q.get('efficacy'))} | "
            f"{_f(q.get('generalization'))} | {_f(q.get('specificity'))} |")
    if any(len(v) > 1 for v in st.values()) or len(st.get("ours", {})) > 1:
        lines += ["", "| statistics (cold) | samples | seconds (median) | peak RSS MiB (tree) |", "|---|---|---|---|"]
        for sys_, by in st.items():
            for n, v in sorted(by.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {sys_} | {n} | {_f(v['seconds']['median'])} | {_f(v['peak_rss_tree_mib'], '{:.0f}')} |")
    if s["scaling"]:
        Bs = sorted({int(b) for v in s["scaling"].values() for b in v})
        lines += ["", "| s / batch (one batch) | " + " | ".join(f"B={b}" for b in Bs) + " |", "|---|" + "---|" * len(Bs)]
        for key, v in s["scaling"].items():
            lines.append(f"| {key} | " + " | ".join(_f(v.get(str(b))) for b in Bs) + " |")
    prep = result.get("prepare", {})
    if prep:
        lines += ["", "Prepare (statistics from disk, context templates, projectors), s: "
                  + ", ".join(f"{k} {_f(v.get('seconds'))}" for k, v in prep.items()) + "."]
    lines += ["", "Tokens/s: batch x padded length of every forward call of the decoder during the target phase "
              "over the phase's wall time; ours replays the blocks below the edited layer from a cache (work skipped), "
              "so its ratio can exceed 1; with its prefix cache only the tokens from the subject's last token on "
              "are run and counted. Peak RSS 'tree' includes child processes (EasyEdit's data-loader workers)."]
    return "\n".join(lines) + "\n"


def make_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    """``per_batch_vs_B.png`` (scaling) and ``stats_vs_samples.png`` (statistics curve), when
    the run measured them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    s = result["summary"]
    if s["scaling"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for key, v in s["scaling"].items():
            pts = sorted((int(b), t) for b, t in v.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("seconds per batch")
        ax.set_title("Per-batch edit time (statistics cached)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "per_batch_vs_B.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written["scaling_plot"] = str(p)
    st = s["statistics"]
    if any(len(by) > 1 for by in st.values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for sys_, by in st.items():
            pts = sorted((int(n), v["seconds"]["median"]) for n, v in by.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sys_)
        ax.set_xlabel("corpus documents")
        ax.set_ylabel("seconds (cold, all critical layers)")
        ax.set_title("Key statistics time vs sample count")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "stats_vs_samples.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written["stats_plot"] = str(p)
    return written


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,5,10, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--methods", type=_name_list, default=list(OUR_METHODS), help=f"ours, of {list(OUR_METHODS)}")
    p.add_argument("--ee-methods", type=_name_list, default=list(EE_METHODS), help=f"EasyEdit's, of {list(EE_METHODS)}")
    p.add_argument("--mom2-n-samples", type=int, default=None, help="corpus documents for C0 (default: the YAML's)")
    p.add_argument("--corpus", default=None, help="corpus file (default: the YAML's mom2_dataset)")
    p.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter (YAML value)")
    p.add_argument("--scaling", type=_int_list, default=[], help="batch sizes for the cost-growth sweep, e.g. 1,5,10,20,50")
    p.add_argument("--scaling-methods", type=_name_list, default=["MEMIT", "AlphaEdit_BLUE"],
                   help="our methods in the sweep (EasyEdit's method of the same base runs beside each)")
    p.add_argument("--scaling-systems", type=_name_list, default=["ours", "easyedit"],
                   help="systems in the sweep: ours, easyedit or both (to split a long sweep over two runs; "
                        "merge them with --combine)")
    p.add_argument("--stats-curve", type=_int_list, default=[], help="extra sample counts for statistics time vs samples")
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
    from benchmarks.sequential import parse_overrides

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


if __name__ == "__main__":
    sys.exit(main())
