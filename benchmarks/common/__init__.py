"""Helpers shared by the benchmark scripts.

* :mod:`~benchmarks.common.paths`: the repository root, default model / YAML / dataset, and how
  ``--data`` and corpus arguments become paths;
* :mod:`~benchmarks.common.system`: machine and version information, peak and current memory;
* :mod:`~benchmarks.common.jsonio`: JSON-safe values, atomic JSON writes, reads;
* :mod:`~benchmarks.common.methods`: the one list of method names (:data:`METHODS`), their
  parsing and their hyperparameters.
"""
from __future__ import annotations

from typing import Any

from benchmarks.common import paths
from benchmarks.common.jsonio import json_roundtrip, jsonable, read_json, write_json
from benchmarks.common.methods import (
    METHODS,
    build_base_hparams,
    check_int,
    method_hparams,
    parse_methods,
    parse_overrides,
)
from benchmarks.common.paths import (
    DEFAULT_DATA_NAME,
    DEFAULT_HPARAMS,
    DEFAULT_MODEL,
    REPO_ROOT,
    default_cf_data,
    default_data,
    recorded_path,
    resolve_data_arg,
    resolve_repo_path,
)
from benchmarks.common.system import (
    cuda_peak_mib,
    current_rss_mib,
    machine_info,
    peak_rss_mib,
    reset_peak_rss,
    versions,
)

__all__ = [
    "METHODS", "build_base_hparams", "check_int", "method_hparams", "parse_methods", "parse_overrides",
    "DEFAULT_DATA_NAME", "DEFAULT_HPARAMS", "DEFAULT_MODEL", "REPO_ROOT", "default_cf_data", "default_data",
    "recorded_path", "resolve_data_arg", "resolve_repo_path", "cuda_peak_mib", "current_rss_mib", "machine_info",
    "peak_rss_mib", "reset_peak_rss", "versions", "json_roundtrip", "jsonable", "read_json", "write_json",
]


def __getattr__(name: str) -> Any:
    """``DEFAULT_CF_DATA`` (kept for older scripts), computed on access: see
    :func:`~benchmarks.common.paths.default_cf_data`."""
    if name == "DEFAULT_CF_DATA":
        return paths.default_cf_data()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
