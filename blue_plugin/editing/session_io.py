"""The on-disk format of an :class:`~blue_plugin.editing.session.EditSession`.

A session directory holds ``manifest.json`` and the tensor file it names
(``session-<batches>-<random>.safetensors``). :func:`write_session` writes the tensor file under a
new name, fsyncs it, then replaces ``manifest.json`` atomically (``os.replace``) and only then
deletes the previous tensor file, so a crash at any moment leaves a complete old or a complete new
session, never a mixture. Nothing is pickled: tensors are safetensors, metadata JSON.

:func:`read_manifest` and :func:`read_tensors` read a session back, checking its format and the
sha256 of its tensor file; :func:`check_model` checks that a model is the unedited model a session
was started on (architecture, and a fingerprint of every parameter the session did not edit).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import filelock
import torch
import safetensors.torch

from ..stats.importer import file_sha256
from .state import fingerprint

#: Version of the session directory layout; :func:`read_manifest` refuses other versions.
SESSION_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "blue_plugin.EditSession"
#: Prefix of the saved weights' names in the tensor file (the rest holds the edit state).
WEIGHT_PREFIX = "weight:"
FINGERPRINT_ELEMENTS = 4096

#: Model identity fields that must agree between a saved session and the model it is loaded on.
COMPARED_IDENTITY_KEYS = ("class", "model_type", "hidden_size", "num_layers", "vocab_size", "n_params", "dtype")
#: Keys every manifest must have.
MANIFEST_KEYS = ("n_batches", "hparams", "model", "params_fingerprint", "weights", "state", "tensors_file", "tensors_sha256")


class BLUESessionError(ValueError):
    """A saved session cannot be used: missing or corrupted files, another model, an already
    edited model, or an unknown format. The message says what to do."""


# ---------------------------------------------------------------------------------------------
# Model identity
# ---------------------------------------------------------------------------------------------


def model_identity(model) -> dict[str, Any]:
    """Architecture facts that a session must match (see :data:`COMPARED_IDENTITY_KEYS`) plus the
    informational ``name_or_path``."""
    cfg = getattr(model, "config", None)
    params = list(model.parameters())

    def first(*keys: str) -> Any:
        for k in keys:
            v = getattr(cfg, k, None)
            if v is not None:
                return v
        return None

    return {
        "class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": first("hidden_size", "n_embd", "d_model"),
        "num_layers": first("num_hidden_layers", "n_layer", "num_layers"),
        "vocab_size": first("vocab_size"),
        "n_params": int(sum(p.numel() for p in params)),
        "dtype": str(params[0].dtype) if params else None,
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or ""),
    }


def params_fingerprint(model, exclude: Sequence[str] = ()) -> str:
    """sha256 over name, shape, dtype and a strided sample (4096 entries) of every parameter
    except ``exclude`` (the edited matrices): identifies the checkpoint without reading all of
    it (~10 ms for a 135M model)."""
    excluded = set(exclude)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if name in excluded:
            continue
        h.update(name.encode())
        h.update(str((tuple(p.shape), str(p.dtype))).encode())
        if p.is_meta:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_ELEMENTS)
        h.update(flat[::step][:FINGERPRINT_ELEMENTS].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def check_model(model, manifest: dict[str, Any], weights: Sequence[str]) -> None:
    """:class:`BLUESessionError` unless ``model`` has the architecture the session was saved for,
    the parameters it edited (``weights`` and the manifest's ``fingerprint_excludes``) and the
    same values of every other parameter."""
    ident, saved_ident = model_identity(model), manifest["model"]
    diff = [k for k in COMPARED_IDENTITY_KEYS if ident.get(k) != saved_ident.get(k)]
    if diff:
        details = ", ".join(f"{k}: saved {saved_ident.get(k)!r}, this model {ident.get(k)!r}" for k in diff)
        raise BLUESessionError(f"the session was saved for another model ({details}); load the model it was started on ({saved_ident.get('name_or_path')!r})")
    params = dict(model.named_parameters())
    excluded = list(manifest.get("fingerprint_excludes", []))
    unknown = [n for n in list(weights) + excluded if n not in params]
    if unknown:
        raise BLUESessionError(f"the model has no parameters {unknown} that the session edited; load the model it was started on")
    if params_fingerprint(model, exclude=excluded) != manifest["params_fingerprint"]:
        raise BLUESessionError(
            "the model's weights differ from those the session was started on (another checkpoint, dtype or "
            f"fine-tune of {saved_ident.get('name_or_path') or 'the saved model'!r}); load the same unedited model"
        )


def check_saved_weights(params: dict[str, torch.Tensor], layer_states: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """:class:`BLUESessionError` unless every matrix the saved state edited (``layer_states``: weight
    name -> saved :class:`~blue_plugin.editing.state.LayerState`) is in the model at its original
    value, and every saved weight fits the model and is finite."""
    for name, ls in layer_states.items():
        if name not in params:
            raise BLUESessionError(f"the session edited {name!r}, which this model does not have")
        now = fingerprint(params[name])
        if ls.orig_fp is not None and not torch.equal(now, ls.orig_fp):
            if ls.post_fp is not None and torch.equal(now, ls.post_fp):
                raise BLUESessionError(f"{name} already carries the session's edits; load the session onto a freshly loaded, unedited model")
            raise BLUESessionError(f"{name} is not at the original value the session started from; load the session onto the unedited model")
    for name, w in weights.items():
        p = params[name]
        if tuple(w.shape) != tuple(p.shape) or w.dtype != p.dtype:
            raise BLUESessionError(f"saved {name} is {tuple(w.shape)} {w.dtype} but the model's is {tuple(p.shape)} {p.dtype}")
        if not bool(torch.isfinite(w).all()):
            raise BLUESessionError(f"saved {name} holds NaN/inf values; the session is corrupted")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def session_dir(directory: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(directory)))


def write_session(directory: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], n_batches: int) -> Path:
    """Write ``tensors`` and ``manifest`` (completed with the tensor file's name and sha256) to
    ``directory`` atomically, under a file lock, and delete the previous tensor file; return
    the manifest path."""

    lock = filelock.FileLock(str(directory / ".session.lock"))
    with lock:
        name = f"session-{n_batches:06d}-{secrets.token_hex(4)}.safetensors"
        path = directory / name
        tmp = directory / f".{name}.tmp"
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        manifest = dict(manifest, tensors_file=name, tensors_sha256=file_sha256(path))
        try:
            write_atomic(directory / MANIFEST_NAME, json.dumps(manifest, indent=1).encode("utf-8"))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        fsync_dir(directory)
        for old in directory.iterdir():  # previous tensor files and leftovers of crashed saves
            if old.name != name and old.name.startswith(("session-", ".session-")) and old.name.endswith((".safetensors", ".tmp")):
                old.unlink(missing_ok=True)
    return directory / MANIFEST_NAME


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved session (validated format); raises :class:`BLUESessionError`."""
    path = session_dir(directory) / MANIFEST_NAME
    if not path.is_file():
        raise BLUESessionError(f"no saved session in {str(path.parent)!r} ({MANIFEST_NAME} is missing); save one with EditSession.save(dir)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BLUESessionError(f"{str(path)!r} is not a readable session manifest ({e}); the session is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BLUESessionError(f"{str(path)!r} is not a blue_plugin session manifest")
    if manifest.get("format_version") != SESSION_FORMAT_VERSION:
        raise BLUESessionError(
            f"{str(path)!r} has session format {manifest.get('format_version')!r}; this blue_plugin reads "
            f"format {SESSION_FORMAT_VERSION} (use the version that wrote it)"
        )
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise BLUESessionError(f"{str(path)!r} lacks {missing}; the session is corrupted")
    return manifest


def read_tensors(directory: Path, manifest: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(weights, state_tensors)`` of the tensor file ``manifest`` names, after checking its
    sha256 and that it holds the weights the manifest lists."""

    tpath = directory / str(manifest["tensors_file"])
    if tpath.name != manifest["tensors_file"] or not tpath.is_file():
        raise BLUESessionError(f"the session's tensor file {str(tpath)!r} is missing; the session is incomplete or was moved in parts")
    if file_sha256(tpath) != manifest["tensors_sha256"]:
        raise BLUESessionError(f"{str(tpath)!r} does not match the checksum in the manifest (corrupted or replaced); the session cannot be used")
    try:
        tensors = safetensors.torch.load_file(str(tpath))
    except Exception as e:  # safetensors raises several types for bad files
        raise BLUESessionError(f"{str(tpath)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    weights = {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items() if k.startswith(WEIGHT_PREFIX)}
    state_tensors = {k: v for k, v in tensors.items() if not k.startswith(WEIGHT_PREFIX)}
    if set(weights) != set(manifest["weights"]):
        raise BLUESessionError(f"{str(tpath)!r} holds weights {sorted(weights)} but the manifest lists {sorted(manifest['weights'])}; the session is corrupted")
    return weights, state_tensors
