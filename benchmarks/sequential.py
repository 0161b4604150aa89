"""Sequential batch editing benchmark (the BLUE paper's protocol), all methods side by side.

Protocol: evaluate the unedited model once ("pre"); then, for each method, start from the
unedited weights, edit the first N cases of the dataset in file order, B at a time, sequentially
without restoring, and evaluate all N cases on the final model. Methods: MEMIT, RECT, PRUNE,
AlphaEdit (``blue: false``, the original residual distribution) and their ``_BLUE`` variants
(``blue: true``), all built from one YAML with only ``base_method`` / ``blue`` changed.

Metrics (:mod:`blue_plugin.evaluation.metrics`, DESIGN.md section 4), mean and 95% bootstrap interval:
CounterFact -- efficacy, generalization, specificity (NLL comparisons), fluency (weighted bi/tri-gram
entropy of greedy generations from the generation prompts, which are the edit prompts for EasyEdit's
CounterFact), consistency (n/a: no reference snippets); zsRE -- efficacy, generalization (token
accuracy under teacher forcing) and specificity (agreement with the unedited model's predictions).
JSON values are fractions (fluency in bits); the markdown table shows them x100 as the paper does.

Costs: wall time of the key-statistics pass (first call of the run: computed, or read from the
disk cache; a second, cached call; optionally a forced cold pass), wall time of every batch edit
(and its targets / keys / update parts), target-optimisation steps per edited layer, peak RSS.

Resumable: after every batch the edited matrices and the sequential state (accumulated K_p K_p^T,
PRUNE's original weight, fingerprints, context prefixes, history) are written under
``OUT/progress/<METHOD>/``; running the same command again continues where it stopped and ends
with the same result. A finished method is kept in ``OUT/progress/<METHOD>/done.json``.

Outputs in ``OUT``: ``results.json`` (config, versions, machine, per-case scores, summaries, costs),
``table.md`` (methods as rows, metrics as columns, "pre" first), ``steps_per_layer.png`` and, with
``--eval-every``, ``metrics_vs_edits.png``. ``--compare DIR1 DIR2 ... --out DIR`` merges runs
into ``comparison.md`` / ``comparison.json``.

Examples::

    python -m benchmarks.sequential --data counterfact \\
        --methods MEMIT,MEMIT_BLUE --n 20 --batch-size 5 --seed 0 --out /tmp/seq-cf
    python benchmarks/sequential.py --data zsre \\
        --methods AlphaEdit,AlphaEdit_BLUE --n 200 --batch-size 20 --eval-every 40 --out /tmp/seq-zsre \\
        --model /models/smollm2-hf --device cuda
    python -m benchmarks.sequential --compare /tmp/seq-cf /tmp/seq-zsre --out /tmp/seq-all
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import (
    DEFAULT_HPARAMS,
    DEFAULT_MODEL,
    REPO_ROOT,
    jsonable,
    cuda_peak_mib,
    current_rss_mib,
    machine_info,
    peak_rss_mib,
    read_json,
    reset_peak_rss,
    resolve_data_arg,
    versions,
    write_json,
)

logger = logging.getLogger("benchmarks.sequential")

#: method name -> (base_method, blue)
METHODS: dict[str, tuple[str, bool]] = {
    "MEMIT": ("MEMIT", False),
    "MEMIT_BLUE": ("MEMIT", True),
    "RECT": ("RECT", False),
    "RECT_BLUE": ("RECT", True),
    "PRUNE": ("PRUNE", False),
    "PRUNE_BLUE": ("PRUNE", True),
    "AlphaEdit": ("AlphaEdit", False),
    "AlphaEdit_BLUE": ("AlphaEdit", True),
}
CF_FORMATS = ("counterfact", "counterfact_rome", "counterfact_templates")
METRIC_LABELS = {
    "efficacy": "Efficacy",
    "generalization": "Generalization",
    "specificity": "Specificity",
    "fluency": "Fluency",
    "consistency": "Consistency",
}
RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1


class BenchmarkInterrupted(RuntimeError):
    """Raised by an ``on_batch`` callback to stop a run after a checkpoint (used by tests)."""


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``"MEMIT,memit_blue"`` or a list -> canonical method names, in order, without duplicates.

    Raises:
        ValueError: an empty list or an unknown name (the message lists the known ones).
    """
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise ValueError(f"give at least one method; choose from {', '.join(METHODS)}")
    lower = {m.lower(): m for m in METHODS}
    out: list[str] = []
    for item in items:
        name = lower.get(item.lower().replace("-", "_"))
        if name is None:
            raise ValueError(f"unknown method {item!r}; choose from {', '.join(METHODS)}")
        if name not in out:
            out.append(name)
    return out


def method_hparams(base, method: str):
    """The hyperparameters of ``method``: ``base`` with its ``base_method`` set, in the mode ``method``
    names (``for_mode``: that mode's ``mode_overrides`` in force, e.g. AlphaEdit's L2 per mode)."""
    base_method, blue = METHODS[method]
    return base.replace(base_method=base_method).for_mode(blue)


def _resolve_corpus(corpus: str) -> str:
    """A relative corpus path that does not exist from the current directory is tried relative to
    the repository root (a YAML may name its corpus relative to it)."""
    p = Path(os.path.expanduser(corpus))
    if p.is_absolute() or p.exists():
        return str(p.resolve()) if p.exists() else corpus
    candidate = (REPO_ROOT / p).resolve()
    return str(candidate) if candidate.exists() else corpus


def build_base_hparams(
    hparams: str | os.PathLike | None,
    batch_size: int,
    seed: int,
    mom2_n_samples: Optional[int] = None,
    steps: Optional[int] = None,
    stats_dir: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
):
    """Load the YAML (default :data:`DEFAULT_HPARAMS`) and apply the benchmark's overrides
    (``overrides``: any further hyperparameters, applied last)."""
    from blue_plugin.hparams import BLUEHyperParams

    hp = BLUEHyperParams.from_hparams(hparams if hparams is not None else DEFAULT_HPARAMS)
    changes: dict[str, Any] = {"batch_size": batch_size, "seed": seed, "mom2_dataset": _resolve_corpus(hp.mom2_dataset)}
    if mom2_n_samples is not None:
        changes["mom2_n_samples"] = mom2_n_samples
    if steps is not None:
        changes["v_num_grad_steps"] = steps
    if stats_dir is not None:
        changes["stats_dir"] = str(stats_dir)
    for key in ("base_method", "blue"):
        if overrides and key in overrides:
            raise ValueError(f"{key!r} is set per method by the benchmark; choose methods instead of overriding it")
    names = set(hp.to_dict())
    unknown = sorted(k for k in (overrides or {}) if k not in names)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} in overrides; see blue_plugin.hparams.BLUEHyperParams")
    changes.update(overrides or {})
    return hp.replace(**changes)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["v_lr=0.1", "layers=[4, 8]"]`` -> ``{"v_lr": 0.1, "layers": [4, 8]}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config_hash(config: dict[str, Any]) -> str:
    import json

    return hashlib.sha256(json.dumps(jsonable(config), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def evaluate_cases(
    model,
    tok,
    fmt: str,
    cases: Sequence[Any],
    pre_locality: Optional[Sequence[Any]] = None,
    fluency_tokens: int = 100,
    batch_size: int = 32,
    gen_batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Per-case scores of ``cases`` on the current ``model`` (see the module docstring).

    Args:
        fmt: dataset format from :func:`blue_plugin.evaluation.data.load_cases`.
        pre_locality: zsRE only: :func:`blue_plugin.evaluation.metrics.zsre_locality_predictions` of the
            unedited model on the same cases.
        fluency_tokens: CounterFact only: new tokens per greedy generation; 0 skips fluency.

    Returns:
        one dict per case with every metric of :data:`blue_plugin.evaluation.metrics.METRICS` (None where
        not applicable) plus the raw values the metric functions return.
    """
    from blue_plugin.evaluation import metrics

    if fmt in CF_FORMATS:
        scores = metrics.counterfact_case_scores(model, tok, cases, batch_size)
        if fluency_tokens > 0:
            flu = metrics.case_fluency(model, tok, cases, fluency_tokens, gen_batch_size)
        else:
            flu = [None] * len(cases)
        for s, f in zip(scores, flu):
            s["fluency"] = f
    elif fmt == "zsre":
        if pre_locality is None:
            raise ValueError("zsRE evaluation needs the unedited model's locality predictions (pre_locality)")
        scores = metrics.zsre_case_scores(model, tok, cases, pre_locality, batch_size)
    else:
        raise ValueError(f"no evaluation for dataset format {fmt!r}; expected one of {CF_FORMATS + ('zsre',)}")
    for s in scores:
        for key in metrics.METRICS:
            s.setdefault(key, None)
    return scores


def _summarize(scores: Sequence[dict], seed: int) -> dict[str, dict[str, Any]]:
    from blue_plugin.evaluation import metrics

    return metrics.summarize(scores, seed=seed)


# ------------------------------------------------------------------------------------------------
# statistics timing
# ------------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}


def prepare_statistics(editor, hp, measure_cold: bool = False, progress: bool = True) -> dict[str, Any]:
    """Load C0 for all critical layers into the editor's state and time it (``progress``: a bar
    while a pass over the corpus runs).

    Returns:
        ``first_call_s`` (the run's first load: ``source`` = "memory" when the model's state
        already held it, "disk" for the cache, "computed" when a pass over the corpus ran for
        all layers, "partial" when it ran for the layers missing from the cache),
        ``cached_s`` (a second call served from the disk cache), ``cold_s`` (a full pass: the first
        call when it computed, else a pass without cache if ``measure_cold``, else None).
    """
    from blue_plugin.model.loading import default_cache_dir
    from blue_plugin.stats.moments import get_second_moments

    layers = list(hp.layers)
    info: dict[str, Any] = {"layers": layers, "mom2_adjustment": hp.mom2_adjustment,
                            "corpus": hp.mom2_dataset, "n_samples": hp.mom2_n_samples,
                            "max_length": hp.mom2_max_length}
    in_memory = all(editor._c0_key(l) in editor.state.second_moments for l in layers)
    cache_dir = Path(hp.stats_dir) if hp.stats_dir is not None else default_cache_dir() / "stats"
    info["cache_dir"] = str(cache_dir)
    before = _snapshot(cache_dir)
    t0 = time.perf_counter()
    editor.ensure_second_moments(layers, progress=progress)
    info["first_call_s"] = time.perf_counter() - t0
    if not hp.mom2_adjustment:
        info.update(source="identity", cached_s=None, cold_s=None)
        return info
    after = _snapshot(cache_dir)
    written = [k for k, v in after.items() if before.get(k) != v]
    if in_memory:
        source = "memory"
    elif not written:
        source = "disk"
    else:  # "partial": some layers were cached, the pass computed only the others
        source = "computed" if len(written) >= len(layers) else "partial"
    info["source"] = source
    info["files_written"] = len(written)
    names = [editor.layout.rewrite(l) for l in layers]
    model_id = str(getattr(editor.model.config, "_name_or_path", None) or hp.model_name)
    kwargs = dict(corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples, max_length=hp.mom2_max_length,
                  model_id=model_id, progress=False)
    t0 = time.perf_counter()
    get_second_moments(editor.model, editor.tok, names, cache_dir=cache_dir, **kwargs)
    info["cached_s"] = time.perf_counter() - t0
    info["cold_s"] = info["first_call_s"] if source == "computed" else None
    if measure_cold and info["cold_s"] is None:
        t0 = time.perf_counter()
        get_second_moments(editor.model, editor.tok, names, cache_dir=None, **kwargs)
        info["cold_s"] = time.perf_counter() - t0
    logger.info("key statistics for layers %s: first call %.2fs (%s), cached %.2fs, cold %s",
                layers, info["first_call_s"], source, info["cached_s"],
                "n/a" if info["cold_s"] is None else f"{info['cold_s']:.1f}s")
    return info


# ------------------------------------------------------------------------------------------------
# checkpoints (local save/restore of weights + EditState)
# ------------------------------------------------------------------------------------------------
_TENSOR_FIELDS = ("kpkp", "W_orig", "orig_fp", "post_fp")
_LAYER_KEYED = ("steps", "nll", "residual_norm", "delta_norm")


def _int_keyed(record: dict[str, Any]) -> dict[str, Any]:
    """History record read back from JSON: per-layer dicts get their int keys back."""
    out = dict(record)
    for key in _LAYER_KEYED:
        if isinstance(out.get(key), dict):
            out[key] = {int(k): v for k, v in out[key].items()}
    return out


def save_checkpoint(folder: Path, editor, layers: Sequence[int], progress: dict[str, Any]) -> None:
    """Write the edited matrices of ``layers`` and the editor's sequential state to ``folder``.

    The tensors go to a new ``ckpt-<batches>.safetensors``; ``checkpoint.json`` (written
    atomically, last) names it, so a crash at any point leaves the previous checkpoint usable.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = editor.state
    tensors: dict[str, torch.Tensor] = {}
    for l in layers:
        tensors[f"weight.{l}"] = editor.weight(l).detach().to("cpu").contiguous()
    sigma: dict[int, Optional[float]] = {}
    for l, ls in state.layers.items():
        sigma[l] = ls.sigma_max
        for name in _TENSOR_FIELDS:
            t = getattr(ls, name)
            if t is not None:
                tensors[f"state.{l}.{name}"] = t.detach().to("cpu").contiguous()
    batches = int(progress["batches_done"])
    fname = f"ckpt-{batches:06d}.safetensors"
    tmp = folder / (fname + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / fname)
    meta = dict(progress)
    meta.update(
        tensors_file=fname,
        sigma_max=sigma,
        n_edits=state.n_edits,
        history=state.history,
        prefixes=[{"params": [list(p) for p in k[0]], "seed": k[1], "prefixes": v} for k, v in state.prefixes.items()],
    )
    write_json(folder / "checkpoint.json", meta)
    for old in folder.glob("ckpt-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path, editor, layers: Sequence[int]) -> Optional[dict[str, Any]]:
    """Restore what :func:`save_checkpoint` wrote into the editor's model and state.

    Returns the progress dict (with ``batches_done``), or None when ``folder`` holds no checkpoint.
    """
    from safetensors.torch import load_file

    meta_path = folder / "checkpoint.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    tensors = load_file(str(folder / meta["tensors_file"]))
    state = editor.state
    state.reset()
    with torch.no_grad():
        for l in layers:
            w = editor.weight(l)
            w.copy_(tensors[f"weight.{l}"].to(device=w.device, dtype=w.dtype))
    for key, t in tensors.items():
        if not key.startswith("state."):
            continue
        _, l, name = key.split(".")
        l = int(l)
        device = editor.weight(l).device if name in ("kpkp", "W_orig") else torch.device("cpu")
        setattr(state.layer(l), name, t.to(device))
    for l, s in meta.get("sigma_max", {}).items():
        state.layer(int(l)).sigma_max = s
    state.n_edits = int(meta["n_edits"])
    state.history[:] = [_int_keyed(r) for r in meta["history"]]
    for p in meta.get("prefixes", []):
        state.prefixes[(tuple(tuple(x) for x in p["params"]), p["seed"])] = list(p["prefixes"])
    return meta


class _LocalCheckpoints:
    """Per-method progress with :func:`save_checkpoint` / :func:`load_checkpoint` (used when
    :mod:`blue_plugin.editing.session` is not available)."""

    kind = "local"

    def __init__(self, folder: Path, model, tok, hp, layers: Sequence[int]):
        from blue_plugin.editing.editor import Editor

        self.folder, self.layers = folder, list(layers)
        self.editor = Editor(model, tok, hp)

    def resume(self) -> Optional[dict[str, Any]]:
        return load_checkpoint(self.folder, self.editor, self.layers)

    def apply(self, requests: list[dict]) -> None:
        self.editor.apply(requests)

    def save(self, progress: dict[str, Any]) -> None:
        save_checkpoint(self.folder, self.editor, self.layers, progress)

    def cleanup(self) -> None:
        for f in self.folder.glob("ckpt-*.safetensors"):
            f.unlink(missing_ok=True)


class _SessionCheckpoints:
    """Per-method progress with :class:`blue_plugin.editing.session.EditSession` (``save`` / ``load``);
    the benchmark's own bookkeeping (wall times, curve) goes to ``progress.json`` next to it."""

    kind = "EditSession"

    def __init__(self, folder: Path, model, tok, hp, session_cls):
        self.folder, self.model, self.tok, self.hp, self.cls = folder, model, tok, hp, session_cls
        self.session_dir = folder / "session"
        self.session = None

    def resume(self) -> Optional[dict[str, Any]]:
        if not (self.session_dir / "manifest.json").is_file():
            self.session = self.cls(self.model, self.tok, self.hp, undo_depth=0)
            return None
        self.session = self.cls.load(self.session_dir, self.model, self.tok, self.hp, undo_depth=0)
        done = int(self.session.n_batches)
        prog_file = self.folder / "progress.json"
        prog = read_json(prog_file) if prog_file.is_file() else {}
        if prog.get("batches_done") != done:  # interrupted between the two writes of save()
            logger.warning("progress.json is out of step with the saved session (%s vs %d batches); "
                           "using the session", prog.get("batches_done"), done)
        wall = list(prog.get("batch_wall_s", []))[:done]
        wall += [float(r["time"].get("total", 0.0)) for r in self.session.state.history[len(wall):done]]
        curve = [c for c in prog.get("curve", []) if c["n_edits"] <= done * self.hp.batch_size]
        return {"batches_done": done, "batch_wall_s": wall, "curve": curve}

    def apply(self, requests: list[dict]) -> None:
        self.session.edit(requests)

    def save(self, progress: dict[str, Any]) -> None:
        self.session.save(self.session_dir)
        write_json(self.folder / "progress.json", progress)

    def cleanup(self) -> None:
        shutil.rmtree(self.session_dir, ignore_errors=True)


def _session_class():
    """:class:`blue_plugin.editing.session.EditSession` when that module exists, else None."""
    try:
        from blue_plugin.editing.session import EditSession
    except ImportError:
        return None
    return EditSession


# ------------------------------------------------------------------------------------------------
# costs
# ------------------------------------------------------------------------------------------------
def steps_per_layer(history: Sequence[dict[str, Any]], max_steps: int) -> dict[int, dict[str, Any]]:
    """Target-optimisation steps per layer over all batches of a run, layers in ascending order.

    Returns:
        ``{layer: {"mean", "max", "total", "n", "not_converged"}}`` where ``n`` counts requests and
        ``not_converged`` those that used all ``max_steps`` steps.
    """
    per: dict[int, list[int]] = {}
    for record in history:
        for l, steps in record.get("steps", {}).items():
            per.setdefault(int(l), []).extend(int(s) for s in steps)
    return {
        l: {"mean": float(np.mean(v)), "max": int(max(v)), "total": int(sum(v)), "n": len(v),
            "not_converged": int(sum(1 for s in v if s >= max_steps))}
        for l, v in sorted(per.items()) if v
    }


def batch_costs(history: Sequence[dict[str, Any]], wall: Sequence[float]) -> dict[str, Any]:
    """Per-batch times from the engine's history (``time``) and the benchmark's own wall clock."""
    totals = [float(r["time"].get("total", 0.0)) for r in history]
    phases = {k: float(sum(r["time"].get(k, 0.0) for r in history)) for k in ("targets", "keys", "update")}
    return {
        "n_batches": len(history),
        "batch_time_s": totals,
        "batch_wall_s": list(wall),
        "batch_time_s_mean": float(np.mean(totals)) if totals else None,
        "edit_time_s_total": float(sum(totals)),
        "phase_time_s": phases,
    }


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _weights_digest(tensors: dict[int, torch.Tensor]) -> str:
    from blue_plugin.editing.state import fingerprint

    h = hashlib.sha256()
    for l in sorted(tensors):
        h.update(str(l).encode())
        h.update(fingerprint(tensors[l]).numpy().tobytes())
    return h.hexdigest()[:16]


def _should_eval(done: int, prev: int, every: Optional[int]) -> bool:
    return every is not None and done // every > prev // every


def run_benchmark(
    data: str | os.PathLike,
    methods: str | Sequence[str],
    n: int,
    batch_size: int,
    seed: int = 0,
    out: str | os.PathLike = "benchmarks/results/sequential/run",
    hparams: str | os.PathLike | None = None,
    model: Any = None,
    tok: Any = None,
    model_name: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    mom2_n_samples: Optional[int] = None,
    steps: Optional[int] = None,
    stats_dir: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    fluency_tokens: int = 100,
    eval_every: Optional[int] = None,
    eval_batch_size: int = 32,
    gen_batch_size: int = 16,
    measure_cold_stats: bool = False,
    keep_checkpoints: bool = False,
    restart: bool = False,
    progress: bool = True,
    plots: bool = True,
    checkpoints: str = "auto",
    on_batch: Optional[Callable[[str, int], None]] = None,
) -> dict[str, Any]:
    """Run the sequential editing benchmark and write its outputs to ``out``.

    Args:
        data: dataset JSON (EasyEdit / ROME CounterFact, CounterFact templates or zsRE), or a
            dataset name (``counterfact``, ``zsre``) resolved by :mod:`blue_plugin.datafiles`.
        methods: names of :data:`METHODS` (list or comma-separated string).
        n, batch_size: edit the first ``n`` cases, ``batch_size`` per batch (the last batch may be
            smaller).
        seed: seeds Python/numpy/torch, the context-prefix generation (``hparams.seed``) and the
            bootstrap.
        out: output folder (created); also holds the resumable progress.
        hparams: YAML file (default :data:`DEFAULT_HPARAMS`).
        model, tok: an already loaded model and tokenizer (e.g. a test fixture). Its weights must
            be unedited; they are restored to their values at the start before this returns.
            None: load ``model_name`` (default :data:`DEFAULT_MODEL`) with
            :func:`blue_plugin.model.loading.load_model`.
        device, dtype: move/load the model to this device ("cpu", "cuda", "cuda:1") / dtype name.
        mom2_n_samples, steps, stats_dir: override ``mom2_n_samples``, ``v_num_grad_steps``,
            ``stats_dir`` of the YAML.
        overrides: further hyperparameters to change, e.g. ``{"L2": 80}`` (not base_method/blue).
        fluency_tokens: new tokens per greedy generation for fluency (0: skip fluency).
        eval_every: also evaluate the cases edited so far every this many edits (for the
            metrics-vs-edits plot); None: final evaluation only.
        measure_cold_stats: also time a full statistics pass when the cache already holds it.
        keep_checkpoints: keep the last checkpoint tensors of finished methods.
        restart: discard progress in ``out`` instead of resuming.
        checkpoints: how progress is saved: "session" (:class:`blue_plugin.editing.session.EditSession`),
            "local" (this module's :func:`save_checkpoint`), "auto" (session when importable).
        on_batch: called as ``on_batch(method, batches_done)`` after each saved checkpoint, with
            the model in its edited state (a test hook; raising stops the run, progress is kept).

    Returns:
        the content of ``out/results.json`` plus ``"paths"`` (the files written).

    Raises:
        ValueError: bad arguments, or ``out`` holding progress of a different configuration
            (pass ``restart=True`` or another ``out``).
    """
    from blue_plugin.evaluation.data import load_cases
    from blue_plugin.editing.editor import Editor
    from blue_plugin.evaluation.metrics import zsre_locality_predictions
    from blue_plugin.model.loading import load_model
    from blue_plugin.editing.state import get_state, reset_state

    method_list = parse_methods(methods)
    _check_int("n", n, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("fluency_tokens", fluency_tokens, 0)
    _check_int("eval_every", eval_every, 1, allow_none=True)
    _check_int("eval_batch_size", eval_batch_size, 1)
    _check_int("gen_batch_size", gen_batch_size, 1)
    if (model is None) != (tok is None):
        raise ValueError("pass both model and tok, or neither (then the model is loaded by name)")
    if model is not None and model_name is not None:
        raise ValueError("pass either model/tok or model_name, not both")
    if checkpoints not in ("auto", "session", "local"):
        raise ValueError(f"checkpoints must be 'auto', 'session' or 'local', got {checkpoints!r}")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype is not None and dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")

    t_run = time.perf_counter()
    out = Path(out)
    data_path = resolve_data_arg(data).resolve()
    fmt, cases = load_cases(data_path, n)
    base_hp = build_base_hparams(hparams, batch_size, seed, mom2_n_samples, steps, stats_dir, overrides)

    if model is None:
        model_name = model_name or DEFAULT_MODEL
        model, tok = load_model(model_name, device=device, dtype=dtypes[dtype] if dtype else None)
    else:
        if device is not None:
            model.to(device)
        if dtype is not None:
            model.to(dtypes[dtype])
        model_name = str(getattr(model.config, "_name_or_path", "") or "<model object>")
    dev = next(model.parameters()).device
    _seed_everything(seed)

    editor0 = Editor(model, tok, base_hp)
    layers = list(base_hp.layers)
    originals = {l: editor0.weight(l).detach().clone() for l in layers}
    state = get_state(model)
    if any(ls.post_fp is not None for ls in state.layers.values()):
        logger.warning("the model carries edits from earlier calls; the benchmark treats its current weights as unedited")
    reset_state(model)

    config = {
        "data": str(data_path),
        "data_sha256": _sha256_file(data_path),
        "format": fmt,
        "n": n,
        "batch_size": batch_size,
        "seed": seed,
        "model": model_name,
        "model_weights_digest": _weights_digest(originals),
        "hparams_file": str(Path(hparams).resolve()) if hparams is not None else str(DEFAULT_HPARAMS),
        "hparams": {k: v for k, v in base_hp.to_dict().items() if k not in ("base_method", "blue", "device", "stats_dir")},
        "fluency_tokens": fluency_tokens,
        "eval_every": eval_every,
        "eval_batch_size": eval_batch_size,
    }
    # names and paths are informational; identity is content (data sha256, weights digest, hparams)
    chash = _config_hash({k: v for k, v in config.items() if k not in ("data", "model", "hparams_file")})
    prog_dir = out / "progress"
    if restart and prog_dir.exists():
        shutil.rmtree(prog_dir)
    cfg_file = prog_dir / "config.json"
    if cfg_file.is_file():
        old = read_json(cfg_file)
        if old.get("hash") != chash:
            diff = sorted(k for k in set(config) | set(old.get("config", {}))
                          if k not in ("data", "model", "hparams_file")
                          and jsonable(config.get(k)) != old.get("config", {}).get(k))
            raise ValueError(
                f"{str(out)!r} holds progress of a different run (differs in {diff}); pass --restart "
                "(restart=True) to discard it, or choose another --out"
            )
        logger.info("resuming the run in %s", out)
    else:
        write_json(cfg_file, {"hash": chash, "config": config})
    session_cls = _session_class() if checkpoints in ("auto", "session") else None
    if checkpoints == "session" and session_cls is None:
        raise ValueError("checkpoints='session' needs blue_plugin.editing.session.EditSession, which is not importable")
    logger.info("checkpoints: %s", "blue_plugin.editing.session.EditSession" if session_cls else "local safetensors")

    paths: dict[str, Any] = {}
    method_results: dict[str, dict[str, Any]] = {}
    try:
        # --- statistics (on the unedited model) -------------------------------------------
        reset_peak_rss()
        stats_info = prepare_statistics(editor0, base_hp, measure_cold_stats, progress)
        stats_info["peak_rss_mib"] = peak_rss_mib()
        stats_file = prog_dir / "statistics.json"  # the first invocation's timing is the one to report
        if stats_file.is_file():
            stats_first = read_json(stats_file)
        else:
            write_json(stats_file, stats_info)
            stats_first = stats_info

        # --- pre ---------------------------------------------------------------------------
        pre_file = prog_dir / "pre.json"
        if pre_file.is_file():
            pre = read_json(pre_file)
        else:
            t0 = time.perf_counter()
            pre_loc = zsre_locality_predictions(model, tok, cases, eval_batch_size) if fmt == "zsre" else None
            scores = evaluate_cases(model, tok, fmt, cases, pre_loc, fluency_tokens, eval_batch_size, gen_batch_size)
            pre = {"scores": scores, "summary": _summarize(scores, seed), "pre_locality": pre_loc,
                   "eval_time_s": time.perf_counter() - t0}
            write_json(pre_file, pre)
        pre_loc = pre.get("pre_locality")
        pre_peak = peak_rss_mib()  # statistics + pre evaluation

        # --- methods -----------------------------------------------------------------------
        n_batches = (n + batch_size - 1) // batch_size
        for method in method_list:
            mdir = prog_dir / method
            done_file = mdir / "done.json"
            if done_file.is_file():
                logger.info("%s: already finished in an earlier invocation", method)
                method_results[method] = read_json(done_file)
                continue
            hp = method_hparams(base_hp, method)
            with torch.no_grad():
                for l, W in originals.items():
                    editor0.weight(l).copy_(W)
            reset_state(model)
            _seed_everything(seed)
            if session_cls is not None:
                ckpt: Any = _SessionCheckpoints(mdir, model, tok, hp, session_cls)
            else:
                ckpt = _LocalCheckpoints(mdir, model, tok, hp, layers)
            reset_peak_rss()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            meta = ckpt.resume()
            start = int(meta["batches_done"]) if meta else 0
            wall: list[float] = list(meta["batch_wall_s"]) if meta else []
            curve: list[dict[str, Any]] = list(meta["curve"]) if meta else []
            if meta:
                logger.info("%s: resuming after batch %d of %d", method, start, n_batches)
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover
                from tqdm import tqdm
            bar = tqdm(total=n_batches, initial=start, desc=method, unit="batch", disable=not progress)
            try:
                for b in range(start, n_batches):
                    batch = cases[b * batch_size:(b + 1) * batch_size]
                    t0 = time.perf_counter()
                    ckpt.apply([c.to_request() for c in batch])
                    wall.append(time.perf_counter() - t0)
                    done = min(n, (b + 1) * batch_size)
                    if _should_eval(done, b * batch_size, eval_every) and done < n:
                        sub = cases[:done]
                        sc = evaluate_cases(model, tok, fmt, sub, pre_loc[:done] if pre_loc else None,
                                            fluency_tokens, eval_batch_size, gen_batch_size)
                        curve.append({"n_edits": done, "summary": _summarize(sc, seed)})
                    ckpt.save({"method": method, "batches_done": b + 1, "batch_wall_s": wall, "curve": curve})
                    bar.update(1)
                    bar.set_postfix(edits=done, s_per_batch=f"{wall[-1]:.1f}")
                    if on_batch is not None:
                        on_batch(method, b + 1)
            finally:
                bar.close()
            t0 = time.perf_counter()
            scores = evaluate_cases(model, tok, fmt, cases, pre_loc, fluency_tokens, eval_batch_size, gen_batch_size)
            eval_s = time.perf_counter() - t0
            summary = _summarize(scores, seed)
            if eval_every is not None:
                curve.append({"n_edits": n, "summary": summary})
            history = get_state(model).history
            costs = batch_costs(history, wall)
            costs.update(
                steps_per_layer=steps_per_layer(history, hp.v_num_grad_steps),
                eval_time_s=eval_s,
                peak_rss_mib=peak_rss_mib(),
                cuda_peak_mib=cuda_peak_mib(),
            )
            result = {
                "method": method,
                "base_method": hp.base_method,
                "blue": hp.blue,
                "edit_layers": hp.edit_layers,
                "summary": summary,
                "scores": scores,
                "curve": curve,
                "costs": costs,
                "history": history,
                "checkpoints": ckpt.kind,
            }
            write_json(done_file, result)
            if not keep_checkpoints:
                ckpt.cleanup()
            method_results[method] = read_json(done_file)  # same (JSON) form as a resumed method
            logger.info("%s: %s", method, {k: v["mean"] for k, v in summary.items()})
    finally:
        with torch.no_grad():
            for l, W in originals.items():
                editor0.weight(l).copy_(W)
        reset_state(model)

    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "sequential",
        "config": config | {"methods": method_list, "device": str(dev),
                            "dtype": str(next(model.parameters()).dtype), "stats_dir": base_hp.stats_dir},
        "config_hash": chash,
        "versions": versions(),
        "machine": machine_info(),
        "metrics": [m for m in METRIC_LABELS],
        "scale_note": "values are fractions (fluency: entropy in bits); tables show x100",
        "pre": {"summary": pre["summary"], "scores": pre["scores"], "eval_time_s": pre.get("eval_time_s")},
        "methods": method_results,
        "costs": {"statistics": stats_first,
                  "statistics_this_invocation": stats_info,
                  "peak_rss_mib_max": max([pre_peak] + [m["costs"]["peak_rss_mib"] for m in method_results.values()]),
                  "current_rss_mib": current_rss_mib(),
                  "invocation_wall_s": time.perf_counter() - t_run},
    }
    result["blue_vs_base"] = blue_vs_base(result)
    paths["results"] = str(write_json(out / RESULTS_FILE, result))
    table = render_table(result)
    (out / "table.md").write_text(table, encoding="utf-8")
    paths["table"] = str(out / "table.md")
    if plots:
        paths.update(make_plots(result, out))
    result["paths"] = paths
    return result


# ------------------------------------------------------------------------------------------------
# tables and plots
# ------------------------------------------------------------------------------------------------
def _metric_keys(fmt: str) -> list[str]:
    return list(METRIC_LABELS) if fmt in CF_FORMATS else ["efficacy", "generalization", "specificity"]


def _cell(s: Optional[dict[str, Any]]) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{100 * s['mean']:.1f} [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"


def _steps_cell(costs: dict[str, Any]) -> str:
    spl = costs.get("steps_per_layer") or {}
    return ", ".join(f"L{l}: {v['mean']:.1f}" for l, v in sorted(spl.items(), key=lambda kv: int(kv[0]))) or "n/a"


def _fmt_s(x: Any) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def blue_vs_base(result: dict[str, Any], n_boot: int = 1000) -> dict[str, dict[str, dict[str, Any]]]:
    """For every method X run together with X_BLUE: per metric, the mean over cases of the
    per-case difference (X_BLUE - X) with a 95% percentile bootstrap interval (cases resampled
    together, seeded with the run's seed), and how many cases entered (both scored).

    Returns ``{X: {metric: {"mean", "ci_low", "ci_high", "n"}}}`` (fractions; fluency in bits).
    """
    from blue_plugin.evaluation.metrics import bootstrap_ci

    methods = result["methods"]
    seed = int(result.get("config", {}).get("seed", 0))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for base in methods:
        if base.endswith("_BLUE") or f"{base}_BLUE" not in methods:
            continue
        a = {s["case_id"]: s for s in methods[base]["scores"]}
        b = {s["case_id"]: s for s in methods[f"{base}_BLUE"]["scores"]}
        per: dict[str, dict[str, Any]] = {}
        for key in METRIC_LABELS:
            d = [float(b[c][key]) - float(a[c][key]) for c in a
                 if c in b and a[c].get(key) is not None and b[c].get(key) is not None]
            if d:
                mean, lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
                per[key] = {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(d)}
        out[base] = per
    return out


def _diff_cell(s: Optional[dict[str, Any]]) -> str:
    if not s:
        return "n/a"
    return f"{100 * s['mean']:+.1f} [{100 * s['ci_low']:+.1f}, {100 * s['ci_high']:+.1f}]"


def render_table(result: dict[str, Any]) -> str:
    """Markdown: a header, the metrics table (methods as rows, "pre" first, x100 with 95% CIs) and
    a cost table."""
    cfg = result["config"]
    keys = _metric_keys(cfg["format"])
    lines = [
        f"## Sequential editing: {Path(cfg['data']).name} ({cfg['format']}), model {Path(str(cfg['model'])).name}",
        "",
        f"N = {cfg['n']} edits, batch size B = {cfg['batch_size']}, seed {cfg['seed']}; all N evaluated "
        f"on the final model. Mean x100 with 95% bootstrap CI (fluency: bi/tri-gram entropy x100).",
        "",
        "| Method | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
        "| pre | " + " | ".join(_cell(result["pre"]["summary"].get(k)) for k in keys) + " |",
    ]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(m["summary"].get(k)) for k in keys) + " |")
    diffs = result.get("blue_vs_base") or blue_vs_base(result)  # stored by run_benchmark; older results lack it
    if diffs:
        lines += ["", "BLUE minus its base method, paired over the same cases: mean x100 with 95% bootstrap CI "
                  "(an interval that excludes 0 is a difference these cases resolve).", "",
                  "| Base | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for base, d in diffs.items():
            lines.append(f"| {base}_BLUE - {base} | " + " | ".join(_diff_cell(d.get(k)) for k in keys) + " |")
    st = result["costs"]["statistics"]
    lines += [
        "",
        f"Key statistics ({st.get('n_samples')} docs of {Path(str(st.get('corpus'))).name}, layers "
        f"{st.get('layers')}): first call {_fmt_s(st.get('first_call_s'))} s ({st.get('source')}), "
        f"cached {_fmt_s(st.get('cached_s'))} s, cold {_fmt_s(st.get('cold_s'))} s.",
        "",
        "| Method | s / batch (mean) | edit s (total) | targets / keys / update s | eval s | steps per layer (mean) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        c = m["costs"]
        ph = c.get("phase_time_s", {})
        lines.append(
            f"| {name} | {_fmt_s(c.get('batch_time_s_mean'))} | {_fmt_s(c.get('edit_time_s_total'))} | "
            f"{_fmt_s(ph.get('targets'))} / {_fmt_s(ph.get('keys'))} / {_fmt_s(ph.get('update'))} | "
            f"{_fmt_s(c.get('eval_time_s'))} | {_steps_cell(c)} | {c.get('peak_rss_mib')} |"
        )
    return "\n".join(lines) + "\n"


def make_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    """``steps_per_layer.png`` and, when intermediate evaluations exist, ``metrics_vs_edits.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    methods = result["methods"]
    # steps per layer
    all_layers = sorted({int(l) for m in methods.values() for l in (m["costs"].get("steps_per_layer") or {})})
    if methods and all_layers:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(methods) + 2), 3.6))
        width = 0.8 / len(all_layers)
        x = np.arange(len(methods))
        for j, l in enumerate(all_layers):
            vals = [(m["costs"].get("steps_per_layer") or {}).get(str(l), {}).get("mean", np.nan) for m in methods.values()]
            ax.bar(x + (j - (len(all_layers) - 1) / 2) * width, vals, width, label=f"layer {l}")
        ax.set_xticks(x, list(methods), rotation=20, ha="right")
        ax.set_ylabel("mean optimisation steps per request")
        ax.set_title("Target-optimisation steps per edited layer")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "steps_per_layer.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written["steps_plot"] = str(p)
    # metrics vs number of edits
    if any(m.get("curve") for m in methods.values()):
        keys = [k for k in _metric_keys(result["config"]["format"]) if k != "consistency"]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
        pre = result["pre"]["summary"]
        for ax, k in zip(axes[0], keys):
            for name, m in methods.items():
                pts = [(0, pre.get(k, {}).get("mean"))] + [(c["n_edits"], c["summary"].get(k, {}).get("mean")) for c in m.get("curve", [])]
                pts = [(x, 100 * y) for x, y in pts if y is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
            ax.set_title(METRIC_LABELS[k])
            ax.set_xlabel("sequential edits")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("x100")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        p = out / "metrics_vs_edits.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written["curve_plot"] = str(p)
    return written


def compare_runs(dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Merge the ``results.json`` of several runs into ``out/comparison.{md,json}``.

    Rows are grouped by run (dataset, N, B, model); each group starts with its "pre" row.
    """
    if not dirs:
        raise ValueError("--compare needs at least one run folder")
    runs = []
    for d in dirs:
        p = Path(d)
        f = p / RESULTS_FILE if p.is_dir() else p
        if not f.is_file():
            raise ValueError(f"{str(d)!r} holds no {RESULTS_FILE}; pass output folders of earlier runs")
        runs.append((str(d), read_json(f)))
    keys = list(METRIC_LABELS)
    lines = [
        "## Sequential editing: comparison",
        "",
        "Mean x100 with 95% bootstrap CI; n/a where a metric does not apply.",
        "",
        "| Run | Method | " + " | ".join(METRIC_LABELS[k] for k in keys) + " | s / batch |",
        "|---|---|" + "---|" * (len(keys) + 1),
    ]
    merged = []
    for d, r in runs:
        cfg = r["config"]
        label = f"{Path(d).name}: {Path(cfg['data']).stem} N={cfg['n']} B={cfg['batch_size']}"
        lines.append(f"| {label} | pre | " + " | ".join(_cell(r["pre"]["summary"].get(k)) for k in keys) + " | |")
        rows = {"run": d, "label": label, "config": cfg, "pre": r["pre"]["summary"], "methods": {}}
        for name, m in r["methods"].items():
            lines.append(f"| {label} | {name} | " + " | ".join(_cell(m["summary"].get(k)) for k in keys)
                         + f" | {_fmt_s(m['costs'].get('batch_time_s_mean'))} |")
            rows["methods"][name] = {"summary": m["summary"], "costs": {k: v for k, v in m["costs"].items()
                                                                        if k not in ("batch_time_s", "batch_wall_s")}}
        merged.append(rows)
    table = "\n".join(lines) + "\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    write_json(out / "comparison.json", {"runs": merged})
    return {"table": table, "runs": merged,
            "paths": {"table": str(out / "comparison.md"), "json": str(out / "comparison.json")}}


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sequential",
        description=__doc__.split("\n\n")[0],
        epilog="Methods: " + ", ".join(METHODS),
    )
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
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype (default: checkpoint's)")
    p.add_argument("--mom2-n-samples", type=int, default=None, help="override mom2_n_samples (documents for C0)")
    p.add_argument("--steps", type=int, default=None, help="override v_num_grad_steps")
    p.add_argument("--stats-dir", default=None, help="override stats_dir (cache of the key statistics)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any hyperparameter of the YAML (value parsed as YAML), e.g. --set L2=80; repeatable")
    p.add_argument("--fluency-tokens", type=int, default=100, help="new tokens per greedy generation (0: no fluency); default 100")
    p.add_argument("--eval-every", type=int, default=None, help="also evaluate the edited-so-far cases every K edits (curve plot)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="prompts per forward pass in evaluation")
    p.add_argument("--gen-batch-size", type=int, default=16, help="prompts per generate() call for fluency")
    p.add_argument("--measure-cold-stats", action="store_true", help="also time a statistics pass without cache")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoint tensors of finished methods")
    p.add_argument("--restart", action="store_true", help="discard progress in --out instead of resuming")
    p.add_argument("--checkpoints", default="auto", choices=["auto", "session", "local"],
                   help="progress format: blue_plugin.editing.session.EditSession, local safetensors, or auto (session if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR", help="merge earlier runs into one table in --out")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.compare:
        res = compare_runs(args.compare, args.out)
        print(res["table"])
        print(f"wrote {res['paths']['table']} and {res['paths']['json']}")
        return 0
    missing = [f"--{k.replace('_', '-')}" for k in ("data", "methods", "n", "batch_size") if getattr(args, k) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (needed unless --compare is given)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        res = run_benchmark(
            data=args.data, methods=args.methods, n=args.n, batch_size=args.batch_size, seed=args.seed,
            out=args.out, hparams=args.hparams, model_name=args.model, device=args.device, dtype=args.dtype,
            mom2_n_samples=args.mom2_n_samples, steps=args.steps, stats_dir=args.stats_dir,
            overrides=parse_overrides(args.set),
            fluency_tokens=args.fluency_tokens, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
            gen_batch_size=args.gen_batch_size, measure_cold_stats=args.measure_cold_stats,
            keep_checkpoints=args.keep_checkpoints, restart=args.restart, progress=not args.no_progress,
            plots=not args.no_plots, checkpoints=args.checkpoints,
        )
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(render_table(res))
    for k, v in res["paths"].items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
