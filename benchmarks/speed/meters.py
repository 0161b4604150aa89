"""Measurements of the speed benchmark: wall time and peak memory of a phase (:class:`Meter`),
tokens of the decoder's forward calls (:class:`TokenCounter`, switched on for the editor's target
phase by :class:`TargetPhaseCounter`), the plain model's forward+backward time, a weights digest."""
from __future__ import annotations

import hashlib
import os
import statistics
import threading
import time
from typing import Any

import torch

from blue_plugin.editing.observer import EditObserver
from blue_plugin.editing.state import fingerprint
from blue_plugin.model.hooks import frozen

from benchmarks.common import peak_rss_mib, reset_peak_rss


def _tree_rss_mib(proc) -> float:
    total = 0
    try:
        total += proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a child that just ended
                pass
    except Exception:
        return float("nan")
    return total / 2**20


class Meter:
    """Wall time and peak memory of one phase (``with Meter() as m: ...; m.result``).

    ``peak_rss_mib``: the process's kernel high-water mark since the phase began (exact, when
    ``/proc/self/clear_refs`` can reset it; else the process-lifetime peak, flagged by
    ``rss_reset: false``); ``peak_rss_tree_mib``: the largest psutil sample (every ``interval``
    s) of the RSS of the process plus all its children.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        try:
            import psutil

            proc = psutil.Process()
        except ImportError:  # pragma: no cover - psutil is a benchmark dependency
            return
        while not self._stop.is_set():
            v = _tree_rss_mib(proc)
            if v == v:  # not NaN
                self._tree_peak = max(self._tree_peak, v)
            self._stop.wait(self.interval)

    def __enter__(self) -> "Meter":
        self._reset = reset_peak_rss()
        self._tree_peak = 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._load0 = os.getloadavg()[0]
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.result = {
            "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(),
            "peak_rss_tree_mib": round(self._tree_peak, 1),
            "rss_reset": self._reset,
            "load_1m": [round(self._load0, 2), round(os.getloadavg()[0], 2)],
        }


class TokenCounter:
    """Counts (batch, length) of every forward call of ``module`` while ``active`` is set.

    ``shapes``: {(batch, length): calls} of the calls made with gradients enabled;
    ``tokens``: batch x length summed over all counted calls (with or without gradients).
    """

    def __init__(self, module: torch.nn.Module):
        self.active = False
        self.tokens = 0
        self.calls = 0
        self.shapes: dict[tuple[int, int], int] = {}
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        if not self.active:
            return
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        b, t = int(x.shape[0]), int(x.shape[1])
        self.tokens += b * t
        self.calls += 1
        if torch.is_grad_enabled():
            self.shapes[(b, t)] = self.shapes.get((b, t), 0) + 1

    def reset(self) -> None:
        self.tokens, self.calls, self.shapes = 0, 0, {}

    def close(self) -> None:
        self._handle.remove()


class TargetPhaseCounter(EditObserver):
    """An editor observer that counts the tokens of the target optimisation: ``counter`` is on
    from every ``"targets"`` phase's start to its end (whatever runs the decoder then is the
    optimisation), and what the engine reports of the phase (rows, tokens without padding,
    seconds) is kept in :attr:`phases`."""

    def __init__(self, counter: TokenCounter):
        self.counter = counter
        self.phases: list[dict[str, Any]] = []

    def phase_started(self, phase: str, layer: int | None) -> None:
        if phase == "targets":
            self.counter.active = True

    def phase_finished(self, phase: str, layer: int | None, seconds: float, info: dict) -> None:
        if phase == "targets":
            self.counter.active = False
            self.phases.append({"layer": layer, "seconds": seconds, "rows": info.get("rows"),
                                "tokens": info.get("tokens")})

    def take_phases(self) -> list[dict[str, Any]]:
        """The target phases reported since the last call (then forgotten)."""
        phases, self.phases = self.phases, []
        return phases


def base_module(model) -> torch.nn.Module:
    """The decoder stack both systems call (``model.model`` for Llama)."""
    return getattr(model, "base_model", None) or model


@torch.no_grad()
def random_batch(model, b: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    dev = model.get_input_embeddings().weight.device
    ids = torch.randint(0, vocab, (b, t), generator=g).to(dev)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def plain_forward_backward(model, shape: tuple[int, int], iters: int, seed: int = 0) -> float:
    """Median seconds of one plain forward+backward at ``shape`` = (batch, length): full logits,
    a loss over all positions, the gradient w.r.t. the input embeddings (parameters frozen)."""
    batch = random_batch(model, shape[0], shape[1], seed)
    emb_layer = model.get_input_embeddings()
    times = []
    with frozen(model):
        for i in range(iters + 1):  # the first call is a warm-up
            t0 = time.perf_counter()
            emb = emb_layer(batch["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = torch.log_softmax(logits.float(), dim=-1)[..., 0].mean()
            loss.backward()
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weights_digest(model) -> str:
    """sha256 (16 hex) of a strided sample of every parameter: equal digests = same weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(fingerprint(p, n=4096).numpy().tobytes())
    return h.hexdigest()[:16]
