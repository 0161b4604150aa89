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
  base model during the target phase (ours: from the start to the end of each ``"targets"`` phase
  the editor reports to its observer, :class:`~benchmarks.speed.meters.TargetPhaseCounter`;
  EasyEdit: while its ``compute_z`` runs), divided by the phase's wall time; and the plain model's
  forward+backward tokens per second at the same batch shapes (full logits, loss over all
  positions, gradient w.r.t. the input embeddings, parameters frozen as while editing). Our
  engine replays the blocks below the edited layer from a cache, so its ratio can exceed 1: the
  skipped blocks are work it does not do. With its prefix cache (``v_prefix_cache``) a step runs
  only the tokens from the subject's last token on; those are the tokens counted (and the shapes
  of the plain forward+backward), so the rows' earlier tokens, served from the cache, are not.
  Each of our runs also records what the engine reported of its target phases
  (``engine_targets``: rows and tokens without padding).
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

Modules: :mod:`~benchmarks.speed.config` (:class:`SpeedConfig`, methods, targets),
:mod:`~benchmarks.speed.meters` (time, memory, tokens), :mod:`~benchmarks.speed.workers` (ours),
:mod:`~benchmarks.speed.easyedit_worker`, :mod:`~benchmarks.speed.processes` (isolation),
:mod:`~benchmarks.speed.run`, :mod:`~benchmarks.speed.report` (summary, table, plots),
:mod:`~benchmarks.speed.combine` (merging split sweeps), :mod:`~benchmarks.speed.cli`.
"""
from benchmarks.speed.cli import build_parser, config_from_args, main
from benchmarks.speed.config import (
    DEFAULT_DATA,
    EE_METHODS,
    OUR_METHODS,
    SCHEMA_VERSION,
    SYSTEMS,
    TARGETS,
    SpeedConfig,
    base_hparams,
    job_order,
    ours_for_base,
)
from benchmarks.speed.meters import (
    Meter,
    TargetPhaseCounter,
    TokenCounter,
    base_module,
    plain_forward_backward,
    weights_digest,
)
from benchmarks.speed.processes import WorkerError, start_workers
from benchmarks.speed.report import make_plots, render_table, summarize
from benchmarks.speed.run import run_speed

#: the name the tests use for :func:`~benchmarks.speed.config.job_order`
_jobs = job_order

__all__ = [
    "build_parser", "config_from_args", "main", "DEFAULT_DATA", "EE_METHODS", "OUR_METHODS", "SCHEMA_VERSION",
    "SYSTEMS", "TARGETS", "SpeedConfig", "base_hparams", "job_order", "ours_for_base", "Meter", "TargetPhaseCounter",
    "TokenCounter", "base_module", "plain_forward_backward", "weights_digest", "WorkerError", "start_workers",
    "make_plots", "render_table", "summarize", "run_speed",
]
