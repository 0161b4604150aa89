"""Sums of k k^T over the keys of FFN output projections, in one forward pass per batch.

A *key* k is the input of an FFN output projection (``down_proj`` / ``c_proj`` / ``fc_out``)
at one token: the ``d_in``-dimensional activation (``d_in`` = the MLP width, e.g. 1536 for
SmolLM2, 4 * n_embd for GPT-2). :func:`collect_second_moments` returns float64 *sums* of k k^T
and token *counts* for several modules, so that a distributed caller can all-reduce them;
:func:`mean_from_sum` turns a sum into the mean E[k k^T].

``mom2_dtype`` (the hyperparameter; MEMIT's ``layer_stats(precision=...)``, which casts the keys
to it and keeps its running sum in it) is here the dtype the keys are cast to before their
products are formed: ``"float32"`` (default): float32 products, summed in float32 over at most
:data:`_PARTIAL_TOKENS` tokens and then into a float64 total (on a CUDA device where TF32 is
allowed for float32 matmuls the products are formed in float64 instead, so a global TF32 switch
cannot lower the precision); ``"float64"``: float64 throughout (about twice the CPU time);
``"float16"`` / ``"bfloat16"``: the keys are rounded to that dtype, the products then formed as for
float32 -- never summed in 16 bits. The total is always float64 (MEMIT keeps it in ``precision``:
a float32 sum over millions of tokens loses digits; ours does not), and so is the stored mean.
"""
from __future__ import annotations

import difflib
import logging
import threading
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.devices import accumulation_device, input_device
from ..model.tokens import pad_token_id
from .sources import check_positive_int

logger = logging.getLogger(__name__)

#: Accepted ``mom2_dtype`` values and the dtype the keys are cast to.
MOM2_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


class _StopForward(Exception):
    """Raised from a hook once every requested module has seen its input for this batch."""


def validate_module_names(model: nn.Module, module_names: Iterable[str]) -> list[str]:
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


def effective_max_length(model: nn.Module, max_length: int) -> int:
    """``max_length`` (positive), capped with a warning at the model's number of positions."""
    check_positive_int(max_length, "max_length")
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        logger.warning("max_length %d exceeds the model's %d positions; using %d", max_length, limit, limit)
        return limit
    return max_length


#: Serialises tokenizer calls: a fast tokenizer keeps its truncation setting on the shared Rust
#: backend, so a call with another max_length in another thread could truncate this one's ids.
_TOKENIZER_LOCK = threading.Lock()


def tokenize(tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text (tokenizer defaults for special tokens), truncated to ``max_length``."""
    with _TOKENIZER_LOCK:
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
    names = validate_module_names(model, module_names)
    check_positive_int(batch_size, "batch_size")
    check_mom2_dtype(mom2_dtype)
    max_length = effective_max_length(model, max_length)
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings (e.g. from read_corpus)")
    modules = dict(model.named_modules())

    ids = [row for row in tokenize(tok, texts, max_length) if row]
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


def mean_from_sum(name: str, total: torch.Tensor, count: int) -> torch.Tensor:
    """``total / count``, warning when fewer tokens than dimensions make the result singular."""
    if count < total.shape[0]:
        logger.warning(
            "second moment of %s comes from %d tokens, fewer than its dimension %d: it is singular, and "
            "MEMIT-style solves may fail or give huge updates; raise mom2_n_samples (or mom2_max_length)",
            name, count, total.shape[0])
    return total / count
