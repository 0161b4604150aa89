"""Tests for blue_plugin.stats.moments on tiny random Llama / GPT-2 models and a tiny word-level tokenizer."""
from __future__ import annotations

import json
import logging
import random
import threading
from pathlib import Path

import pytest
import torch

from blue_plugin.stats import cache as stats
from blue_plugin.stats import collect_second_moments, get_second_moments, read_corpus
from blue_plugin.stats import corpus as corpus_mod
from blue_plugin.stats.cache import request_metadata

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = (
    "the a an cat dog bird sat on mat ran fast slow red blue green house tree river city "
    "king queen paris france capital is of in and big small old new runs sees likes"
).split()


def _make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    """Word-level tokenizer over WORDS with a BOS token prepended, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture()
def llama():
    return _llama()


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    lines = _make_texts(23)
    lines.insert(5, "")
    lines.insert(9, "   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _brute_force(model, tok, names, texts, max_length):
    """Every text alone (no padding) through the FULL model; K^T K / n in float64."""
    modules = dict(model.named_modules())
    keys = {n: [] for n in names}
    handles = [modules[n].register_forward_pre_hook(
        lambda m, a, n=n: keys[n].append(a[0].reshape(-1, a[0].shape[-1]).double())) for n in names]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        k = torch.cat(keys[n])
        out[n] = (k.T @ k / k.shape[0], k.shape[0])
    return out


def _count_calls(modules):
    counter = {id(m): 0 for m in modules}

    def hook(m, a):
        counter[id(m)] += 1

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    return counter, handles


# ------------------------------------------------------------------------------------------------
# collect_second_moments
# ------------------------------------------------------------------------------------------------


def test_collect_matches_brute_force_llama(llama, tok):
    names = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    texts = _make_texts(20)
    got = collect_second_moments(llama, tok, names, texts, max_length=16, batch_size=4, progress=False)
    ref = _brute_force(llama, tok, names, texts, 16)
    for n in names:
        s, c = got[n]
        assert s.dtype == torch.float64 and s.shape == (64, 64)
        assert c == ref[n][1]
        torch.testing.assert_close(s / c, ref[n][0], rtol=1e-5, atol=1e-9)
    # the two layers really differ (hooks are not mixed up)
    assert not torch.allclose(got[names[0]][0], got[names[1]][0])


def test_collect_gpt2_conv1d(tok):
    model = _gpt2()
    names = ["transformer.h.0.mlp.c_proj", "transformer.h.2.mlp.c_proj"]
    assert type(dict(model.named_modules())[names[0]]).__name__ == "Conv1D"
    texts = _make_texts(12, seed=1)
    got = collect_second_moments(model, tok, names, texts, max_length=20, batch_size=5, progress=False)
    ref = _brute_force(model, tok, names, texts, 20)
    for n in names:
        s, c = got[n]
        assert s.shape == (128, 128)  # d_ff = 4 * n_embd, not n_embd
        assert c == ref[n][1]
        torch.testing.assert_close(s / c, ref[n][0], rtol=1e-5, atol=1e-9)


def test_padding_excluded(llama, tok):
    names = ["model.layers.3.mlp.down_proj"]
    texts = _make_texts(10, seed=2)
    n_real = sum(len(ids) for ids in tok(texts, truncation=True, max_length=16)["input_ids"])
    s1, c1 = collect_second_moments(llama, tok, names, texts, 16, batch_size=1, progress=False)[names[0]]
    s4, c4 = collect_second_moments(llama, tok, names, texts, 16, batch_size=4, progress=False)[names[0]]
    assert c1 == c4 == n_real
    assert n_real < 10 * 16  # the batches of 4 did contain padding
    torch.testing.assert_close(s4, s1, rtol=1e-5, atol=1e-8)


def test_stops_after_highest_needed_layer(llama, tok):
    layers = list(llama.model.layers)
    counter, handles = _count_calls(layers + [llama.model.norm, llama.lm_head])
    texts = _make_texts(9, seed=3)
    try:
        collect_second_moments(llama, tok, ["model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj"],
                               texts, 16, batch_size=4, progress=False)
    finally:
        for h in handles:
            h.remove()
    calls = [counter[id(m)] for m in layers]
    assert calls == [3, 3, 0, 0]  # 9 texts / batch 4 = 3 passes; layers 2, 3 never run
    assert counter[id(llama.model.norm)] == 0 and counter[id(llama.lm_head)] == 0


def test_restores_training_mode_and_removes_hooks(llama, tok):
    llama.train()
    name = "model.layers.0.mlp.down_proj"
    module = dict(llama.named_modules())[name]
    collect_second_moments(llama, tok, [name], _make_texts(3), 8, progress=False)
    assert llama.training
    assert not module._forward_pre_hooks


def test_bad_inputs(llama, tok):
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        collect_second_moments(llama, tok, ["model.layers.1.mlp.down_prj"], ["the cat"], 8, progress=False)
    with pytest.raises(ValueError, match="empty"):
        collect_second_moments(llama, tok, [], ["the cat"], 8, progress=False)
    with pytest.raises(ValueError, match="texts"):
        collect_second_moments(llama, tok, ["model.layers.1.mlp.down_proj"], [], 8, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        collect_second_moments(llama, tok, ["model.layers.1.mlp.down_proj"], ["a"], 8, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        collect_second_moments(llama, tok, ["model.layers.1.mlp.down_proj"], ["a"], 0)


# ------------------------------------------------------------------------------------------------
# get_second_moments and the cache
# ------------------------------------------------------------------------------------------------

NAMES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]


def _get(model, tok, corpus, cache_dir, n=20, names=NAMES, max_length=16, **kw):
    return get_second_moments(model, tok, names, str(corpus), n, max_length, cache_dir,
                              model_id="tiny-llama", batch_size=4, progress=False, **kw)


def _layer0_calls(model, fn):
    counter, handles = _count_calls([model.model.layers[0]])
    try:
        out = fn()
    finally:
        for h in handles:
            h.remove()
    return out, counter[id(model.model.layers[0])]


def test_cache_round_trip(llama, tok, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    first, calls1 = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache))
    assert calls1 == 5  # 20 docs, batch 4: one pass for both layers
    files = sorted(p.name for p in cache.iterdir() if p.name != ".locks")
    assert files == [
        "tiny-llama__model.layers.1.mlp.down_proj__corpus__n20__len16.safetensors",
        "tiny-llama__model.layers.2.mlp.down_proj__corpus__n20__len16.safetensors",
    ]  # no temp or lock files left
    second, calls2 = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache))
    assert calls2 == 0
    for n in NAMES:
        assert torch.equal(first[n], second[n]) and second[n].dtype == torch.float64
    ref = _brute_force(llama, tok, NAMES, read_corpus(str(corpus_file), 20), 16)
    for n in NAMES:
        torch.testing.assert_close(second[n], ref[n][0], rtol=1e-5, atol=1e-9)
    # metadata is what the docs promise
    from safetensors import safe_open

    with safe_open(str(cache / files[0]), "pt") as f:
        meta = f.metadata()
    assert meta["module"] == NAMES[0] and meta["n_samples"] == "20" and meta["max_length"] == "16"
    assert meta["count"] == str(ref[NAMES[0]][1]) and meta["n_docs"] == "20"
    assert meta["model_type"] == "llama" and meta["num_layers"] == "4" and meta["dtype"] == "float64"
    assert meta["corpus_path"] == str(corpus_file) and len(meta["corpus_sha256"]) == 64


def test_cache_partial_hit_computes_only_missing(llama, tok, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    _get(llama, tok, corpus_file, cache, names=[NAMES[0]])
    counter, handles = _count_calls(list(llama.model.layers))
    try:
        out = _get(llama, tok, corpus_file, cache, names=[NAMES[0], "model.layers.0.mlp.down_proj"])
    finally:
        for h in handles:
            h.remove()
    # layer 1 came from the cache, so the pass stopped after layer 0
    assert [counter[id(m)] for m in llama.model.layers] == [5, 0, 0, 0]
    assert set(out) == {NAMES[0], "model.layers.0.mlp.down_proj"}


def test_no_cache_dir(llama, tok, corpus_file):
    a, calls_a = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, None))
    b, calls_b = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, None))
    assert calls_a == calls_b == 5
    assert torch.equal(a[NAMES[0]], b[NAMES[0]])


def test_warns_when_fewer_tokens_than_dimension(llama, tok, corpus_file, caplog):
    """C0 from fewer tokens than the key dimension (64 here) is singular: say so, with the fix."""
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        _get(llama, tok, corpus_file, None, n=2, names=NAMES[:1])
    msgs = [r.getMessage() for r in caplog.records if "fewer than its dimension 64" in r.getMessage()]
    assert len(msgs) == 1 and "raise mom2_n_samples" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        out = _get(llama, tok, corpus_file, None, n=20, names=NAMES[:1])
    assert not [r for r in caplog.records if "fewer than its dimension" in r.getMessage()]
    assert torch.linalg.matrix_rank(out[NAMES[0]]) == 64


def test_truncated_file_recomputed_with_warning(llama, tok, corpus_file, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = _get(llama, tok, corpus_file, cache)
    path = next(p for p in cache.iterdir() if NAMES[0] in p.name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        again, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache))
    assert calls == 5
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(again[NAMES[0]], first[NAMES[0]], rtol=1e-12, atol=0)
    assert path.stat().st_size == len(data)  # rewritten whole


def test_flipped_byte_recomputed(llama, tok, corpus_file, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = _get(llama, tok, corpus_file, cache)
    path = next(p for p in cache.iterdir() if NAMES[1] in p.name)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40  # inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        again, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache))
    assert calls == 5
    assert any("checksum" in r.getMessage() for r in caplog.records)
    assert torch.equal(again[NAMES[1]], first[NAMES[1]])


def test_garbage_file_recomputed(llama, tok, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    _get(llama, tok, corpus_file, cache)
    for p in cache.glob("*.safetensors"):
        p.write_bytes(b"\x80\x04not a safetensors file")
    out, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache))
    assert calls == 5 and torch.isfinite(out[NAMES[0]]).all()


def test_metadata_mismatch_recomputes(llama, tok, corpus_file, tmp_path, caplog):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    cache = tmp_path / "cache"
    first = _get(llama, tok, corpus_file, cache)
    path = next(p for p in cache.iterdir() if NAMES[0] in p.name)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    # forge: same file name, but the metadata says it was made for another sample count
    save_file({"mom2": load_file(str(path))["mom2"] * 2}, str(path), metadata={**meta, "n_samples": "7"})
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        again, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache))
    assert calls == 5
    assert any("n_samples" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(again[NAMES[0]], first[NAMES[0]], rtol=1e-12, atol=0)


def test_different_n_samples_not_reused(llama, tok, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    a = _get(llama, tok, corpus_file, cache, n=20)
    b, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache, n=8))
    assert calls == 2
    assert not torch.allclose(a[NAMES[0]], b[NAMES[0]])


def test_other_weights_invalidate(tok, corpus_file, tmp_path, caplog):
    cache = tmp_path / "cache"
    m1 = _llama(seed=0)
    a = _get(m1, tok, corpus_file, cache)
    m2 = _llama(seed=1)  # same architecture and name, other weights
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats"):
        b, calls = _layer0_calls(m2, lambda: _get(m2, tok, corpus_file, cache))
    assert calls == 5
    assert any("weights_fingerprint" in r.getMessage() for r in caplog.records)
    assert not torch.allclose(a[NAMES[0]], b[NAMES[0]])
    # a change in the attention of the first layer also invalidates
    with torch.no_grad():
        m2.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    _, calls = _layer0_calls(m2, lambda: _get(m2, tok, corpus_file, cache))
    assert calls == 5


def test_editing_down_proj_keeps_cache(llama, tok, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    a = _get(llama, tok, corpus_file, cache)
    with torch.no_grad():  # what an edit does: change FFN output projections, layer 0 included
        for i in (0, 1, 2):
            llama.model.layers[i].mlp.down_proj.weight.add_(0.1)
    b, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache))
    assert calls == 0
    assert torch.equal(a[NAMES[0]], b[NAMES[0]])


def test_corpus_text_change_invalidates(llama, tok, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    _get(llama, tok, corpus_file, cache, n=5, subset="first")
    _get(llama, tok, corpus_file, cache, n=5)  # the default random subset: a file of its own
    with open(corpus_file, "a", encoding="utf-8") as f:  # appending after the first lines
        f.write("the king of france\n")
    _, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache, n=5, subset="first"))
    assert calls == 0  # the first 5 documents did not change: still valid
    _, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache, n=5))
    assert calls == 2  # one more document: another random subset, so recomputed
    corpus_file.write_text("the queen of paris\n" + corpus_file.read_text(encoding="utf-8"), encoding="utf-8")
    _, calls = _layer0_calls(llama, lambda: _get(llama, tok, corpus_file, cache, n=5, subset="first"))
    assert calls == 2


def test_concurrent_callers_compute_once(tok, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    models = [_llama(), _llama()]  # separate copies: hooks are per model
    counters = []
    barrier = threading.Barrier(2)
    results = [None, None]

    def work(i):
        counter, handles = _count_calls([models[i].model.layers[0]])
        counters.append(counter)
        barrier.wait()
        try:
            results[i] = _get(models[i], tok, corpus_file, cache)
        finally:
            for h in handles:
                h.remove()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(sum(c.values()) for c in counters) == 5  # one pass in total
    for n in NAMES:
        assert torch.equal(results[0][n], results[1][n])
    assert sorted(p.suffix for p in cache.iterdir() if p.name != ".locks") == [".safetensors"] * 2


def test_request_metadata_is_reusable(llama, tok, corpus_file):
    texts = read_corpus(str(corpus_file), 20)
    meta = request_metadata(llama, tok, NAMES[0], str(corpus_file), texts, 20, 16, "tiny-llama")
    assert set(stats.COMPARED_KEYS) <= set(meta)
    assert all(isinstance(v, str) for v in meta.values())
    assert stats.cache_file_name(meta) == "tiny-llama__model.layers.1.mlp.down_proj__corpus__n20__len16.safetensors"
    # the fingerprint ignores the edited kind of module but not the embeddings
    with torch.no_grad():
        llama.model.layers[0].mlp.down_proj.weight.mul_(2)
    assert request_metadata(llama, tok, NAMES[0], str(corpus_file), texts, 20, 16, "tiny-llama") == meta
    with torch.no_grad():
        llama.model.embed_tokens.weight.mul_(2)
    assert request_metadata(llama, tok, NAMES[0], str(corpus_file), texts, 20, 16, "tiny-llama") != meta


# ------------------------------------------------------------------------------------------------
# read_corpus
# ------------------------------------------------------------------------------------------------


def test_read_text_skips_blank_lines(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("  first doc \n\n   \nsecond doc\nthird\n", encoding="utf-8")
    assert read_corpus(str(p), 2, subset="first") == ["first doc", "second doc"]
    assert read_corpus(str(p), 10) == ["first doc", "second doc", "third"]


def test_read_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "", "c d"])) + "\n\n")
    assert read_corpus(str(p), 5) == ["a b", "c d"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="line 2.*'text'"):
        read_corpus(str(bad), 5)
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_corpus(str(bad), 5)


def test_read_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_corpus(str(tmp_path / "nope.txt"), 5)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        read_corpus(str(empty), 5)
    with pytest.raises(ValueError, match="not a regular file"):
        read_corpus(str(tmp_path), 5)
    with pytest.raises(ValueError, match="n_samples"):
        read_corpus(str(empty), 0)


def test_read_relative_and_home(tmp_path, monkeypatch):
    (tmp_path / "rel.txt").write_text("x y\n")
    monkeypatch.chdir(tmp_path)
    assert read_corpus("rel.txt", 1) == ["x y"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert read_corpus("~/rel.txt", 1) == ["x y"]


def test_read_hub_corpus_without_datasets(monkeypatch, tmp_path):
    import builtins

    monkeypatch.chdir(tmp_path)  # no local file called "wikipedia"
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ValueError, match="pip install datasets"):
        read_corpus("wikipedia", 3)


def test_hub_corpus_cache_hit_needs_no_hub(llama, tok, tmp_path, monkeypatch):
    """A cached 'wikipedia' statistic is reused without contacting the hub (or needing datasets)."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_hub(name, n, **kw):
        calls.append((name, n))
        return _make_texts(n, seed=5)

    monkeypatch.setattr(corpus_mod, "read_hf_corpus", fake_hub)
    cache = tmp_path / "cache"
    a = _get(llama, tok, "wikipedia", cache, n=6)
    assert calls == [("wikipedia", 6)]
    assert (cache / "tiny-llama__model.layers.1.mlp.down_proj__wikipedia__n6__len16.safetensors").exists()
    b, layer0 = _layer0_calls(llama, lambda: _get(llama, tok, "wikipedia", cache, n=6))
    assert calls == [("wikipedia", 6)] and layer0 == 0
    assert torch.equal(a[NAMES[0]], b[NAMES[0]])


def test_gpt2_fingerprint_ignores_mlp_c_proj_only(tok, corpus_file):
    model = _gpt2()
    name = "transformer.h.1.mlp.c_proj"
    texts = read_corpus(str(corpus_file), 4)
    meta = request_metadata(model, tok, name, str(corpus_file), texts, 4, 16)
    assert meta["model_type"] == "gpt2" and meta["hidden_size"] == "32" and meta["num_layers"] == "4"
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight.add_(1.0)  # the edited kind, in the first block
    assert request_metadata(model, tok, name, str(corpus_file), texts, 4, 16) == meta
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.add_(1.0)  # same short name, other module
    assert request_metadata(model, tok, name, str(corpus_file), texts, 4, 16) != meta


@pytest.mark.parametrize("d,blocks", [(67, 4), (64, 4), (5, 8), (1, 4)])
def test_block_triangular_gram_equals_the_full_product(d, blocks):
    """k^T k summed on the lower block triangle only, then mirrored, equals the full product
    (also when d is not a multiple of the block count, or smaller than it)."""
    from blue_plugin.stats.accumulate import add_lower_gram_, symmetrize_lower_

    g = torch.Generator().manual_seed(d)
    acc = torch.zeros(d, d, dtype=torch.float64)
    ref = torch.zeros(d, d, dtype=torch.float64)
    for n in (3, 40, 1):
        k = torch.randn(n, d, generator=g, dtype=torch.float64)
        add_lower_gram_(acc, k, blocks)
        ref += k.T @ k
    if d > 1:
        assert not torch.allclose(acc, ref)  # the upper blocks are still missing
    symmetrize_lower_(acc, blocks)
    assert torch.equal(acc, acc.T)
    torch.testing.assert_close(acc, ref, rtol=1e-12, atol=1e-12)
