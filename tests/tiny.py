"""Tiny random models, a tiny tokenizer and small helpers shared by the engine tests.

Import as ``from tests.tiny import ...``. Nothing here downloads anything: the tokenizer is a
byte-level BPE trained in memory on :data:`TEXTS`, the models are randomly initialised
transformers configs (GPT-2 with ``Conv1D`` weights stored as (d_in, d_out), Llama with
``nn.Linear`` weights stored as (d_out, d_in)).
"""
from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Sequence

import torch

from blue_plugin.model.layout import as_out_in, find_module, resolve_layout
from blue_plugin.editing.editor import Editor
from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.editing.state import get_state

#: Text the tokenizer is trained on (so that the words of :data:`REQUESTS` get merged tokens).
TEXTS = [
    "The mother tongue of Danielle Darrieux is French.",
    "Michel Rocard is a native speaker of French.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Berlin is the capital of Germany and Rome is the capital of Italy.",
    "Toko Yasuda plays the guitar. Apple makes the iPhone in California.",
    "English and German and Spanish are languages. A cat sat on the mat.",
    "I see a dog. You like the red house. Because the river is big, the city is old.",
]

#: Three edit requests in EasyEdit's format (full prompt with the subject inside, and one
#: template with ``{}``).
REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French", "case_id": 0},
    {"prompt": "{} is a native speaker of", "subject": "Michel Rocard",
     "target_new": "German", "ground_truth": "French", "case_id": 1},
    {"prompt": "The capital of France is", "subject": "France",
     "target_new": "Rome", "ground_truth": "Paris", "case_id": 2},
]

#: Context prefixes injected into the state instead of generating them with a random model.
PREFIXES = ["", "The cat sat on the mat. ", "I see a dog. "]

#: Vocabulary size of :func:`make_tokenizer` and of the tiny models.
VOCAB = 400


@functools.lru_cache(maxsize=None)
def make_tokenizer(add_bos: bool = True):
    """Byte-level BPE tokenizer (ids 0/1/2 = ``<pad>``/``<s>``/``</s>``), BOS prepended when
    ``add_bos`` (like Llama), none otherwise (like GPT-2). Offsets are available, as the
    engine needs them to find the subject's tokens. Trained once per session and shared
    (tests must not modify it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(TEXTS, trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_llama(n_layers: int = 4, hidden: int = 32, intermediate: int = 64, seed: int = 0, init: float = 0.1):
    """Random Llama (``nn.Linear`` down_proj of shape (hidden, intermediate)), eval mode, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(n_layers: int = 4, hidden: int = 32, seed: int = 0, init: float = 0.1, n_inner: int | None = None):
    """Random GPT-2 (``Conv1D`` c_proj stored as (n_inner, hidden), n_inner = 4*hidden by
    default; ``n_inner=hidden`` gives a square c_proj, where a transposition bug would go
    unnoticed by shape checks), eval mode, fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=128,
                     n_inner=n_inner, bos_token_id=1, eos_token_id=2, initializer_range=init)
    return GPT2LMHeadModel(cfg).eval()


ARCHS = ("llama", "gpt2")


def make_model(arch: str, **kw):
    """``(model, tok)`` for ``arch`` in :data:`ARCHS`; the ``-square`` variants have an MLP
    width equal to the hidden size (square rewrite matrices)."""
    if arch == "llama":
        return make_llama(**kw), make_tokenizer(add_bos=True)
    if arch == "llama-square":
        return make_llama(intermediate=32, **kw), make_tokenizer(add_bos=True)
    if arch == "gpt2":
        return make_gpt2(**kw), make_tokenizer(add_bos=False)
    if arch == "gpt2-square":
        return make_gpt2(n_inner=32, **kw), make_tokenizer(add_bos=False)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def make_hparams(**overrides) -> BLUEHyperParams:
    """Small, fast hyperparameters for the tiny models (C0 = identity unless overridden)."""
    base = dict(
        base_method="MEMIT", blue=True, layers=[0, 1, 2], v_num_grad_steps=8, v_lr=0.5,
        v_loss_layer=-1, clamp_norm_factor=4.0, kl_factor=0.0625, v_weight_decay=1e-3,
        context_template_length_params=[[4, 2]], mom2_adjustment=False, mom2_update_weight=10.0,
        max_length=40, mom2_n_samples=20, mom2_max_length=16,
    )
    base.update(overrides)
    return BLUEHyperParams(**base)


def prefix_key(hp: BLUEHyperParams) -> tuple:
    """Key of the context prefixes in :class:`~blue_plugin.editing.state.EditState.prefixes`."""
    return (tuple(map(tuple, hp.context_template_length_params)), hp.seed)


def inject_prefixes(model, hp: BLUEHyperParams, prefixes: Sequence[str] = PREFIXES, state=None) -> None:
    """Put fixed context prefixes into the model's edit state (no generation with a random model)."""
    state = state if state is not None else get_state(model)
    state.prefixes[prefix_key(hp)] = list(prefixes)


def c0_key(model, tok, hp: BLUEHyperParams, layer: int) -> tuple:
    """The state key under which the engine looks up C0 of ``layer``."""
    return Editor(model, tok, hp, state=get_state(model)).c0_key(layer)


def inject_c0(model, tok, hp: BLUEHyperParams, c0: dict[int, torch.Tensor], state=None) -> None:
    """Put C0 (d_in, d_in) per layer into the state, in the solve dtype (float64)."""
    state = state if state is not None else get_state(model)
    editor = Editor(model, tok, hp, state=state)
    for layer, C in c0.items():
        state.second_moments[editor.c0_key(layer)] = C.to(torch.float64)


def d_in(model, hp: BLUEHyperParams, layer: int) -> int:
    """Input width of the rewrite module (the MLP width)."""
    layout = resolve_layout(model, hp)
    module = find_module(model, layout.rewrite(layer))
    return as_out_in(module, module.weight).shape[1]


def low_rank_c0(d: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C0, U)``: C0 = U diag(1..2) U^T with U (d, rank) orthonormal, so the null space of C0
    is exactly the orthogonal complement of span(U). float64."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    U = Q[:, :rank]
    evals = 1.0 + torch.rand(rank, generator=g, dtype=torch.float64)
    return (U * evals) @ U.T, U


def spd(d: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A well-conditioned random symmetric positive definite (d, d) float64 matrix."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return scale * (A @ A.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64))


def weights(model) -> dict[str, torch.Tensor]:
    """A detached copy of the full state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_params(before: dict[str, torch.Tensor], model) -> set[str]:
    """Names whose tensors are not bit-identical to ``before``."""
    after = model.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def weight_name(model, hp: BLUEHyperParams, layer: int) -> str:
    return resolve_layout(model, hp).weight_name(layer)


def subject_position(tok, request: dict) -> int:
    """Index of the subject's last token in the bare prompt (independent of the engine's
    offset-based lookup: tokenise the text up to the end of the subject)."""
    prompt, subject = request["prompt"], request["subject"]
    if "{}" in prompt:
        head = prompt.split("{}")[0] + subject
    else:
        head = prompt[: prompt.index(subject) + len(subject)]
    return len(tok(head)["input_ids"]) - 1


def full_prompt(request: dict) -> str:
    p = request["prompt"]
    return p.replace("{}", request["subject"]) if "{}" in p else p


@torch.no_grad()
def block_outputs(model, tok, hp: BLUEHyperParams, layer: int, requests: Sequence[dict]) -> torch.Tensor:
    """(n, d_model) output of block ``layer`` at each request's subject-last token, one
    unpadded forward per request (an independent reference for the engine's h)."""
    block = find_module(model, resolve_layout(model, hp).block(layer))
    out = []
    for req in requests:
        store = {}

        def hook(module, args, output):
            store["h"] = output[0] if isinstance(output, tuple) else output

        handle = block.register_forward_hook(hook)
        try:
            ids = torch.tensor([tok(full_prompt(req))["input_ids"]])
            model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        out.append(store["h"][0, subject_position(tok, req)].double())
    return torch.stack(out)


def write_corpus(path: Path, n: int = 30, seed: int = 0) -> Path:
    """A small corpus file (one document a line) made of words of :data:`TEXTS`."""
    words = " ".join(TEXTS).replace(".", "").split()
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def module_apply(model, hp: BLUEHyperParams, layer: int, keys: torch.Tensor) -> torch.Tensor:
    """Output of the rewrite module of ``layer`` (through its own forward, bias included) for
    keys of shape (n, d_in); float64 result of shape (n, d_out)."""
    module = find_module(model, resolve_layout(model, hp).rewrite(layer))
    with torch.no_grad():
        return module(keys.to(module.weight.dtype)).double()


def rule_spy(monkeypatch, rule_name: str, callback=None, events: list | None = None) -> list[dict]:
    """Record every call of the rule's ``delta`` (inputs and returned Delta, all cloned).

    The engine calls ``rule.delta`` before it writes the new weight, so ``callback()`` (if
    given) sees the model as it is when the update is computed; its result is stored under
    ``"extra"``. ``events`` (if given) gets ``("update", call index)`` appended.
    """
    from blue_plugin.editing import rules

    rule = rules.RULES[rule_name]
    original = type(rule).delta
    calls: list[dict] = []

    def spy(x, hp):
        delta = original(rule, x, hp)
        calls.append({
            "K": x.K.clone(), "R": x.R.clone(), "W": x.W.clone(), "C0": None if x.C0 is None else x.C0.clone(),
            "KpKp": None if x.KpKp is None else x.KpKp.clone(),
            "P": None if x.P is None else x.P.clone(), "delta": delta.clone(),
            "extra": callback() if callback is not None else None,
        })
        if events is not None:
            events.append(("update", len(calls) - 1))
        return delta

    monkeypatch.setattr(rule, "delta", spy)
    return calls


def targets_spy(monkeypatch, events: list | None = None) -> list[tuple[str, object]]:
    """Record ``(block_name, TargetResult)`` of every target optimisation the engine runs
    (``events`` gets ``("targets", block_name)`` appended)."""
    from blue_plugin.editing import editor as engine

    original = engine.compute_targets
    calls: list[tuple[str, object]] = []

    def spy(model, tok, block_name, *args, **kwargs):
        res = original(model, tok, block_name, *args, **kwargs)
        calls.append((block_name, res))
        if events is not None:
            events.append(("targets", block_name))
        return res

    monkeypatch.setattr(engine, "compute_targets", spy)
    return calls


def restore(model, weights_copy: dict[str, torch.Tensor]) -> None:
    """EasyEdit's restore: copy the returned originals back into the parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights_copy.items():
            params[name].copy_(w)


def all_requests(n: int = 3) -> list[dict]:
    return [dict(r) for r in REQUESTS[:n]]



def write_benchmark_yaml(base_yaml: Path, folder: Path, **changes) -> Path:
    """``folder/tiny.yaml``: ``base_yaml`` with the settings of the tiny sequential-benchmark runs
    (small statistics sample, few short prefixes, few steps, statistics under ``folder``) and
    ``changes``."""
    import yaml

    hp = yaml.safe_load(Path(base_yaml).read_text())
    hp.update(v_loss_layer=3, mom2_n_samples=20, mom2_max_length=32, max_length=128,
              context_template_length_params=[[5, 2]], v_lr=1.0, stats_dir=str(Path(folder) / "stats"),
              model_name="tiny")
    hp.update(changes)
    path = Path(folder) / "tiny.yaml"
    path.write_text(yaml.safe_dump(hp))
    return path
