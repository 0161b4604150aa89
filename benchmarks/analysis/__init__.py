"""The BLUE paper's residual-distribution analyses, causal tracing and dynamic boundary layers,
for one model and config (default: the embedded SmolLM2-135M-Instruct and its YAML).

Analyses (``--what``, comma-separated; ``all`` = every one):

``contribution``  (1) contribution score per critical layer, distributed vs direct residual,
                  applied to the hidden state (the paper's procedure) and as a weight update;
``cosine``        (2) cosine similarity of the distributed and the directly computed residual;
``single_layer``  (3) efficacy of editing one layer with the direct vs the distributed residual;
``steps``         (4) target-optimisation steps per layer, layer by layer with earlier layers
                  updated (and, as a baseline, on the unedited model);
``deviation``     (5) residual deviation vs distribution distance, weight-deviation error vs batch
                  size and vs sequential edit length;
``tracing``       (6) causal tracing (average indirect effect of MLP outputs, and of the other
                  kinds given in ``--trace-kinds``) with suggested critical layers;
``dynamic``       (7) sequential CounterFact edits with fixed vs dynamically chosen boundary layers.

Definitions: :mod:`blue_plugin.research.analysis`, :mod:`blue_plugin.research.tracing`, :mod:`blue_plugin.editing.selection`.
Outputs in ``--out``: ``analysis.json`` (config, versions, machine, timings, every result),
``summary.md`` and one PNG per analysis. A finished analysis is kept in ``analysis.json`` and
skipped when the command runs again with the same settings (other ``--what`` lists add to the same
folder; ``--restart`` recomputes everything).

Examples::

    python -m benchmarks.analysis --what all --n 50 --out benchmarks/results/analysis/smollm2-135m
    python -m benchmarks.analysis --what contribution,cosine --n 2 --steps 5 --mom2-n-samples 50 \\
        --trace-n 2 --out /tmp/analysis-smoke --smoke

Modules: :mod:`~benchmarks.analysis.config` (names, hyperparameters, requests),
:mod:`~benchmarks.analysis.runners` (the analyses), :mod:`~benchmarks.analysis.plots`,
:mod:`~benchmarks.analysis.summary` (``summary.md``), :mod:`~benchmarks.analysis.cli`.
"""
from typing import Any

from benchmarks.analysis.cli import build_parser, main
from benchmarks.analysis.config import (
    ANALYSES,
    DEFAULT_WHAT,
    RESULTS_FILE,
    SCHEMA_VERSION,
    build_hparams,
    parse_int_list,
    parse_what,
    valid_requests,
)
from benchmarks.analysis.plots import make_plots
from benchmarks.analysis.runners import run_analysis, run_dynamic, strip_tensors
from benchmarks.analysis.summary import render_summary
from benchmarks.common import default_cf_data, read_json

__all__ = [
    "build_parser", "main", "ANALYSES", "DEFAULT_WHAT", "RESULTS_FILE", "SCHEMA_VERSION", "build_hparams",
    "parse_int_list", "parse_what", "valid_requests", "make_plots", "run_analysis", "run_dynamic", "strip_tensors",
    "render_summary", "read_json",
]


def __getattr__(name: str) -> Any:
    """``DEFAULT_DATA``: the default ``--data``, where CounterFact is now without downloading
    (:func:`benchmarks.common.default_cf_data`), computed on access."""
    if name == "DEFAULT_DATA":
        return default_cf_data()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
