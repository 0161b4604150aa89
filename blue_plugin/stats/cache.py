"""The on-disk cache of the key statistics: what identifies a request, and the validated files.

A cache file is a plain safetensors file holding one float64 tensor ``"mom2"`` (d_in x d_in, the
mean E[k k^T]) and string metadata (:func:`request_metadata`, plus what
:func:`written_metadata` adds about the pass). Nothing is ever unpickled. The model and the
tokenizer are identified by fingerprints (:func:`weights_fingerprint`,
:func:`tokenizer_fingerprint`); files are written atomically (:func:`save_moment`), validated
when read (:func:`load_moment`) and computed under a file lock (:func:`acquire_cache_lock`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import filelock
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from .accumulate import check_mom2_dtype, tokenize
from .sources import corpus_identity

logger = logging.getLogger(__name__)

#: Bumped whenever the meaning or layout of a cache file changes; older files are recomputed.
#: 2: documents are a seeded random subset by default (``corpus_subset``), ``mom2_dtype`` recorded.
CACHE_FORMAT_VERSION = "2"

#: Name of the tensor inside a cache file.
TENSOR_KEY = "mom2"

#: Metadata keys that must match between a cache file and the current request.
#: The others (model id, corpus path and size, token count, ...) are informational. ``dtype`` is
#: that of the total and of the stored mean (always float64); ``mom2_dtype`` that of the keys'
#: products (see :mod:`blue_plugin.stats.accumulate`); ``corpus_subset`` how the documents were chosen.
COMPARED_KEYS: tuple[str, ...] = (
    "format_version",
    "model_type",
    "hidden_size",
    "num_layers",
    "weights_fingerprint",
    "tokenizer_fingerprint",
    "module",
    "corpus_name",
    "corpus_sha256",
    "corpus_subset",
    "n_samples",
    "max_length",
    "dtype",
    "mom2_dtype",
)

#: ``kind`` metadata of a cache file: a second moment C_0 (files without ``kind`` are ones) or
#: AlphaEdit's null-space projection P imported from its ``null_space_project.pt``
#: (:mod:`blue_plugin.stats.projection`), which also compares :data:`PROJECTION_KEYS`.
KIND_SECOND_MOMENT = "second_moment"
KIND_PROJECTION = "projection"
PROJECTION_KEYS: tuple[str, ...] = ("kind", "nullspace_threshold")

_TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog. Paris 1889, naïve café — 42%!"
_FINGERPRINT_ELEMENTS = 1 << 16


def _tensor_sample_bytes(t: torch.Tensor) -> bytes:
    """Strided sample of a tensor, rounded to bfloat16 (so fp32/bf16 copies of a model agree)."""
    if t.is_meta:  # offloaded weights (accelerate): only the shape is known
        return b"meta" + str(tuple(t.shape)).encode()
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // _FINGERPRINT_ELEMENTS)
    sample = flat[::stride][:_FINGERPRINT_ELEMENTS].float().to(torch.bfloat16).float().cpu()
    return sample.numpy().tobytes() + str(tuple(t.shape)).encode()


def _module_pattern(name: str) -> str | None:
    """``model.layers.4.mlp.down_proj`` -> regex matching that module in every layer."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    if not idx:
        return None
    i = idx[-1]
    return r"\.".join([re.escape(p) for p in parts[:i]] + [r"\d+"] + [re.escape(p) for p in parts[i + 1:]]) + r"(\.|$)"


def weights_fingerprint(model: nn.Module, module_names: Sequence[str]) -> str:
    """sha256 of strided samples of the weights the statistics depend on but editing leaves alone.

    Covers the input-embedding matrix and every parameter of the first block of the layer stack
    that holds ``module_names`` (attention, norms, MLP input side), except the edited kind of
    module (e.g. ``down_proj`` of every layer), so edits -- sequential ones included -- keep the
    cache valid while a different checkpoint of the same architecture does not.
    """
    h = hashlib.sha256()
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is not None and getattr(emb, "weight", None) is not None:
        h.update(b"embed")
        h.update(_tensor_sample_bytes(emb.weight))
    excluded = [re.compile(p) for p in {_module_pattern(n) for n in module_names} if p]
    prefixes = set()
    for n in module_names:
        parts = n.split(".")
        idx = [i for i, p in enumerate(parts) if p.isdigit()]
        if idx:
            prefixes.add(".".join(parts[: idx[-1]]) + ".0.")
    for pname, p in model.named_parameters():
        if not any(pname.startswith(pre) for pre in prefixes):
            continue
        if any(rx.match(pname) for rx in excluded):
            continue
        h.update(pname.encode())
        h.update(_tensor_sample_bytes(p))
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's class, size and its ids for a fixed probe sentence."""
    try:
        ids = tokenize(tok, [_TOKENIZER_PROBE], 4096)[0]
    except Exception as e:  # a tokenizer that cannot even encode the probe fails later anyway
        ids = [f"error:{type(e).__name__}"]
    try:
        size = len(tok)
    except TypeError:
        size = -1
    blob = json.dumps([type(tok).__name__, size, ids])
    return hashlib.sha256(blob.encode()).hexdigest()


def model_identity(model: nn.Module, model_id: str | None = None) -> dict[str, str]:
    """Informational id (``model_id`` or ``config.name_or_path``) plus compared shape fields."""
    config = getattr(model, "config", None)
    name = model_id or getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or "model"
    return {
        "model_id": str(name),
        "model_type": str(getattr(config, "model_type", "") or ""),
        "hidden_size": str(getattr(config, "hidden_size", "") or ""),
        "num_layers": str(getattr(config, "num_hidden_layers", "") or ""),
    }


def request_metadata(
    model: nn.Module,
    tok,
    module_name: str,
    corpus: str,
    texts: Sequence[str] | None,
    n_samples: int,
    max_length: int,
    model_id: str | None = None,
    *,
    subset: str = "random",
    mom2_dtype: str = "float32",
    fingerprints: tuple[str, str] | None = None,
) -> dict[str, str]:
    """Metadata that a cache file for this request must carry (all values are strings).

    ``texts`` are the documents read from the corpus (``None`` for a hub corpus); ``subset``
    as in :func:`blue_plugin.stats.corpus.read_corpus`. The keys in :data:`COMPARED_KEYS` must
    match a file for it to be used; a written file additionally carries ``count`` (tokens),
    ``n_docs`` and ``d_in``. ``max_length`` should already be the effective one (see
    :func:`blue_plugin.stats.moments.get_second_moments`). ``fingerprints``: the (weights,
    tokenizer) fingerprints when the caller has them already; computed otherwise.
    """
    wfp, tfp = fingerprints or (weights_fingerprint(model, [module_name]), tokenizer_fingerprint(tok))
    meta = {"format_version": CACHE_FORMAT_VERSION}
    meta.update(model_identity(model, model_id))
    meta.update(
        {
            "weights_fingerprint": wfp,
            "tokenizer_fingerprint": tfp,
            "module": module_name,
            "n_samples": str(n_samples),
            "max_length": str(max_length),
            "dtype": "float64",
            "mom2_dtype": check_mom2_dtype(mom2_dtype),
        }
    )
    meta.update(corpus_identity(corpus, texts, subset=subset))
    return meta


def slug(text: str, limit: int = 60) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]`` (other runs become ``_``) and ``limit`` characters, for file names."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    return text[:limit]


def cache_file_name(meta: dict[str, str]) -> str:
    """Readable file name: ``<model>__<module>__<corpus>__n<n_samples>__len<max_length>.safetensors``,
    with ``__first`` before the suffix for the first-documents subset and ``__<mom2_dtype>`` for a
    ``mom2_dtype`` other than float32 (so those requests do not overwrite the default's file)."""
    model = slug(Path(meta["model_id"].rstrip("/\\")).name or meta["model_type"])
    corpus = meta["corpus_name"]
    corpus = corpus.split(":")[0].split("/")[-1] if ":" in corpus else Path(corpus).stem
    extra = "__first" if meta.get("corpus_subset") == "first" else ""
    extra += f"__{slug(meta['mom2_dtype'])}" if meta.get("mom2_dtype", "float32") != "float32" else ""
    return (
        f"{model}__{slug(meta['module'], 100)}__{slug(corpus)}"
        f"__n{meta['n_samples']}__len{meta['max_length']}{extra}.safetensors"
    )


def projection_file_name(meta: dict[str, str], threshold: float) -> str:
    """The projection file of a request: :func:`cache_file_name` with ``__P_thr<threshold>``
    before the suffix (``threshold``: the ``nullspace_threshold`` P was computed with)."""
    return cache_file_name(meta).replace(".safetensors", f"__P_thr{slug(format(float(threshold), 'g'))}.safetensors")


def _sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def save_moment(path: str | Path, mean: torch.Tensor, meta: dict[str, str]) -> None:
    """Write ``mean`` (float64, d x d) with ``meta`` atomically: temp file in the same
    directory, fsync, then ``os.replace``. The tensor's sha256 is stored in the metadata."""
    path = Path(path)
    tensor = mean.detach().to("cpu", torch.float64).contiguous()
    meta = dict(meta)
    meta["d_in"] = str(tensor.shape[0])
    meta["tensor_sha256"] = _sha256_tensor(tensor)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file({TENSOR_KEY: tensor}, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_moment(
    path: str | Path,
    expected: dict[str, str],
    device: torch.device | str = "cpu",
    d_in: int | None = None,
    kind: str = KIND_SECOND_MOMENT,
) -> torch.Tensor | None:
    """Read a cache file if it is intact and matches ``expected``; otherwise log a warning and
    return ``None`` (caller recomputes). Never raises for a bad file.

    Checks: readable safetensors of ``kind`` (:data:`KIND_SECOND_MOMENT` or
    :data:`KIND_PROJECTION`), all :data:`COMPARED_KEYS` (and for a projection
    :data:`PROJECTION_KEYS`) equal, a float64 square tensor of side ``d_in`` (when given) equal to
    the stored ``d_in``, its sha256 equal to the stored one, finite values, positive token count
    (second moments).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("kind", KIND_SECOND_MOMENT) != kind:
                logger.warning("statistics cache %s holds a %s, not a %s; not used", path,
                               meta.get("kind", KIND_SECOND_MOMENT), kind)
                return None
            compared = COMPARED_KEYS + (PROJECTION_KEYS if kind == KIND_PROJECTION else ())
            diff = [k for k in compared if meta.get(k) != expected.get(k)]
            if diff:
                details = ", ".join(f"{k}: file {meta.get(k)!r} != wanted {expected.get(k)!r}" for k in diff[:4])
                logger.warning("statistics cache %s is for another request (%s); recomputing", path, details)
                return None
            tensor = f.get_tensor(TENSOR_KEY)
        side = int(meta.get("d_in", "-1"))
        problems = []
        if tensor.dtype != torch.float64 or tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
            problems.append(f"tensor {tuple(tensor.shape)} {tensor.dtype} is not a float64 square matrix")
        elif tensor.shape[0] != side or (d_in is not None and side != d_in):
            problems.append(f"size {tensor.shape[0]} does not match d_in {side if d_in is None else d_in}")
        elif _sha256_tensor(tensor) != meta.get("tensor_sha256"):
            problems.append("checksum mismatch (corrupted data)")
        elif not torch.isfinite(tensor).all():
            problems.append("non-finite values")
        elif kind == KIND_SECOND_MOMENT and int(meta.get("count", "0")) < 1:
            problems.append("no token count")
        if problems:
            logger.warning("statistics cache %s is invalid (%s); recomputing", path, problems[0])
            return None
    except Exception as e:  # truncated / garbled files surface as many exception types
        logger.warning("statistics cache %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None
    return tensor.to(device)


def expected_d_in(module: nn.Module) -> int | None:
    """d_in from the module when it says so (Linear.in_features, GPT-2 Conv1D.nx)."""
    for attr in ("in_features", "nx"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def written_metadata(meta: dict[str, str], module: nn.Module, count: int, n_docs: int, **extra: str) -> dict[str, str]:
    """``meta`` (from :func:`request_metadata`) plus what a written file records about the pass:
    token ``count``, ``n_docs`` and the module's ``model_dtype`` (and any ``extra`` strings)."""
    out = {**meta, "count": str(count), "n_docs": str(n_docs),
           "model_dtype": str(next(module.parameters(), torch.empty(0)).dtype)}
    out.update({k: str(v) for k, v in extra.items()})
    return out


def acquire_cache_lock(cache_dir: Path, meta: dict[str, str]):
    """Take (blocking) the file lock that guards computing the files of one request
    (model, corpus, n_samples, max_length) in ``cache_dir``; returns the held
    ``filelock.FileLock`` -- call ``release()`` when done."""
    lock_name = cache_file_name({**meta, "module": "all"}).replace(".safetensors", ".lock")
    lock_dir = Path(cache_dir) / ".locks"  # lock files stay (deleting them is racy); keep them apart
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_dir / lock_name))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logger.info("waiting for another process computing statistics (lock %s)", lock_dir / lock_name)
        lock.acquire()
    return lock
