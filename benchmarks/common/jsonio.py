"""JSON files of the benchmarks: values made JSON-safe, atomic writes, reads that name the file."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
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


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (to compare a configuration with a stored one)."""
    return json.loads(json.dumps(jsonable(obj)))
