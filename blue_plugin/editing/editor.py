"""The editing engine: BLUE and the original residual distribution over one update-rule interface.

Original methods (``blue: false``): one target z at the last critical layer L; for the critical
layers l_1..l_m in order, R = z - h_L(current model), R_{l_i} = R / (m - i + 1), update W_{l_i}.

BLUE (``blue: true``): for l in (l_1, l_m), in that order, compute z_l at layer l on the current
(already partly edited) model, R_l = z_l - h_l(current), full residual, update W_l.

A batch is all-or-nothing: the new weights are checked before they are written, and any error
restores the edited matrices bit-for-bit and leaves the sequential state untouched.

Whole-batch and whole-sequence rules (:mod:`blue_plugin.editing.rules`): RECT masks each layer's update
when the batch is written; PRUNE runs the sequence unrestrained (kept in the state) and serves
``W_orig + restrain(W - W_orig)`` after every call (:meth:`Editor.finalize` is implicit).
"""
from __future__ import annotations

import copy as copy_module
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..model.layout import ModelLayout, as_out_in, find_module, from_out_in, resolve_layout
from .contexts import ContextPrefixes, generate_prefixes, with_groups
from ..errors import BLUEConfigError, BLUEEditError
from ..model.hooks import frozen
from ..hparams import BLUEHyperParams
from .keys import keys_and_outputs
from .requests import EditRequest, check_rows_fit, key_rows, position_limit, prepare_requests, target_rows
from .rules import LayerInputs, get_rule, null_space_projector
from .state import EditState, check_finite_parameters, fingerprint, get_state, serve_restrained
from .targets import TargetResult, compute_targets

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass
class _Pending:
    """Changes of one batch, applied to the state only once the whole batch has succeeded."""

    kkt: dict[int, torch.Tensor]
    originals: dict[int, torch.Tensor]  # stored weights before the batch of every layer it may write
    layer_init: dict[int, dict[str, Any]]  # first-edit facts of a layer (fingerprint, PRUNE original)
    dense: dict[int, torch.Tensor] = field(default_factory=dict)  # the batch's dense update (RECT 'batch')
    unrestrained: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)  # PRUNE 'sequence'


class Editor:
    """Applies batches of edits to one model with one set of hyperparameters."""

    def __init__(self, model, tok, hparams: BLUEHyperParams, state: Optional[EditState] = None):
        self.model, self.tok, self.hp = model, tok, hparams
        self.layout: ModelLayout = resolve_layout(model, hparams)
        self.rule = get_rule(hparams.base_method)
        self.state = state if state is not None else get_state(model)
        self.solve_dtype = _DTYPES[hparams.solve_dtype]
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

    def _c0_key(self, layer: int) -> tuple:
        hp = self.hp
        return (layer, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_max_length, hp.mom2_dtype, hp.mom2_adjustment)

    def ensure_second_moments(self, layers: Sequence[int], progress: bool = True) -> None:
        """Load (or compute, in one pass, with a progress bar unless ``progress=False``) C0 for
        ``layers`` into the state."""
        missing = [l for l in layers if self._c0_key(l) not in self.state.second_moments]
        if not missing:
            return
        if not self.hp.mom2_adjustment:
            for l in missing:
                d_in = self.W(l).shape[1]
                self.state.second_moments[self._c0_key(l)] = torch.eye(d_in, dtype=self.solve_dtype, device=self.weight(l).device)
            return
        if any(ls.post_fp is not None for ls in self.state.layers.values()):
            logger.warning("loading key statistics after edits were made: if they are not cached yet they are computed on the edited model")
        from ..stats.moments import get_second_moments
        from ..model.loading import default_cache_dir

        names = {l: self.layout.rewrite(l) for l in missing}
        cache_dir = self.hp.stats_dir if self.hp.stats_dir is not None else default_cache_dir() / "stats"
        model_id = getattr(self.model.config, "_name_or_path", None) or self.hp.model_name
        moments = get_second_moments(
            self.model,
            self.tok,
            list(names.values()),
            corpus=self.hp.mom2_dataset,
            n_samples=self.hp.mom2_n_samples,
            max_length=self.hp.mom2_max_length,
            mom2_dtype=self.hp.mom2_dtype,
            cache_dir=cache_dir,
            model_id=str(model_id),
            progress=progress,
        )
        for l, name in names.items():
            C0 = moments[name].to(device=self.weight(l).device, dtype=self.solve_dtype)
            self.state.second_moments[self._c0_key(l)] = C0

    def C0(self, layer: int) -> torch.Tensor:
        return self.state.second_moments[self._c0_key(layer)]

    def projector(self, layer: int) -> torch.Tensor:
        key = self._c0_key(layer) + (self.hp.nullspace_threshold,)
        if key not in self.state.projectors:
            P, rank = null_space_projector(self.C0(layer), self.hp.nullspace_threshold)
            d = P.shape[0]
            logger.info("AlphaEdit layer %d: null space of C0 has dimension %d of %d (threshold %g)", layer, rank, d, self.hp.nullspace_threshold)
            if rank == 0:
                logger.warning("layer %d: the null space is empty at threshold %g; AlphaEdit cannot change this layer", layer, self.hp.nullspace_threshold)
            self.state.projectors[key] = (P, rank)
        return self.state.projectors[key][0]

    # ---- one batch ----------------------------------------------------------------------------
    def edit_layers(self) -> list[int]:
        return self.hp.edit_layers

    def apply(self, requests: Sequence[dict], return_orig_weights: bool = False) -> dict[str, torch.Tensor]:
        t_start = time.perf_counter()
        reqs = prepare_requests(self.tok, requests, self.hp)
        check_finite_parameters(self.model)
        self.state.sync_with_weights(self.weight)  # stored orientation, as the fingerprints were taken
        dynamic = self.hp.blue and self.hp.layer_selection == "dynamic"
        if dynamic:
            from .selection import choose_boundary_layers, window_layers

            candidates = window_layers(self.hp)
        else:
            candidates = self.edit_layers()
        offloaded = [l for l in candidates if self.weight(l).is_meta]
        if offloaded:
            raise BLUEConfigError(
                f"the weights of layer(s) {offloaded} are offloaded (device 'meta', accelerate disk/CPU offload); "
                "load the model with a device_map that keeps the edited layers on a GPU or the CPU."
            )
        self.ensure_second_moments(candidates)
        prefixes = self.prefixes()
        check_rows_fit(self.tok, reqs, prefixes, self.hp.fact_token, position_limit(self.model))
        resumed = self.state.unrestrained_layers() if self.rule.restrains_sequence(self.hp) else []
        pending = _Pending(kkt={}, originals={l: self.weight(l).detach().clone() for l in resumed}, layer_init={})
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
            self._restore({l: self.state.layers[l].W_unrestrained for l in resumed})  # PRUNE: continue unrestrained
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
            self._write_batch(layers, pending, record)
        except BaseException:
            self._restore(pending.originals)
            raise
        self._commit(pending, len(reqs))
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
        t0 = time.perf_counter()
        rows = target_rows(self.tok, reqs, prefixes, self.hp.fact_token)
        lower = [self.layout.block(i) for i in range(layer)] if self.hp.v_replay_lower_layers else ()
        res = compute_targets(self.model, self.tok, self.layout.block(layer), rows, len(reqs), len(prefixes), self.hp, lower)
        record["time"]["targets"] += time.perf_counter() - t0
        record["steps"][layer] = res.steps
        record["nll"][layer] = res.nll
        return res

    def _keys(self, reqs, prefixes, key_layer: int, out_layer: int, record: dict):
        t0 = time.perf_counter()
        rows = key_rows(self.tok, reqs, prefixes, self.hp.fact_token)
        keys, outs = keys_and_outputs(self.model, self.tok, self.layout, rows, len(reqs), prefixes, [key_layer], [out_layer])
        record["time"]["keys"] += time.perf_counter() - t0
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

    def _update(self, layer: int, K: torch.Tensor, R: torch.Tensor, pending: _Pending, record: dict) -> None:
        """K: (n, d_in), R: (n, d_out). Computes and writes the new weight of ``layer``."""
        t0 = time.perf_counter()
        module, stored = self.module(layer), self.weight(layer)
        dev, sd = stored.device, self.solve_dtype
        W = as_out_in(module, stored).to(sd)
        if K.shape[1] != W.shape[1] or R.shape[1] != W.shape[0]:
            raise BLUEEditError(f"layer {layer}: keys {tuple(K.shape)} / residuals {tuple(R.shape)} do not fit the weight {tuple(W.shape)} (d_out, d_in).")
        if not (torch.isfinite(K).all() and torch.isfinite(R).all()):
            raise BLUEEditError(f"layer {layer}: non-finite keys or residuals; the model may already contain NaN/inf weights.")
        Kt, Rt = K.T.to(dev, sd), R.T.to(dev, sd)
        ls = self.state.layers.get(layer)
        init = pending.layer_init.setdefault(layer, {})
        if (ls is None or ls.orig_fp is None) and "orig_fp" not in init:
            init["orig_fp"] = fingerprint(pending.originals[layer])
        W_orig, sigma_max = self._original(layer, pending) if self.rule.needs_original else (None, None)
        x = LayerInputs(
            W=W,
            K=Kt,
            R=Rt,
            C0=self.C0(layer),
            KpKp=ls.kpkp if ls is not None and self.rule.uses_kpkp(self.hp) else None,
            P=self.projector(layer) if self.rule.needs_projector else None,
            W_orig=W_orig,
            sigma_max=sigma_max,
        )
        try:
            delta = self.rule.delta(x, self.hp)
            if not torch.isfinite(delta).all():
                raise BLUEEditError(
                    f"layer {layer}: the {self.hp.base_method} update is not finite (check mom2_update_weight / L2 "
                    "and the statistics); nothing was changed."
                )
            W_new, info = self.rule.finalize_with_info(W + delta, x, self.hp)
            if info is not None:  # PRUNE per batch: the accumulated change against its bound
                record.setdefault("change_sigma", {})[layer] = info
        except torch.linalg.LinAlgError as exc:
            raise BLUEEditError(f"layer {layer}: the {self.hp.base_method} solve failed ({exc}); nothing was changed.") from exc
        self._write(layer, W_new)
        if self.rule.adjusts_batch(self.hp):
            pending.dense[layer] = pending.dense.get(layer, 0) + (W_new - W)
        pending.kkt[layer] = pending.kkt.get(layer, 0) + Kt @ Kt.T
        record["residual_norm"][layer] = R.norm(dim=1).tolist()
        record.setdefault("delta_norm", {})[layer] = float((W_new - W).norm())
        record["time"]["update"] += time.perf_counter() - t0

    def _original(self, layer: int, pending: _Pending) -> tuple[torch.Tensor, float]:
        """PRUNE's W_orig (d_out, d_in; solve dtype) and sigma_max (state, or this first batch)."""
        ls = self.state.layers.get(layer)
        if ls is not None and ls.W_orig is not None:
            return ls.W_orig, ls.sigma_max
        init = pending.layer_init.setdefault(layer, {})
        if "W_orig" not in init:
            init["W_orig"] = as_out_in(self.module(layer), pending.originals[layer].to(self.solve_dtype))
            init["sigma_max"] = float(torch.linalg.matrix_norm(init["W_orig"], ord=2))
        return init["W_orig"], init["sigma_max"]

    def _write(self, layer: int, W_new: torch.Tensor) -> None:
        """Write ``W_new`` (d_out, d_in) into the stored weight of ``layer`` (checked first)."""
        module, stored = self.module(layer), self.weight(layer)
        if W_new.shape != (shape := as_out_in(module, stored).shape):
            raise BLUEEditError(f"layer {layer}: update has shape {tuple(W_new.shape)}, expected {tuple(shape)}.")
        new_stored = from_out_in(module, W_new).to(stored.dtype)
        if not torch.isfinite(new_stored).all():
            raise BLUEEditError(f"layer {layer}: the update is not finite (check mom2_update_weight / L2 and the statistics); nothing was changed.")
        with torch.no_grad():
            stored.copy_(new_stored)

    # ---- whole-batch and whole-sequence rules (RECT 'batch', PRUNE 'sequence') ----------------
    def _write_batch(self, layers: Sequence[int], pending: _Pending, record: dict) -> None:
        """After the walk: RECT's masked updates; PRUNE's served weights (unrestrained ones kept)."""
        if self.rule.adjusts_batch(self.hp):
            for l in layers:
                W_before = as_out_in(self.module(l), pending.originals[l]).to(self.solve_dtype)
                D = self.rule.batch_update(pending.dense[l], W_before, self.hp)
                self._write(l, W_before + D)
                record["delta_norm"][l] = float(D.norm())
                record.setdefault("kept_fraction", {})[l] = float((D != 0).sum()) / D.numel()
        if self.rule.restrains_sequence(self.hp):
            for l in sorted(pending.originals):
                if l not in layers:  # resumed, not edited by this batch: served weight and state stay
                    with torch.no_grad():
                        self.weight(l).copy_(pending.originals[l])
                    continue
                unrestrained = self.weight(l).detach().clone()
                info = serve_restrained(self.module(l), unrestrained, *self._original(l, pending), self.solve_dtype)
                record.setdefault("change_sigma", {})[l] = info
                pending.unrestrained[l] = unrestrained if info["above"] else None

    def finalize(self) -> dict[int, dict]:
        """Serve ``W_orig + restrain(W - W_orig)`` for a PRUNE sequence (``prune_timing: sequence``;
        :meth:`EditState.finalize <blue_plugin.editing.state.EditState.finalize>`). :meth:`apply` leaves the
        model so already; idempotent. Returns ``{layer: info}``; ``{}`` for other methods/timings."""
        if not self.rule.restrains_sequence(self.hp):
            return {}
        return self.state.finalize(self.module, self.solve_dtype)

    def _restore(self, originals: dict[int, torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, W in originals.items():
                self.weight(layer).copy_(W)

    def _commit(self, pending: _Pending, n: int) -> None:
        for layer, init in pending.layer_init.items():
            ls = self.state.layer(layer)
            for key, value in init.items():
                if getattr(ls, key) is None:
                    setattr(ls, key, value)
        for layer, kkt in pending.kkt.items():
            ls = self.state.layer(layer)
            ls.kpkp = kkt.clone() if ls.kpkp is None else ls.kpkp + kkt
        if not self.rule.restrains_sequence(self.hp):  # another method goes on from the served weights
            for ls in self.state.layers.values():
                ls.W_unrestrained = None
        for layer, W in pending.unrestrained.items():
            self.state.layer(layer).W_unrestrained = W
        for layer in pending.originals:
            self.state.layer(layer).post_fp = fingerprint(self.weight(layer))
        self.state.n_edits += n


def _coerce_hparams(hparams: Any) -> BLUEHyperParams:
    if isinstance(hparams, BLUEHyperParams):
        return hparams
    if isinstance(hparams, dict):
        return BLUEHyperParams.from_dict(hparams)
    raise BLUEConfigError(
        f"hparams must be a BLUEHyperParams (or a dict of its keys), got {type(hparams).__name__}; "
        "load one with BLUEHyperParams.from_hparams('hparams/BLUE/....yaml')."
    )


def apply_blue_to_model(
    model,
    tok,
    requests: Sequence[dict],
    hparams: BLUEHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    state: Optional[EditState] = None,
    **kwargs: Any,
):
    """Edit ``model`` with ``requests`` (EasyEdit's apply contract).

    Returns ``(model, weights_copy)``. With ``copy=True`` the input model is left untouched and an
    edited deep copy is returned. With ``return_orig_weights=True``, ``weights_copy`` maps the
    parameter names of exactly the changed matrices to their pre-edit values (restore with
    ``param.data.copy_(weights_copy[name])``). Consecutive calls on the same model are sequential
    batch editing; the state lives in :func:`blue_plugin.get_state(model) <blue_plugin.editing.state.get_state>`
    unless ``state`` is given. ``keep_original_weight`` and other EasyEdit keyword arguments are
    accepted and have no effect (the editor restores weights from ``weights_copy``).
    """
    hp = _coerce_hparams(hparams)
    if copy:
        model = copy_module.deepcopy(model)
    editor = Editor(model, tok, hp, state)
    weights_copy = editor.apply(requests, return_orig_weights=return_orig_weights)
    return model, weights_copy
