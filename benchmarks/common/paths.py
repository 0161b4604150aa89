"""The repository root, the model, configuration and dataset the benchmarks use by default, and
how a ``--data`` / corpus / YAML argument becomes a path.

Data are resolved when a run starts (:mod:`blue_plugin.datafiles`), never at import.
"""
from __future__ import annotations

import os
from pathlib import Path

from blue_plugin.datafiles import DATA_ENV, DATASETS, cache_dir, data_dirs, locate, resolve_data

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The embedded model, its configuration and the dataset (a :mod:`blue_plugin.datafiles` name)
#: the benchmarks use by default.
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HPARAMS = REPO_ROOT / "hparams" / "BLUE" / "smollm2-135m.yaml"
DEFAULT_DATA_NAME = "counterfact"


def default_data(name: str = DEFAULT_DATA_NAME, download: bool = True) -> Path:
    """The dataset ``name`` resolved now by :func:`blue_plugin.datafiles.resolve_data`
    ($BLUE_PLUGIN_DATA, the cache, then a download); call it at run time, never at import."""
    return resolve_data(name, download=download)


def resolve_data_arg(value: str | os.PathLike | None, default: str = DEFAULT_DATA_NAME,
                     download: bool = True) -> Path:
    """A ``--data`` value as a path: None means the dataset ``default``; a dataset name
    (``counterfact``, ``zsre``) is resolved; a relative path that does not exist from the current
    directory is tried relative to the repository root.

    Raises:
        blue_plugin.datafiles.DataFileNotFound: the file is nowhere (the message says where it looked).
    """
    if value is None:
        return default_data(default, download)
    p = Path(os.path.expanduser(str(value)))
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).is_file():
        return (REPO_ROOT / p).resolve()
    return resolve_data(value, download=download)


def resolve_repo_path(path: str) -> str:
    """A path that exists from the current directory, made absolute; else a relative path that
    exists under the repository root (a YAML may name its corpus relative to it); else ``path``
    unchanged (e.g. a corpus name such as ``wordnet``)."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        return str(p.resolve())
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return str((REPO_ROOT / p).resolve())
    return path


def recorded_path(path: str | os.PathLike) -> str:
    """``path`` as a run records it in committed results: relative to the repository root when
    inside it, ``$BLUE_PLUGIN_DATA/<relative path>`` when inside a folder that variable names,
    else absolute. A committed configuration then reads the same on every machine and checkout."""
    given = Path(os.path.abspath(os.path.expanduser(str(path))))  # keeps links: hparams/BLUE is one
    for p in (given, given.resolve()):
        if p.is_relative_to(REPO_ROOT):
            return p.relative_to(REPO_ROOT).as_posix()
        for root in data_dirs():
            for r in (Path(os.path.abspath(root)), root.resolve()):
                if p.is_relative_to(r):
                    return f"${DATA_ENV}/{p.relative_to(r).as_posix()}"
    return str(given)


def default_cf_data() -> Path:
    """Where CounterFact is now without downloading, else where
    ``python -m blue_plugin.datafiles fetch counterfact`` puts it."""
    return locate(DEFAULT_DATA_NAME) or cache_dir() / DATASETS[DEFAULT_DATA_NAME].relpath

