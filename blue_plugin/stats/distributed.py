"""Second-moment statistics sharded over processes with ``torch.distributed``.

Launched with ``torchrun`` (or any launcher that sets the usual ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables), every process (rank) loads the
model, gets the corpus from rank 0 (which reads it; a ``sampled`` corpus is generated there
once), and takes a deterministic shard of its documents: document ``i``
goes to rank ``i % world_size`` (:func:`shard_indices`; shard sizes differ by at most one, a rank
may get none). Each rank accumulates float64 sums of k k^T and token counts with
:func:`blue_plugin.stats.accumulate.collect_second_moments`; the sums and counts are all-reduced
(SUM), and rank 0 writes the cache files -- the same files, names and metadata as the
single-process :func:`blue_plugin.stats.moments.get_second_moments`, so the editing engine finds
them. The other ranks wait at a barrier until the files are written.

Equality with a single process: a sum of float64 sums equals the single-process sum up to float64
rounding. The keys themselves come from float32 forward passes whose batches (and so padding
widths) differ between a sharded and an unsharded run; with ``batch_size=1`` no batch depends on
the sharding and the results agree to ~1e-12 relative, otherwise to float32 rounding of the keys.

Backends and joining the group: :mod:`blue_plugin.stats.process_group`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..model.devices import accumulation_device, input_device, module_device
from .accumulate import (
    check_mom2_dtype,
    collect_second_moments,
    effective_max_length,
    mean_from_sum,
    tokenize,
    validate_module_names,
)
from .cache import (
    acquire_cache_lock,
    cache_file_name,
    expected_d_in,
    load_moment,
    request_metadata,
    save_moment,
    tokenizer_fingerprint,
    weights_fingerprint,
    written_metadata,
)
from .corpus import read_corpus
from .process_group import DistInfo, broadcast_object, collectively, current_dist, shard_indices
from .sources import check_positive_int

logger = logging.getLogger(__name__)


@dataclass
class StatsRun:
    """Outcome of :func:`distributed_second_moments`.

    ``moments``: ``{module: E[k k^T]}`` float64 (d_in x d_in) on every rank (on the module's
    device, CPU where that lacks float64); ``computed`` / ``cached``: which modules were computed
    in this run or found valid in the cache; ``paths``: cache file per module (``None`` when not
    caching); ``count``: tokens per computed module; ``ranks``: per rank ``{"rank", "docs",
    "tokens", "seconds"}`` (``seconds``: that rank's accumulation time); ``seconds``: wall time of
    the whole call on this rank.
    """

    moments: dict[str, torch.Tensor]
    computed: list[str]
    cached: list[str]
    paths: dict[str, Path | None]
    count: dict[str, int] = field(default_factory=dict)
    ranks: list[dict] = field(default_factory=list)
    world_size: int = 1
    seconds: float = 0.0


def _local_sums(
    model: nn.Module,
    tok,
    names: list[str],
    texts: list[str],
    max_length: int,
    batch_size: int,
    progress: bool,
    mom2_dtype: str = "float32",
) -> tuple[dict[str, tuple[torch.Tensor | None, int]], int]:
    """Sums and counts over this rank's ``texts``; ``(None, 0)`` per module for a shard without
    tokens (no documents, or none that tokenises to anything). Also returns the token count."""
    if not texts or not any(tokenize(tok, texts, max_length)):
        return {n: (None, 0) for n in names}, 0
    raw = collect_second_moments(model, tok, names, texts, max_length, batch_size, progress,
                                 mom2_dtype=mom2_dtype)
    return dict(raw), raw[names[0]][1]


def _d_in(module: nn.Module) -> int:
    d = expected_d_in(module)
    return int(d) if d is not None else 0


def distributed_second_moments(
    model: nn.Module,
    tok,
    module_names: Sequence[str],
    corpus: str,
    n_samples: int,
    max_length: int,
    cache_dir: str | Path | None,
    model_id: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    overwrite: bool = False,
    *,
    mom2_dtype: str = "float32",
    subset: str = "random",
) -> StatsRun:
    """E[k k^T] of the inputs of ``module_names``, computed over all ranks of the process group.

    A collective: every rank must call it with the same arguments (and the same model weights).
    Without an initialised process group it runs in this process alone, which gives exactly what
    :func:`blue_plugin.stats.moments.get_second_moments` gives.

    Args:
        model, tok, module_names, max_length, batch_size, mom2_dtype: as in
            :func:`blue_plugin.stats.accumulate.collect_second_moments`. ``max_length`` is capped at
            the model's positions, as in ``get_second_moments``.
        corpus, n_samples, subset: as in :func:`blue_plugin.stats.corpus.read_corpus`; rank 0 reads
            the documents and sends them to every rank, which keeps its shard
            (:func:`blue_plugin.stats.process_group.shard_indices`).
        cache_dir: where rank 0 reads and writes the cache files (``None``: no cache). With
            several nodes this is rank 0's file system.
        model_id: as in ``get_second_moments`` (default ``config.name_or_path``); the engine uses
            ``config._name_or_path`` or ``hparams.model_name``.
        progress: show a progress bar (of rank 0's shard; other ranks never show one).
        overwrite: recompute and rewrite even when valid cache files exist.

    Returns:
        A :class:`StatsRun` (the same on every rank, except ``seconds``).

    Raises:
        ValueError: bad arguments, an unreadable corpus, no tokens in the whole corpus. An error
            on any rank is raised on every rank.
    """
    t_start = time.perf_counter()
    names = validate_module_names(model, module_names)
    check_positive_int(n_samples, "n_samples")
    check_positive_int(batch_size, "batch_size")
    check_mom2_dtype(mom2_dtype)
    max_length = effective_max_length(model, max_length)
    modules = dict(model.named_modules())
    devices = {n: accumulation_device(module_device(model, modules[n])) for n in names}
    info = current_dist(input_device(model))

    def read() -> list[str] | None:
        if not info.is_main:
            return None
        return read_corpus(corpus, n_samples, subset=subset, model=model, tok=tok, max_length=max_length,
                                 progress=progress)

    texts: list[str] = broadcast_object(info, collectively(info, read, "reading the corpus"))  # type: ignore[assignment]
    paths: dict[str, Path | None] = {n: None for n in names}
    metas: dict[str, dict[str, str]] = {}

    # Rank 0 decides what to compute (its cache is the one that counts) and holds the file lock
    # until it has written the files, as get_second_moments does.
    lock = None
    cached: dict[str, torch.Tensor] = {}

    def plan() -> list[str]:
        nonlocal lock
        if not info.is_main or cache_dir is None:
            return list(names)
        root = Path(os.path.expanduser(os.fspath(cache_dir)))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the statistics cache directory {str(root)!r}: {e}") from e
        tfp = tokenizer_fingerprint(tok)
        for n in names:
            metas[n] = request_metadata(
                model, tok, n, corpus, texts, n_samples, max_length, model_id,
                subset=subset, mom2_dtype=mom2_dtype, fingerprints=(weights_fingerprint(model, [n]), tfp),
            )
            paths[n] = root / cache_file_name(metas[n])
        lock = acquire_cache_lock(root, metas[names[0]])
        if not overwrite:
            for n in names:
                t = load_moment(paths[n], metas[n], devices[n], expected_d_in(modules[n]))
                if t is not None:
                    cached[n] = t
        return [n for n in names if n not in cached]

    try:
        missing: list[str] = collectively(info, plan, "checking the statistics cache")
        missing = broadcast_object(info, missing)  # type: ignore[assignment]
        paths = broadcast_object(info, paths)  # type: ignore[assignment]
        result = StatsRun(moments={}, computed=list(missing), cached=[n for n in names if n not in missing],
                          paths=paths, world_size=info.world_size)

        if missing:
            shard = [texts[i] for i in shard_indices(len(texts), info.rank, info.world_size)]
            if info.is_main:
                logger.info(
                    "computing second moments for %s over %d documents on %d process(es) (%d on rank 0)",
                    missing, len(texts), info.world_size, len(shard),
                )

            def accumulate():
                t0 = time.perf_counter()  # this rank's own work, not the wait for the others
                out = _local_sums(model, tok, missing, shard, max_length, batch_size, progress and info.is_main,
                                  mom2_dtype)
                return out, time.perf_counter() - t0

            (local, tokens), seconds = collectively(info, accumulate, "accumulating statistics")
            mine = {"rank": info.rank, "docs": len(shard), "tokens": tokens, "seconds": seconds}
            if info.world_size > 1:
                gathered: list = [None] * info.world_size
                dist.all_gather_object(gathered, mine)
                result.ranks = list(gathered)
            else:
                result.ranks = [mine]
            sums, counts = _reduce(info, missing, local, modules)
            empty = [n for n in missing if counts[n] == 0]
            if empty:
                raise ValueError(f"no corpus token reached {empty}; check the corpus and the tokenizer")
            for n in missing:
                mean = mean_from_sum(n, sums[n], counts[n])
                result.moments[n] = mean.to(devices[n])
                result.count[n] = counts[n]

            def write() -> None:
                if not info.is_main or cache_dir is None:
                    return
                for n in missing:
                    meta = written_metadata(metas[n], modules[n], counts[n], len(texts),
                                                  n_processes=str(info.world_size))
                    try:
                        save_moment(paths[n], result.moments[n], meta)  # type: ignore[arg-type]
                        logger.info("wrote %s (%d tokens)", paths[n], counts[n])
                    except OSError as e:
                        logger.warning("could not write statistics cache %s (%s)", paths[n], e)

            collectively(info, write, "writing the statistics cache")
    finally:
        if lock is not None:
            lock.release()
    if info.world_size > 1:
        dist.barrier()

    for n in result.cached:  # loaded by rank 0; the other ranks receive them
        t = cached.get(n)
        if info.world_size > 1:
            shape = broadcast_object(info, None if t is None else tuple(t.shape))
            buf = (t if t is not None else torch.empty(*shape, dtype=torch.float64)).to(info.comm_device)  # type: ignore[misc]
            dist.broadcast(buf, src=0)
            t = buf
        result.moments[n] = t.to(devices[n])  # type: ignore[union-attr]
    result.moments = {n: result.moments[n] for n in names}
    result.seconds = time.perf_counter() - t_start
    return result


def _reduce(
    info: DistInfo,
    names: list[str],
    local: dict[str, tuple[torch.Tensor | None, int]],
    modules: dict[str, nn.Module],
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """All-reduce (SUM) the float64 sums and the token counts of ``names`` over the ranks.

    A rank without tokens contributes zeros; the matrix side comes from the module (or, for
    modules that do not say, from the ranks that have sums).
    """
    counts_t = torch.tensor([local[n][1] for n in names], dtype=torch.long, device=info.comm_device)
    dims = torch.tensor(
        [local[n][0].shape[0] if local[n][0] is not None else _d_in(modules[n]) for n in names],
        dtype=torch.long, device=info.comm_device,
    )
    if info.world_size > 1:
        dist.all_reduce(counts_t, op=dist.ReduceOp.SUM)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX)
    sums: dict[str, torch.Tensor] = {}
    for i, n in enumerate(names):
        s = local[n][0]
        if info.world_size == 1:
            if s is not None:
                sums[n] = s
            continue
        d = int(dims[i])
        buf = s.to(info.comm_device, torch.float64) if s is not None else torch.zeros(d, d, dtype=torch.float64, device=info.comm_device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        sums[n] = buf
    return sums, {n: int(c) for n, c in zip(names, counts_t.tolist())}
