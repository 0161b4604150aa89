"""EasyEdit's worker of the speed benchmark: its own ``apply_memit_to_model`` /
``apply_AlphaEdit_to_model`` with its own hyperparameter classes.

EasyEdit has no hooks, so this worker (and only it, in its own process when isolated) wraps
functions in EasyEdit's modules: ``compute_z`` (targets; the decoder's tokens are counted while it
runs), ``compute_ks`` and ``get_module_input_output_at_words`` (keys), ``get_cov`` (statistics
look-up), and serves ``layer_stats``'s ``load_dataset`` the local corpus. EasyEdit's files are
untouched. What had to be adapted is listed in :mod:`benchmarks.speed`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from blue_plugin.integrations.easyedit import import_easyeditor
from blue_plugin.model.layout import resolve_layout

from benchmarks.speed.config import EE_METHODS, SpeedConfig
from benchmarks.speed.meters import Meter
from benchmarks.speed.workers import WorkerBase

EE_CORPUS_NAME = "wikitext"  # the hub name under which EasyEdit's layer_stats is served the local corpus


def no_progress(iterable, total=None):
    """Stands in for tqdm in EasyEdit's ``layer_stats`` (its ``progress=None`` path is broken)."""
    return iterable


class EasyEditWorker(WorkerBase):
    """EasyEdit's own ``apply_memit_to_model`` / ``apply_AlphaEdit_to_model`` with its own
    hyperparameter classes (see the module docstring for what had to be adapted)."""

    system = "easyedit"

    def __init__(self, cfg: SpeedConfig, model=None, tok=None, log_dir: Optional[str] = None):
        super().__init__(cfg, model, tok)

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
            mom2_dataset=EE_CORPUS_NAME, mom2_n_samples=hp.mom2_n_samples, mom2_dtype=hp.mom2_dtype,
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
                                            EE_CORPUS_NAME, to_collect=["mom2"], sample_size=n_samples,
                                            precision=hp.mom2_dtype, hparams=hp, progress=no_progress)
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

    def start_sequence(self, method: str) -> None:
        self._reset_cache = method == "AlphaEdit"  # a new sequence: AlphaEdit forgets its K_p K_p^T

    def apply_batch(self, method: str, batch: list[dict]) -> dict[str, Any]:
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
