"""What a sequential run depends on: :class:`SequentialConfig` (one field per CLI flag) and the
constants of the benchmark's outputs."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

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
SCHEMA_VERSION = 1
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
        eval_every: also evaluate the cases edited so far every this many edits (for the
            metrics-vs-edits plot); None: final evaluation only.
        eval_batch_size, gen_batch_size: prompts per forward pass / per ``generate()`` call.
        measure_cold_stats: also time a full statistics pass when the cache already holds it.
        keep_checkpoints: keep the saved session of finished methods.
        restart: discard progress in ``out`` instead of resuming.
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
    eval_batch_size: int = 32
    gen_batch_size: int = 16
    measure_cold_stats: bool = False
    keep_checkpoints: bool = False
    restart: bool = False
    progress: bool = True
    plots: bool = True
    checkpoints: str = "session"

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
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("gen_batch_size", self.gen_batch_size, 1)
        if self.checkpoints not in CHECKPOINT_CHOICES:
            raise ValueError(
                f"checkpoints={self.checkpoints!r}: progress is saved with blue_plugin.editing.session.EditSession "
                f"only (the 'local' safetensors format was removed); pass 'session' (or 'auto')")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        return names

    def torch_dtype(self):
        """``dtype`` as a torch dtype (None: the checkpoint's)."""
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)

    def replace(self, **changes: Any) -> "SequentialConfig":
        return dataclasses.replace(self, **changes)
