"""AlphaEdit's null-space projections, checked and imported into the statistics cache.

AlphaEdit's ``null_space_project.pt`` is ``torch.save`` of one float tensor (L, d, d): slice i is
the projection P = U U^T onto the eigenvectors of the i-th edited layer's C_0 whose eigenvalues
are below ``nullspace_threshold`` (the layers in the order of the configuration's ``layers``).
AlphaEdit's update needs only P (with the accumulated K_p K_p^T, the keys and residuals), so an
imported P lets the engine edit with AlphaEdit without computing C_0; MEMIT, RECT and PRUNE still
need C_0 itself, which cannot be recovered from P.

The file is read with ``torch.load(weights_only=True)`` only (a single (d, d) tensor is one
slice). Checks, in this order, each named in the :class:`~blue_plugin.errors.BLUEStatisticsError`
it raises (``error.check``): ``format``, ``pickle``, ``shape`` (square slices of side = the
modules' key dimension, as many slices as modules), ``finite``, ``symmetry`` (max |P - P^T| <=
``tol`` x max |P|), ``idempotent`` (||P P - P||_F <= ``tol`` x max(||P||_F, 1)) and
``eigenvalues`` (each within ``tol`` of 0 or 1; the number near 1 is the rank, the null-space
dimension). A refused file leaves the cache untouched.

The threshold P was computed with is not in the file: the caller gives it (the configuration's
``nullspace_threshold`` by default on the command line) and it is recorded. Each slice is stored,
symmetrised, in float64, as its own cache file next to the C_0 file of the same request
(:func:`blue_plugin.stats.cache.projection_file_name`: ``<C_0 file name>__P_thr<threshold>``)
with ``kind = projection``, ``nullspace_threshold``, ``rank`` and the provenance
(``source_path``, ``source_sha256``, ``source_slice``, ...). :func:`load_projection` reads it back.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import BLUEStatisticsError
from .accumulate import check_mom2_dtype, effective_max_length, validate_module_names
from .cache import (
    KIND_PROJECTION,
    acquire_cache_lock,
    cache_file_name,
    expected_d_in,
    load_moment,
    projection_file_name,
    request_metadata,
    save_moment,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from .corpus import read_corpus
from .importer import ImportResult, file_sha256, read_torch_file, refusal
from .sources import check_positive_int, is_hf_corpus

logger = logging.getLogger(__name__)

#: The checks of a projection file, in the order they run (``BLUEStatisticsError.check``).
PROJECTION_CHECKS: tuple[str, ...] = ("format", "pickle", "shape", "finite", "symmetry", "idempotent", "eigenvalues")
#: Default tolerance of the symmetry (relative), idempotency (relative) and eigenvalue (absolute)
#: checks; a float32 P from an SVD is within about 1e-6 of each.
DEFAULT_PROJECTION_TOL = 1e-3
#: ``source_format`` of an imported projection.
PROJECTION_FORMAT = "alphaedit-projection"


@dataclass
class SliceCheck:
    """What the checks found for one slice of a projection file."""

    index: int
    rank: int  #: eigenvalues near 1: the dimension of the null space P projects onto
    max_asymmetry: float
    idempotency_error: float  #: ||P P - P||_F / max(||P||_F, 1)
    eigenvalue_error: float  #: largest distance of an eigenvalue from {0, 1}


@dataclass
class SourceProjection:
    """A checked projection file: the slices (L, d, d) as stored, and what each check found."""

    path: Path
    tensor: torch.Tensor
    sha256: str
    slices: list[SliceCheck] = field(default_factory=list)

    def slice(self, i: int) -> torch.Tensor:
        """Slice ``i``, symmetrised, in float64 (what is stored)."""
        p = self.tensor[i].to(torch.float64)
        return (p + p.T) / 2


def check_threshold(threshold: float) -> float:
    """``nullspace_threshold`` as a finite float > 0, else ``ValueError``."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"nullspace_threshold must be a number, got {threshold!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"nullspace_threshold must be a finite number > 0, got {threshold!r}")
    return value


def read_projection(path: str | os.PathLike) -> tuple[Path, torch.Tensor]:
    """``(absolute path, tensor (L, d, d))`` of a projection file (``format`` and ``pickle`` checks)."""
    path = Path(os.path.expanduser(os.fspath(path))).absolute()
    if not path.is_file():
        raise refusal(path, "format", "no such file")
    data = read_torch_file(path)
    if not isinstance(data, torch.Tensor):
        raise refusal(path, "format", f"it holds a {type(data).__name__}, not one tensor (layers, d, d) as AlphaEdit's "
                                      "null_space_project.pt does")
    if not data.is_floating_point():
        raise refusal(path, "format", f"the projection has dtype {data.dtype}, not a floating-point type")
    if data.dim() not in (2, 3) or data.shape[-1] != data.shape[-2] or data.numel() == 0:
        raise refusal(path, "shape", f"the tensor has shape {tuple(data.shape)}, not (layers, d, d) or (d, d)")
    return path, data.detach().cpu().reshape(-1, data.shape[-1], data.shape[-1])


def check_slice(path: Path, P: torch.Tensor, index: int, tol: float) -> SliceCheck:
    """The ``finite``, ``symmetry``, ``idempotent`` and ``eigenvalues`` checks of one slice."""
    where = f"slice {index}"
    p = P.to(torch.float64)
    bad = int((~torch.isfinite(p)).sum().item())
    if bad:
        raise refusal(path, "finite", f"{where}: {bad} of {p.numel()} entries are NaN or infinite")
    scale = p.abs().max().item()
    asym = (p - p.T).abs().max().item()
    if asym > tol * scale:
        raise refusal(path, "symmetry", f"{where}: max |P - P^T| = {asym:.3g} exceeds {tol:g} x max |P| = "
                                        f"{tol * scale:.3g}; an orthogonal projection is symmetric")
    s = (p + p.T) / 2
    norm = max(torch.linalg.matrix_norm(s).item(), 1.0)
    idem = torch.linalg.matrix_norm(s @ s - s).item() / norm
    if idem > tol:
        raise refusal(path, "idempotent", f"{where}: ||P P - P|| / ||P|| = {idem:.3g} exceeds {tol:g}; a projection "
                                          "satisfies P P = P (is this a covariance rather than AlphaEdit's P?)")
    evals = torch.linalg.eigvalsh(s)
    dist = torch.minimum(evals.abs(), (evals - 1).abs())
    worst = dist.max().item()
    if worst > tol:
        e = evals[int(dist.argmax())].item()
        raise refusal(path, "eigenvalues", f"{where}: eigenvalue {e:.6g} is {worst:.3g} away from 0 and 1 (more than "
                                           f"{tol:g}); the eigenvalues of a projection are 0 or 1")
    return SliceCheck(index=index, rank=int((evals > 0.5).sum().item()), max_asymmetry=asym,
                      idempotency_error=idem, eigenvalue_error=worst)


def check_projection(path: str | os.PathLike, d_in: int | None, n_layers: int | None = None,
                     tol: float = DEFAULT_PROJECTION_TOL) -> SourceProjection:
    """Every check of a projection file against a key dimension ``d_in`` and a number of layers
    ``n_layers`` (when given), writing nothing."""
    if not tol >= 0:
        raise ValueError(f"the projection tolerance must be >= 0, got {tol!r}")
    path, t = read_projection(path)
    n, d = t.shape[0], t.shape[-1]
    if d_in is not None and d != d_in:
        raise refusal(path, "shape", f"the projections are {d} x {d} but the module's keys have d_in = {d_in} "
                                     "dimensions (wrong layer, module or model?)")
    if n_layers is not None and n != n_layers:
        raise refusal(path, "shape", f"the file holds {n} projection(s) but {n_layers} layer(s) were given; slice i "
                                     "belongs to the i-th layer (give as many layers as slices, in the order of "
                                     "the configuration AlphaEdit ran with)")
    src = SourceProjection(path=path, tensor=t, sha256="")
    src.slices = [check_slice(path, t[i], i, tol) for i in range(n)]
    src.sha256 = file_sha256(path)
    return src


def request_metadatas(model: nn.Module, tok, module_names: Sequence[str], corpus: str, n_samples: int,
                      max_length: int, model_id: str | None = None, *, mom2_dtype: str = "float32",
                      subset: str = "random", progress: bool = True) -> dict[str, dict[str, str]]:
    """:func:`~blue_plugin.stats.cache.request_metadata` of each module, as
    :func:`~blue_plugin.stats.moments.get_second_moments` builds it (a local corpus is read to
    fingerprint it, a hub corpus is not); ``max_length`` as configured (made effective here)."""
    check_positive_int(n_samples, "n_samples")
    check_mom2_dtype(mom2_dtype)
    max_length = effective_max_length(model, max_length)
    texts = None if is_hf_corpus(str(corpus)) else read_corpus(
        corpus, n_samples, subset=subset, model=model, tok=tok, max_length=max_length, progress=progress)
    tfp = tokenizer_fingerprint(tok)
    return {n: request_metadata(model, tok, n, corpus, texts, n_samples, max_length, model_id, subset=subset,
                                mom2_dtype=mom2_dtype, fingerprints=(weights_fingerprint(model, [n]), tfp))
            for n in module_names}


def projection_metadata(meta: dict[str, str], threshold: float) -> dict[str, str]:
    """The metadata a projection file for request ``meta`` must carry."""
    return {**meta, "kind": KIND_PROJECTION, "nullspace_threshold": repr(check_threshold(threshold))}


def cached_statistics(model: nn.Module, tok, module_names: Sequence[str], *, corpus: str, n_samples: int,
                      max_length: int, threshold: float, cache_dir: str | os.PathLike, model_id: str | None = None,
                      mom2_dtype: str = "float32", subset: str = "random", progress: bool = True,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What the cache already holds, computing nothing: ``({name: C_0}, {name: P})``, C_0 as
    :func:`~blue_plugin.stats.moments.get_second_moments` would read it, P (imported,
    ``threshold``) only for the modules without a C_0 file; float64 on the CPU."""
    names = validate_module_names(model, list(module_names))
    cache_dir = Path(os.path.expanduser(os.fspath(cache_dir)))
    metas = request_metadatas(model, tok, names, corpus, n_samples, max_length, model_id, mom2_dtype=mom2_dtype,
                              subset=subset, progress=progress)
    modules = dict(model.named_modules())
    moments, projections = {}, {}
    for n in names:
        d_in = expected_d_in(modules[n])
        path = cache_dir / cache_file_name(metas[n])
        C = load_moment(path, metas[n], "cpu", d_in) if path.exists() else None
        if C is not None:
            moments[n] = C
            continue
        expected = projection_metadata(metas[n], threshold)
        path = cache_dir / projection_file_name(expected, threshold)
        P = load_moment(path, expected, "cpu", d_in, kind=KIND_PROJECTION) if path.exists() else None
        if P is not None:
            projections[n] = P
    return moments, projections


def load_projection(model: nn.Module, tok, module_name: str, *, corpus: str, n_samples: int, max_length: int,
                    threshold: float, cache_dir: str | os.PathLike, model_id: str | None = None,
                    mom2_dtype: str = "float32", subset: str = "random", progress: bool = True) -> torch.Tensor | None:
    """The imported projection P (float64, CPU) of ``module_name`` for the C_0 settings
    (``corpus``, ``n_samples``, ``max_length``, ``mom2_dtype``, ``subset``, ``model_id``) and
    ``threshold``, or ``None`` when the cache has none (or an invalid one, with a warning)."""
    name = validate_module_names(model, [module_name])[0]
    meta = request_metadatas(model, tok, [name], corpus, n_samples, max_length, model_id, mom2_dtype=mom2_dtype,
                             subset=subset, progress=progress)[name]
    expected = projection_metadata(meta, threshold)
    path = Path(os.path.expanduser(os.fspath(cache_dir))) / projection_file_name(expected, threshold)
    d_in = expected_d_in(dict(model.named_modules())[name])
    return load_moment(path, expected, "cpu", d_in, kind=KIND_PROJECTION) if path.exists() else None


def import_projection(
    source: str | os.PathLike,
    model: nn.Module,
    tok,
    module_names: Sequence[str],
    *,
    corpus: str,
    n_samples: int,
    max_length: int,
    threshold: float,
    cache_dir: str | os.PathLike,
    model_id: str | None = None,
    mom2_dtype: str = "float32",
    subset: str = "random",
    tol: float = DEFAULT_PROJECTION_TOL,
    overwrite: bool = False,
    progress: bool = True,
) -> list[ImportResult]:
    """Check the projection file ``source`` (slice i for ``module_names[i]``) and store each
    slice in ``cache_dir`` as the projection of that module for the C_0 settings the editing
    configuration uses (``mom2_dataset``, ``mom2_n_samples``, ...) and ``threshold`` (its
    ``nullspace_threshold``; the caller vouches that P was computed with these).

    Raises :class:`BLUEStatisticsError` (``check`` as in the module docstring, ``destination``
    for an existing file without ``overwrite``, ``readback``) with nothing written, or
    ``ValueError`` for bad arguments. ``ImportResult.count`` is the slice's rank.
    """
    names = validate_module_names(model, list(module_names))
    if len(set(names)) != len(names):
        raise ValueError(f"a module is listed twice: {names}")
    modules = dict(model.named_modules())
    dims = {n: expected_d_in(modules[n]) for n in names}
    if any(d is None for d in dims.values()):
        raise ValueError(f"cannot tell the key dimension of {[n for n, d in dims.items() if d is None]} "
                         "(needs in_features of nn.Linear or nx of GPT-2's Conv1D)")
    if len(set(dims.values())) != 1:
        raise ValueError(f"the modules have different key dimensions {dims}; one projection file has one d")
    threshold = check_threshold(threshold)
    src = check_projection(source, dims[names[0]], len(names), tol)
    metas = request_metadatas(model, tok, names, corpus, n_samples, max_length, model_id, mom2_dtype=mom2_dtype,
                              subset=subset, progress=progress)
    cache_dir = Path(os.path.expanduser(os.fspath(cache_dir)))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the statistics cache directory {str(cache_dir)!r}: {e}") from e
    planned = []
    for n, check in zip(names, src.slices):
        meta = {**projection_metadata(metas[n], threshold), "rank": str(check.rank),
                "model_dtype": str(next(modules[n].parameters(), torch.empty(0)).dtype),
                "source_format": PROJECTION_FORMAT, "source_path": str(src.path), "source_sha256": src.sha256,
                "source_slice": str(check.index), "source_slices": str(len(src.slices)),
                "source_dtype": str(src.tensor.dtype).replace("torch.", ""),
                "source_max_asymmetry": f"{check.max_asymmetry:.3g}",
                "source_idempotency_error": f"{check.idempotency_error:.3g}",
                "source_eigenvalue_error": f"{check.eigenvalue_error:.3g}"}
        planned.append((n, check, meta, cache_dir / projection_file_name(meta, threshold)))
    lock = acquire_cache_lock(cache_dir, metas[names[0]])
    written: list[Path] = []
    try:
        existing = [str(path) for *_, path in planned if path.exists()]
        if existing and not overwrite:
            raise BLUEStatisticsError(f"{', '.join(existing)} already exist(s) (imported before); pass --overwrite "
                                      "(overwrite=True) to replace. Nothing was written to the statistics cache.",
                                      "destination")
        for n, check, meta, path in planned:
            save_moment(path, src.slice(check.index), meta)
            written.append(path)
            if load_moment(path, meta, "cpu", dims[n], kind=KIND_PROJECTION) is None:
                raise BLUEStatisticsError(f"{path} did not read back as a valid cache file (see the warning above); "
                                          "the files of this import were removed.", "readback")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        lock.release()
    results = []
    for n, check, meta, path in planned:
        logger.info("imported slice %d of %s as the null-space projection of %s (rank %d of %d, threshold %g): %s",
                    check.index, src.path, n, check.rank, dims[n], threshold, path)
        if check.rank == 0:
            logger.warning("%s: the projection is zero (empty null space); AlphaEdit cannot change this module", n)
        results.append(ImportResult(path=path, module=n, count=check.rank, metadata=meta))
    return results
