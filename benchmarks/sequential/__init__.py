"""Sequential batch editing benchmark (the BLUE paper's protocol), all methods side by side.

Protocol: evaluate the unedited model once ("pre"); then, for each method, start from the
unedited weights, edit the first N cases of the dataset in file order, B at a time, sequentially
without restoring, and evaluate all N cases on the final model. Methods
(:data:`benchmarks.common.METHODS`): MEMIT, RECT, PRUNE, AlphaEdit (``blue: false``, the original
residual distribution) and their ``_BLUE`` variants (``blue: true``), all built from one YAML with
only ``base_method`` / ``blue`` changed.

Metrics (:mod:`~benchmarks.sequential.evaluate`), mean and 95% bootstrap interval. JSON values are
fractions (fluency in bits); the markdown table shows them x100 as the paper does.

General ability and curves (:mod:`~benchmarks.sequential.curves`): the held-out perplexity
(``--heldout-docs``, default 500 documents of the C0 corpus that C0 did not use) of the unedited
model and of every method's final model, with paired BLUE-minus-base differences; with
``--curve-every K``, curve points every K edits (efficacy, generalization, specificity on a seeded
sample of up to ``--curve-cases`` 200 edited cases, fluency on ``--curve-fluency-cases`` 50 of
them, held-out perplexity), plus the unedited model as point 0 and the final model as point N.

Costs (:mod:`~benchmarks.sequential.costs`): wall time of the key-statistics pass (first call of
the run: computed, or read from the disk cache; a second, cached call; optionally a forced cold
pass), wall time of every batch edit (and its targets / keys / update parts), target-optimisation
steps per edited layer, peak RSS.

PRUNE (:mod:`~benchmarks.sequential.restraint`): every batch records the accumulated change's
largest singular value over sigma_max per layer; where the restraint acts, the curve points and
the final evaluation are repeated on the unrestrained sequence (``restraint`` in ``done.json``,
a dotted line in the curve plots, a table section), so its effect is paired over the same cases.

Resumable (:mod:`~benchmarks.sequential.checkpoints`): after every batch the method's
:class:`blue_plugin.editing.session.EditSession` is saved under ``OUT/progress/<METHOD>/``;
running the same command again continues where it stopped and ends with the same result. Curve
points are taken after the batch's checkpoint (one missing after a stop is taken on resuming), and
the evaluations of all cases (unedited, final) save their scores every ``--eval-chunk-cases``
(100) cases (:mod:`~benchmarks.sequential.chunked`), so a stop loses at most one batch or one
chunk. A finished method is kept in ``OUT/progress/<METHOD>/done.json``.

Outputs in ``OUT`` (:mod:`~benchmarks.sequential.report`, :mod:`~benchmarks.sequential.plots`):
``results.json`` (config, versions, machine, per-case scores, summaries, costs), ``table.md``
(methods as rows, metrics as columns, "pre" first), ``steps_per_layer.png``, with
``--eval-every`` ``metrics_vs_edits.png`` and with ``--curve-every`` one ``curve_<metric>.png`` per
metric (x = number of edits, both modes of each base method). ``--compare DIR1 DIR2 ... --out
DIR`` merges runs into ``comparison.md`` / ``comparison.json``; ``--evidence DIR1 DIR2 ... --out
DIR`` writes ``evidence.md`` (:mod:`~benchmarks.sequential.evidence`): per run and base method,
BLUE minus base with "better" / "worse" only where the 95 % interval excludes 0; ``--status --out
DIR`` (:mod:`~benchmarks.sequential.status`) says where a run stands from its progress folder
(methods, batches, curve points so far) and writes ``status.md`` / ``status.json``; ``--pre-from
DIR`` takes the unedited evaluation from another run of the same configuration. Finished
measurements (the unedited evaluation, each finished method) are copied, gzip-compressed, to
``OUT/kept/`` (:mod:`~benchmarks.sequential.kept`), small enough to commit: a run in a folder whose
progress is gone (another machine) restores them and resumes after the last finished method.

From Python: ``run_benchmark(SequentialConfig(data=..., methods=..., n=..., batch_size=...),
model=..., tok=...)``; the fields may also be given as keywords of :func:`run_benchmark`.

Examples::

    python -m benchmarks.sequential --data counterfact \\
        --methods MEMIT,MEMIT_BLUE --n 20 --batch-size 5 --seed 0 --out /tmp/seq-cf
    python -m benchmarks.sequential --data zsre \\
        --methods AlphaEdit,AlphaEdit_BLUE --n 200 --batch-size 20 --eval-every 40 --out /tmp/seq-zsre \\
        --model /models/smollm2-hf --device cuda
    python -m benchmarks.sequential --data counterfact --methods MEMIT,MEMIT_BLUE --n 2000 \\
        --batch-size 100 --curve-every 200 --out /tmp/seq-cf-2000 --device cuda
    python -m benchmarks.sequential --compare /tmp/seq-cf /tmp/seq-zsre --out /tmp/seq-all
"""
from benchmarks.common import (
    DEFAULT_HPARAMS,
    DEFAULT_MODEL,
    METHODS,
    build_base_hparams,
    method_hparams,
    parse_methods,
    parse_overrides,
)
from benchmarks.sequential.checkpoints import SessionCheckpoints
from benchmarks.sequential.cli import build_parser, config_from_args, main
from benchmarks.sequential.config import CF_FORMATS, METRIC_LABELS, RESULTS_FILE, SequentialConfig
from benchmarks.sequential.costs import batch_costs, prepare_statistics, steps_per_layer
from benchmarks.sequential.curves import CURVE_METRICS, CurvePlan, evaluate_point, point_from_scores, select_heldout
from benchmarks.sequential.evaluate import evaluate_cases, summarize
from benchmarks.sequential.plots import make_plots
from benchmarks.sequential.report import blue_vs_base, compare_runs, diff_cell, render_table
from benchmarks.sequential.run import BenchmarkInterrupted, run_benchmark

#: the name the tests use for :func:`~benchmarks.sequential.report.diff_cell`
_diff_cell = diff_cell

__all__ = [
    "DEFAULT_HPARAMS", "DEFAULT_MODEL", "METHODS", "build_base_hparams", "method_hparams", "parse_methods",
    "parse_overrides", "SessionCheckpoints", "build_parser", "config_from_args", "main", "CF_FORMATS",
    "METRIC_LABELS", "RESULTS_FILE", "SequentialConfig", "batch_costs", "prepare_statistics", "steps_per_layer",
    "CURVE_METRICS", "CurvePlan", "evaluate_point", "point_from_scores", "select_heldout",
    "evaluate_cases", "summarize", "make_plots", "blue_vs_base", "compare_runs", "diff_cell", "render_table",
    "BenchmarkInterrupted", "run_benchmark",
]
