"""Corpora for the key statistics C_0: which documents, read from where, which subset.

``source`` (what the YAML key ``mom2_dataset`` holds) is one of

* a path to a text file (one document per non-empty line, whitespace stripped) or a ``.jsonl``
  file (one JSON object with a string field ``text`` per line); ``~`` is expanded, relative paths
  are relative to the current directory;
* ``"wikipedia"`` / ``"wikitext"``: read through the ``datasets`` package (:data:`HF_CORPORA`);
* ``"wordnet"``: the WordNet 3.0 glosses (definition and example sentences, one document per
  synset: the text after ``| `` of every line of ``data.noun``, ``data.verb``, ``data.adj`` and
  ``data.adv``, in that order, skipping the licence header lines that start with two spaces;
  117,659 documents), parsed at run time from the first directory of ``$WNSEARCHDIR``,
  ``$WNHOME/dict``, ``/usr/share/wordnet`` (Debian's ``wordnet-base``) that holds the four files,
  else from ``$BLUE_PLUGIN_DATA/corpus/wordnet-glosses.txt`` (the same documents, one per line);
* ``"sampled"``: text sampled from the model itself, cached
  (:func:`blue_plugin.stats.sampling.sample_corpus`; needs ``model`` and ``tok``);
* a combination ``"a+b"`` of these with at least one named part, e.g. ``"wordnet+sampled"``:
  ``n`` documents split evenly over the parts (the first ``n % parts`` get one more), each part
  read as if alone (same subset rule and seed), concatenated in the order given.

An existing file named like a named source wins over it. Nothing falls back silently: a source
that cannot be read raises ``ValueError`` saying what to install or set.

Subsets (``subset``): ``"random"`` (default), as MEMIT's ``layer_stats`` with ``random_sample=1``
(its ``FixedRandomSubsetSampler``): the documents at the first ``n`` entries of ``range(N)``
shuffled by ``random.Random(seed)``, seed 1, returned in corpus order (the order does not change
C_0; it keeps the distributed shards alike). Local files and WordNet are read whole for this. Hub
corpora cannot be read whole: ``datasets``' streaming ``shuffle(seed, buffer_size=10_000)``
(shuffled shard order, then a 10,000-document buffer) gives a seeded, approximately uniform
subset, in drawn order. ``"first"``: the first ``n`` documents (the behaviour before subsets).

The single sources are read in :mod:`blue_plugin.stats.sources` (``sampled`` in
:mod:`blue_plugin.stats.sampling`); this module combines them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .sampling import read_sampled
from .sources import (
    DEFAULT_SEED,
    HF_CORPORA,
    NAMED_SOURCES,
    SAMPLED,
    SUBSETS,
    WORDNET,
    check_positive_int,
    choose_subset,
    named_source,
    read_hf_corpus,
    read_local_corpus,
    read_wordnet,
    resolve_path,
    source_parts,
)

logger = logging.getLogger(__name__)


def read_corpus(
    source: str,
    n_samples: int,
    *,
    subset: str = "random",
    seed: int = DEFAULT_SEED,
    model=None,
    tok=None,
    max_length: int = 128,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> list[str]:
    """``n_samples`` non-empty documents of ``source`` (see the module docstring for sources,
    combinations and subsets).

    Args:
        source: a path, ``wikipedia``, ``wikitext``, ``wordnet``, ``sampled`` or a combination.
        n_samples: how many documents (positive). If a corpus has fewer, all are used and a
            warning is logged.
        subset: ``"random"`` (seeded random subset, default) or ``"first"``.
        seed: seed of the random subset and of the sampled text.
        model, tok, max_length: only for ``sampled``: the model that writes the documents, its
            tokenizer, and the document length in tokens (use the statistics' ``max_length``).
        cache_dir: only for ``sampled``: root of the corpus cache (default
            ``blue_plugin.model.loading.default_cache_dir()``; files go to ``<root>/corpus/sampled``).
        progress: progress bar while generating ``sampled`` text.

    Raises:
        ValueError: missing path, a directory, a malformed ``.jsonl`` line, an empty corpus,
            ``datasets`` missing or the hub unreachable, no WordNet, no model for ``sampled`` --
            each message says what to install, set or pass.
    """
    check_positive_int(n_samples, "n_samples")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(f"corpus must be a path to a text/.jsonl file or one of {list(NAMED_SOURCES)} "
                         f"(or a combination such as 'wordnet+sampled'), got {source!r}")
    parts = source_parts(str(source)) if isinstance(source, str) else [source]
    docs: list[str] = []
    for i, part in enumerate(parts):
        share = n_samples // len(parts) + (i < n_samples % len(parts))
        if share:
            docs += _read_one(part, share, subset, seed, model, tok, max_length, cache_dir, progress)
    return docs


def _read_one(source, n, subset, seed, model, tok, max_length, cache_dir, progress) -> list[str]:
    name = named_source(str(source))
    if name in HF_CORPORA:
        docs = read_hf_corpus(name, n, subset=subset, seed=seed)
    elif name == SAMPLED:
        docs = read_sampled(model, tok, n, max_length, seed=seed, cache_dir=cache_dir, progress=progress)
    else:
        every = read_wordnet() if name == WORDNET else \
            read_local_corpus(resolve_path(source), n if subset == "first" else None)
        docs = choose_subset(every, n, subset, seed)
    if not docs:
        raise ValueError(f"corpus {str(source)!r} contains no non-empty documents; pass a file with one "
                         "document per line (or a .jsonl file with a 'text' field)")
    if len(docs) < n:
        logger.warning("corpus %r has only %d documents, fewer than the %d requested; using all of them",
                       str(source), len(docs), n)
    return docs
