"""The synthetic inputs of :mod:`benchmarks.checks.gpu_check`: a random Llama of a given shape
built directly on its device, a word-level tokenizer built in memory, synthetic requests and
synthetic key statistics C0 = A A^T / m + eps I. Nothing is downloaded."""
from __future__ import annotations

from typing import Any

import torch

#: Llama-3-8B's shape (its config.json), without the weights.
LLAMA3_8B_SHAPE: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)
#: The --small shape: enough layers for critical layers 4-8 and v_loss_layer at the top.
SMALL_SHAPE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=10, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rope_theta=500000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)
C0_EPS = 1e-3

WORDS = (
    "the a an of is in and to was by for with on at from as it his her their its this that which who "
    "mother tongue native speaker language capital city country born died plays played works worked "
    "for company founded river mountain big small old new red blue house cat dog sat mat see like "
    "because therefore you i we they he she music guitar piano club team member citizen located "
    "official religion position genre label owner author wrote made famous known called named"
).split()
RELATIONS = (
    "The mother tongue of {} is", "{} is a native speaker of", "{} plays the", "{} was born in",
    "The capital of {} is", "{} works for", "{} is a member of the", "{} is located in",
    "The official language of {} is", "{} is a citizen of",
)
PREFIXES = (
    "The cat sat on the mat and it was big. ",
    "Therefore we see the old house in the city. ",
    "Because the river is big the city is old. ",
    "I like the red house of the company. ",
    "You see a dog and a cat in the house. ",
)


# ------------------------------------------------------------------------------------------------
# model, tokenizer, requests, statistics
# ------------------------------------------------------------------------------------------------
def n_names(n_requests: int) -> int:
    """Distinct subject/object words needed for ``n_requests`` requests."""
    return max(16, 2 * n_requests)


def make_tokenizer(n_requests: int):
    """Word-level fast tokenizer (lower-casing, whitespace/punctuation split, no BOS) over
    :data:`WORDS`, punctuation, ``name0..`` (subjects) and ``obj0..`` (objects); ids 0-3 are
    ``<pad> <s> </s> <unk>``. Offsets are available, as the engine needs them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS + [".", ","] + [f"name{i}" for i in range(n_names(n_requests))] + [f"obj{i}" for i in range(n_names(n_requests))]:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_requests(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` synthetic requests: two-word subjects ``NameI NameJ`` (distinct per request), one of
    :data:`RELATIONS`, a one-word new target and ground truth ``objK``."""
    import random

    rng = random.Random(seed)
    m = n_names(n)
    out = []
    for i in range(n):
        subject = f"Name{(2 * i) % m} Name{(2 * i + 1) % m}"
        prompt = RELATIONS[i % len(RELATIONS)].format(subject)
        new, true = rng.sample(range(m), 2)
        out.append({"case_id": i, "prompt": prompt, "subject": subject,
                    "target_new": f"obj{new}", "ground_truth": f"obj{true}"})
    return out


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int):
    """Random ``LlamaForCausalLM`` of ``shape``, created directly on ``device`` in ``dtype``
    (parameters are never materialised in float32 or on the CPU first), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.02)
    config._name_or_path = "random-llama3-8b-shape" if shape["hidden_size"] == 4096 else "random-small-llama"
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype)  # no-op unless a buffer/parameter escaped the default dtype
    return model.eval()


def synthetic_c0(d: int, device: torch.device, seed: int) -> torch.Tensor:
    """(d, d) float64: A A^T / m + C0_EPS * I, A ~ N(0, 1) of shape (d, m), m = d // 2."""
    m = max(1, d // 2)
    g = torch.Generator(device=device).manual_seed(seed)
    A = torch.randn(d, m, dtype=torch.float64, device=device, generator=g)
    C = A @ A.T
    del A
    C /= m
    C.diagonal().add_(C0_EPS)
    return C
