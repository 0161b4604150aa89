"""Helpers shared by the benchmark scripts: machine and version info, peak memory, JSON files.

Nothing here touches a model's weights; everything is safe to call from any script.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The embedded model, its configuration and the dataset (a :mod:`blue_plugin.datafiles` name)
#: the benchmarks use by default.
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HPARAMS = REPO_ROOT / "hparams" / "BLUE" / "smollm2-135m.yaml"
DEFAULT_DATA_NAME = "counterfact"


def default_data(name: str = DEFAULT_DATA_NAME, download: bool = True) -> Path:
    """The dataset ``name`` resolved now by :func:`blue_plugin.datafiles.resolve_data`
    ($BLUE_PLUGIN_DATA, the cache, then a download); call it at run time, never at import."""
    from blue_plugin.datafiles import resolve_data

    return resolve_data(name, download=download)


def resolve_data_arg(value: str | os.PathLike | None, default: str = DEFAULT_DATA_NAME,
                     download: bool = True) -> Path:
    """A ``--data`` value as a path: None means the dataset ``default``; a dataset name
    (``counterfact``, ``zsre``) is resolved; a relative path that does not exist from the current
    directory is tried relative to the repository root.

    Raises:
        blue_plugin.datafiles.DataFileNotFound: the file is nowhere (the message says where it looked).
    """
    from blue_plugin.datafiles import resolve_data

    if value is None:
        return default_data(default, download)
    p = Path(os.path.expanduser(str(value)))
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).is_file():
        return (REPO_ROOT / p).resolve()
    return resolve_data(value, download=download)


def __getattr__(name: str) -> Any:
    """``DEFAULT_CF_DATA`` (kept for older scripts): where CounterFact is now without downloading,
    else where ``python -m blue_plugin.datafiles fetch counterfact`` puts it. Computed on access, so
    importing this module never depends on the file."""
    if name == "DEFAULT_CF_DATA":
        from blue_plugin.datafiles import DATASETS, cache_dir, locate

        return locate(DEFAULT_DATA_NAME) or cache_dir() / DATASETS[DEFAULT_DATA_NAME].relpath
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Host, OS, CPU model and count, total memory, torch threads and the CUDA devices (if any)."""
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import psutil

        info["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 2)
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):  # pragma: no cover - psutil is a bench dependency
        pass
    if torch.cuda.is_available():
        info["cuda_devices"] = [
            {"name": torch.cuda.get_device_name(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 2)}
            for i in range(torch.cuda.device_count())
        ]
    return info


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, Any]:
    """Versions of Python, the numerical stack and blue_plugin, plus the git commit of the repo."""
    import torch
    import transformers

    import blue_plugin

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "blue_plugin": getattr(blue_plugin, "__version__", "unknown"),
        "cuda": torch.version.cuda,
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        out["git_commit"] = commit
        out["git_dirty"] = bool(status)
    return out


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``/proc/self/clear_refs``).

    Returns True when the counter was reset, so that :func:`peak_rss_mib` afterwards measures the
    peak since this call; False where that is not possible (then it is the process-lifetime peak).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (since the last successful :func:`reset_peak_rss`)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = raw // 1024 if sys.platform == "darwin" else raw
    return round(kib / 1024, 1)


def current_rss_mib() -> float:
    """Current resident memory of this process in MiB."""
    kib = _status_kib("VmRSS")
    if kib is None:
        try:
            import psutil

            return round(psutil.Process().memory_info().rss / 2**20, 1)
        except ImportError:  # pragma: no cover
            return float("nan")
    return round(kib / 1024, 1)


def cuda_peak_mib() -> float | None:
    """Peak CUDA memory allocated by torch since the last reset (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """``obj`` with numpy/torch scalars and arrays, tuples, paths and non-string keys made JSON-safe.

    Non-finite floats become None (JSON has no NaN).
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return jsonable(obj.detach().cpu().tolist())
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``jsonable(obj)`` to ``path`` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(jsonable(obj), fh, indent=indent)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing or broken file raises ValueError naming it."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc
