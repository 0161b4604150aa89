"""A resumable, undoable sequential editing session.

:class:`EditSession` wraps ``(model, tok, hparams)`` for sequential batch editing:

* :meth:`EditSession.edit` applies one batch with :func:`~blue_plugin.apply_blue_to_model`,
  all-or-nothing: if anything fails (a non-finite residual, a failed solve, a bad request, an
  interrupt) the edited weights and the edit state are put back bit-for-bit;
* :meth:`EditSession.undo` restores the weights and the state from before the last batch(es)
  exactly (``undo_depth`` batches are kept, 1 by default);
* :meth:`EditSession.finalize` serves the final weights of a PRUNE sequence (a no-op after every
  batch, which serves them already; see :meth:`blue_plugin.editing.editor.Editor.finalize`);
* :meth:`EditSession.save` writes, atomically, everything needed to continue later: the edit
  state (accumulated K_p K_p^T per layer, PRUNE's originals, sigma_max and unrestrained weights,
  weight fingerprints, history, edit count, context prefixes) and the current (served) values of
  the edited matrices, in one
  safetensors file, plus a JSON manifest (hyperparameters, batch count, model identity, sha256
  of the tensor file);
* :meth:`EditSession.load` puts a saved session onto a freshly loaded, *unedited* model after
  checking that it is the model the session was started on.

The directory layout, its atomic writes and its checks are :mod:`blue_plugin.editing.session_io`.

The model-constant caches (C0 and AlphaEdit's projector) are not saved; :meth:`load` reads C0
from the statistics cache (or recomputes it) on the unedited model *before* it applies the saved
weights, exactly as the first batch of an uninterrupted run did, so resuming is bit-identical.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import BLUEEditError
from ..hparams import BLUEHyperParams
from ..model.layout import ModelLayout, from_out_in, resolve_layout
from .editor import Editor, apply_blue_to_model
from .export import collect_factors, write_adapter, write_model
from .observer import EditObserver
from .session_io import (
    COMPARED_IDENTITY_KEYS,
    FORMAT_NAME,
    MANIFEST_NAME,
    SESSION_FORMAT_VERSION,
    WEIGHT_PREFIX,
    BLUESessionError,
    check_model,
    check_saved_weights,
    model_identity,
    params_fingerprint,
    read_manifest,
    read_tensors,
    session_dir,
    write_session,
)
from .state import EditState, check_finite_parameters, fingerprint, get_state

logger = logging.getLogger(__name__)

__all__ = ["EditSession", "BLUESessionError", "MANIFEST_NAME", "SESSION_FORMAT_VERSION", "COMPARED_IDENTITY_KEYS",
           "model_identity", "params_fingerprint"]


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


class EditSession:
    """Sequential batch editing of one model with save / load / undo.

    Args:
        model, tok: the model to edit in place and its tokenizer.
        hparams: a :class:`~blue_plugin.BLUEHyperParams`, a dict of its keys, or a YAML path.
        undo_depth: how many batches :meth:`undo` can take back (each kept batch costs a copy of
            the critical layers' weights and of the per-layer state; 0 disables undo).
        history_limit: keep only the newest ``history_limit`` per-batch records in
            ``get_state(model).history`` (None: keep all; a record is ~1-2 KB).
        observer: an :class:`~blue_plugin.editing.observer.EditObserver` told about the phases
            of every batch.

    The session uses (and owns, while it lives) the model's :func:`~blue_plugin.get_state`
    state, so plain :func:`~blue_plugin.apply_blue_to_model` calls see the same sequence. It
    starts by the rule :func:`~blue_plugin.apply_blue_to_model` follows: a model whose edited
    weights were restored to their original values starts a fresh sequence; a model that still
    carries edits (e.g. after ``apply_blue_to_model``, or a ``copy.deepcopy`` of such a model) is
    refused with :class:`BLUESessionError` unless ``adopt_edits=True``, which continues that
    sequence (undo then reaches back to the session's first batch only, and the exports need the
    original weights: PRUNE keeps them; otherwise start the session on the unedited model).

    The session keeps a CPU copy of every matrix it edits as it was before its first edit (for
    :meth:`export_adapter`; e.g. 2 x 117 MB for BLUE on Llama-3-8B in bfloat16).
    """

    def __init__(self, model, tok, hparams: Any, undo_depth: int = 1, history_limit: Optional[int] = None,
                 observer: Optional[EditObserver] = None, adopt_edits: bool = False):
        if isinstance(undo_depth, bool) or not isinstance(undo_depth, int) or undo_depth < 0:
            raise ValueError(f"undo_depth must be an integer >= 0, got {undo_depth!r}")
        if history_limit is not None and (isinstance(history_limit, bool) or not isinstance(history_limit, int) or history_limit < 1):
            raise ValueError(f"history_limit must be None or an integer >= 1, got {history_limit!r}")
        self.model, self.tok = model, tok
        self.hparams = BLUEHyperParams.coerce(hparams)
        self.layout: ModelLayout = resolve_layout(model, self.hparams)  # validates templates and layers
        self.undo_depth = undo_depth
        self.history_limit = history_limit
        self.observer = observer
        #: a :class:`~blue_plugin.editing.replay.TargetLog` for :meth:`edit` (record / replay targets), or None
        self.target_log = None
        self.n_batches = 0
        self._undo: list[tuple[dict[str, torch.Tensor], EditState, int]] = []
        #: stored weights of the edited matrices before their first edit (CPU), for the exports
        self._originals: dict[str, torch.Tensor] = {}
        self._sync()
        state = self.state
        carried = [l for l, ls in state.layers.items() if ls.post_fp is not None]
        if state.n_edits or carried:
            if not adopt_edits:
                raise BLUESessionError(
                    f"this model carries {state.n_edits} edit(s) (layers {sorted(carried)}) made outside this session "
                    "(apply_blue_to_model, or another session on this model or the one it was copied from). "
                    "Pass adopt_edits=True to continue that sequence in this session, or restore the original "
                    "weights (or call blue_plugin.reset_state(model)) to start afresh."
                )
            logger.info("the session adopts %d earlier edit(s) on layers %s", state.n_edits, sorted(carried))
            self._adopt_originals(carried)

    def _weight_of(self, layer: int) -> torch.Tensor:
        params = self._params()
        name = self.layout.weight_name(layer)
        if name not in params:
            raise BLUESessionError(f"the model's edit state names layer {layer}, but the model has no {name!r}; "
                                   "call blue_plugin.reset_state(model) on a model edited with other templates")
        return params[name]

    def _sync(self) -> None:
        """Compare the state with the weights (restored weights: a fresh sequence)."""
        was = self.state.n_edits
        self.state.sync_with_weights(self._weight_of)
        if was and not self.state.n_edits:
            self._undo.clear()
            self.n_batches = 0

    def _adopt_originals(self, layers: Sequence[int]) -> None:
        for l in layers:
            ls = self.state.layers[l]
            if ls.W_orig is not None:  # PRUNE keeps the original (d_out, d_in)
                w = self._weight_of(l)
                module = self.model.get_submodule(self.layout.rewrite(l))
                self._originals[self.layout.weight_name(l)] = from_out_in(module, ls.W_orig).to("cpu", w.dtype).clone()

    # ---- properties ------------------------------------------------------------------------
    @property
    def state(self) -> EditState:
        """The edit state attached to the model."""
        return get_state(self.model)

    @property
    def n_edits(self) -> int:
        return self.state.n_edits

    @property
    def can_undo(self) -> int:
        """How many batches :meth:`undo` can still take back."""
        return len(self._undo)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    def _critical_weight_names(self) -> list[str]:
        """Stored weights that a batch may change: the rewrite modules of all critical layers
        (a superset of the edited ones, whatever the layer selection)."""
        return [self.layout.weight_name(l) for l in self.hparams.layers]

    # ---- editing -----------------------------------------------------------------------------
    def edit(self, requests: Sequence[dict]) -> dict[str, Any]:
        """Apply one batch; return its history record.

        All-or-nothing: on any exception (including ``KeyboardInterrupt``) the critical layers'
        weights and the edit state are restored bit-for-bit before the exception propagates.
        Errors a user can fix are ``ValueError`` subclasses (``BLUEConfigError``,
        ``BLUERequestError``, ``BLUEEditError``).
        """
        check_finite_parameters(self.model)
        self._sync()
        params = self._params()
        names = self._critical_weight_names()
        before = {n: params[n].detach().clone() for n in names}
        snapshot = self.state.snapshot()
        last = self.state.history[-1] if self.state.history else None
        fresh = {l for l in self.hparams.layers if self.state.layers.get(l) is None or self.state.layers[l].post_fp is None}
        try:
            apply_blue_to_model(self.model, self.tok, requests, self.hparams, state=self.state, observer=self.observer,
                                target_log=self.target_log)
        except BaseException as e:
            self._put_back(before, snapshot)
            if isinstance(e, torch.linalg.LinAlgError):  # e.g. an SVD of non-finite values (PRUNE)
                raise BLUEEditError(
                    f"a linear-algebra step of the update failed ({e}); check mom2_update_weight / L2 and "
                    "the statistics. Nothing was changed."
                ) from e
            raise
        if not self.state.history or self.state.history[-1] is last:  # pragma: no cover - engine contract
            raise RuntimeError("the engine did not record the batch")
        record = self.state.history[-1]
        changed = {n: w for n, w in before.items() if not torch.equal(w, params[n])}
        for l in fresh:
            n = self.layout.weight_name(l)
            if n in changed and n not in self._originals:
                self._originals[n] = changed[n].to("cpu")
        if self.undo_depth:
            self._undo.append((changed, snapshot, self.n_batches))
            del self._undo[: max(0, len(self._undo) - self.undo_depth)]
        self.n_batches += 1
        self._trim_history()
        return record

    def _trim_history(self) -> None:
        hist = self.state.history
        if self.history_limit is not None and len(hist) > self.history_limit:
            del hist[: len(hist) - self.history_limit]

    def _put_back(self, weights: dict[str, torch.Tensor], snapshot: EditState) -> None:
        params = self._params()
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        self.state.restore(snapshot)

    def undo(self) -> None:
        """Restore the weights and the edit state from before the last batch, exactly."""
        if not self._undo:
            raise ValueError(
                "nothing to undo: no batch was edited in this session since it was created or "
                f"loaded, or all {self.undo_depth} kept batch(es) were undone already "
                "(raise undo_depth to keep more)"
            )
        weights, snapshot, n_batches = self._undo.pop()
        self._put_back(weights, snapshot)
        self.n_batches = n_batches
        logger.info("undid batch %d; %d edit(s) remain", n_batches + 1, self.state.n_edits)

    def finalize(self) -> dict[int, dict]:
        """Serve ``W_orig + restrain(W - W_orig)`` for a PRUNE sequence (``prune_timing: sequence``)
        and return the restraint info per layer (``{}`` for other methods). Every batch leaves
        the model so already, so this is idempotent and changes nothing after :meth:`edit`; the
        state keeps the unrestrained weights, and later batches continue from them."""
        return Editor(self.model, self.tok, self.hparams, self.state).finalize()

    # ---- exports -----------------------------------------------------------------------------
    def _export_info(self) -> dict[str, Any]:
        return {"n_edits": self.n_edits, "n_batches": self.n_batches, "hparams": self.hparams.to_dict(),
                "model": model_identity(self.model)}

    def export_adapter(self, path: str | os.PathLike, rank: Optional[int] = None) -> dict[str, Any]:
        """Write the accumulated weight change of every edited module as a PEFT LoRA adapter
        folder (see :mod:`blue_plugin.editing.export`); PRUNE's restraint is applied first
        (:meth:`finalize`). ``rank`` truncates every module's factors to at most that rank.
        Returns the export info (per module: rank, numerical rank, relative reconstruction error)."""
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be None or an integer >= 1, got {rank!r}")
        self.finalize()
        factors = collect_factors(self.model, self.layout, self._edited_layers(), self._originals, rank)
        info = dict(self._export_info(), kind="peft-lora", requested_rank=rank,
                    modules={f.module: f.summary() for f in factors})
        base = model_identity(self.model).get("name_or_path") or ""
        write_adapter(path, factors, base, info)
        return info

    def export_model(self, path: str | os.PathLike) -> Path:
        """``save_pretrained`` the edited model (PRUNE's restraint applied first) and its tokenizer
        into ``path``; ``AutoModelForCausalLM.from_pretrained(path)`` loads it without blue_plugin."""
        self.finalize()
        return write_model(self.model, self.tok, path, dict(self._export_info(), kind="model"))

    # ---- persistence -----------------------------------------------------------------------
    def _edited_layers(self) -> list[int]:
        return sorted(l for l, ls in self.state.layers.items() if ls.post_fp is not None)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the session to ``directory`` (created if needed) atomically; return the
        manifest path. Safe against a crash at any moment and against concurrent saves into the
        same directory (file lock)."""
        directory = session_dir(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state
        params = self._params()
        tensors, state_meta = state.to_tensors(include_prefixes=True)
        weights_meta: dict[str, Any] = {}
        edited = self._edited_layers()
        for l in edited:
            name = self.layout.weight_name(l)
            w = params[name].detach()
            tensors[WEIGHT_PREFIX + name] = w.to("cpu").contiguous().clone()
            weights_meta[name] = {"layer": l, "shape": list(w.shape), "dtype": str(w.dtype)}
        excluded = [self.layout.weight_name(l) for l in state.layers]
        manifest = {
            "format": FORMAT_NAME,
            "format_version": SESSION_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "n_batches": self.n_batches,
            "n_edits": state.n_edits,
            "hparams": self.hparams.to_dict(),
            "model": model_identity(self.model),
            "params_fingerprint": params_fingerprint(self.model, exclude=excluded),
            "fingerprint_excludes": excluded,
            "weights": weights_meta,
            "state": state_meta,
        }
        path = write_session(directory, tensors, manifest, self.n_batches)
        logger.info("saved session (%d batches, %d edits) to %s", self.n_batches, state.n_edits, directory)
        return path

    @staticmethod
    def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
        """The manifest of a saved session (validated format); raises :class:`BLUESessionError`."""
        return read_manifest(directory)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        model,
        tok,
        hparams: Any = None,
        undo_depth: int = 1,
        history_limit: Optional[int] = None,
        prepare_statistics: bool = True,
        observer: Optional[EditObserver] = None,
    ) -> "EditSession":
        """Restore a saved session onto ``model``, a freshly loaded **unedited** copy of the
        model it was started on, and return it (the model is edited in place).

        Checks, before anything is changed: the manifest and the sha256 of the tensor file; the
        model's architecture and a fingerprint of all its non-edited parameters; that each
        edited matrix is at its original value (fingerprint); that the model carries no edits
        in its state. Then (``prepare_statistics``) C0 of the edited layers is read from the
        statistics cache, or computed on the still unedited model, and finally the saved
        matrices and the edit state are put in place. ``hparams`` defaults to the saved ones;
        passing others logs the keys that differ. Raises :class:`BLUESessionError` (a
        ValueError) and leaves the model unchanged when a check fails.
        """
        directory = session_dir(directory)
        manifest = cls.read_manifest(directory)
        saved_hp = BLUEHyperParams.from_dict(manifest["hparams"], source=f"{directory / MANIFEST_NAME} hparams")
        hp = saved_hp if hparams is None else BLUEHyperParams.coerce(hparams)
        if hparams is not None:
            diff = sorted(k for k, v in saved_hp.to_dict().items() if hp.to_dict().get(k) != v)
            if diff:
                logger.warning("loading a session with hyperparameters that differ from the saved ones in %s; "
                               "the continued run will not be identical to an uninterrupted one", diff)

        weights, state_tensors = read_tensors(directory, manifest)
        check_model(model, manifest, list(weights))
        layout = resolve_layout(model, hp)
        params = dict(model.named_parameters())
        try:
            new_state = EditState.from_tensors(state_tensors, manifest["state"], device_of=lambda l: params[layout.weight_name(l)].device)
        except ValueError as e:
            raise BLUESessionError(f"the saved edit state cannot be read: {e}") from None
        check_saved_weights(params, {layout.weight_name(l): ls for l, ls in new_state.layers.items()}, weights)
        state = get_state(model)
        state.sync_with_weights(lambda l: params[layout.weight_name(l)])  # restored weights: no edits
        if state.n_edits or any(ls.post_fp is not None for ls in state.layers.values()):
            raise BLUESessionError("this model already has edits in its state; load the session onto a freshly loaded model (or call blue_plugin.reset_state(model) after restoring its weights)")

        # -- statistics on the unedited model, as the uninterrupted run computed them --------
        if prepare_statistics and new_state.layers:
            Editor(model, tok, hp, state).ensure_second_moments(sorted(set(new_state.layers) | set(hp.edit_layers)))

        # -- apply (all-or-nothing) ----------------------------------------------------------
        originals = {n: params[n].detach().clone() for n in weights}
        snapshot = state.snapshot()
        try:
            with torch.no_grad():
                for name, w in weights.items():
                    params[name].copy_(w.to(params[name].device))
            state.load_edits_from(new_state)
            for l, ls in state.layers.items():
                if ls.post_fp is not None and not torch.equal(fingerprint(params[layout.weight_name(l)]), ls.post_fp):
                    raise BLUESessionError(f"{layout.weight_name(l)} does not match the saved fingerprint after loading; the session is corrupted")
        except BaseException:
            with torch.no_grad():
                for name, w in originals.items():
                    params[name].copy_(w)
            state.restore(snapshot)
            raise
        session = cls(model, tok, hp, undo_depth=undo_depth, history_limit=history_limit, observer=observer,
                      adopt_edits=True)
        session._originals.update({n: w.to("cpu") for n, w in originals.items()})
        session.n_batches = int(manifest["n_batches"])
        logger.info("loaded session from %s: %d batches, %d edits", directory, session.n_batches, state.n_edits)
        return session
