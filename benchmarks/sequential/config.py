"""What a sequential run depends on: :class:`SequentialConfig` (one field per CLI flag) and the
constants of the benchmark's outputs."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from benchmarks.common import check_int, parse_methods

CF_FORMATS = ("counterfact", "counterfact_rome", "counterfact_templates")
METRIC_LABELS = {
    "efficacy": "Efficacy",
    "generalization": "Generalization",
    "specificity": "Specificity",
    "fluency": "Fluency",
    "consistency": "Consistency",
}
RESULTS_FILE = "results.json"
#: 2: held-out perplexity (``heldout``, ``summary["perplexity"]``) and sampled curves (``curves``);
#: results of version 1 lack both and are still read (shown as n/a).
SCHEMA_VERSION = 2
DTYPES = ("float32", "float16", "bfloat16")
#: how progress is saved: both names mean :class:`blue_plugin.editing.session.EditSession`
CHECKPOINT_CHOICES = ("auto", "session")


@dataclass
class SequentialConfig:
    """One sequential run (see :mod:`benchmarks.sequential`).

    Args:
        data: dataset JSON (EasyEdit / ROME CounterFact, CounterFact templates or zsRE), or a
            dataset name (``counterfact``, ``zsre``) resolved by :mod:`blue_plugin.datafiles`.
        methods: names of :data:`benchmarks.common.METHODS` (list or comma-separated string).
        n, batch_size: edit the first ``n`` cases, ``batch_size`` per batch (the last batch may be
            smaller).
        seed: seeds Python/numpy/torch, the context-prefix generation (``hparams.seed``) and the
            bootstrap.
        out: output folder (created); also holds the resumable progress.
        hparams: YAML file (default :data:`benchmarks.common.DEFAULT_HPARAMS`).
        model_name: model to load when no model object is passed (default
            :data:`benchmarks.common.DEFAULT_MODEL`), with :func:`blue_plugin.model.loading.load_model`.
        device, dtype: move/load the model to this device ("cpu", "cuda", "cuda:1") / dtype name.
        mom2_n_samples, steps, stats_dir: override ``mom2_n_samples``, ``v_num_grad_steps``,
            ``stats_dir`` of the YAML.
        overrides: further hyperparameters to change, e.g. ``{"L2": 80}`` (not base_method/blue).
        fluency_tokens: new tokens per greedy generation for fluency (0: skip fluency).
        eval_every: also evaluate all the cases edited so far every this many edits (for the
            metrics-vs-edits plot); None: final evaluation only.
        heldout_docs: documents of the C0 corpus held out from C0
            (:func:`blue_plugin.stats.heldout.heldout_documents`) on which the held-out perplexity
            of the unedited model and of every method's final model is measured; 0: none.
        curve_every: every this many edits, evaluate a curve point
            (:mod:`~benchmarks.sequential.curves`) on a seeded sample of the cases edited so far;
            None: no curve points.
        curve_cases, curve_fluency_cases: cases per curve point (efficacy, generalization,
            specificity) and how many of them also get fluency.
        curve_heldout_docs: held-out documents per curve point (the first ones of
            ``heldout_docs``); None: all.
        eval_batch_size, gen_batch_size: prompts per forward pass / per ``generate()`` call.
        eval_chunk_cases: evaluations of all cases (the unedited model's, each method's final one)
            save their per-case scores after every this many cases
            (:mod:`~benchmarks.sequential.chunked`), so a stopped run resumes within them. Not part
            of the run's identity: scores differ from another chunking by rounding at most.
        measure_cold_stats: also time a full statistics pass when the cache already holds it.
        keep_checkpoints: keep the saved session of finished methods.
        replay_tolerance: a method replaying its kept batches on another machine
            (:mod:`~benchmarks.sequential.kept`) continues when a replayed batch's weights differ
            from the kept run's by at most this fraction of their change (a strided sample; 0:
            only bit-identical weights); beyond it the run stops and says so. Not part of the
            run's identity.
        restart: discard progress in ``out`` instead of resuming.
        pre_from: output folder of another run of the same configuration (methods aside): its
            run-level measurements (statistics timing, the unedited evaluation, the held-out
            documents and their unedited perplexity) are copied into ``out`` where ``out`` lacks
            them, instead of being measured again; None: measure.
        progress: tqdm bars; plots: write the PNG plots.
        checkpoints: "session" or "auto": progress is saved with
            :class:`blue_plugin.editing.session.EditSession` (the only format).
    """

    data: str | os.PathLike
    methods: str | Sequence[str]
    n: int
    batch_size: int
    seed: int = 0
    out: str | os.PathLike = "benchmarks/results/sequential/run"
    hparams: str | os.PathLike | None = None
    model_name: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    mom2_n_samples: Optional[int] = None
    steps: Optional[int] = None
    stats_dir: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    fluency_tokens: int = 100
    eval_every: Optional[int] = None
    heldout_docs: int = 500
    curve_every: Optional[int] = None
    curve_cases: int = 200
    curve_fluency_cases: int = 50
    curve_heldout_docs: Optional[int] = None
    eval_batch_size: int = 32
    gen_batch_size: int = 16
    eval_chunk_cases: int = 100
    measure_cold_stats: bool = False
    keep_checkpoints: bool = False
    replay_tolerance: float = 1e-3
    restart: bool = False
    progress: bool = True
    plots: bool = True
    checkpoints: str = "session"
    pre_from: str | os.PathLike | None = None

    def validate(self) -> list[str]:
        """Check every field; returns the canonical method names.

        Raises:
            ValueError: the first bad field, named.
        """
        names = parse_methods(self.methods)
        check_int("n", self.n, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_int("fluency_tokens", self.fluency_tokens, 0)
        check_int("eval_every", self.eval_every, 1, allow_none=True)
        check_int("heldout_docs", self.heldout_docs, 0)
        check_int("curve_every", self.curve_every, 1, allow_none=True)
        check_int("curve_cases", self.curve_cases, 1)
        check_int("curve_fluency_cases", self.curve_fluency_cases, 0)
        check_int("curve_heldout_docs", self.curve_heldout_docs, 1, allow_none=True)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("gen_batch_size", self.gen_batch_size, 1)
        check_int("eval_chunk_cases", self.eval_chunk_cases, 1)
        if isinstance(self.replay_tolerance, bool) or not isinstance(self.replay_tolerance, (int, float)) \
                or not 0 <= self.replay_tolerance < float("inf"):
            raise ValueError(f"replay_tolerance must be a finite number >= 0, got {self.replay_tolerance!r}")
        if self.checkpoints not in CHECKPOINT_CHOICES:
            raise ValueError(
                f"checkpoints={self.checkpoints!r}: progress is saved with blue_plugin.editing.session.EditSession "
                f"only (the 'local' safetensors format was removed); pass 'session' (or 'auto')")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        return names

    def torch_dtype(self):
        """``dtype`` as a torch dtype (None: the checkpoint's)."""
        return None if self.dtype is None else getattr(torch, self.dtype)

    def replace(self, **changes: Any) -> "SequentialConfig":
        return dataclasses.replace(self, **changes)
