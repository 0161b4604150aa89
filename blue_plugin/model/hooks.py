"""Forward hooks: capture module inputs/outputs, add per-row deltas, stop a forward early.

Invariant: every context manager here removes its hooks on exit, also when the body raises, so
the model is left exactly as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .layout import find_module


class StopForward(Exception):
    """Raised from a hook to end a forward pass once everything needed has been seen."""


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(
    model: nn.Module,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    stop_after: str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of ``inputs_of`` modules and the (first) output of
    ``outputs_of`` modules into the yielded dict (keys ``"in:<name>"`` / ``"out:<name>"``).

    If ``stop_after`` is given, the forward pass raises :class:`StopForward` right after that
    module has run; use :func:`run_until` to call the model.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []

    def pre_hook(name: str) -> Callable:
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            store[f"in:{name}"] = x
        return hook

    def post_hook(name: str, stop: bool) -> Callable:
        def hook(module, args, output):
            if name in outputs_of:
                store[f"out:{name}"] = _first(output)
            if stop:
                raise StopForward
        return hook

    try:
        for name in inputs_of:
            handles.append(find_module(model, name).register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        post_names = list(dict.fromkeys(list(outputs_of) + ([stop_after] if stop_after else [])))
        for name in post_names:
            handles.append(find_module(model, name).register_forward_hook(post_hook(name, name == stop_after)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until(model: nn.Module, **batch) -> torch.Tensor | None:
    """Call the model; return the logits, or None when a hook stopped the pass early."""
    try:
        return model(**batch, use_cache=False).logits
    except StopForward:
        return None


@contextmanager
def add_delta(
    model: nn.Module, module_name: str, rows: torch.Tensor, positions: torch.Tensor, deltas: torch.Tensor
) -> Iterator[None]:
    """Add ``deltas[j]`` to the output of ``module_name`` at ``(rows[j], positions[j])``.

    Shapes: rows, positions: (n,) long; deltas: (n, d_model). Differentiable in ``deltas``.
    """

    def hook(module, args, output):
        hidden = _first(output)
        dev = hidden.device  # the block may sit on another device than the deltas (device_map)
        edited = hidden.index_put((rows.to(dev), positions.to(dev)), deltas.to(dev, hidden.dtype), accumulate=True)
        if isinstance(output, tuple):
            return (edited,) + tuple(output[1:])
        return edited

    handle = find_module(model, module_name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on all parameters (restored on exit) and set eval mode."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its hidden-state input unchanged."""

    def __init__(self, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "_original", original)

    def __getattr__(self, name):  # attributes such as attention_type used by the parent model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(_PassThrough):
    """Stands in for the block whose output is cached: returns that output."""

    def __init__(self, original: nn.Module, output):
        super().__init__(original)
        object.__setattr__(self, "_output", output)

    def forward(self, hidden_states, *args, **kwargs):
        return object.__getattribute__(self, "_output")


def _split(name: str) -> tuple[str, int]:
    parent, _, index = name.rpartition(".")
    if not index.isdigit():
        raise ValueError(f"block name {name!r} does not end in a layer index")
    return parent, int(index)


def block_index(name: str) -> int:
    """Layer index of a block name such as ``"model.layers.4"``."""
    return _split(name)[1]


@contextmanager
def replay_blocks(model: nn.Module, lower_blocks: Sequence[str], block_name: str, output) -> Iterator[None]:
    """Run the model with blocks ``lower_blocks`` skipped and block ``block_name`` replaced by a
    module that returns ``output`` (its cached output for the same batch).

    Valid only when the blocks below and at ``block_name`` see nothing that changes between the
    caching pass and the replay (here: the delta is added after ``block_name``). The original
    modules are put back on exit.
    """
    swaps = []
    try:
        for name in list(lower_blocks) + [block_name]:
            parent_name, index = _split(name)
            parent = model.get_submodule(parent_name)
            original = parent[index]
            parent[index] = _Replay(original, output) if name == block_name else _PassThrough(original)
            swaps.append((parent, index, original))
        yield
    finally:
        for parent, index, original in reversed(swaps):
            parent[index] = original
