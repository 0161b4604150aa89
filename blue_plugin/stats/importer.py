"""Second moments computed by other tools, checked and imported into the statistics cache.

Accepted sources (``source_format``; by default from the file's suffix):

``npz`` (``.npz`` / ``.npy``)
    The cache file of ROME's, EasyEdit's and AlphaEdit's ``layer_stats``
    (``<stats_dir>/<model>/<corpus>_stats/<module>_<precision>_mom2[_<n>].npz``): the state of a
    running second moment inside a combined statistic, saved with ``numpy.savez``. Keys
    ``mom2.count`` (the number of tokens), ``mom2.mom2`` (the SUM of k k^T over those tokens;
    their ``moment()`` divides it by the count), ``mom2.constructor`` (a string) and, when the
    sample size was set, ``sample_size`` (documents). Read with ``numpy.load(allow_pickle=False)``.
``pt`` (``.pt`` / ``.pth`` / ``.bin``)
    The same state saved with ``torch.save`` (keys with or without the ``mom2.`` prefix, or
    nested under ``mom2``; tensors, numbers and strings only). Read with
    ``torch.load(weights_only=True)``.

AlphaEdit's ``null_space_project.pt`` (``torch.save`` of one float tensor (L, d, d): for each
edited layer the projection P = U U^T onto the eigenvectors of its C_0 below
``nullspace_threshold``) is not a second moment -- C_0 cannot be recovered from P, and MEMIT, RECT
and PRUNE need C_0 itself -- so it is refused here (``projection`` check) and imported as a
projection by :mod:`blue_plugin.stats.projection`, which AlphaEdit's update can use without C_0.
Any other bare tensor is refused: it has no sample count.

Checks, in this order, each named in the :class:`~blue_plugin.errors.BLUEStatisticsError` it
raises (``error.check``): ``format`` (a readable file of a known layout), ``pickle`` (no pickled
Python objects), ``projection``, ``count`` (present, an integer > 0), ``shape`` (square, side =
the module's key dimension ``d_in``), ``finite``, ``symmetry`` (max |C - C^T| <= ``symmetry_tol``
x max |C|, C = sum / count) and ``diagonal`` (E[k_i^2] >= 0). A refused file leaves the cache
untouched. An accepted one is stored as the mean (symmetrised) under the request that
:func:`blue_plugin.stats.moments.get_second_moments` builds for the given corpus, sample count,
max length, ``mom2_dtype`` and subset -- the caller vouches that these describe the source --
with provenance in the metadata: ``source_path``, ``source_sha256``, ``source_format``,
``source_count``, ``source_dtype``, ``source_max_asymmetry``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import BLUEStatisticsError
from .accumulate import check_mom2_dtype, effective_max_length, validate_module_names
from .cache import (
    acquire_cache_lock,
    cache_file_name,
    expected_d_in,
    load_moment,
    request_metadata,
    save_moment,
    written_metadata,
)
from .corpus import read_corpus
from .sources import check_positive_int, is_hf_corpus

logger = logging.getLogger(__name__)

#: ``source_format`` values, and the suffixes that select them by default.
SOURCE_FORMATS: tuple[str, ...] = ("npz", "pt")
SUFFIX_FORMATS: dict[str, str] = {".npz": "npz", ".npy": "npz", ".pt": "pt", ".pth": "pt", ".bin": "pt"}
#: The checks, in the order they run (``BLUEStatisticsError.check``).
CHECKS: tuple[str, ...] = ("format", "pickle", "projection", "count", "shape", "finite", "symmetry", "diagonal")
#: Default tolerance of the symmetry check, relative to the largest |entry| of the mean (float32
#: sums of many batches are symmetric to about 1e-6 relative).
DEFAULT_SYMMETRY_TOL = 1e-4
#: Relative tolerance under which a bare tensor counts as a projection (symmetric, P P v = P v).
PROJECTION_TOL = 1e-3

_PROTOCOL_BYTE = b"\x80"  # first byte of a pickle of protocol 2 or later
_NEXT_STEP = "Nothing was written to the statistics cache."


@dataclass
class SourceMoment:
    """A second moment read from another tool's file, before the checks that need ``d_in``."""

    path: Path
    source_format: str  #: ``rome-npz`` or ``rome-state-pt``
    total: torch.Tensor  #: the SUM of k k^T, as stored (its dtype is the source's)
    count: int  #: tokens summed
    sha256: str  #: of the source file
    n_docs: str = ""  #: documents (``sample_size``) when the file says, else ""


@dataclass
class ImportResult:
    """What :func:`import_second_moment` wrote."""

    path: Path
    module: str
    count: int
    metadata: dict[str, str] = field(default_factory=dict)


def refusal(path: Path, check: str, why: str) -> BLUEStatisticsError:
    """The error for ``path`` failing ``check`` (one of :data:`CHECKS`)."""
    return BLUEStatisticsError(f"{path}: refused by the {check} check: {why}. {_NEXT_STEP}", check)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


def _read_numpy(path: Path) -> Any:
    """The arrays of an ``.npz`` (a dict) or one ``.npy`` array; never unpickles."""
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "Object arrays" in str(e) or _first_byte(path) == _PROTOCOL_BYTE:
            raise refusal(path, "pickle", f"it holds pickled Python objects, which numpy.load(allow_pickle=False) "
                                          f"does not read ({e})") from None
        raise refusal(path, "format", f"not a NumPy .npz/.npy file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise refusal(path, "format", f"not a readable NumPy .npz/.npy file ({type(e).__name__}: {e})") from None
    if isinstance(data, np.ndarray):
        return data
    out = {}
    with data:
        for key in data.files:
            try:
                out[key] = data[key]
            except ValueError as e:
                if "pickle" in str(e).lower() or "Object arrays" in str(e):
                    raise refusal(path, "pickle", f"member {key!r} is an object array (pickled Python objects), "
                                                  "which numpy.load(allow_pickle=False) does not read") from None
                raise refusal(path, "format", f"member {key!r} is unreadable ({e})") from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise refusal(path, "format", f"member {key!r} is unreadable ({type(e).__name__}: {e})") from None
    return out


def read_torch_file(path: Path) -> Any:
    """What ``torch.load(weights_only=True)`` returns; a pickle it refuses becomes a refusal."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path) or _first_byte(path) == _PROTOCOL_BYTE:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            detail = f"; it needs {found.group(1)}" if found else ""
            raise refusal(path, "pickle", "it holds pickled Python objects other than tensors, numbers, strings "
                                          f"and containers of them, which torch.load(weights_only=True) refuses{detail}") from None
        raise refusal(path, "format", "not a file written by torch.save") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise refusal(path, "format", f"not a readable torch.save file ({type(e).__name__}: {e})") from None


def looks_like_projection(t: torch.Tensor, tol: float = PROJECTION_TOL) -> bool:
    """Whether ``t`` (d, d) or (L, d, d) holds projections: each slab symmetric with P (P v) = P v
    for two random vectors v (O(L d^2), no d^3 product)."""
    if t.dim() not in (2, 3) or t.shape[-1] != t.shape[-2] or not t.is_floating_point() or t.numel() == 0:
        return False
    d = t.shape[-1]
    v = torch.randn(d, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for slab in t.reshape(-1, d, d):
        s = slab.to(torch.float64)
        if not torch.isfinite(s).all():
            return False
        if (s - s.T).abs().max().item() > tol * max(1.0, s.abs().max().item()):
            return False
        pv = s @ v
        if (s @ pv - pv).norm().item() > tol * max(pv.norm().item(), 1e-12):
            return False
    return True


def _refuse_bare(path: Path, t: Any) -> BLUEStatisticsError:
    if isinstance(t, np.ndarray) and t.dtype.kind in "fiu":
        t = torch.from_numpy(np.ascontiguousarray(t))
    if isinstance(t, torch.Tensor) and looks_like_projection(t):
        layers = f"{t.shape[0]} layer(s) of " if t.dim() == 3 else ""
        return refusal(path, "projection", (
            f"a tensor {tuple(t.shape)} of null-space projections P ({layers}d = {t.shape[-1]}), as AlphaEdit's "
            "null_space_project.pt holds, not a second moment: C0 cannot be recovered from P, and MEMIT, RECT and "
            "PRUNE need C0 itself. Import it as a projection for AlphaEdit (python -m blue_plugin.stats import FILE "
            "--hparams H --layers L1,L2,... [--nullspace-threshold T]), or import the layer_stats .npz that P was "
            "computed from (<stats_dir>/<model>/<corpus>_stats/<module>_<precision>_mom2_<n>.npz)"))
    if not isinstance(t, (torch.Tensor, np.ndarray)):
        return refusal(path, "format", f"it holds a {type(t).__name__}, not a state dict with 'mom2.mom2' and "
                                       "'mom2.count'")
    return refusal(path, "count", (
        f"a bare {tuple(t.shape)} array carries no sample count (a mean cannot be checked or weighed without the number "
        "of tokens behind it); save it as {'mom2.mom2': <sum of k k^T>, 'mom2.count': <tokens>} like layer_stats"))


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def parse_count(path: Path, value: Any, key: str) -> int:
    """The token count stored under ``key``: a single finite integer > 0, else a ``count`` refusal."""
    if value is None:
        raise refusal(path, "count", f"no sample count ({key}) in the file; a second moment cannot be checked or "
                                     "averaged without the number of tokens it sums")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iuf":
        raise refusal(path, "count", f"{key} is {arr.dtype} of shape {arr.shape}, not a single number")
    number = arr.reshape(()).item()
    if isinstance(number, float):
        if not math.isfinite(number) or not number.is_integer():
            raise refusal(path, "count", f"{key} is {number!r}, not a whole number of tokens")
        number = int(number)
    if number < 1:
        raise refusal(path, "count", f"{key} is {number}; it must be > 0 (no tokens were summed)")
    return int(number)


def _state(path: Path, data: Mapping[str, Any]) -> tuple[Any, Any, str]:
    """(sum, count, count key) from a ROME-style state dict (prefixed, plain or nested)."""
    if "mom2.mom2" in data:
        return data["mom2.mom2"], data.get("mom2.count"), "mom2.count"
    if isinstance(data.get("mom2"), Mapping):
        return _state(path, {f"mom2.{k}": v for k, v in data["mom2"].items()})
    if "mom2" in data:
        return data["mom2"], data.get("count"), "count"
    keys = ", ".join(sorted(map(str, data))[:12]) or "none"
    raise refusal(path, "format", f"no second moment in it (keys: {keys}); expected 'mom2.mom2' (the sum of "
                                  "k k^T) and 'mom2.count' as ROME's / EasyEdit's layer_stats write")


def read_source(path: str | os.PathLike, source_format: str | None = None) -> SourceMoment:
    """Read a second-moment file of another tool (see the module docstring) without unpickling.

    Runs the ``format``, ``pickle``, ``projection`` and ``count`` checks; raises
    :class:`BLUEStatisticsError` naming the failed one.
    """
    path = Path(os.path.expanduser(os.fspath(path))).absolute()
    if not path.is_file():
        raise refusal(path, "format", "no such file")
    fmt = source_format or SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt not in SOURCE_FORMATS:
        raise refusal(path, "format", f"cannot tell the format from the suffix {path.suffix!r}; "
                                      f"give the format ({' or '.join(SOURCE_FORMATS)})")
    data = _read_numpy(path) if fmt == "npz" else read_torch_file(path)
    if not isinstance(data, Mapping):
        raise _refuse_bare(path, data)
    raw_sum, raw_count, count_key = _state(path, data)
    total = _as_tensor(raw_sum)
    if total is None:
        raise refusal(path, "format", f"the second moment is a {type(raw_sum).__name__}, not a numeric array")
    count = parse_count(path, raw_count, count_key)
    n_docs = ""
    size = data.get("sample_size")
    if size is not None:
        arr = np.asarray(size.cpu().numpy() if isinstance(size, torch.Tensor) else size)
        if arr.size == 1 and arr.dtype.kind in "iuf" and math.isfinite(float(arr.reshape(()).item())):
            n_docs = str(int(arr.reshape(()).item()))
    return SourceMoment(path=path, source_format=f"rome-{'npz' if fmt == 'npz' else 'state-pt'}", total=total,
                        count=count, sha256=file_sha256(path), n_docs=n_docs)


def check_moment(src: SourceMoment, d_in: int | None,
                 symmetry_tol: float = DEFAULT_SYMMETRY_TOL) -> tuple[torch.Tensor, float]:
    """The ``shape``, ``finite``, ``symmetry`` and ``diagonal`` checks; returns the symmetrised
    float64 mean sum / count and its largest asymmetry |C - C^T| (before symmetrising)."""
    if not symmetry_tol >= 0:
        raise ValueError(f"symmetry_tol must be >= 0, got {symmetry_tol!r}")
    path, t = src.path, src.total
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise refusal(path, "shape", f"the second moment has shape {tuple(t.shape)}, not a square matrix")
    if d_in is not None and t.shape[0] != d_in:
        raise refusal(path, "shape", f"the second moment is {t.shape[0]} x {t.shape[1]} but the module's keys have "
                                     f"d_in = {d_in} dimensions (wrong layer, module or model?)")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise refusal(path, "format", f"the second moment has dtype {t.dtype}")
    total = t.to(torch.float64)
    bad = int((~torch.isfinite(total)).sum().item())
    if bad:
        raise refusal(path, "finite", f"{bad} of {total.numel()} entries of the second moment are NaN or infinite")
    mean = total / src.count
    scale = mean.abs().max().item()
    asym = (mean - mean.T).abs().max().item()
    if asym > symmetry_tol * scale:
        raise refusal(path, "symmetry", f"max |C - C^T| = {asym:.3g} exceeds {symmetry_tol:g} x max |C| = "
                                        f"{symmetry_tol * scale:.3g}; a second moment is symmetric")
    negative = int((mean.diagonal() < 0).sum().item())
    if negative:
        raise refusal(path, "diagonal", f"{negative} diagonal entries are negative; E[k_i^2] cannot be")
    return (mean + mean.T) / 2, asym


def check_file(path: str | os.PathLike, d_in: int | None, source_format: str | None = None,
               symmetry_tol: float = DEFAULT_SYMMETRY_TOL) -> tuple[SourceMoment, torch.Tensor, float]:
    """Every check of ``path`` against a key dimension ``d_in``, writing nothing: ``(source, mean,
    asymmetry)`` as from :func:`read_source` and :func:`check_moment`."""
    src = read_source(path, source_format)
    mean, asym = check_moment(src, d_in, symmetry_tol)
    return src, mean, asym


def import_second_moment(
    source: str | os.PathLike,
    model: nn.Module,
    tok,
    module_name: str,
    *,
    corpus: str,
    n_samples: int,
    max_length: int,
    cache_dir: str | os.PathLike,
    model_id: str | None = None,
    mom2_dtype: str = "float32",
    subset: str = "random",
    source_format: str | None = None,
    symmetry_tol: float = DEFAULT_SYMMETRY_TOL,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Check ``source`` against ``module_name`` of ``model`` and store its mean in ``cache_dir``
    as the cache file that :func:`blue_plugin.stats.moments.get_second_moments` reads for
    (``corpus``, ``n_samples``, ``max_length``, ``mom2_dtype``, ``subset``, ``model_id``): pass the
    values the editing configuration uses (``mom2_dataset``, ``mom2_n_samples``, ...). A local
    corpus is read to fingerprint it, as the engine does; a hub corpus is not.

    Raises :class:`BLUEStatisticsError` (``check`` as in the module docstring, or
    ``destination`` for an existing file without ``overwrite``) with nothing written, or
    ``ValueError`` for bad arguments.
    """
    name = validate_module_names(model, [module_name])[0]
    module = dict(model.named_modules())[name]
    d_in = expected_d_in(module)
    if d_in is None:
        raise ValueError(f"cannot tell the key dimension of {name} ({type(module).__name__}); "
                         "it needs in_features (nn.Linear) or nx (GPT-2 Conv1D)")
    check_positive_int(n_samples, "n_samples")
    check_mom2_dtype(mom2_dtype)
    max_length = effective_max_length(model, max_length)
    src, mean, asym = check_file(source, d_in, source_format, symmetry_tol)
    texts = None if is_hf_corpus(str(corpus)) else read_corpus(
        corpus, n_samples, subset=subset, model=model, tok=tok, max_length=max_length, progress=progress)
    meta = request_metadata(model, tok, name, corpus, texts, n_samples, max_length, model_id,
                            subset=subset, mom2_dtype=mom2_dtype)
    meta = written_metadata(
        meta, module, src.count, src.n_docs, source_format=src.source_format, source_path=str(src.path),
        source_sha256=src.sha256, source_count=str(src.count), source_dtype=str(src.total.dtype).replace("torch.", ""),
        source_max_asymmetry=f"{asym:.3g}",
    )
    cache_dir = Path(os.path.expanduser(os.fspath(cache_dir)))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the statistics cache directory {str(cache_dir)!r}: {e}") from e
    path = cache_dir / cache_file_name(meta)
    lock = acquire_cache_lock(cache_dir, meta)
    try:
        if path.exists() and not overwrite:
            raise BLUEStatisticsError(f"{path} already exists (computed or imported before); pass --overwrite "
                                      f"(overwrite=True) to replace it. {_NEXT_STEP}", "destination")
        save_moment(path, mean, meta)
        if load_moment(path, meta, "cpu", d_in) is None:  # what the engine will check, checked now
            path.unlink(missing_ok=True)
            raise BLUEStatisticsError(f"{path} did not read back as a valid cache file (see the warning above); "
                                      f"it was removed. {_NEXT_STEP}", "readback")
    finally:
        lock.release()
    logger.info("imported %s (%s, %d tokens) as %s for corpus %s, n_samples %d, max_length %d, mom2_dtype %s",
                src.path, src.source_format, src.count, path, corpus, n_samples, max_length, mom2_dtype)
    return ImportResult(path=path, module=name, count=src.count, metadata=meta)
