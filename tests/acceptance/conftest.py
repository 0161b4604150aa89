"""Fixtures shared by the sequential benchmark's tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """(model, tok, yaml path): a tiny random Llama (tests/tiny.py, vocabulary 400), layers [1, 2, 3]."""
    from benchmarks.sequential import DEFAULT_HPARAMS
    from tests.tiny import make_llama, make_tokenizer, write_benchmark_yaml

    path = write_benchmark_yaml(DEFAULT_HPARAMS, tmp_path_factory.mktemp("tiny_seq"), layers=[1, 2, 3],
                                v_num_grad_steps=6, mom2_update_weight=10.0)
    return make_llama(n_layers=4, hidden=32, intermediate=64), make_tokenizer(), path
