"""The workers of the speed benchmark, one per system, with the same interface in-process and
over a pipe (:mod:`~benchmarks.speed.processes`): :class:`WorkerBase` (model, cases, the timed
edit loop, evaluation, plain forward+backward) and :class:`OursWorker` (blue_plugin's engine);
EasyEdit's is :class:`~benchmarks.speed.easyedit_worker.EasyEditWorker`."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from blue_plugin.editing.editor import Editor, apply_blue_to_model
from blue_plugin.editing.state import get_state, reset_state
from blue_plugin.evaluation.data import load_cases
from blue_plugin.evaluation.metrics import counterfact_case_scores
from blue_plugin.model.loading import load_model
from blue_plugin.stats.corpus import read_corpus
from blue_plugin.stats.moments import get_second_moments

from benchmarks.common import method_hparams, resolve_data_arg
from benchmarks.speed.config import OUR_METHODS, SpeedConfig, base_hparams
from benchmarks.speed.meters import (
    Meter,
    TargetPhaseCounter,
    TokenCounter,
    base_module,
    plain_forward_backward,
    weights_digest,
)


class WorkerBase:
    """What both systems share; subclasses implement ``start_sequence`` and ``apply_batch``."""

    system = "?"

    def __init__(self, cfg: SpeedConfig, model=None, tok=None):
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
        self.editor0.restore(self.originals)

    def corpus_docs(self, n: int) -> list[str]:
        return read_corpus(self.hp.mom2_dataset, n)

    def evaluate(self, n: int) -> dict[str, Any]:
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
        self.start_sequence(method)
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
                    phases = self.apply_batch(method, batch)
                    engine = phases.pop("engine_targets", None)
                    if engine is not None:
                        out.setdefault("engine_targets", []).append(engine)
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

    def start_sequence(self, method: str) -> None:
        """A new sequence of edits of ``method`` starts from the unedited weights."""
        raise NotImplementedError

    def apply_batch(self, method: str, batch: list[dict]) -> dict[str, Any]:
        """Edit one batch; returns the phase times (and ``total``) and the steps per layer."""
        raise NotImplementedError


class OursWorker(WorkerBase):
    """blue_plugin's engine (:func:`blue_plugin.editing.editor.apply_blue_to_model`)."""

    system = "ours"

    def __init__(self, cfg: SpeedConfig, model=None, tok=None):
        super().__init__(cfg, model, tok)
        self.observer = TargetPhaseCounter(self.counter)

    def stats_cold(self, n_samples: int, into_cache: bool) -> dict[str, Any]:
        """C_0 of all critical layers from an empty cache, one truncated pass. ``into_cache``:
        write into the cache the edits use (else a temporary folder, deleted)."""
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
        with Meter() as m:
            ed = Editor(self.model, self.tok, self.hp.replace(base_method="AlphaEdit", blue=False))
            ed.ensure_second_moments(self.layers)
            prefixes = ed.prefixes()
            if any(OUR_METHODS[x][0] == "AlphaEdit" for x in self.cfg.methods):
                for l in self.layers:
                    ed.projector(l)
        return {"system": self.system, "prefixes": list(prefixes), **m.result}

    def start_sequence(self, method: str) -> None:
        reset_state(self.model)  # forgets the edits; keeps C0, projectors and prefixes

    def apply_batch(self, method: str, batch: list[dict]) -> dict[str, Any]:
        """One :func:`~blue_plugin.editing.editor.apply_blue_to_model` call, observed by
        :attr:`observer` (tokens of the target phase); phase times and steps from the engine's
        history, and what the engine reported of its target phases (``engine_targets``)."""
        apply_blue_to_model(self.model, self.tok, batch, method_hparams(self.hp, method), observer=self.observer)
        rec = get_state(self.model).history[-1]
        steps = {str(l): list(s) for l, s in rec["steps"].items()}
        targets = self.observer.take_phases()
        if not targets:
            raise RuntimeError("apply_blue_to_model reported no 'targets' phase to its observer; the target "
                               "tokens cannot be counted (does this blue_plugin pass observer= to the editor?)")
        engine = {"layers": [t["layer"] for t in targets], "rows": sum(t["rows"] or 0 for t in targets),
                  "tokens": sum(t["tokens"] or 0 for t in targets)}
        return {**{k: float(v) for k, v in rec["time"].items()}, "steps": steps, "engine_targets": engine}
