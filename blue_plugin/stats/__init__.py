"""Key statistics C_0 = E[k k^T] of the FFN output projections' inputs over a corpus.

Modules, bottom to top: ``sources`` (corpus files, hub corpora, WordNet; subsets and identity),
``accumulate`` (sums of k k^T in one forward pass per batch), ``cache`` (fingerprints, metadata,
the validated safetensors files and their lock), ``sampling`` (text sampled from the model),
``corpus`` (:func:`read_corpus`: every source and combinations), ``moments``
(:func:`get_second_moments`: the means, from the cache or computed), ``process_group`` and
``distributed`` (the pass spread over processes), ``importer`` (ROME / EasyEdit / AlphaEdit
``layer_stats`` files checked and imported into the cache), ``projection`` (AlphaEdit's null-space
projections checked, imported and read back: :func:`load_projection`), ``cli`` (``python -m blue_plugin.stats``
and its ``import`` subcommand).
"""
from .accumulate import collect_second_moments
from .cache import CACHE_FORMAT_VERSION, COMPARED_KEYS, TENSOR_KEY
from .corpus import read_corpus
from .moments import get_second_moments
from .projection import load_projection

__all__ = [
    "CACHE_FORMAT_VERSION",
    "COMPARED_KEYS",
    "TENSOR_KEY",
    "collect_second_moments",
    "get_second_moments",
    "load_projection",
    "read_corpus",
]
