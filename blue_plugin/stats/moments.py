"""Second-moment statistics C_0 = E[k k^T] of the keys of FFN output projections.

A *key* k is the input of an FFN output projection (``down_proj`` / ``c_proj`` / ``fc_out``)
at one token: the ``d_in``-dimensional activation (``d_in`` = the MLP width, e.g. 1536 for
SmolLM2, 4 * n_embd for GPT-2). Locate-then-edit methods need C_0 over general text.

Three layers of API:

* :func:`blue_plugin.stats.corpus.read_corpus` -- ``n_samples`` documents of a local text /
  ``.jsonl`` file, ``wikipedia`` / ``wikitext`` through the ``datasets`` package, the ``wordnet``
  glosses, text ``sampled`` from the model (:func:`blue_plugin.stats.sampling.sample_corpus`) or
  a combination such as ``wordnet+sampled``; a seeded random subset by default
  (``subset="first"``: the first documents).
* :func:`blue_plugin.stats.accumulate.collect_second_moments` -- float64 *sums* of k k^T and
  token *counts* for several modules in one forward pass per batch that stops right after the
  last needed module. Sums and counts (not means) so that a distributed caller can all-reduce
  them. ``mom2_dtype`` (the dtype of the keys' products) is described in
  :mod:`blue_plugin.stats.accumulate`.
* :func:`get_second_moments` (this module) -- means E[k k^T] with a validated on-disk
  safetensors cache (:mod:`blue_plugin.stats.cache`: one file per model, module, corpus, subset,
  sample count, max length and ``mom2_dtype``), atomic writes and a file lock.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..model.devices import accumulation_device, module_device
from .accumulate import (
    check_mom2_dtype,
    collect_second_moments,
    effective_max_length,
    mean_from_sum,
    validate_module_names,
)
from .cache import (
    acquire_cache_lock,
    cache_file_name,
    expected_d_in,
    load_moment,
    request_metadata,
    save_moment,
    tokenizer_fingerprint,
    weights_fingerprint,
    written_metadata,
)
from .corpus import read_corpus
from .sources import check_positive_int, is_hf_corpus

logger = logging.getLogger(__name__)


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
            of the statistics (a ``sampled`` corpus is cached regardless, see
            :func:`blue_plugin.stats.sampling.read_sampled`).
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
    names = validate_module_names(model, module_names)
    check_positive_int(n_samples, "n_samples")
    check_positive_int(batch_size, "batch_size")
    check_mom2_dtype(mom2_dtype)
    max_length = effective_max_length(model, max_length)
    modules = dict(model.named_modules())
    devices = {n: accumulation_device(module_device(model, modules[n])) for n in names}

    def read() -> list[str]:
        return read_corpus(corpus, n_samples, subset=subset, model=model, tok=tok, max_length=max_length,
                           progress=progress)

    hub = is_hf_corpus(str(corpus))
    texts: list[str] | None = None if hub else read()

    if cache_dir is None:
        if texts is None:
            texts = read()
        raw = collect_second_moments(model, tok, names, texts, max_length, batch_size, progress,
                                     mom2_dtype=mom2_dtype)
        return {n: mean_from_sum(n, s, c).to(devices[n]) for n, (s, c) in raw.items()}

    cache_dir = Path(os.path.expanduser(os.fspath(cache_dir)))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the statistics cache directory {str(cache_dir)!r}: {e}") from e

    weight_fps = {n: weights_fingerprint(model, [n]) for n in names}
    tfp = tokenizer_fingerprint(tok)
    metas = {
        n: request_metadata(model, tok, n, corpus, texts, n_samples, max_length, model_id,
                            subset=subset, mom2_dtype=mom2_dtype, fingerprints=(weight_fps[n], tfp))
        for n in names
    }
    paths = {n: cache_dir / cache_file_name(metas[n]) for n in names}

    def try_load(pending: Iterable[str]) -> dict[str, torch.Tensor]:
        found = {}
        for n in pending:
            t = load_moment(paths[n], metas[n], devices[n], expected_d_in(modules[n]))
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
                    mean = mean_from_sum(n, s, c)
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
