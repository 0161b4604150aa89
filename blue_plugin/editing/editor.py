"""The editing engine: BLUE and the original residual distribution over one update-rule interface.

Original methods (``blue: false``): one target z at the last critical layer L; for the critical
layers l_1..l_m in order, R = z - h_L(current model), R_{l_i} = R / (m - i + 1), update W_{l_i}.

BLUE (``blue: true``): for l in (l_1, l_m), in that order, compute z_l at layer l on the current
(already partly edited) model, R_l = z_l - h_l(current), full residual, update W_l.

A batch is all-or-nothing: the new weights are checked before they are written, and any error
restores the edited matrices bit-for-bit and leaves the sequential state untouched
(:class:`~blue_plugin.editing.batch.PendingBatch`).

Whole-batch and whole-sequence rules (:mod:`blue_plugin.editing.rules`): RECT masks each layer's update
when the batch is written; PRUNE runs the sequence unrestrained (kept in the state) and serves
``W_orig + restrain(W - W_orig)`` after every call (:meth:`Editor.finalize` is implicit).

The steps of a batch are public probes of :class:`Editor` -- :meth:`~Editor.targets_at`,
:meth:`~Editor.keys_at`, :meth:`~Editor.layer_update`, :meth:`~Editor.add_update`,
:meth:`~Editor.restore` / :meth:`~Editor.weights_restored` -- which dynamic layer selection and the
research analyses call on the model as it is. An optional
:class:`~blue_plugin.editing.observer.EditObserver` hears the phases of every batch.
"""
from __future__ import annotations

import copy as copy_module
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch

from ..errors import BLUEConfigError, BLUEEditError
from ..hparams import BLUEHyperParams
from ..model.hooks import frozen
from ..model.layout import ModelLayout, as_out_in, find_module, from_out_in, resolve_layout
from .batch import PendingBatch
from .contexts import ContextPrefixes, generate_prefixes, with_groups
from .keys import keys_and_outputs
from .observer import EditObserver, check_observer, observed
from .replay import TargetLog
from .requests import EditRequest, check_rows_fit, key_rows, position_limit, prepare_requests, target_rows
from .rules import LayerInputs, get_rule
from .selection import choose_boundary_layers, window_layers
from .state import EditState, check_finite_parameters, get_state
from .statistics import EditStatistics
from .targets import TargetResult, compute_targets

logger = logging.getLogger(__name__)

SOLVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class Editor:
    """Applies batches of edits to one model with one set of hyperparameters (a
    :class:`BLUEHyperParams`, a dict of its keys or a YAML path; see :meth:`BLUEHyperParams.coerce`).
    ``state``: the sequential state (default: the model's :func:`get_state`); ``observer``: an
    :class:`~blue_plugin.editing.observer.EditObserver` told about every phase of a batch;
    ``target_log``: a :class:`~blue_plugin.editing.replay.TargetLog` that records the batch's
    targets and may replay recorded ones instead of optimising them."""

    def __init__(self, model, tok, hparams: BLUEHyperParams, state: Optional[EditState] = None,
                 observer: Optional[EditObserver] = None, target_log: Optional[TargetLog] = None):
        hparams = BLUEHyperParams.coerce(hparams)
        self.model, self.tok, self.hp = model, tok, hparams
        self.layout: ModelLayout = resolve_layout(model, hparams)
        self.rule = get_rule(hparams.base_method)
        self.state = state if state is not None else get_state(model)
        self.observer = check_observer(observer)
        self.target_log = target_log
        self.solve_dtype = SOLVE_DTYPES[hparams.solve_dtype]
        self.statistics = EditStatistics(self)
        if tok.pad_token_id is None and tok.eos_token_id is None:
            raise BLUEConfigError("the tokenizer has neither a pad nor an eos token; set tok.pad_token.")

    # ---- model access ---------------------------------------------------------------------
    def module(self, layer: int):
        return find_module(self.model, self.layout.rewrite(layer))

    def weight(self, layer: int) -> torch.Tensor:
        """Stored weight of the rewrite module (a Parameter, edited in place)."""
        return self.module(layer).weight

    def W(self, layer: int) -> torch.Tensor:
        """(d_out, d_in) view of the stored weight."""
        return as_out_in(self.module(layer), self.weight(layer))

    def write(self, layer: int, W_new: torch.Tensor) -> None:
        """Write ``W_new`` (d_out, d_in) into the stored weight of ``layer`` (shape and finiteness
        checked first: :class:`~blue_plugin.errors.BLUEEditError`, nothing written)."""
        module, stored = self.module(layer), self.weight(layer)
        if W_new.shape != (shape := as_out_in(module, stored).shape):
            raise BLUEEditError(f"layer {layer}: update has shape {tuple(W_new.shape)}, expected {tuple(shape)}.")
        new_stored = from_out_in(module, W_new).to(stored.dtype)
        if not torch.isfinite(new_stored).all():
            raise BLUEEditError(f"layer {layer}: the update is not finite (check mom2_update_weight / L2 and the statistics); nothing was changed.")
        with torch.no_grad():
            stored.copy_(new_stored)

    def add_update(self, layer: int, delta: torch.Tensor) -> None:
        """Add ``delta`` (d_out, d_in, e.g. from :meth:`layer_update`) to the stored weight of
        ``layer``, in ``delta``'s dtype, written back in the stored dtype."""
        self.write(layer, self.W(layer).to(delta.dtype) + delta.to(self.weight(layer).device))

    def restore(self, originals: dict[int, torch.Tensor]) -> None:
        """Copy ``originals`` ({layer: stored weight}) back into the rewrite weights, bit for bit."""
        with torch.no_grad():
            for layer, W in originals.items():
                self.weight(layer).copy_(W)

    @contextmanager
    def weights_restored(self, layers: Sequence[int]) -> Iterator[None]:
        """Restore the rewrite weights of ``layers`` bit-for-bit on exit (also on errors)."""
        saved = {l: self.weight(l).detach().clone() for l in dict.fromkeys(layers)}
        try:
            yield
        finally:
            self.restore(saved)

    # ---- cached, model-constant inputs ------------------------------------------------------
    def prefixes(self) -> ContextPrefixes:
        """The context prefixes with their groups (generated once, cached in the state; a plain
        list found there is grouped by ``context_template_length_params``)."""
        params = self.hp.context_template_length_params
        key = (tuple(map(tuple, params)), self.hp.seed)
        cached = self.state.prefixes.get(key)
        if cached is None:
            cached = generate_prefixes(self.model, self.tok, params, self.hp.seed)
        self.state.prefixes[key] = with_groups(cached, params)
        return self.state.prefixes[key]

    # ---- statistics (blue_plugin.editing.statistics) --------------------------------------------
    def c0_key(self, layer: int) -> tuple:
        """Key of ``layer``'s C0 in ``state.second_moments`` (layer and the statistics settings)."""
        return self.statistics.c0_key(layer)

    def ensure_second_moments(self, layers: Sequence[int], progress: bool = True) -> list[int]:
        """Load (or compute, in one pass, with a progress bar unless ``progress=False``) the
        statistics of ``layers`` into the state: C0, or for AlphaEdit C0 or a projection imported
        into the cache (then C0 is not computed; :mod:`blue_plugin.editing.statistics`). Returns
        the layers whose statistics were not in the state yet."""
        return self.statistics.ensure(layers, progress)

    def C0(self, layer: int) -> torch.Tensor:
        """``layer``'s C0 (loaded by :meth:`ensure_second_moments`; a
        :class:`~blue_plugin.errors.BLUEStatisticsError` when only an imported projection is)."""
        return self.statistics.C0(layer)

    def projector(self, layer: int) -> torch.Tensor:
        """AlphaEdit's null-space projector of ``layer`` (imported, or derived from C0 and cached)."""
        return self.statistics.projector(layer)

    # ---- probes: the steps of a batch on the model as it is -----------------------------------
    def targets_at(self, reqs: Sequence[EditRequest], prefixes: Sequence[str], layer: int,
                   info: Optional[dict] = None) -> TargetResult:
        """Targets ``z`` (n, d_model) at block ``layer`` on the current model, as a batch computes
        them (call inside :func:`blue_plugin.model.hooks.frozen`). ``info``, if given, receives
        ``rows`` / ``tokens`` (the optimisation's rows and their unpadded tokens), ``steps``
        and ``requests``."""
        rows = target_rows(self.tok, reqs, prefixes, self.hp.fact_token)
        lower = [self.layout.block(i) for i in range(layer)] if self.hp.v_replay_lower_layers else ()
        res = compute_targets(self.model, self.tok, self.layout.block(layer), rows, len(reqs), len(prefixes), self.hp, lower)
        if info is not None:
            info.update(rows=len(rows), tokens=sum(len(r.ids) for r in rows), steps=list(res.steps), requests=len(reqs))
        return res

    def keys_at(self, reqs: Sequence[EditRequest], prefixes: Sequence[str], key_layers: Sequence[int],
                out_layers: Sequence[int] = (), info: Optional[dict] = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Keys (n, d_in) at ``key_layers`` and block outputs h (n, d_model) at ``out_layers``
        (:func:`~blue_plugin.editing.keys.keys_and_outputs`). ``info``, if given, receives
        ``rows`` / ``tokens`` of the forward pass and ``requests``."""
        rows = key_rows(self.tok, reqs, prefixes, self.hp.fact_token)
        out = keys_and_outputs(self.model, self.tok, self.layout, rows, len(reqs), prefixes, key_layers, out_layers)
        if info is not None:
            info.update(rows=len(rows), tokens=sum(len(r.ids) for r in rows), requests=len(reqs))
        return out

    def layer_update(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """The change ``W_new - W`` (d_out, d_in; solve dtype, on the weight's device) that the
        rule makes to ``layer`` for keys ``K`` (n, d_in) and residuals ``R`` (n, d_out), with the
        state's ``C0``, accumulated ``K_p K_p^T`` (if the rule uses it), AlphaEdit projector and
        PRUNE original (the current weight before a layer's first edit): the update the layers
        after it see during the walk (RECT with ``rect_mask_timing: batch`` masks it only when
        the batch is written, PRUNE with ``prune_timing: sequence`` restrains only the served
        weights). Nothing is written. The statistics must be loaded (:meth:`ensure_second_moments`)."""
        x, W_new, _ = self._solve(layer, K, R, PendingBatch(originals={layer: self.weight(layer).detach()}))
        return W_new - x.W

    @torch.no_grad()
    def _solve(self, layer: int, K: torch.Tensor, R: torch.Tensor, pending: PendingBatch) -> tuple[LayerInputs, torch.Tensor, Optional[dict]]:
        """The rule's inputs, new weight (d_out, d_in; solve dtype) and what it records (or None)."""
        module, stored = self.module(layer), self.weight(layer)
        dev, sd = stored.device, self.solve_dtype
        W = as_out_in(module, stored).to(sd)
        if K.shape[0] != R.shape[0] or K.shape[1] != W.shape[1] or R.shape[1] != W.shape[0]:
            raise BLUEEditError(f"layer {layer}: keys {tuple(K.shape)} / residuals {tuple(R.shape)} do not fit the weight {tuple(W.shape)} (d_out, d_in).")
        if not (torch.isfinite(K).all() and torch.isfinite(R).all()):
            raise BLUEEditError(f"layer {layer}: non-finite keys or residuals; the model may already contain NaN/inf weights.")
        rule, hp = self.rule, self.hp
        ls = self.state.layers.get(layer)
        W_orig, sigma_max = pending.original(self.state, module, layer, sd) if rule.needs_original else (None, None)
        x = LayerInputs(
            W=W,
            K=K.T.to(dev, sd),
            R=R.T.to(dev, sd),
            C0=self.C0(layer) if rule.needs_c0 else None,
            KpKp=ls.kpkp if ls is not None and rule.uses_kpkp(hp) else None,
            P=self.projector(layer) if rule.needs_projector else None,
            W_orig=W_orig,
            sigma_max=sigma_max,
        )
        try:
            delta = rule.delta(x, hp)
            if not torch.isfinite(delta).all():
                raise BLUEEditError(
                    f"layer {layer}: the {hp.base_method} update is not finite (check mom2_update_weight / L2 "
                    "and the statistics); nothing was changed."
                )
            W_new, info = rule.finalize_with_info(W + delta, x, hp)
        except torch.linalg.LinAlgError as exc:
            raise BLUEEditError(f"layer {layer}: the {hp.base_method} solve failed ({exc}); nothing was changed.") from exc
        return x, W_new, info

    # ---- one batch ----------------------------------------------------------------------------
    def edit_layers(self) -> list[int]:
        return self.hp.edit_layers

    def apply(self, requests: Sequence[dict], return_orig_weights: bool = False) -> dict[str, torch.Tensor]:
        t_start = time.perf_counter()
        reqs = prepare_requests(self.tok, requests, self.hp)
        check_finite_parameters(self.model)
        self.state.sync_with_weights(self.weight)  # stored orientation, as the fingerprints were taken
        dynamic = self.hp.blue and self.hp.layer_selection == "dynamic"
        candidates = window_layers(self.hp) if dynamic else self.edit_layers()
        offloaded = [l for l in candidates if self.weight(l).is_meta]
        if offloaded:
            raise BLUEConfigError(
                f"the weights of layer(s) {offloaded} are offloaded (device 'meta', accelerate disk/CPU offload); "
                "load the model with a device_map that keeps the edited layers on a GPU or the CPU."
            )
        with observed(self.observer, "statistics", None) as info:
            info.update(layers=list(candidates), missing=self.ensure_second_moments(candidates))
        with observed(self.observer, "prefixes", None) as info:
            prefixes = self.prefixes()
            info["prefixes"] = len(prefixes)
        check_rows_fit(self.tok, reqs, prefixes, self.hp.fact_token, position_limit(self.model))
        resumed = self.state.unrestrained_layers() if self.rule.restrains_sequence(self.hp) else []
        pending = PendingBatch(originals={l: self.weight(l).detach().clone() for l in resumed})
        record: dict[str, Any] = {
            "n_requests": len(reqs),
            "case_ids": [r.case_id for r in reqs],
            "mode": "BLUE" if self.hp.blue else "original",
            "base_method": self.hp.base_method,
            "layers": [],
            "steps": {},
            "nll": {},
            "residual_norm": {},
            "time": {"targets": 0.0, "keys": 0.0, "update": 0.0},
        }
        try:
            self.restore({l: self.state.layers[l].W_unrestrained for l in resumed})  # PRUNE: continue unrestrained
            layers = candidates
            if dynamic:
                sel = record["layer_selection"] = {}
                layers = sorted(set(choose_boundary_layers(self, reqs, prefixes, criterion=self.hp.dynamic_criterion, details=sel)))
            record["layers"] = layers
            for l in layers:
                pending.originals.setdefault(l, self.weight(l).detach().clone())
            with frozen(self.model):
                if self.hp.blue:
                    self._run_blue(reqs, prefixes, layers, pending, record)
                else:
                    self._run_original(reqs, prefixes, layers, pending, record)
            with observed(self.observer, "write", None) as info:
                info["layers"] = list(layers)
                pending.write(self, layers, record)
        except BaseException:
            self.restore(pending.originals)
            raise
        pending.commit(self.state, self.weight, self.rule.restrains_sequence(self.hp), len(reqs))
        record["time"]["total"] = time.perf_counter() - t_start
        self.state.history.append(record)
        logger.info(
            "edited %d request(s) at layers %s (%s/%s) in %.1fs; mean steps per layer %s",
            len(reqs), layers, record["mode"], self.hp.base_method, record["time"]["total"],
            {l: round(sum(s) / len(s), 2) for l, s in record["steps"].items()},
        )
        if not return_orig_weights:
            return {}
        return {self.layout.weight_name(l): pending.originals[l] for l in layers}

    def _targets(self, reqs: list[EditRequest], prefixes: list[str], layer: int, record: dict) -> TargetResult:
        log = self.target_log
        res = log.take(reqs, layer) if log is not None else None
        if res is None:
            with observed(self.observer, "targets", layer, record["time"]) as info:
                res = self.targets_at(reqs, prefixes, layer, info)
        else:
            record["replayed_targets"] = True
        if log is not None:
            log.put(reqs, layer, res)
        record["steps"][layer] = res.steps
        record["nll"][layer] = res.nll
        return res

    def _keys(self, reqs, prefixes, key_layer: int, out_layer: int, record: dict):
        with observed(self.observer, "keys", key_layer, record["time"]) as info:
            keys, outs = self.keys_at(reqs, prefixes, [key_layer], [out_layer], info)
            info["out_layer"] = out_layer
        return keys[key_layer], outs[out_layer]

    def _run_blue(self, reqs, prefixes, layers, pending, record) -> None:
        for layer in layers:
            target = self._targets(reqs, prefixes, layer, record)
            K, h = self._keys(reqs, prefixes, layer, layer, record)
            R = target.z.to(h.device) - h  # h lives on the layer's device
            self._update(layer, K, R, pending, record)

    def _run_original(self, reqs, prefixes, layers, pending, record) -> None:
        z_layer = layers[-1]
        target = self._targets(reqs, prefixes, z_layer, record)
        for i, layer in enumerate(layers):
            K, h = self._keys(reqs, prefixes, layer, z_layer, record)
            R = (target.z.to(h.device) - h) / (len(layers) - i)
            self._update(layer, K, R, pending, record)

    def _update(self, layer: int, K: torch.Tensor, R: torch.Tensor, pending: PendingBatch, record: dict) -> None:
        """K: (n, d_in), R: (n, d_out). Computes and writes the new weight of ``layer``."""
        with observed(self.observer, "update", layer, record["time"]) as info:
            pending.note_first_edit(self.state, layer)
            x, W_new, extra = self._solve(layer, K, R, pending)
            if extra is not None:  # PRUNE per batch: the accumulated change against its bound
                record.setdefault("change_sigma", {})[layer] = extra
            self.write(layer, W_new)
            pending.add(layer, x.W, W_new, x.K, self.rule.adjusts_batch(self.hp))
            record["residual_norm"][layer] = R.norm(dim=1).tolist()
            record.setdefault("delta_norm", {})[layer] = info["delta_norm"] = float((W_new - x.W).norm())
            info["requests"] = K.shape[0]

    def finalize(self) -> dict[int, dict]:
        """Serve ``W_orig + restrain(W - W_orig)`` for a PRUNE sequence (``prune_timing: sequence``;
        :meth:`EditState.finalize <blue_plugin.editing.state.EditState.finalize>`). :meth:`apply` leaves the
        model so already; idempotent. Returns ``{layer: info}``; ``{}`` for other methods/timings."""
        if not self.rule.restrains_sequence(self.hp):
            return {}
        return self.state.finalize(self.module, self.solve_dtype)


def apply_blue_to_model(
    model,
    tok,
    requests: Sequence[dict],
    hparams: BLUEHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    state: Optional[EditState] = None,
    observer: Optional[EditObserver] = None,
    target_log: Optional[TargetLog] = None,
    **kwargs: Any,
):
    """Edit ``model`` with ``requests`` (EasyEdit's apply contract).

    Returns ``(model, weights_copy)``. With ``copy=True`` the input model is left untouched and an
    edited deep copy is returned. With ``return_orig_weights=True``, ``weights_copy`` maps the
    parameter names of exactly the changed matrices to their pre-edit values (restore with
    ``param.data.copy_(weights_copy[name])``). Consecutive calls on the same model are sequential
    batch editing; the state lives in :func:`blue_plugin.get_state(model) <blue_plugin.editing.state.get_state>`
    unless ``state`` is given. ``observer``: an :class:`~blue_plugin.editing.observer.EditObserver`
    told about the batch's phases; ``target_log``: a :class:`~blue_plugin.editing.replay.TargetLog`
    (record / replay the batch's targets). ``keep_original_weight`` and other EasyEdit keyword arguments
    are accepted and have no effect (the editor restores weights from ``weights_copy``).
    """
    hp = BLUEHyperParams.coerce(hparams)
    if copy:
        model = copy_module.deepcopy(model)
    editor = Editor(model, tok, hp, state, observer, target_log)
    weights_copy = editor.apply(requests, return_orig_weights=return_orig_weights)
    return model, weights_copy
