"""Sequential editing state, held in an explicit object attached to the model.

Per edited layer it keeps the accumulated K_p K_p^T of earlier batches and, for PRUNE restrained
once per sequence (``prune_timing: sequence``), the unrestrained weights the sequence continues
from (the model serves the restrained ones); and it caches what only depends on the unedited
model: the key second moment C0, AlphaEdit's null-space projector P, PRUNE's original weight and
its largest singular value, and the context prefixes (with their groups).

The state notices when the edited weights were changed outside the plugin (for example EasyEdit
restoring the weights after a non-sequential edit): if they are back at their original values, the
accumulated edit history is dropped, so non-sequential edits never leak into each other.

Persistence: :meth:`EditState.to_tensors` / :meth:`EditState.from_tensors` turn the *edit* part
of the state (per-layer K_p K_p^T, PRUNE originals, sigma_max and unrestrained weights, weight
fingerprints, history, edit count, context prefixes and their groups) into a flat
``{name: tensor}`` dict for safetensors plus JSON-serialisable metadata, and back, bit-exactly.
The model-constant caches C0 and P are not serialised (they are recomputed, or read from the
statistics cache). No pickle anywhere.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch

from ..model.layout import as_out_in, from_out_in
from .contexts import ContextPrefixes
from ..errors import BLUEEditError
from .rules import prune_restrain_with_info

logger = logging.getLogger(__name__)

_ATTR = "_blue_edit_state"

#: Version of the layout written by :meth:`EditState.to_tensors`; bumped on incompatible changes.
STATE_FORMAT_VERSION = 1

_LAYER_TENSORS = ("kpkp", "W_orig", "W_unrestrained", "orig_fp", "post_fp")


def fingerprint(W: torch.Tensor, n: int = 65536) -> torch.Tensor:
    """A strided sample of the weight's entries (exact values), to detect outside changes."""
    flat = W.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].to("cpu", torch.float64).clone()


def check_finite_parameters(model, max_names: int = 5) -> None:
    """Raise :class:`~blue_plugin.errors.BLUEEditError` if any parameter of ``model`` holds NaN
    or inf. A broken model would otherwise write non-finite statistics into the cache and crash
    (or waste minutes) in the target optimisation before the edit is refused. Cost: one pass
    over the weights (~0.1 s for a 135M-parameter model on a CPU)."""
    bad = []
    for name, p in model.named_parameters():
        if p.is_meta or p.numel() == 0:
            continue
        if not bool(torch.isfinite(p.detach()).all()):
            bad.append(name)
            if len(bad) >= max_names:
                break
    if bad:
        raise BLUEEditError(
            f"the model's parameters {bad} contain NaN or inf; reload the model (or restore its "
            "weights) before editing. Nothing was changed."
        )


@dataclass
class LayerState:
    """State of one edited layer; tensors live on the layer's device.

    ``kpkp``: (d_in, d_in) accumulated K_p K_p^T (solve dtype) or None before the first commit;
    ``W_orig``: (d_out, d_in) original weight (PRUNE only); ``sigma_max``: its largest singular
    value; ``W_unrestrained``: PRUNE with ``prune_timing: sequence``, the stored weight (stored
    orientation and dtype) the sequence has reached without the restraint, while the model serves
    ``W_orig + restrain(W_unrestrained - W_orig)``; None when the two are equal (nothing is
    restrained) or for other methods; ``orig_fp`` / ``post_fp``: :func:`fingerprint` of the
    stored weight before any edit / after the last committed edit (the served weight; CPU float64).
    """

    kpkp: Optional[torch.Tensor] = None
    W_orig: Optional[torch.Tensor] = None
    sigma_max: Optional[float] = None
    W_unrestrained: Optional[torch.Tensor] = None
    orig_fp: Optional[torch.Tensor] = None
    post_fp: Optional[torch.Tensor] = None

    def clone(self) -> "LayerState":
        """A deep copy (tensors cloned, so later in-place changes cannot reach the copy)."""
        return LayerState(**{
            f.name: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for f in fields(self) for v in [getattr(self, f.name)]
        })

    def equals(self, other: "LayerState") -> bool:
        """Bit-exact equality of every field (tensors compared with ``torch.equal``)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                    return False
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
                    return False
            elif a != b:
                return False
        return True


@dataclass
class EditState:
    """Everything a sequence of :func:`~blue_plugin.apply_blue_to_model` calls on one model
    needs to remember. Get it with :func:`get_state`; forget edits with :meth:`reset`.

    The *edit* part (``layers``, ``history``, ``n_edits``) changes with every committed batch;
    ``second_moments``, ``projectors`` and ``prefixes`` are caches of quantities of the unedited
    model.
    """

    layers: dict[int, LayerState] = field(default_factory=dict)
    second_moments: dict[tuple, torch.Tensor] = field(default_factory=dict)
    projectors: dict[tuple, tuple[torch.Tensor, int]] = field(default_factory=dict)
    prefixes: dict[tuple, list[str]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    n_edits: int = 0

    def layer(self, layer: int) -> LayerState:
        return self.layers.setdefault(layer, LayerState())

    def unrestrained_layers(self) -> list[int]:
        """Layers whose ``W_unrestrained`` is set (the model serves PRUNE's restraint of it)."""
        return sorted(l for l, ls in self.layers.items() if ls.W_unrestrained is not None)

    def reset(self) -> None:
        """Forget all edits (accumulated keys, PRUNE's unrestrained weights, history). Caches that
        depend only on the unedited model (C0, projectors, prefixes, original weights) are kept."""
        for ls in self.layers.values():
            ls.kpkp = None
            ls.W_unrestrained = None
            ls.post_fp = None
        self.history.clear()
        self.n_edits = 0

    def sync_with_weights(self, weight_of) -> None:
        """Compare the current weights (``weight_of(layer)``) with what the last edit left. If
        every edited layer is back at its original values, drop the edit history; if they were
        changed in another way, warn and keep the state, except PRUNE's unrestrained weights of the
        changed layers (the sequence continues from the weights as they are now)."""
        tracked = {l: ls for l, ls in self.layers.items() if ls.post_fp is not None}
        if not tracked:
            return
        now = {l: fingerprint(weight_of(l)) for l in tracked}
        changed = [l for l, ls in tracked.items() if not torch.equal(now[l], ls.post_fp)]
        if not changed:
            return
        if all(ls.orig_fp is not None and torch.equal(now[l], ls.orig_fp) for l, ls in tracked.items()):
            logger.info("edited weights were restored to the original; starting a fresh edit sequence")
            self.reset()
            return
        logger.warning(
            "weights of layers %s were changed outside blue_plugin since the last edit; keeping the "
            "accumulated state (call blue_plugin.reset_state(model) to start afresh)",
            changed,
        )
        for l in changed:
            tracked[l].post_fp = now[l]
            if tracked[l].W_unrestrained is not None:
                logger.warning("layer %d: PRUNE continues from the changed weights, not from its unrestrained ones", l)
                tracked[l].W_unrestrained = None

    # ---- snapshots (all-or-nothing batches, undo) -------------------------------------------
    def snapshot(self) -> "EditState":
        """A copy of the edit part (layers deep-copied, history list copied, ``n_edits``); the
        model-constant caches are not copied (the snapshot's are empty)."""
        return EditState(
            layers={l: ls.clone() for l, ls in self.layers.items()},
            history=list(self.history),
            n_edits=self.n_edits,
        )

    def scratch(self) -> "EditState":
        """A :meth:`snapshot` that shares this state's model-constant caches (C0, projectors,
        prefixes): for edits that must not touch this state but need not recompute them."""
        s = self.snapshot()
        s.second_moments, s.projectors, s.prefixes = self.second_moments, self.projectors, self.prefixes
        return s

    def restore(self, snapshot: "EditState") -> None:
        """Make the edit part equal to ``snapshot`` (taken with :meth:`snapshot`). The caches
        are kept; the ``history`` list object keeps its identity."""
        self.layers = {l: ls.clone() for l, ls in snapshot.layers.items()}
        self.history[:] = snapshot.history
        self.n_edits = snapshot.n_edits

    def same_edits(self, other: "EditState", compare_history: bool = True) -> bool:
        """True when the edit parts (layers, n_edits and, if ``compare_history``, the history
        records) are bit-identical. History records hold wall-clock timings, so two separate runs
        of the same edits agree in everything but their history."""
        if self.n_edits != other.n_edits or set(self.layers) != set(other.layers):
            return False
        if not all(self.layers[l].equals(other.layers[l]) for l in self.layers):
            return False
        return not compare_history or _dumps(self.history) == _dumps(other.history)

    # ---- serialisation --------------------------------------------------------------------
    def to_tensors(self, include_prefixes: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The edit part as ``({name: CPU tensor}, metadata)``.

        Tensor names are ``layers.<l>.<field>`` for ``kpkp`` (d_in, d_in), ``W_orig`` (d_out,
        d_in), ``W_unrestrained`` (stored shape and dtype), ``orig_fp`` and ``post_fp`` (1-D
        float64), each present only when set. The metadata is JSON-serialisable: format version,
        ``n_edits``, per-layer ``sigma_max``, ``history`` (encoded so that int dict keys and
        tuples survive JSON) and, when ``include_prefixes``, the context prefixes with their
        groups (they come from sampling, so keeping them makes a resumed run bit-identical).
        """
        tensors: dict[str, torch.Tensor] = {}
        layers_meta: dict[str, Any] = {}
        for l, ls in sorted(self.layers.items()):
            for name in _LAYER_TENSORS:
                t = getattr(ls, name)
                if t is not None:
                    tensors[f"layers.{l}.{name}"] = t.detach().to("cpu").contiguous().clone()
            layers_meta[str(l)] = {"sigma_max": _encode_float(ls.sigma_max)}
        meta: dict[str, Any] = {
            "state_format_version": STATE_FORMAT_VERSION,
            "n_edits": self.n_edits,
            "layers": layers_meta,
            "history": _encode(self.history),
        }
        if include_prefixes:
            meta["prefixes"] = [[_encode(k), list(v), list(getattr(v, "groups", ()))] for k, v in self.prefixes.items()]
        return tensors, meta

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        device_of: Optional[Callable[[int], torch.device]] = None,
    ) -> "EditState":
        """Inverse of :meth:`to_tensors`. ``device_of(layer)`` gives the device for the layer's
        ``kpkp`` / ``W_orig`` / ``W_unrestrained`` (default: CPU); fingerprints stay on the CPU.
        Prefixes saved without their groups (older files) get them from the parameters in their
        key when used. Raises ValueError for a layout it does not understand."""
        version = meta.get("state_format_version")
        if version != STATE_FORMAT_VERSION:
            raise ValueError(
                f"edit state has format version {version!r}, this blue_plugin reads version "
                f"{STATE_FORMAT_VERSION}; use the blue_plugin version that wrote it"
            )
        state = cls()
        layer_ids = {int(k) for k in meta.get("layers", {})}
        for name in tensors:
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in _LAYER_TENSORS:
                raise ValueError(f"unexpected tensor {name!r} in a saved edit state")
            layer_ids.add(int(parts[1]))
        for l in sorted(layer_ids):
            ls = state.layer(l)
            dev = device_of(l) if device_of is not None else torch.device("cpu")
            for name in _LAYER_TENSORS:
                t = tensors.get(f"layers.{l}.{name}")
                if t is not None:
                    setattr(ls, name, t.clone() if name.endswith("_fp") else t.to(dev).clone())
            ls.sigma_max = _decode_float(meta.get("layers", {}).get(str(l), {}).get("sigma_max"))
        state.n_edits = int(meta.get("n_edits", 0))
        state.history = list(decode_value(meta.get("history", [])))
        for key, value, *groups in meta.get("prefixes", []):
            texts = [str(s) for s in value]
            state.prefixes[decode_value(key)] = ContextPrefixes(texts, groups[0]) if groups and groups[0] else texts
        return state

    def finalize(self, module_of: Callable[[int], torch.nn.Module], solve_dtype: torch.dtype = torch.float64) -> dict[int, dict]:
        """End-of-sequence PRUNE restraint of the served weights: for every layer edited with an
        original weight (``W_orig``), make ``module_of(layer).weight`` equal to ``W_orig +
        restrain(W - W_orig)``, W being ``W_unrestrained`` or, when there is none, the weight as it
        is (which then becomes ``W_unrestrained`` if the restraint changes it). Idempotent. Only
        for a sequence edited with ``prune_timing: sequence`` (use
        :meth:`blue_plugin.editing.editor.Editor.finalize`, which checks that). Returns the restraint
        info per layer (:func:`~blue_plugin.editing.rules.prune_restrain_with_info`)."""
        self.sync_with_weights(lambda l: module_of(l).weight)
        out = {}
        for l, ls in sorted(self.layers.items()):
            if ls.W_orig is None or ls.post_fp is None:
                continue
            module = module_of(l)
            seq = ls.W_unrestrained if ls.W_unrestrained is not None else module.weight.detach().clone()
            out[l] = serve_restrained(module, seq, ls.W_orig, ls.sigma_max, solve_dtype)
            ls.W_unrestrained = seq if out[l]["above"] else None
            ls.post_fp = fingerprint(module.weight)
        return out

    def load_edits_from(self, other: "EditState") -> None:
        """Take over the edit part and the prefixes of ``other`` (e.g. one read from disk),
        keeping this state's C0 / projector caches."""
        self.restore(other)
        self.prefixes.update({k: copy.copy(v) for k, v in other.prefixes.items()})


def serve_restrained(module: torch.nn.Module, unrestrained: torch.Tensor, W_orig: torch.Tensor, sigma_max: float,
                     solve_dtype: torch.dtype = torch.float64) -> dict:
    """Write ``W_orig + restrain(unrestrained - W_orig)`` (PRUNE, :func:`~blue_plugin.editing.rules.prune_restrain`)
    into ``module.weight``; ``unrestrained`` is in the stored form (orientation, dtype) and
    ``W_orig`` (d_out, d_in). When nothing is restrained the weight becomes ``unrestrained``
    bit-for-bit. Returns the restraint info (``max_over_sigma_max``, ``above``); raises
    :class:`~blue_plugin.errors.BLUEEditError` (before writing) when the SVD fails or the result
    is not finite."""
    stored = module.weight
    W = as_out_in(module, unrestrained.to(stored.device)).to(solve_dtype)
    try:
        W_served, info = prune_restrain_with_info(W, W_orig.to(W.device, solve_dtype), sigma_max)
    except torch.linalg.LinAlgError as exc:
        raise BLUEEditError(f"the PRUNE restraint failed ({exc}); nothing was changed.") from exc
    new = from_out_in(module, W_served).to(stored.dtype) if info["above"] else unrestrained.to(stored.device)
    if not bool(torch.isfinite(new).all()):
        raise BLUEEditError("the PRUNE restraint gave non-finite weights; nothing was changed.")
    with torch.no_grad():
        stored.copy_(new)
    return info


def get_state(model) -> EditState:
    """The :class:`EditState` attached to ``model`` (created on first use)."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        state = EditState()
        model.__dict__[_ATTR] = state
    return state


def reset_state(model) -> None:
    """Forget the edit history of ``model`` (its weights are not touched)."""
    get_state(model).reset()


# ---- JSON encoding that round-trips dicts with non-string keys, tuples and non-finite floats --

def _encode_float(x: Optional[float]) -> Any:
    if x is None or math.isfinite(x):
        return x
    return {"__float__": repr(x)}


def _decode_float(x: Any) -> Optional[float]:
    if isinstance(x, dict) and "__float__" in x:
        return float(x["__float__"])
    return None if x is None else float(x)


def _encode(obj: Any) -> Any:
    """JSON-safe form: tuples -> ``{"__tuple__": [...]}``, dicts whose keys are not all
    strings -> ``{"__items__": [[k, v], ...]}``, NaN/inf -> ``{"__float__": "nan"}``,
    tensors -> lists; anything else unknown becomes its ``repr`` (logged once)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return _encode_float(obj)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({"__tuple__", "__items__", "__float__"} & set(obj)):
            return {k: _encode(v) for k, v in obj.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if isinstance(obj, torch.Tensor):
        return _encode(obj.detach().cpu().tolist())
    logger.debug("storing a %s in the edit history as its repr", type(obj).__name__)
    return repr(obj)


def decode_value(obj: Any) -> Any:  # inverse of _encode (JSON from a saved session)
    if isinstance(obj, list):
        return [decode_value(v) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(decode_value(v) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {_freeze(decode_value(k)): decode_value(v) for k, v in obj["__items__"]}
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: decode_value(v) for k, v in obj.items()}
    return obj


def _freeze(key: Any) -> Any:
    """Dict keys must be hashable: lists (from JSON) become tuples."""
    return tuple(_freeze(k) for k in key) if isinstance(key, list) else key


def _dumps(obj: Any) -> str:
    return json.dumps(_encode(obj), sort_keys=True)
