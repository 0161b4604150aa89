"""The editing methods every benchmark knows, and their hyperparameters built from one YAML.

:data:`METHODS` is the one list of method names: the original methods (``blue: false``, the
original residual distribution) and their ``_BLUE`` variants (``blue: true``); a benchmark that
runs only some of them selects from it.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import yaml

from blue_plugin.hparams import BLUEHyperParams

from benchmarks.common.paths import DEFAULT_HPARAMS, resolve_repo_path

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


def build_base_hparams(
    hparams: str | os.PathLike | None,
    batch_size: int,
    seed: int,
    mom2_n_samples: Optional[int] = None,
    steps: Optional[int] = None,
    stats_dir: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
):
    """Load the YAML (default :data:`~benchmarks.common.paths.DEFAULT_HPARAMS`) and apply the
    benchmark's overrides (``overrides``: any further hyperparameters, applied last; not
    ``base_method`` / ``blue``, which each method sets). A corpus named by a relative path is
    found from the current directory or the repository root."""
    hp = BLUEHyperParams.from_hparams(hparams if hparams is not None else DEFAULT_HPARAMS)
    changes: dict[str, Any] = {"batch_size": batch_size, "seed": seed}
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
    hp = hp.replace(**changes)
    return hp.replace(mom2_dataset=resolve_repo_path(hp.mom2_dataset))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["v_lr=0.1", "layers=[4, 8]"]`` -> ``{"v_lr": 0.1, "layers": [4, 8]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
