"""Second-moment statistics C_0 = E[k k^T] of the keys of FFN output projections.

A *key* k is the input of an FFN output projection (``down_proj`` / ``c_proj`` / ``fc_out``)
at one token: the ``d_in``-dimensional activation (``d_in`` = the MLP width, e.g. 1536 for
SmolLM2, 4 * n_embd for GPT-2). Locate-then-edit methods need C_0 over general text.

Three layers of API:

* :func:`read_corpus` (from :mod:`blue_plugin.stats.corpus`) -- ``n_samples`` documents of a local
  text / ``.jsonl`` file, ``wikipedia`` / ``wikitext`` through the ``datasets`` package, the
  ``wordnet`` glosses, text ``sampled`` from the model (:func:`sample_corpus`, in this module
  because it runs the model) or a combination such as ``wordnet+sampled``; a seeded random
  subset by default (``subset="first"``: the first documents).
* :func:`collect_second_moments` -- float64 *sums* of k k^T and token *counts* for several
  modules in one forward pass per batch that stops right after the last needed module.
  Sums and counts (not means) so that a distributed caller can all-reduce them.
* :func:`get_second_moments` -- means E[k k^T] with a validated on-disk safetensors cache
  (one file per model, module, corpus, subset, sample count, max length and ``mom2_dtype``),
  atomic writes and a file lock.

``mom2_dtype`` (the hyperparameter; MEMIT's ``layer_stats(precision=...)``, which casts the keys
to it and keeps its running sum in it) is here the dtype the keys are cast to before their
products are formed: ``"float32"`` (default): float32 products, summed in float32 over at most
:data:`_PARTIAL_TOKENS` tokens and then into a float64 total (on a CUDA device where TF32 is
allowed for float32 matmuls the products are formed in float64 instead, so a global TF32 switch
cannot lower the precision); ``"float64"``: float64 throughout (about twice the CPU time);
``"float16"`` / ``"bfloat16"``: the keys are rounded to that dtype, the products then formed as for
float32 -- never summed in 16 bits. The total is always float64 (MEMIT keeps it in ``precision``:
a float32 sum over millions of tokens loses digits; ours does not), and so is the stored mean.

Cache files are plain safetensors holding one float64 tensor ``"mom2"`` (d_in x d_in, the mean)
and string metadata (see :func:`request_metadata`). Nothing is ever unpickled.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .corpus import (  # noqa: F401 -- re-exported: callers import these from blue_plugin.stats.moments
    DEFAULT_SEED,
    HF_CORPORA,
    SUBSETS,
    _check_positive_int,
    _is_hf_corpus,
    _read_hf_corpus,
    _read_local_corpus,
    _resolve_path,
    corpus_identity,
    read_corpus,
)
from ..model.devices import accumulation_device, input_device, module_device
from ..model.tokens import pad_token_id

logger = logging.getLogger(__name__)

#: Bumped whenever the meaning or layout of a cache file changes; older files are recomputed.
#: 2: documents are a seeded random subset by default (``corpus_subset``), ``mom2_dtype`` recorded.
CACHE_FORMAT_VERSION = "2"

#: Name of the tensor inside a cache file.
TENSOR_KEY = "mom2"

#: Accepted ``mom2_dtype`` values and the dtype the keys are cast to.
MOM2_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
}

#: Metadata keys that must match between a cache file and the current request.
#: The others (model id, corpus path and size, token count, ...) are informational. ``dtype`` is
#: that of the total and of the stored mean (always float64); ``mom2_dtype`` that of the keys'
#: products (see the module docstring); ``corpus_subset`` how the documents were chosen.
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

_TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog. Paris 1889, naïve café — 42%!"
_FINGERPRINT_ELEMENTS = 1 << 16


class _StopForward(Exception):
    """Raised from a hook once every requested module has seen its input for this batch."""


# ---------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------


def _validate_module_names(model: nn.Module, module_names: Iterable[str]) -> list[str]:
    """Deduplicated names in the given order; ValueError (with close matches) for unknown ones."""
    if isinstance(module_names, str):
        module_names = [module_names]
    names = list(dict.fromkeys(module_names))
    if not names:
        raise ValueError("module_names is empty; pass e.g. ['model.layers.4.mlp.down_proj']")
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(name, str) or name not in modules:
            close = difflib.get_close_matches(str(name), list(modules), n=3, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"module {name!r} does not exist in the model{hint}")
    return names


#: Tokens summed in a float32 partial sum before it is added to the float64 total.
_PARTIAL_TOKENS = 4096


#: Blocks per side of the block-triangular k^T k (see :func:`add_lower_gram_`).
_GRAM_BLOCKS = 4


def _gram_bounds(d: int, blocks: int = _GRAM_BLOCKS) -> list[tuple[int, int]]:
    step = -(-d // blocks)
    return [(a, min(a + step, d)) for a in range(0, d, step)]


def add_lower_gram_(acc: torch.Tensor, k: torch.Tensor, blocks: int = _GRAM_BLOCKS) -> torch.Tensor:
    """``acc += k^T k`` on the diagonal blocks and the blocks below them only (k^T k is
    symmetric: with 4 blocks per side this is 10 of 16 block products). Finish with
    :func:`symmetrize_lower_`. ``acc``: (d, d); ``k``: (n, d)."""
    bounds = _gram_bounds(k.shape[1], blocks)
    for i, (a, b) in enumerate(bounds):
        for c, e in bounds[: i + 1]:
            acc[a:b, c:e].addmm_(k[:, a:b].T, k[:, c:e])
    return acc


def symmetrize_lower_(acc: torch.Tensor, blocks: int = _GRAM_BLOCKS) -> torch.Tensor:
    """Copy the blocks below the diagonal (filled by :func:`add_lower_gram_`) onto those above it,
    and the lower triangle of each diagonal block onto its upper one (a matrix product's diagonal
    block need not be bitwise symmetric), so the result is exactly symmetric."""
    bounds = _gram_bounds(acc.shape[0], blocks)
    for i, (a, b) in enumerate(bounds):
        diag = acc[a:b, a:b]
        diag.copy_(diag.tril() + diag.tril(-1).T)
        for c, e in bounds[:i]:
            acc[c:e, a:b] = acc[a:b, c:e].T
    return acc


def check_mom2_dtype(mom2_dtype: object) -> str:
    """``mom2_dtype`` if it is one of :data:`MOM2_DTYPES`, else ``ValueError``."""
    if mom2_dtype not in MOM2_DTYPES:
        raise ValueError(f"mom2_dtype must be one of {sorted(MOM2_DTYPES)}, got {mom2_dtype!r}")
    return str(mom2_dtype)


def _tf32_possible(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` may run as TF32 (a CUDA device with TF32 allowed)."""
    if device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    try:
        if getattr(matmul, "fp32_precision", None) == "tf32":
            return True
        return bool(matmul.allow_tf32)
    except RuntimeError:  # legacy and new TF32 settings mixed: torch refuses to say; assume it may be on
        return True


def _product_dtype(device: torch.device, mom2_dtype: str = "float32") -> torch.dtype:
    """dtype in which k^T k is formed and summed before it goes into the float64 total: float64
    for ``mom2_dtype="float64"``, else float32 (about twice as fast as float64 on the CPU; a
    partial sum covers at most :data:`_PARTIAL_TOKENS` tokens and loses ~1e-7 relative, far
    below what C0 needs) -- except on a CUDA device that may run float32 matmuls as TF32, where
    it is float64, so a global TF32 switch cannot lower the precision of the statistics."""
    if MOM2_DTYPES[check_mom2_dtype(mom2_dtype)] == torch.float64 or _tf32_possible(device):
        return torch.float64
    return torch.float32


class _GramSum:
    """Running sum of k^T k for one module, returned in float64 by :meth:`result`.

    Keys are cast to ``mom2_dtype`` (rounding them for float16 / bfloat16), then to the
    product dtype (:func:`_product_dtype`). Products go onto the lower block triangle only
    (:func:`add_lower_gram_`), mirrored at the end: in float32, into a partial sum moved into
    the float64 total every :data:`_PARTIAL_TOKENS` tokens; in float64, straight into the total."""

    def __init__(self, d: int, device: torch.device, mom2_dtype: str = "float32"):
        self.key_dtype = MOM2_DTYPES[check_mom2_dtype(mom2_dtype)]
        self.dtype = _product_dtype(device, mom2_dtype)
        self.total = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.part = torch.zeros(d, d, dtype=self.dtype, device=device) if self.dtype != torch.float64 else None
        self.part_tokens = 0

    def add(self, k: torch.Tensor) -> None:
        k = k.to(self.key_dtype).to(self.dtype)
        if self.part is None:
            add_lower_gram_(self.total, k)
            return
        add_lower_gram_(self.part, k)
        self.part_tokens += k.shape[0]
        if self.part_tokens >= _PARTIAL_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self.part is not None and self.part_tokens:
            self.total.add_(self.part)
            self.part.zero_()
            self.part_tokens = 0

    def result(self) -> torch.Tensor:
        self._flush()
        self.part = None
        return symmetrize_lower_(self.total)


def _effective_max_length(model: nn.Module, max_length: int) -> int:
    _check_positive_int(max_length, "max_length")
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        logger.warning("max_length %d exceeds the model's %d positions; using %d", max_length, limit, limit)
        return limit
    return max_length


def _tokenize(tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text (tokenizer defaults for special tokens), truncated to ``max_length``."""
    enc = tok(list(texts), truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    out = []
    for row in ids:
        row = [int(t) for t in row][:max_length]
        out.append(row)
    return out


def collect_second_moments(
    model: nn.Module,
    tok,
    module_names: list[str],
    texts: list[str],
    max_length: int,
    batch_size: int = 16,
    progress: bool = True,
    *,
    mom2_dtype: str = "float32",
) -> dict[str, tuple[torch.Tensor, int]]:
    """Sum of k k^T and token count of the inputs of several modules, in one pass per batch.

    Each batch of texts is tokenised (tokenizer defaults, truncated to ``max_length``), right
    padded and run through ``model`` once under ``torch.no_grad`` in eval mode (the training
    flag is restored afterwards). Forward pre-hooks on all ``module_names`` record their input
    at the real (non-padding) tokens; the hook of the last module to run raises a private
    exception that ends the pass, so layers above the highest needed one never execute.
    Texts are processed longest first (less padding); the sums do not depend on the order.
    The keys are cast to ``mom2_dtype`` and k^T k is summed in float32 over up to
    :data:`_PARTIAL_TOKENS` tokens, then added to the float64 total (float64 throughout for
    ``mom2_dtype="float64"`` or where TF32 could apply, see :func:`_product_dtype`).

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...)``); not modified.
        tok: a Hugging Face tokenizer (callable with ``truncation`` / ``max_length``,
            returning ``input_ids``).
        module_names: full dotted names, e.g. ``"model.layers.4.mlp.down_proj"`` (Linear) or
            ``"transformer.h.2.mlp.c_proj"`` (GPT-2 Conv1D). Duplicates are ignored.
        texts: documents; texts that tokenise to nothing are skipped.
        max_length: tokens per text (positive; capped at the model's position limit).
        batch_size: texts per forward pass (positive).
        progress: show a tqdm progress bar.
        mom2_dtype: ``"float32"`` (default), ``"float64"``, ``"bfloat16"`` or ``"float16"``: the
            dtype the keys are cast to before their products (see the module docstring).

    Returns:
        ``{name: (S, n)}``: S = sum over real tokens of k k^T, float64, shape (d_in, d_in),
        on the device of the module's input (CPU where that device lacks float64);
        n = number of tokens (Python int). The mean is ``S / n``.

    Raises:
        ValueError: unknown module (close matches listed), empty inputs, non-positive sizes,
            no tokens at all, or a module that the forward pass never calls.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    names = _validate_module_names(model, module_names)
    _check_positive_int(batch_size, "batch_size")
    check_mom2_dtype(mom2_dtype)
    max_length = _effective_max_length(model, max_length)
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings (e.g. from read_corpus)")
    modules = dict(model.named_modules())

    ids = [row for row in _tokenize(tok, texts, max_length) if row]
    if not ids:
        raise ValueError("no text produced any token; check the corpus and the tokenizer")
    ids.sort(key=len, reverse=True)  # longest first: least padding, memory peak shows early
    pad_id = pad_token_id(tok)
    device = input_device(model)

    grams: dict[str, _GramSum] = {}
    counts: dict[str, int] = {name: 0 for name in names}
    state: dict[str, object] = {"pending": set(), "mask": None, "index": {}}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            pending: set = state["pending"]  # type: ignore[assignment]
            if name not in pending:  # module called twice in one pass: first call counts
                return None
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            mask: torch.Tensor = state["mask"]  # type: ignore[assignment]
            if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x.reshape(-1, x.shape[-1])
            elif x.dim() == 2 and x.shape[0] == mask.numel():
                pass
            else:
                raise RuntimeError(
                    f"input of {name} has shape {tuple(x.shape)}, which does not line up with the "
                    f"(batch, sequence) shape {tuple(mask.shape)}; cannot tell real tokens from padding"
                )
            acc_device = accumulation_device(x.device)
            index_cache: dict = state["index"]  # type: ignore[assignment]
            if x.device not in index_cache:
                index_cache[x.device] = state["flat_index"].to(x.device, non_blocking=True)  # type: ignore[union-attr]
            k = x.index_select(0, index_cache[x.device]).to(device=acc_device)
            if name not in grams:
                grams[name] = _GramSum(k.shape[1], acc_device, mom2_dtype)
            grams[name].add(k)
            counts[name] += int(state["n_tokens"])  # type: ignore[arg-type]
            pending.discard(name)
            if not pending:
                raise _StopForward
            return None

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n), with_kwargs=True) for n in names]
    was_training = model.training
    n_batches = (len(ids) + batch_size - 1) // batch_size
    try:
        model.eval()
        with torch.no_grad(), tqdm(
            total=n_batches, desc="second moments", unit="batch", disable=not progress
        ) as bar:
            total = 0
            for start in range(0, len(ids), batch_size):
                rows = ids[start:start + batch_size]
                width = max(len(r) for r in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, r in enumerate(rows):
                    input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                    mask[i, : len(r)] = 1
                state["pending"] = set(names)
                state["mask"] = mask
                state["flat_index"] = mask.reshape(-1).nonzero().squeeze(1)
                state["index"] = {}
                state["n_tokens"] = int(mask.sum())
                try:
                    model(
                        input_ids=input_ids.to(device),
                        attention_mask=mask.to(device),
                        use_cache=False,
                    )
                except _StopForward:
                    pass
                if state["pending"]:
                    raise ValueError(
                        f"modules {sorted(state['pending'])} were never called in the forward pass; "
                        "pass the FFN output projections (e.g. 'model.layers.4.mlp.down_proj')"
                    )
                total += int(state["n_tokens"])  # type: ignore[arg-type]
                bar.update(1)
                bar.set_postfix(tokens=total, refresh=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        state.clear()
    sums = {name: grams[name].result() for name in names}
    grams.clear()
    bad = [name for name in names if not torch.isfinite(sums[name]).all()]
    if bad:
        raise ValueError(
            f"the key statistics of {', '.join(bad)} are not finite: the model produces NaN/inf activations "
            "(check its weights for NaN/inf)" + (" or keys overflow float16 (use mom2_dtype float32)"
                                                 if mom2_dtype == "float16" else "") + "; nothing was cached."
        )
    return {name: (sums[name], counts[name]) for name in names}


# ---------------------------------------------------------------------------------------------
# Metadata and cache files
# ---------------------------------------------------------------------------------------------


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
        ids = _tokenize(tok, [_TOKENIZER_PROBE], 4096)[0]
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
    _fingerprints: tuple[str, str] | None = None,
) -> dict[str, str]:
    """Metadata that a cache file for this request must carry (all values are strings).

    ``texts`` are the documents read from the corpus (``None`` for a hub corpus); ``subset``
    as in :func:`read_corpus`. The keys in :data:`COMPARED_KEYS` must match a file for it to
    be used; a written file additionally carries ``count`` (tokens), ``n_docs`` and ``d_in``.
    ``max_length`` should already be the effective one (see :func:`get_second_moments`).
    """
    wfp, tfp = _fingerprints or (weights_fingerprint(model, [module_name]), tokenizer_fingerprint(tok))
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


def _slug(text: str, limit: int = 60) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    return text[:limit]


def cache_file_name(meta: dict[str, str]) -> str:
    """Readable file name: ``<model>__<module>__<corpus>__n<n_samples>__len<max_length>.safetensors``,
    with ``__first`` before the suffix for the first-documents subset and ``__<mom2_dtype>`` for a
    ``mom2_dtype`` other than float32 (so those requests do not overwrite the default's file)."""
    model = _slug(Path(meta["model_id"].rstrip("/\\")).name or meta["model_type"])
    corpus = meta["corpus_name"]
    corpus = corpus.split(":")[0].split("/")[-1] if ":" in corpus else Path(corpus).stem
    extra = "__first" if meta.get("corpus_subset") == "first" else ""
    extra += f"__{_slug(meta['mom2_dtype'])}" if meta.get("mom2_dtype", "float32") != "float32" else ""
    return (
        f"{model}__{_slug(meta['module'], 100)}__{_slug(corpus)}"
        f"__n{meta['n_samples']}__len{meta['max_length']}{extra}.safetensors"
    )


def _sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def save_moment(path: str | Path, mean: torch.Tensor, meta: dict[str, str]) -> None:
    """Write ``mean`` (float64, d x d) with ``meta`` atomically: temp file in the same
    directory, fsync, then ``os.replace``. The tensor's sha256 is stored in the metadata."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    tensor = mean.detach().to("cpu", torch.float64).contiguous()
    meta = dict(meta)
    meta["d_in"] = str(tensor.shape[0])
    meta["tensor_sha256"] = _sha256_tensor(tensor)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({TENSOR_KEY: tensor}, tmp, metadata=meta)
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
) -> torch.Tensor | None:
    """Read a cache file if it is intact and matches ``expected``; otherwise log a warning and
    return ``None`` (caller recomputes). Never raises for a bad file.

    Checks: readable safetensors, all :data:`COMPARED_KEYS` equal, a float64 square tensor of
    side ``d_in`` (when given) equal to the stored ``d_in``, its sha256 equal to the stored one,
    finite values, positive token count.
    """
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            diff = [k for k in COMPARED_KEYS if meta.get(k) != expected.get(k)]
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
        elif int(meta.get("count", "0")) < 1:
            problems.append("no token count")
        if problems:
            logger.warning("statistics cache %s is invalid (%s); recomputing", path, problems[0])
            return None
    except Exception as e:  # truncated / garbled files surface as many exception types
        logger.warning("statistics cache %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None
    return tensor.to(device)


def _expected_d_in(module: nn.Module) -> int | None:
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
    import filelock  # noqa: PLC0415

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


def _mean(name: str, total: torch.Tensor, count: int) -> torch.Tensor:
    """``total / count``, warning when fewer tokens than dimensions make the result singular."""
    if count < total.shape[0]:
        logger.warning(
            "second moment of %s comes from %d tokens, fewer than its dimension %d: it is singular, and "
            "MEMIT-style solves may fail or give huge updates; raise mom2_n_samples (or mom2_max_length)",
            name, count, total.shape[0])
    return total / count


def get_second_moments(
    model: nn.Module,
    tok,
    module_names: list[str],
    corpus: str,
    n_samples: int,
    max_length: int,
    cache_dir: str | Path | None,
    model_id: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    *,
    mom2_dtype: str = "float32",
    subset: str = "random",
) -> dict[str, torch.Tensor]:
    """E[k k^T] of the inputs of ``module_names`` over ``n_samples`` documents of ``corpus``
    (a seeded random subset by default), from the cache where valid, all missing modules
    computed in one pass.

    Args:
        model, tok, module_names, max_length, batch_size, progress, mom2_dtype: as in
            :func:`collect_second_moments`.
        corpus, n_samples, subset: as in :func:`read_corpus` (``corpus`` is what
            ``mom2_dataset`` holds). Any corpus but a single hub corpus is always read to
            fingerprint the documents used (for ``sampled`` that generates the text once, then
            reads its cache file); a hub corpus only when something must be computed.
        cache_dir: directory for the cache files (created if missing); ``None`` disables caching
            of the statistics (a ``sampled`` corpus is cached regardless, see :func:`read_sampled`).
        model_id: readable model name for file names and metadata (default:
            ``config.name_or_path``).

    Returns:
        ``{name: C}``, C float64 (d_in x d_in), on the device of the module's parameters (CPU for
        devices without float64, e.g. MPS).

    Cache files (one per module) hold the mean and the metadata of :func:`request_metadata`.
    A file that is truncated, corrupted or made for another request (model weights, tokenizer,
    corpus text and subset, sample count, max length, ``mom2_dtype``, format) is reported with a
    warning and recomputed.
    Computing and writing happen under a ``filelock.FileLock`` per (model, corpus, n, length),
    so concurrent processes compute each file once; writes are atomic.
    """
    names = _validate_module_names(model, module_names)
    _check_positive_int(n_samples, "n_samples")
    _check_positive_int(batch_size, "batch_size")
    check_mom2_dtype(mom2_dtype)
    max_length = _effective_max_length(model, max_length)
    modules = dict(model.named_modules())
    devices = {n: accumulation_device(module_device(model, modules[n])) for n in names}

    def read() -> list[str]:
        return read_corpus(corpus, n_samples, subset=subset, model=model, tok=tok, max_length=max_length,
                           progress=progress)

    hub = _is_hf_corpus(str(corpus))
    texts: list[str] | None = None if hub else read()

    if cache_dir is None:
        if texts is None:
            texts = read()
        raw = collect_second_moments(model, tok, names, texts, max_length, batch_size, progress,
                                     mom2_dtype=mom2_dtype)
        return {n: _mean(n, s, c).to(devices[n]) for n, (s, c) in raw.items()}

    cache_dir = Path(os.path.expanduser(os.fspath(cache_dir)))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the statistics cache directory {str(cache_dir)!r}: {e}") from e

    fingerprints = {n: weights_fingerprint(model, [n]) for n in names}
    tfp = tokenizer_fingerprint(tok)
    metas = {
        n: request_metadata(model, tok, n, corpus, texts, n_samples, max_length, model_id,
                            subset=subset, mom2_dtype=mom2_dtype, _fingerprints=(fingerprints[n], tfp))
        for n in names
    }
    paths = {n: cache_dir / cache_file_name(metas[n]) for n in names}

    def try_load(pending: Iterable[str]) -> dict[str, torch.Tensor]:
        found = {}
        for n in pending:
            t = load_moment(paths[n], metas[n], devices[n], _expected_d_in(modules[n]))
            if t is not None:
                found[n] = t
        return found

    result = try_load(names)
    missing = [n for n in names if n not in result]
    if missing:
        lock = acquire_cache_lock(cache_dir, metas[missing[0]])
        try:
            result.update(try_load(missing))  # another process may have written them meanwhile
            missing = [n for n in names if n not in result]
            if missing:
                if texts is None:
                    texts = read()
                logger.info("computing second moments for %s over %d documents", missing, len(texts))
                raw = collect_second_moments(model, tok, missing, texts, max_length, batch_size, progress,
                                             mom2_dtype=mom2_dtype)
                for n in missing:
                    s, c = raw[n]
                    mean = _mean(n, s, c)
                    meta = written_metadata(metas[n], modules[n], c, len(texts))
                    try:
                        save_moment(paths[n], mean, meta)
                        logger.info("wrote %s (%d tokens)", paths[n], c)
                    except OSError as e:
                        logger.warning("could not write statistics cache %s (%s); continuing uncached", paths[n], e)
                    result[n] = mean.to(devices[n])
        finally:
            lock.release()
    return {n: result[n] for n in names}


# ---------------------------------------------------------------------------------------------
# Sampled corpus: text written by the model (the ``sampled`` source of read_corpus)
# ---------------------------------------------------------------------------------------------

#: Neutral one-word starts of the sampled documents (document i starts with entry i % 16).
SAMPLED_STARTS: tuple[str, ...] = ("The", "A", "In", "It", "This", "On", "When", "He", "She", "They",
                                   "We", "There", "After", "One", "Many", "For")
SAMPLED_TOP_K = 50
SAMPLED_TEMPERATURE = 1.0
#: Part of the sampled corpus' cache key; bump when the sampling procedure changes.
SAMPLED_VERSION = "1"
#: Documents per generation batch (the text does not depend on it).
SAMPLED_BATCH = 64
_FFN_OUT_0 = re.compile(r"\.0\.mlp\.(down_proj|c_proj|fc_out|dense_4h_to_h)$")


def sampled_cache_path(model, tok, n: int, max_length: int, seed: int = DEFAULT_SEED,
                       cache_dir: str | Path | None = None) -> Path:
    """Cache file of a sampled corpus: ``<root>/corpus/sampled/<model type>__<key>__n<n>__len<L>
    __seed<s>__v<version>.jsonl``; ``key`` hashes the weights fingerprint of the statistics cache
    (embeddings and first block, FFN output projections excluded, so edits keep the file) and the
    tokenizer fingerprint."""
    if cache_dir is None:
        from ..model.loading import default_cache_dir  # noqa: PLC0415

        cache_dir = default_cache_dir()
    ffn = [name for name, _ in model.named_modules() if _FFN_OUT_0.search(name)]
    key = hashlib.sha256((weights_fingerprint(model, ffn[:1]) + tokenizer_fingerprint(tok)).encode()).hexdigest()
    kind = _slug(str(getattr(getattr(model, "config", None), "model_type", "") or "model"), 40)
    name = f"{kind}__{key[:16]}__n{n}__len{max_length}__seed{seed}__v{SAMPLED_VERSION}.jsonl"
    return Path(os.path.expanduser(os.fspath(cache_dir))) / "corpus" / "sampled" / name


def read_sampled(model, tok, n: int, max_length: int, seed: int = DEFAULT_SEED,
                 cache_dir: str | Path | None = None, progress: bool = False) -> list[str]:
    """The sampled corpus of ``model``: read from its cache file (:func:`sampled_cache_path`) if
    that holds ``n`` documents, else generated (:func:`sample_corpus`) and written atomically."""
    if model is None or tok is None:
        raise ValueError("corpus 'sampled' is text generated by the model: pass model= and tok= to "
                         "read_corpus (get_second_moments does)")
    _check_positive_int(max_length, "max_length")
    path = sampled_cache_path(model, tok, n, max_length, seed, cache_dir)
    if path.is_file():
        try:
            docs = _read_local_corpus(path)
            if len(docs) == n:
                return docs
            problem = f"{len(docs)} documents instead of {n}"
        except (ValueError, OSError) as e:
            problem = str(e)
        logger.warning("sampled corpus cache %s is invalid (%s); generating it again", path, problem)
    logger.info("generating the sampled corpus: %d documents of up to %d tokens from the model (seed %d)",
                n, max_length, seed)
    docs = sample_corpus(model, tok, n, max_length, seed, progress=progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        logger.info("wrote %s", path)
    except OSError as e:
        logger.warning("could not write the sampled corpus cache %s (%s); continuing uncached", path, e)
    return docs


def _doc_seed(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "little") >> 1


def sample_corpus(model, tok, n: int, max_length: int, seed: int = DEFAULT_SEED,
                  batch_size: int = SAMPLED_BATCH, progress: bool = False) -> list[str]:
    """``n`` documents written by ``model`` itself: a data-free corpus for C_0.

    Why: C_0 stands for the keys the model meets on general text; the model's own samples are
    text of its own distribution, so their keys need no data shipped or downloaded (and no
    Wikipedia). One-word starts rather than BOS alone: a chat model started from BOS alone tends
    to write chat-template text.

    How: document ``i`` starts from the neutral word ``SAMPLED_STARTS[i % 16]`` ("The", "A",
    "In", ...; tokenised with the tokenizer's defaults, so a BOS token comes first where the
    tokenizer adds one) and continues by top-k sampling (k = 50, temperature 1) until a special
    token (EOS, the model's EOS ids, BOS, padding, ...) or ``max_length`` tokens in all (start
    included): the statistics' length, so the documents fill the positions C_0 covers. Its
    random numbers come from its own ``torch.Generator`` seeded from ``(seed, i)``, so the text
    depends neither on the global RNG state nor on the batching (``batch_size`` documents with
    the same start run together, with a KV cache) nor on ``n`` (document ``i`` is the same for
    every ``n > i``); it does depend on the device and the torch version through the logits.
    The text is decoded without special tokens and stripped; the start word keeps it non-empty.
    Runs under ``torch.no_grad`` in eval mode (the training flag is restored). Cost: one forward
    pass of the whole model per token, e.g. ~90 tokens/s for SmolLM2-135M on one CPU core.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    _check_positive_int(n, "n")
    _check_positive_int(max_length, "max_length")
    device = input_device(model)
    stops = [tok.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
             *getattr(tok, "all_special_ids", [])]
    eos = {t for t in stops for t in (t if isinstance(t, (list, tuple)) else [t]) if isinstance(t, int)}
    starts = [list(tok(s)["input_ids"]) or [tok.bos_token_id] for s in SAMPLED_STARTS]
    jobs = []
    for s in range(len(starts)):
        rows = list(range(s, n, len(starts)))
        jobs += [(s, rows[j:j + batch_size]) for j in range(0, len(rows), batch_size)]
    texts: list[str] = [""] * n
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for s, rows in tqdm(jobs, desc="sampling corpus", unit="batch", disable=not progress):
                prompt = starts[s]
                u = torch.stack([torch.rand(max_length, generator=torch.Generator().manual_seed(_doc_seed(seed, i)))
                                 for i in rows])
                for i, gen in zip(rows, _sample_rows(model, prompt, u, max_length - len(prompt), eos, device)):
                    texts[i] = tok.decode(prompt + gen, skip_special_tokens=True).strip() or SAMPLED_STARTS[s]
    finally:
        model.train(was_training)
    return texts


def _sample_rows(model, prompt: list[int], u: torch.Tensor, steps: int, eos: set[int], device) -> list[list[int]]:
    """Continue ``prompt`` in ``len(u)`` rows for up to ``steps`` tokens; row r draws token t by
    inverting the top-k CDF at ``u[r, t]``. Each row is cut before its first EOS token."""
    x = torch.tensor([prompt] * u.shape[0], dtype=torch.long, device=device)
    # the key/value cache argument: ``cache`` in recent transformers, ``past_key_values`` before
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, out = None, []
    done = torch.zeros(u.shape[0], dtype=torch.bool)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long)
    for t in range(max(0, steps)):
        res = model(input_ids=x, use_cache=True, **{cache_kw: past})
        past = getattr(res, "cache", None)
        past = getattr(res, "past_key_values", None) if past is None else past
        vals, idx = res.logits[:, -1].float().cpu().topk(min(SAMPLED_TOP_K, res.logits.shape[-1]), dim=-1)
        cdf = torch.softmax(vals / SAMPLED_TEMPERATURE, dim=-1).cumsum(-1)
        pick = (cdf < u[:, t:t + 1] * cdf[:, -1:]).sum(-1).clamp_max(idx.shape[1] - 1)
        nxt = idx.gather(1, pick[:, None])
        out.append(nxt)
        done |= torch.isin(nxt[:, 0], eos_t)
        if bool(done.all()):
            break
        x = nxt.to(device)
    rows = torch.cat(out, 1).tolist() if out else [[] for _ in range(u.shape[0])]
    return [r[: next((j for j, tk in enumerate(r) if tk in eos), len(r))] for r in rows]


# ---------------------------------------------------------------------------------------------
# Command line: python -m blue_plugin.stats.moments (single process or under torchrun)
# ---------------------------------------------------------------------------------------------

_CLI_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers such as 4,8, got {text!r}") from None
    if not layers or any(x < 0 for x in layers):
        raise ValueError(f"--layers must list non-negative layer indices such as 4,8, got {text!r}")
    return sorted(dict.fromkeys(layers))


def build_arg_parser():
    """Arguments of ``python -m blue_plugin.stats.moments``."""
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(
        prog="python -m blue_plugin.stats.moments",
        description=(
            "Precompute the key second moments C_0 that a BLUE config needs, into the cache the "
            "editing engine reads. Runs in one process, or sharded over processes and nodes under "
            "torchrun (e.g. `torchrun --nproc_per_node 2 -m blue_plugin.stats.moments --hparams ...`)."
        ),
    )
    p.add_argument("--hparams", required=True, help="BLUE YAML config (e.g. hparams/BLUE/smollm2-135m.yaml)")
    p.add_argument("--model", default=None, help="model name or local HF folder (default: the config's model_name)")
    p.add_argument("--layers", default=None,
                   help="comma-separated layers, e.g. 4,8 (default: the layers the config edits)")
    p.add_argument("--n-samples", type=int, default=None, help="corpus documents (default: mom2_n_samples)")
    p.add_argument("--corpus", default=None,
                   help="corpus: a text/.jsonl file, wikipedia, wikitext, wordnet, sampled or a combination such "
                        "as wordnet+sampled (default: mom2_dataset)")
    p.add_argument("--subset", choices=list(SUBSETS), default="random",
                   help="which documents: a seeded random subset (default) or the first ones")
    p.add_argument("--mom2-dtype", choices=sorted(MOM2_DTYPES), default=None,
                   help="dtype the keys are cast to before their products (default: mom2_dtype)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per document (default: mom2_max_length)")
    p.add_argument("--stats-dir", default=None,
                   help="cache folder (default: the config's stats_dir, else <cache>/stats as the engine uses)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per forward pass and process (default 16)")
    p.add_argument("--device", default=None, help="device of this process (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_CLI_DTYPES), default=None,
                   help="model dtype (default: the checkpoint's); sums are float64 regardless")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if valid cache files exist")
    p.add_argument("--report", default=None, help="write a JSON summary (timings per rank, files) here (rank 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m blue_plugin.stats.moments``; returns the exit status.

    Under ``torchrun`` every process runs this; each takes its shard of the corpus, the sums are
    all-reduced and rank 0 writes the cache (see :mod:`blue_plugin.stats.distributed`).
    """
    import sys  # noqa: PLC0415

    from ..model.layout import resolve_layout  # noqa: PLC0415
    from .distributed import distributed_second_moments  # noqa: PLC0415
    from .process_group import RankFailed, init_distributed  # noqa: PLC0415
    from ..hparams import BLUEHyperParams  # noqa: PLC0415
    from ..model.loading import default_cache_dir, load_model  # noqa: PLC0415

    parser = build_arg_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING),
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    info = None
    try:
        if args.threads is not None:
            torch.set_num_threads(_check_positive_int(args.threads, "--threads"))
        hp = BLUEHyperParams.from_hparams(args.hparams)
        changes: dict[str, object] = {}
        if args.model is not None:
            changes["model_name"] = args.model
        if args.n_samples is not None:
            changes["mom2_n_samples"] = args.n_samples
        if args.corpus is not None:
            changes["mom2_dataset"] = args.corpus
        if args.max_length is not None:
            changes["mom2_max_length"] = args.max_length
        if args.mom2_dtype is not None:
            changes["mom2_dtype"] = args.mom2_dtype
        layers = _parse_layers(args.layers) if args.layers is not None else list(hp.edit_layers)
        changes["layers"] = layers
        hp = hp.replace(**changes)
        if not hp.mom2_adjustment:
            logger.warning("%s has mom2_adjustment: false; the engine will not use these statistics", args.hparams)
        _check_positive_int(args.batch_size, "--batch-size")

        info = init_distributed(args.device)
        model, tok = load_model(hp.model_name, device=info.device,
                                dtype=_CLI_DTYPES[args.dtype] if args.dtype else None)
        layout = resolve_layout(model, hp)
        names = [layout.rewrite(layer) for layer in layers]
        # Same cache folder and model id as Editor.ensure_second_moments, so the engine finds the files.
        cache_dir = args.stats_dir or (hp.stats_dir if hp.stats_dir is not None else default_cache_dir() / "stats")
        model_id = str(getattr(model.config, "_name_or_path", None) or hp.model_name)
        run = distributed_second_moments(
            model, tok, names, corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples,
            max_length=hp.mom2_max_length, cache_dir=cache_dir, model_id=model_id,
            batch_size=args.batch_size, progress=not args.no_progress, overwrite=args.overwrite,
            mom2_dtype=hp.mom2_dtype, subset=args.subset,
        )
        if info.is_main:
            tokens = sum(r["tokens"] for r in run.ranks)
            slowest = max((r["seconds"] for r in run.ranks), default=0.0)
            logger.info("%d module(s) computed, %d found in the cache", len(run.computed), len(run.cached))
            if run.computed:
                logger.info(
                    "%d tokens on %d process(es); accumulation %.1fs (slowest rank), %.0f tokens/s in total",
                    tokens, info.world_size, slowest, tokens / slowest if slowest else float("nan"),
                )
            for n in names:
                logger.info("%s -> %s", n, run.paths[n])
            if args.report:
                report = {
                    "model": hp.model_name, "model_id": model_id, "modules": names,
                    "corpus": hp.mom2_dataset, "n_samples": hp.mom2_n_samples, "max_length": hp.mom2_max_length,
                    "subset": args.subset, "mom2_dtype": hp.mom2_dtype,
                    "batch_size": args.batch_size, "world_size": info.world_size, "backend": info.backend,
                    "device": str(info.device), "threads": torch.get_num_threads(),
                    "computed": run.computed, "cached": run.cached, "count": run.count,
                    "ranks": run.ranks, "seconds_total": run.seconds,
                    "paths": {n: str(p) if p is not None else None for n, p in run.paths.items()},
                }
                Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return 0
    except ValueError as e:  # user-fixable (config, corpus, layers, ...)
        logger.error("%s", e)
        return 2
    except RankFailed as e:  # the rank that failed has logged why
        logger.error("%s", e)
        return 1
    finally:
        if info is not None and info.backend is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
