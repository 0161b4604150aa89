"""Second-moment statistics C_0 = E[k k^T] of the keys of FFN output projections.

A *key* k is the input of an FFN output projection (``down_proj`` / ``c_proj`` / ``fc_out``)
at one token: the ``d_in``-dimensional activation (``d_in`` = the MLP width, e.g. 1536 for
SmolLM2, 4 * n_embd for GPT-2). Locate-then-edit methods need C_0 over general text.

Three layers of API:

* :func:`read_corpus` -- the first ``n_samples`` documents of a local text / ``.jsonl`` file or of
  ``wikipedia`` / ``wikitext`` through the ``datasets`` package.
* :func:`collect_second_moments` -- float64 *sums* of k k^T and token *counts* for several
  modules in one forward pass per batch that stops right after the last needed module.
  Sums and counts (not means) so that a distributed caller can all-reduce them.
* :func:`get_second_moments` -- means E[k k^T] with a validated on-disk safetensors cache
  (one file per model, module, corpus, sample count and max length), atomic writes and a
  file lock.

Cache files are plain safetensors holding one float64 tensor ``"mom2"`` (d_in x d_in, the mean)
and string metadata (see :func:`request_metadata`). Nothing is ever unpickled.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .requests import pad_token_id

logger = logging.getLogger(__name__)

#: Bumped whenever the meaning or layout of a cache file changes; older files are recomputed.
CACHE_FORMAT_VERSION = "1"

#: Name of the tensor inside a cache file.
TENSOR_KEY = "mom2"

#: ``source`` names that are read through the ``datasets`` package: (hub id, config, split).
HF_CORPORA: dict[str, tuple[str, str, str]] = {
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", "train"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1", "train"),
}

#: Metadata keys that must match between a cache file and the current request.
#: The others (model id, corpus path and size, token count, ...) are informational.
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
    "n_samples",
    "max_length",
    "dtype",
)

_TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog. Paris 1889, naïve café — 42%!"
_FINGERPRINT_ELEMENTS = 1 << 16


class _StopForward(Exception):
    """Raised from a hook once every requested module has seen its input for this batch."""


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _resolve_path(source: str | os.PathLike[str]) -> Path:
    """``~`` expanded; relative paths are relative to the current directory."""
    return Path(os.path.expanduser(os.fspath(source))).absolute()


def _is_hf_corpus(source: str) -> bool:
    return str(source).strip().lower() in HF_CORPORA and not _resolve_path(source).exists()


def read_corpus(source: str, n_samples: int) -> list[str]:
    """Return the first ``n_samples`` non-empty documents of ``source``, in order.

    Args:
        source: one of
            * a text file: one document per non-empty line (surrounding whitespace stripped);
            * a ``.jsonl`` file: one JSON object per non-empty line with a string field ``text``;
            * ``"wikipedia"`` or ``"wikitext"``: streamed from the Hugging Face hub through the
              ``datasets`` package (see :data:`HF_CORPORA`); needs the package and network.
            ``~`` is expanded; relative paths are relative to the current directory. An
            existing file named like a hub corpus wins over the hub.
        n_samples: how many documents to return (positive). If the corpus has fewer, all of
            them are returned and a warning is logged.

    Raises:
        ValueError: missing path, a directory, a malformed ``.jsonl`` line, an empty corpus,
            ``datasets`` missing or the hub unreachable -- each message says what to fix.
    """
    _check_positive_int(n_samples, "n_samples")
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(
            f"corpus must be a path to a text/.jsonl file or one of {sorted(HF_CORPORA)}, "
            f"got {source!r}"
        )
    if _is_hf_corpus(str(source)):
        docs = _read_hf_corpus(str(source).strip().lower(), n_samples)
    else:
        docs = _read_local_corpus(_resolve_path(source), n_samples)
    if not docs:
        raise ValueError(
            f"corpus {source!r} contains no non-empty documents; pass a file with one document "
            "per line (or a .jsonl file with a 'text' field)"
        )
    if len(docs) < n_samples:
        logger.warning(
            "corpus %r has only %d documents, fewer than the %d requested; using all of them",
            str(source), len(docs), n_samples,
        )
    return docs


def _read_local_corpus(path: Path, n_samples: int) -> list[str]:
    if not path.exists():
        raise ValueError(
            f"corpus file {str(path)!r} does not exist; pass an existing text or .jsonl file "
            f"(relative paths are relative to {os.getcwd()!r}) or one of {sorted(HF_CORPORA)}"
        )
    if not path.is_file():
        raise ValueError(f"corpus path {str(path)!r} is not a regular file; pass a text or .jsonl file")
    is_jsonl = path.suffix.lower() == ".jsonl"
    docs: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if len(docs) >= n_samples:
                break
            line = line.strip()
            if not line:
                continue
            if is_jsonl:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{str(path)!r} line {lineno} is not valid JSON ({e.msg}); a .jsonl corpus "
                        "needs one JSON object with a 'text' field per line"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(
                        f"{str(path)!r} line {lineno} has no string field 'text'; a .jsonl corpus "
                        "needs one JSON object with a 'text' field per line"
                    )
                line = record["text"].strip()
                if not line:
                    continue
            docs.append(line)
    return docs


def _read_hf_corpus(name: str, n_samples: int) -> list[str]:
    hub_id, config, split = HF_CORPORA[name]
    try:
        import datasets  # noqa: PLC0415 -- optional dependency, imported only when needed
    except ImportError:
        raise ValueError(
            f"corpus {name!r} is read through the 'datasets' package, which is not installed: "
            "`pip install datasets`, or pass a local text file instead (e.g. "
            "../shared/data/corpus/wordnet-glosses.txt, or the WordNet glosses from Debian's "
            "wordnet-base package)"
        ) from None
    docs: list[str] = []
    try:
        stream = datasets.load_dataset(hub_id, config, split=split, streaming=True)
        for record in stream:
            text = str(record.get("text", "")).strip()
            if text:
                docs.append(text)
                if len(docs) >= n_samples:
                    break
    except Exception as e:  # network, hub or format errors: all mean "this corpus is unusable"
        raise ValueError(
            f"could not read corpus {name!r} ({hub_id}, {config}) from the Hugging Face hub: "
            f"{type(e).__name__}: {e}. Check network access, or pass a local text file instead"
        ) from e
    return docs


def corpus_identity(source: str, texts: Sequence[str] | None) -> dict[str, str]:
    """Identity of a corpus for cache metadata.

    For a local file: its name, absolute path and size (informational) and the sha256 of the
    documents actually used (``texts``: compared), so moving the file or appending lines after
    the first ``n_samples`` keeps the cache valid while any change to the used text does not.
    For a hub corpus: its hub id and config (``texts`` may be ``None``; the hub is not contacted).
    """
    if _is_hf_corpus(str(source)):
        hub_id, config, split = HF_CORPORA[str(source).strip().lower()]
        return {
            "corpus_name": f"{hub_id}:{config}:{split}",
            "corpus_path": "",
            "corpus_size": "",
            "corpus_sha256": "",
        }
    if texts is None:
        raise ValueError("texts are needed to identify a local corpus")
    path = _resolve_path(source)
    h = hashlib.sha256()
    for doc in texts:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return {
        "corpus_name": path.name,
        "corpus_path": str(path),
        "corpus_size": str(path.stat().st_size) if path.exists() else "",
        "corpus_sha256": h.hexdigest(),
    }


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


def _input_device(model: nn.Module) -> torch.device:
    """Device for ``input_ids``: that of the input embeddings (handles ``device_map`` models)."""
    try:
        emb = model.get_input_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
    except (AttributeError, NotImplementedError):
        pass
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _module_device(model: nn.Module, module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return _input_device(model)


def _accumulation_device(device: torch.device) -> torch.device:
    """float64 is not supported everywhere (Apple MPS); fall back to CPU there."""
    return torch.device("cpu") if device.type == "mps" else device


#: Tokens summed in float32 (on the CPU) before the partial sum is added to the float64 total.
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
    """Copy the blocks below the diagonal (filled by :func:`add_lower_gram_`) onto those above it."""
    bounds = _gram_bounds(acc.shape[0], blocks)
    for i, (a, b) in enumerate(bounds):
        for c, e in bounds[:i]:
            acc[c:e, a:b] = acc[a:b, c:e].T
    return acc


def _product_dtype(device: torch.device) -> torch.dtype:
    """dtype in which k^T k is summed before it goes into the float64 total. On the CPU float32
    (about twice as fast as float64 there; a partial sum covers at most a few thousand tokens,
    :data:`_PARTIAL_TOKENS`, and loses ~1e-7 relative, far below what C0 needs); elsewhere
    float64, so a global TF32 switch on a GPU cannot lower the precision of the statistics."""
    return torch.float32 if device.type == "cpu" else torch.float64


class _GramSum:
    """Running sum of k^T k for one module, returned in float64 by :meth:`result`.

    Where :func:`_product_dtype` is float32 (the CPU), keys are summed in a float32 partial sum
    on the lower block triangle only (:func:`add_lower_gram_`), moved into the float64 total
    every :data:`_PARTIAL_TOKENS` tokens and mirrored at the end; elsewhere each batch goes
    straight into the float64 total."""

    def __init__(self, d: int, device: torch.device):
        self.dtype = _product_dtype(device)
        self.total = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.part = torch.zeros(d, d, dtype=self.dtype, device=device) if self.dtype != torch.float64 else None
        self.part_tokens = 0

    def add(self, k: torch.Tensor) -> None:
        k = k.to(self.dtype)
        if self.part is None:
            self.total.addmm_(k.T, k)
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
        if self.part is not None:
            self.part = None
            symmetrize_lower_(self.total)
        return self.total


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
) -> dict[str, tuple[torch.Tensor, int]]:
    """Sum of k k^T and token count of the inputs of several modules, in one pass per batch.

    Each batch of texts is tokenised (tokenizer defaults, truncated to ``max_length``), right
    padded and run through ``model`` once under ``torch.no_grad`` in eval mode (the training
    flag is restored afterwards). Forward pre-hooks on all ``module_names`` record their input
    at the real (non-padding) tokens; the hook of the last module to run raises a private
    exception that ends the pass, so layers above the highest needed one never execute.
    Texts are processed longest first (less padding); the sums do not depend on the order.
    On the CPU k^T k is summed in float32 over up to :data:`_PARTIAL_TOKENS` tokens and then
    added to the float64 total (float64 throughout elsewhere, see :func:`_product_dtype`).

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
    max_length = _effective_max_length(model, max_length)
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings (e.g. from read_corpus)")
    modules = dict(model.named_modules())

    ids = [row for row in _tokenize(tok, texts, max_length) if row]
    if not ids:
        raise ValueError("no text produced any token; check the corpus and the tokenizer")
    ids.sort(key=len, reverse=True)  # longest first: least padding, memory peak shows early
    pad_id = pad_token_id(tok)
    device = _input_device(model)

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
            acc_device = _accumulation_device(x.device)
            index_cache: dict = state["index"]  # type: ignore[assignment]
            if x.device not in index_cache:
                index_cache[x.device] = state["flat_index"].to(x.device, non_blocking=True)  # type: ignore[union-attr]
            k = x.index_select(0, index_cache[x.device]).to(device=acc_device)
            if name not in grams:
                grams[name] = _GramSum(k.shape[1], acc_device)
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
            "(check its weights for NaN/inf); nothing was cached."
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
    _fingerprints: tuple[str, str] | None = None,
) -> dict[str, str]:
    """Metadata that a cache file for this request must carry (all values are strings).

    ``texts`` are the documents read from a local corpus (``None`` for hub corpora). The keys in
    :data:`COMPARED_KEYS` must match a file for it to be used; a written file additionally
    carries ``count`` (tokens), ``n_docs`` and ``d_in``. ``max_length`` should already be the
    effective one (see :func:`get_second_moments`).
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
        }
    )
    meta.update(corpus_identity(corpus, texts))
    return meta


def _slug(text: str, limit: int = 60) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    return text[:limit]


def cache_file_name(meta: dict[str, str]) -> str:
    """Readable file name: ``<model>__<module>__<corpus>__n<n_samples>__len<max_length>.safetensors``."""
    model = _slug(Path(meta["model_id"].rstrip("/\\")).name or meta["model_type"])
    corpus = meta["corpus_name"]
    corpus = corpus.split(":")[0].split("/")[-1] if ":" in corpus else Path(corpus).stem
    return (
        f"{model}__{_slug(meta['module'], 100)}__{_slug(corpus)}"
        f"__n{meta['n_samples']}__len{meta['max_length']}.safetensors"
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
) -> dict[str, torch.Tensor]:
    """E[k k^T] of the inputs of ``module_names`` over the first ``n_samples`` documents of
    ``corpus``, from the cache where valid, all missing modules computed in one pass.

    Args:
        model, tok, module_names, max_length, batch_size, progress: as in
            :func:`collect_second_moments`.
        corpus, n_samples: as in :func:`read_corpus`. A local corpus is always read (cheap) to
            fingerprint the documents used; a hub corpus only when something must be computed.
        cache_dir: directory for the cache files (created if missing); ``None`` disables caching.
        model_id: readable model name for file names and metadata (default:
            ``config.name_or_path``).

    Returns:
        ``{name: C}``, C float64 (d_in x d_in), on the device of the module's parameters (CPU for
        devices without float64, e.g. MPS).

    Cache files (one per module) hold the mean and the metadata of :func:`request_metadata`.
    A file that is truncated, corrupted or made for another request (model weights, tokenizer,
    corpus text, sample count, max length, format) is reported with a warning and recomputed.
    Computing and writing happen under a ``filelock.FileLock`` per (model, corpus, n, length),
    so concurrent processes compute each file once; writes are atomic.
    """
    names = _validate_module_names(model, module_names)
    _check_positive_int(n_samples, "n_samples")
    _check_positive_int(batch_size, "batch_size")
    max_length = _effective_max_length(model, max_length)
    modules = dict(model.named_modules())
    devices = {n: _accumulation_device(_module_device(model, modules[n])) for n in names}

    hub = _is_hf_corpus(str(corpus))
    texts: list[str] | None = None if hub else read_corpus(corpus, n_samples)

    if cache_dir is None:
        if texts is None:
            texts = read_corpus(corpus, n_samples)
        raw = collect_second_moments(model, tok, names, texts, max_length, batch_size, progress)
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
                            _fingerprints=(fingerprints[n], tfp))
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
                    texts = read_corpus(corpus, n_samples)
                logger.info("computing second moments for %s over %d documents", missing, len(texts))
                raw = collect_second_moments(model, tok, missing, texts, max_length, batch_size, progress)
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
# Command line: python -m blue_plugin.stats (single process or under torchrun)
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
    """Arguments of ``python -m blue_plugin.stats``."""
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(
        prog="python -m blue_plugin.stats",
        description=(
            "Precompute the key second moments C_0 that a BLUE config needs, into the cache the "
            "editing engine reads. Runs in one process, or sharded over processes and nodes under "
            "torchrun (e.g. `torchrun --nproc_per_node 2 -m blue_plugin.stats --hparams ...`)."
        ),
    )
    p.add_argument("--hparams", required=True, help="BLUE YAML config (e.g. hparams/BLUE/smollm2-135m.yaml)")
    p.add_argument("--model", default=None, help="model name or local HF folder (default: the config's model_name)")
    p.add_argument("--layers", default=None,
                   help="comma-separated layers, e.g. 4,8 (default: the layers the config edits)")
    p.add_argument("--n-samples", type=int, default=None, help="corpus documents (default: mom2_n_samples)")
    p.add_argument("--corpus", default=None, help="corpus file or wikipedia/wikitext (default: mom2_dataset)")
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
    """Entry point of ``python -m blue_plugin.stats``; returns the exit status.

    Under ``torchrun`` every process runs this; each takes its shard of the corpus, the sums are
    all-reduced and rank 0 writes the cache (see :mod:`blue_plugin.distributed`).
    """
    import sys  # noqa: PLC0415

    from .arch import resolve_layout  # noqa: PLC0415
    from .distributed import RankFailed, distributed_second_moments, init_distributed  # noqa: PLC0415
    from .hparams import BLUEHyperParams  # noqa: PLC0415
    from .models import default_cache_dir, load_model  # noqa: PLC0415

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


if __name__ == "__main__":
    # Run the package's copy of this module (the one blue_plugin.distributed imports), not __main__.
    from blue_plugin.stats import main as _main

    raise SystemExit(_main())
