"""Key statistics C_0 = E[k k^T] of the FFN output projections' inputs over a corpus.

``corpus`` reads the documents, ``moments`` accumulates and caches the means, ``distributed``
spreads the pass over processes; ``python -m blue_plugin.stats`` is the command line.
"""
from .corpus import read_corpus
from .moments import collect_second_moments, get_second_moments

__all__ = ["collect_second_moments", "get_second_moments", "read_corpus"]
