"""Machine and version information and the memory figures of this process.

Nothing here touches a model's weights; everything is safe to call from any script.
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from typing import Any

import numpy as np
import torch
import transformers

import blue_plugin

from benchmarks.common.paths import REPO_ROOT


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
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)
