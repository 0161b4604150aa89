"""The process group of the distributed statistics (:mod:`blue_plugin.stats.distributed`).

:func:`init_distributed` joins the group a launcher (``torchrun``, or anything that sets the usual
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables) describes:
backend ``nccl`` when the ranks run on CUDA devices (``cuda:LOCAL_RANK``), ``gloo`` on CPU; without
a launcher (``WORLD_SIZE`` unset or 1) everything runs in one process. :func:`shard_indices` deals
the documents out; :func:`collectively` runs a step so that a failure on one rank stops every rank.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node,
    the ``device`` it computes on and the process-group ``backend`` (``None``: single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Device that collectives need their tensors on (CUDA for nccl, CPU for gloo)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; unset it or fix the launcher") from None


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the launcher's environment, if there is one.

    Reads ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (set by ``torchrun``). With more than one
    process and no group yet, initialises one (``env://``) with backend ``nccl`` when ``device``
    is a CUDA device and ``gloo`` otherwise. An already initialised group is used as it is.

    Args:
        device: where this rank computes; default ``cuda:LOCAL_RANK`` if CUDA is available,
            else the CPU. A CUDA device becomes the current device.
        timeout_s: collective timeout (the statistics pass of a large model can be long).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device(device) if device is not None else default_device(local_rank)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None)
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        logger.debug("rank %d/%d joined the process group (%s) on %s", rank, world, backend, dev)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, str(dist.get_backend()))


def current_dist(device: torch.device | None = None) -> DistInfo:
    """:class:`DistInfo` of an initialised group (or a single process), without initialising."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dev, str(dist.get_backend()))
    return DistInfo(0, 1, 0, dev, None)


def shard_indices(n_docs: int, rank: int, world_size: int) -> range:
    """Indices of the documents of ``rank``: ``rank, rank + world_size, ...`` below ``n_docs``.

    Deterministic and disjoint; together the ranks cover ``range(n_docs)``. Shard sizes differ by
    at most one (ranks ``< n_docs % world_size`` get the extra document); with more ranks than
    documents some shards are empty. Striding rather than contiguous blocks keeps the shards'
    length distributions alike when the corpus is ordered (e.g. WordNet by part of speech).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}")
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    return range(rank, n_docs, world_size)


class RankFailed(RuntimeError):
    """Raised on the other ranks when a collective step failed on one rank."""


def collectively(info: DistInfo, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank (no rank is left
    waiting in a collective). The failing rank re-raises its own exception."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # reported to all ranks below, then re-raised
        error = e
    if info.world_size > 1:
        flag = torch.tensor([0 if error is None else info.rank + 1], dtype=torch.long, device=info.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = int(flag.item())
        if failed and error is None:
            raise RankFailed(f"{what} failed on rank {failed - 1} (see its log); stopping on rank {info.rank} too")
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def broadcast_object(info: DistInfo, obj: object) -> object:
    if info.world_size == 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, device=info.comm_device)
    return box[0]
