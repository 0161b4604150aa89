"""A battery of bad inputs: each gives a ValueError (a BLUE*Error subclass where the plugin raises
it) whose message says what to fix, and leaves the model's weights, its edit state and the
statistics cache exactly as they were.

Some inputs are not errors: unicode subjects and targets, mixed-length batches, and corrupted or
foreign statistics files (recomputed with a warning, never used). Those are asserted to work.

Tiny random Llama / GPT-2 models and the byte-level BPE tokenizer of :mod:`tests.tiny`.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from blue_plugin import apply_blue_to_model
from blue_plugin.editing.editor import Editor
from blue_plugin.errors import BLUEConfigError, BLUEEditError, BLUERequestError
from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.editing.requests import check_rows_fit, position_limit, prepare_requests
from blue_plugin.editing.session import EditSession
from blue_plugin.editing.state import get_state
from tests.tiny import (
    REQUESTS,
    changed_params,
    inject_prefixes,
    make_gpt2,
    make_hparams,
    make_llama,
    make_tokenizer,
    weights,
    write_corpus,
)

GOOD = dict(REQUESTS[2])  # "The capital of France is" / France -> Rome


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny Llama with cached statistics (corpus file -> stats dir) and injected prefixes."""
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = write_corpus(root / "corpus.txt", n=30)
    tok = make_tokenizer(add_bos=True)
    hp = make_hparams(mom2_adjustment=True, mom2_dataset=str(corpus), mom2_n_samples=30,
                      stats_dir=str(root / "stats"), v_num_grad_steps=3, model_name="tiny-llama")
    model = make_llama(seed=0)
    inject_prefixes(model, hp)
    Editor(model, tok, hp).ensure_second_moments(hp.edit_layers)  # fills the cache and the state
    assert len(list((root / "stats").glob("*.safetensors"))) == 2
    return SimpleNamespace(model=model, tok=tok, hp=hp, root=root, corpus=corpus, stats=root / "stats")


def _cache_listing(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _edit(env, requests=None, **changes):
    hp = env.hp.replace(**changes) if changes else env.hp
    return apply_blue_to_model(env.model, env.tok, [dict(GOOD)] if requests is None else requests, hp)


# ---- YAML files ----------------------------------------------------------------------------


def _yaml(env, text: str | None = None, drop=(), **changes) -> BLUEHyperParams:
    """Write a YAML file (``text``, or the env's hparams with ``changes`` / without ``drop``),
    read it with from_hparams and, should that succeed, edit with it."""
    path = env.root / f"hp-{os.getpid()}.yaml"
    if text is None:
        config = {k: v for k, v in env.hp.to_dict().items() if k not in drop}
        config.update(changes)
        text = yaml.safe_dump(config, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    hp = BLUEHyperParams.from_hparams(path)
    apply_blue_to_model(env.model, env.tok, [dict(GOOD)], hp)
    return hp


def _yaml_raw_edit(env, old: str, new: str):
    text = yaml.safe_dump(env.hp.to_dict(), sort_keys=False)
    assert old in text
    return _yaml(env, text.replace(old, new))


def _yaml_python_tag(env):
    marker = env.root / "PWNED"
    try:
        _yaml(env, "!!python/object/apply:os.system ['touch " + str(marker) + "']\n")
    finally:
        assert not marker.exists()


def _subject_inside_a_token(env):
    """A subject that ends in the middle of a token of the prompt: cut the prompt's subject word
    one character before the end of one of its multi-character tokens."""
    prompt, word = REQUESTS[0]["prompt"], REQUESTS[0]["subject"]
    start = prompt.index(word)
    enc = env.tok(prompt, return_offsets_mapping=True)
    cut = next(b - 1 for a, b in enc["offset_mapping"] if start <= a and b <= start + len(word) and b - a >= 2)
    subject = prompt[start:cut]
    assert subject and word.startswith(subject) and len(subject) < len(word)
    _edit(env, [{"prompt": prompt, "subject": subject, "target_new": "English"}])


def _no_pad_no_eos(env):
    tok = copy.deepcopy(make_tokenizer(add_bos=True))  # make_tokenizer is cached: never mutate its result
    tok.pad_token = None
    tok.eos_token = None
    apply_blue_to_model(env.model, tok, [dict(GOOD)], env.hp)


def _empty_corpus(env):
    path = env.root / "empty.txt"
    path.write_text("\n   \n\t\n", encoding="utf-8")
    _edit(env, mom2_dataset=str(path))


def _bad_jsonl_corpus(env):
    path = env.root / "bad.jsonl"
    path.write_text('{"text": "a cat"}\n{"body": "no text field"}\n', encoding="utf-8")
    _edit(env, mom2_dataset=str(path))


def _nan_weight_session(env):
    """EditSession checks every parameter first; the env model is left alone (a copy is used)."""
    model = make_llama(seed=0)
    inject_prefixes(model, env.hp)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 3] = math.nan
    EditSession(model, env.tok, env.hp).edit([dict(GOOD)])


LONG = " ".join(["very"] * 300)
MEDIUM = " ".join(["very"] * 35)  # ~140 tokens: below max_length=400, above 128 positions

#: id -> (action, exception class, regex the message must match)
CASES = {
    # YAML files
    "yaml-typo-key": (lambda e: _yaml(e, v_lrr=0.5), BLUEConfigError, r"unknown hyperparameter.*'v_lrr' \(did you mean 'v_lr'\?\)"),
    "yaml-typo-base-method": (lambda e: _yaml(e, base_method="MEMTI"), BLUEConfigError, r"Did you mean 'MEMIT'\?"),
    "yaml-unknown-base-method": (lambda e: _yaml(e, base_method="ROME"), BLUEConfigError, r"'base_method'.*one of MEMIT, RECT, PRUNE, AlphaEdit"),
    "yaml-wrong-alg-name": (lambda e: _yaml(e, alg_name="MEMIT"), BLUEConfigError, r"'alg_name': must be 'BLUE'"),
    "yaml-layers-as-string": (lambda e: _yaml(e, layers="0, 2"), BLUEConfigError, r"'layers' must be a list"),
    "yaml-layers-not-integers": (lambda e: _yaml(e, layers=[0, "two"]), BLUEConfigError, r"'layers': must be a list of integers"),
    "yaml-blue-not-bool": (lambda e: _yaml(e, blue="maybe"), BLUEConfigError, r"'blue' must be true or false"),
    "yaml-lr-not-number": (lambda e: _yaml(e, v_lr="fast"), BLUEConfigError, r"'v_lr' must be a number"),
    "yaml-steps-fractional": (lambda e: _yaml(e, v_num_grad_steps=2.5), BLUEConfigError, r"'v_num_grad_steps' must be an integer"),
    "yaml-steps-scientific-fraction": (lambda e: _yaml_raw_edit(e, "v_num_grad_steps: 3", "v_num_grad_steps: 2.5e-1"), BLUEConfigError, r"'v_num_grad_steps' must be an integer"),
    "yaml-missing-layers": (lambda e: _yaml(e, drop=("layers",)), BLUEConfigError, r"missing required key\(s\) 'layers'"),
    "yaml-missing-alg-name-and-model": (lambda e: _yaml(e, drop=("alg_name", "model_name")), BLUEConfigError, r"missing required key\(s\) 'alg_name', 'model_name'"),
    "yaml-syntax-error": (lambda e: _yaml_raw_edit(e, "layers:\n- 0\n- 1\n- 2", "layers: [0, 1, 2"), BLUEConfigError, r"not valid YAML"),
    "yaml-not-a-mapping": (lambda e: _yaml(e, "- alg_name\n- BLUE\n"), BLUEConfigError, r"expected a mapping"),
    "yaml-empty-file": (lambda e: _yaml(e, "# nothing here\n"), BLUEConfigError, r"the file is empty"),
    "yaml-python-object-tag": (_yaml_python_tag, BLUEConfigError, r"not valid YAML"),
    "yaml-file-missing": (lambda e: BLUEHyperParams.from_hparams(e.root / "nope"), BLUEConfigError, r"file not found.*nope\.yaml"),
    # hyperparameter values
    "layers-empty": (lambda e: _edit(e, layers=[]), BLUEConfigError, r"'layers': must list at least one"),
    "layers-unsorted": (lambda e: _edit(e, layers=[2, 0]), BLUEConfigError, r"ascending order.*did you mean \[0, 2\]"),
    "layers-duplicated": (lambda e: _edit(e, layers=[0, 0, 2]), BLUEConfigError, r"'layers': contains duplicates"),
    "layers-out-of-range": (lambda e: _edit(e, layers=[0, 9]), BLUEConfigError, r"\[9\] outside the model, which has layers 0\.\.3"),
    "layers-negative": (lambda e: _edit(e, layers=[-1, 2]), BLUEConfigError, r"layer indices must be >= 0"),
    "template-matches-nothing": (lambda e: _edit(e, rewrite_module_tmp="model.layers.{}.mlp.down_prj"), BLUEConfigError,
                                 r"no module named 'model\.layers\.0\.mlp\.down_prj'.*Close matches: model\.layers\.0\.mlp\.down_proj"),
    "template-without-placeholder": (lambda e: _edit(e, layer_module_tmp="model.layers.mlp"), BLUEConfigError, r"must contain '\{\}'"),
    "template-not-a-linear": (lambda e: _edit(e, rewrite_module_tmp="model.layers.{}.mlp.act_fn"), BLUEConfigError,
                              r"cannot edit a .*nn\.Linear or transformers' Conv1D"),
    "batch-size-zero": (lambda e: _edit(e, batch_size=0), BLUEConfigError, r"'batch_size': must be a positive integer"),
    "max-length-negative": (lambda e: _edit(e, max_length=-5), BLUEConfigError, r"'max_length': must be a positive integer"),
    "v-loss-layer-not-last": (lambda e: _edit(e, v_loss_layer=1), BLUEConfigError, r"'v_loss_layer' must be the last layer \(3\) or -1"),
    "rect-fraction-above-one": (lambda e: _edit(e, rect_keep_fraction=1.5), BLUEConfigError, r"'rect_keep_fraction': must be in \(0, 1\]"),
    "hparams-as-path-string": (lambda e: apply_blue_to_model(e.model, e.tok, [dict(GOOD)], str(e.root / "x.yaml")), BLUEConfigError,
                               r"hparams must be a BLUEHyperParams.*from_hparams"),
    "hparams-dict-typo": (lambda e: apply_blue_to_model(e.model, e.tok, [dict(GOOD)], {"layerz": [0, 2]}), BLUEConfigError,
                          r"'layerz' \(did you mean 'layers'\?\)"),
    "tokenizer-without-pad-and-eos": (_no_pad_no_eos, BLUEConfigError, r"neither a pad nor an eos token; set tok\.pad_token"),
    # requests
    "request-missing-prompt": (lambda e: _edit(e, [{"subject": "France", "target_new": "Rome"}]), BLUERequestError, r"request 0.*has no 'prompt'"),
    "request-missing-target": (lambda e: _edit(e, [{"prompt": "The capital of France is", "subject": "France"}]), BLUERequestError, r"has no 'target_new'"),
    "request-missing-subject": (lambda e: _edit(e, [{"prompt": "The capital of France is", "target_new": "Rome"}]), BLUERequestError,
                                r"has no 'subject'; it is needed for fact_token='subject_last'"),
    "request-prompt-not-string": (lambda e: _edit(e, [{**GOOD, "prompt": 42}]), BLUERequestError, r"'prompt' must be a string, got int"),
    "request-not-a-dict": (lambda e: _edit(e, ["The capital of France is Rome"]), BLUERequestError, r"request 0 must be a dict, got str"),
    "requests-empty-list": (lambda e: _edit(e, []), BLUERequestError, r"requests must be a non-empty list"),
    "subject-not-in-prompt": (lambda e: _edit(e, [{**GOOD, "subject": "Germany"}]), BLUERequestError,
                              r"subject 'Germany' does not occur in prompt.*exactly as written"),
    "subject-case-differs": (lambda e: _edit(e, [{**GOOD, "subject": "france"}]), BLUERequestError, r"does not occur in prompt"),
    "subject-splits-a-token": (_subject_inside_a_token, BLUERequestError, r"does not end on a token boundary.*whole word"),
    "subject-empty": (lambda e: _edit(e, [{**GOOD, "subject": ""}]), BLUERequestError, r"'subject' is empty"),
    "prompt-two-placeholders": (lambda e: _edit(e, [{**GOOD, "prompt": "{} is the capital of {}"}]), BLUERequestError, r"more than one '\{\}'"),
    "target-empty": (lambda e: _edit(e, [{**GOOD, "target_new": ""}]), BLUERequestError, r"'target_new' is empty or only whitespace"),
    "target-whitespace": (lambda e: _edit(e, [{**GOOD, "target_new": " \t\n "}]), BLUERequestError, r"'target_new' is empty or only whitespace"),
    "target-rome-format-empty": (lambda e: _edit(e, [{**GOOD, "target_new": {"str": "  ", "id": "Q1"}}]), BLUERequestError, r"'target_new' is empty"),
    "target-longer-than-max-length": (lambda e: _edit(e, [{**GOOD, "target_new": " ".join(["Rome"] * 60)}]), BLUERequestError,
                                      r"plus target \(\d+ tokens\) exceeds max_length=40; shorten them or raise max_length"),
    "prompt-very-long": (lambda e: _edit(e, [{**GOOD, "prompt": LONG + " The capital of France is"}]), BLUERequestError, r"exceeds max_length=40"),
    "batch-second-request-empty-target": (lambda e: _edit(e, [dict(GOOD), {**REQUESTS[0], "target_new": ""}]), BLUERequestError,
                                          r"request 1 \(case_id=0\).*'target_new' is empty"),
    "batch-long-request-after-short": (lambda e: _edit(e, [dict(GOOD), {**REQUESTS[1], "prompt": LONG + " {} is"}]), BLUERequestError,
                                       r"request 1 \(case_id=1\).*exceeds max_length"),
    "batch-single-dict-missing-prompt": (lambda e: _edit(e, {"subject": "France", "target_new": "Rome"}), BLUERequestError, r"has no 'prompt'"),
    # statistics / corpus
    "corpus-missing": (lambda e: _edit(e, mom2_dataset=str(e.root / "no-such-corpus.txt")), ValueError, r"corpus file .*no-such-corpus\.txt' does not exist"),
    "corpus-empty": (_empty_corpus, ValueError, r"contains no non-empty documents"),
    "corpus-is-a-directory": (lambda e: _edit(e, mom2_dataset=str(e.root)), ValueError, r"is not a regular file"),
    "corpus-jsonl-without-text": (_bad_jsonl_corpus, ValueError, r"line 2 has no string field 'text'"),
    "nan-weight-session": (_nan_weight_session, BLUEEditError, r"model\.embed_tokens\.weight.*NaN or inf; reload the model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_changes_nothing(env, case):
    action, exc, match = CASES[case]
    state = get_state(env.model)
    w0, s0 = weights(env.model), state.snapshot()
    caches0 = (set(state.second_moments), set(state.projectors), dict(state.prefixes))
    files0 = _cache_listing(env.stats)
    with pytest.raises(exc, match=match) as info:
        action(env)
    assert isinstance(info.value, ValueError)
    assert changed_params(w0, env.model) == set()
    assert state.same_edits(s0) and state.n_edits == 0
    assert (set(state.second_moments), set(state.projectors), dict(state.prefixes)) == caches0
    assert _cache_listing(env.stats) == files0


def test_battery_is_large_enough():
    assert len(CASES) >= 25


# ---- inputs the engine does not catch yet (see the report; EditSession covers the first) -----


def test_nan_weight_via_apply_is_refused_before_statistics(env, tmp_path):
    model = make_llama(seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = math.nan
    stats = tmp_path / "stats"
    shutil.copytree(env.stats, stats)
    hp = env.hp.replace(stats_dir=str(stats))
    files0 = _cache_listing(stats)
    with pytest.raises(BLUEEditError, match="NaN"):
        apply_blue_to_model(model, env.tok, [dict(GOOD)], hp)
    assert _cache_listing(stats) == files0


def test_prompt_beyond_model_positions_via_apply(env):
    model = make_gpt2(seed=0)  # n_positions = 128, learned position embeddings
    tok = make_tokenizer(add_bos=False)
    hp = make_hparams(max_length=400)
    inject_prefixes(model, hp)
    w0 = weights(model)
    with pytest.raises(BLUERequestError, match="positions of the model"):
        apply_blue_to_model(model, tok, [{**GOOD, "prompt": MEDIUM + " The capital of France is"}], hp)
    assert changed_params(w0, model) == set()


def test_check_rows_fit_names_the_request_and_the_limit(env):
    model = make_gpt2(seed=0)
    tok = make_tokenizer(add_bos=False)
    assert position_limit(model) == 128 and position_limit(env.model) == 128
    hp = make_hparams(max_length=400)
    reqs = prepare_requests(tok, [dict(GOOD), {**GOOD, "prompt": MEDIUM + " The capital of France is"}], hp)
    check_rows_fit(tok, reqs[:1], ["", "I see a dog. "], hp.fact_token, 128)
    with pytest.raises(BLUERequestError, match=r"request 1 .*more than the 128 positions of the model"):
        check_rows_fit(tok, reqs, ["", "I see a dog. "], hp.fact_token, 128)
    check_rows_fit(tok, reqs, [""], hp.fact_token, None)


# ---- inputs that must work --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unicode_subjects_and_targets_work(env, arch):
    model = make_llama(seed=0) if arch == "llama" else make_gpt2(seed=0)
    tok = make_tokenizer(add_bos=arch == "llama")
    hp = make_hparams(v_num_grad_steps=3)
    inject_prefixes(model, hp)
    w0 = weights(model)
    requests = [
        {"prompt": "東京の首都は", "subject": "東京", "target_new": "Ελλάδα 🚀", "case_id": "ja"},
        {"prompt": "The rocket 🚀 Ünïcødé flies to", "subject": "🚀 Ünïcødé", "target_new": "Zürich", "case_id": "emoji"},
        {"prompt": "{} est la capitale de", "subject": "Zürich", "target_new": "la Suisse — naïve café", "case_id": "fr"},
    ]
    apply_blue_to_model(model, tok, requests, hp)
    changed = changed_params(w0, model)
    assert len(changed) == 2
    record = get_state(model).history[-1]
    assert record["case_ids"] == ["ja", "emoji", "fr"]
    assert all(math.isfinite(x) for xs in record["nll"].values() for x in xs)


def test_mixed_length_batch_works(env):
    """One-token and many-token targets, short and long prompts, a template and a full prompt,
    a subject at the start and one at the end, in one batch."""
    model = make_llama(seed=0)
    hp = env.hp.replace(max_length=64)
    inject_prefixes(model, hp)
    w0 = weights(model)
    requests = [
        {"prompt": "{} is", "subject": "Paris", "target_new": "Rome"},
        {"prompt": "Because the river is big, the city is old and the capital of Germany and Italy is known as",
         "subject": "Italy", "target_new": "the red house of the mother tongue of Danielle Darrieux"},
        {"prompt": "I see a dog. You like", "subject": "dog", "target_new": "cat"},
        dict(REQUESTS[0]),
    ]
    apply_blue_to_model(model, env.tok, requests, hp)
    assert len(changed_params(w0, model)) == 2
    record = get_state(model).history[-1]
    assert record["n_requests"] == 4 and all(len(v) == 4 for v in record["nll"].values())


def _reference_edit(env, tmp_path) -> dict[str, torch.Tensor]:
    """Edited weights of a fresh model with a fresh statistics cache."""
    model = make_llama(seed=0)
    hp = env.hp.replace(stats_dir=str(tmp_path / "ref-stats"))
    inject_prefixes(model, hp)
    apply_blue_to_model(model, env.tok, [dict(GOOD)], hp)
    return weights(model)


def _corrupt_truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _corrupt_garbage(p: Path):
    p.write_bytes(b"\x80\x04\x95 this was a pickle once")


def _corrupt_nan_with_valid_checksum(p: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from blue_plugin.stats.cache import _sha256_tensor

    with safe_open(str(p), "pt") as f:
        meta, t = f.metadata(), f.get_tensor("mom2")
    t[0, 0] = math.nan
    save_file({"mom2": t}, str(p), metadata={**meta, "tensor_sha256": _sha256_tensor(t)})


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_truncate, "unreadable"),
    (_corrupt_garbage, "unreadable"),
    (_corrupt_nan_with_valid_checksum, "non-finite"),
], ids=["truncated", "garbage", "nan-inside"])
def test_corrupted_statistics_are_recomputed_not_used(env, tmp_path, caplog, corrupt, message):
    stats = tmp_path / "stats"
    hp = env.hp.replace(stats_dir=str(stats))
    warm = make_llama(seed=0)
    Editor(warm, env.tok, hp).ensure_second_moments(hp.edit_layers)
    for p in stats.glob("*.safetensors"):
        corrupt(p)
    model = make_llama(seed=0)
    inject_prefixes(model, hp)
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        apply_blue_to_model(model, env.tok, [dict(GOOD)], hp)
    assert any(message in r.getMessage() for r in caplog.records)
    ref = _reference_edit(env, tmp_path)
    assert changed_params(ref, model) == set()


def test_statistics_of_another_model_are_recomputed_not_used(env, tmp_path, caplog):
    stats = tmp_path / "stats"
    hp = env.hp.replace(stats_dir=str(stats))
    other = make_llama(seed=1)  # same architecture and name, other weights
    Editor(other, env.tok, hp).ensure_second_moments(hp.edit_layers)
    model = make_llama(seed=0)
    inject_prefixes(model, hp)
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        apply_blue_to_model(model, env.tok, [dict(GOOD)], hp)
    assert any("weights_fingerprint" in r.getMessage() for r in caplog.records)
    assert changed_params(_reference_edit(env, tmp_path), model) == set()


def test_yaml_without_base_method_warns_and_uses_default(env, caplog):
    config = {k: v for k, v in env.hp.to_dict().items() if k not in ("base_method", "blue")}
    path = env.root / "defaults.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="blue_plugin.hparams"):
        hp = BLUEHyperParams.from_hparams(path)
    assert hp.base_method == "MEMIT" and hp.blue is True
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'base_method' is not set; using 'MEMIT'" in messages and "'blue' is not set; using True" in messages


# ---- statistics cache: what tests/unit/test_stats.py does not cover yet ----------------------------

_STATS_WORKER = r"""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from blue_plugin.stats.moments import get_second_moments
cfg = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"]).eval()
tok = PreTrainedTokenizerFast.from_pretrained(cfg["model_dir"])
calls = []
model.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
Path(cfg["ready"]).write_text("1")
while not all(Path(p).exists() for p in cfg["all_ready"]):  # start both passes together
    time.sleep(0.01)
out = get_second_moments(model, tok, cfg["names"], cfg["corpus"], 200, 32, cfg["cache"], model_id="tiny", batch_size=2, progress=False)
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in out.items()}, cfg["out"])
print("FORWARDS", len(calls))
"""


def test_two_processes_compute_statistics_once(env, tmp_path):
    """Two processes asking for the same statistics at the same moment: one computes, the other
    waits on the file lock and reads the file; both get identical tensors, the cache holds exactly
    the two complete files."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    make_llama(seed=0).save_pretrained(model_dir)
    env.tok.save_pretrained(model_dir)
    corpus = write_corpus(tmp_path / "corpus.txt", n=200)
    names = ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    ready = [str(tmp_path / f"ready{i}") for i in range(2)]
    repo = Path(__file__).resolve().parents[2]
    run_env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    procs = []
    for i in range(2):
        cfg = {"model_dir": str(model_dir), "names": names, "corpus": str(corpus), "cache": str(tmp_path / "cache"),
               "ready": ready[i], "all_ready": ready, "out": str(tmp_path / f"out{i}.safetensors")}
        procs.append(subprocess.Popen([sys.executable, "-c", _STATS_WORKER, json.dumps(cfg)], cwd=str(repo), env=run_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outputs.append(out.decode(errors="replace"))
        assert p.returncode == 0, outputs[-1][-3000:]
    forwards = sorted(int(o.split("FORWARDS")[-1].split()[0]) for o in outputs)
    assert forwards == [0, 100]  # 200 documents in batches of 2, computed by exactly one process
    a, b = load_file(str(tmp_path / "out0.safetensors")), load_file(str(tmp_path / "out1.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in names)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_file())
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)


def test_interrupted_statistics_write_keeps_the_old_file(env, tmp_path, monkeypatch):
    """save_moment writes to a temp file and renames: a crash mid-write leaves the previous file
    byte-identical and no temp file behind."""
    import safetensors.torch

    from blue_plugin.stats import cache as stats

    src = next(env.stats.glob("*.safetensors"))
    path = tmp_path / src.name
    shutil.copy(src, path)
    before = path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, tensor = f.metadata(), f.get_tensor("mom2")
    real = safetensors.torch.save_file

    def dies_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:64])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        stats.save_moment(path, tensor * 2, meta)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_statistics_for_another_tokenizer_or_format_are_recomputed(env, tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from blue_plugin.stats.moments import get_second_moments

    names = ["model.layers.0.mlp.down_proj"]
    model = make_llama(seed=0)
    kw = dict(corpus=str(env.corpus), n_samples=30, max_length=16, cache_dir=tmp_path, model_id="tiny", progress=False)
    first = get_second_moments(model, env.tok, names, **kw)[names[0]]
    other_tok = make_tokenizer(add_bos=False)  # same vocabulary, no BOS: other token streams
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        second = get_second_moments(model, other_tok, names, **kw)[names[0]]
    assert any("tokenizer_fingerprint" in r.getMessage() for r in caplog.records)
    assert not torch.equal(first, second)
    path = next(tmp_path.glob("*.safetensors"))
    with safe_open(str(path), "pt") as f:
        meta, t = f.metadata(), f.get_tensor("mom2")
    save_file({"mom2": t}, str(path), metadata={**meta, "format_version": "0"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        get_second_moments(model, other_tok, names, **kw)
    assert any("format_version" in r.getMessage() for r in caplog.records)


def test_statistics_of_a_nan_model_are_refused_not_cached(env, tmp_path):
    from blue_plugin.stats.moments import get_second_moments

    model = make_llama(seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj"):
        get_second_moments(model, env.tok, ["model.layers.0.mlp.down_proj"], str(env.corpus), 30, 16, tmp_path,
                           model_id="tiny", progress=False)
    assert list(tmp_path.glob("*.safetensors")) == []
