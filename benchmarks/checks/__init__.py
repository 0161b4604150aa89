"""Focused checks beside the two benchmarks: ``gpu_check`` (one BLUE edit on a random
Llama-3-8B-shaped model on a GPU, with its synthetic inputs in ``synthetic``),
``gpu_split_check`` (a model split between a GPU and the CPU against the all-CPU edit),
``peak_rss`` (peak memory of one edit, one process per configuration) and ``stats_throughput``
(tokens/s of the key-statistics pass for 1 and 2 processes).

Their documented commands (``python benchmarks/gpu_check.py``, ``python -m benchmarks.peak_rss``,
...) run them through the shims of the same names in :mod:`benchmarks`; ``python -m
benchmarks.checks.<name>`` works as well.
"""
