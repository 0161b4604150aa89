"""Corpus sources (WordNet, sampled, combinations), the seeded random subset and mom2_dtype."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import pytest
import torch

from blue_plugin.stats import get_second_moments, read_corpus
from blue_plugin.stats import sampling as stats
from blue_plugin.stats import sources as C

pytest.importorskip("transformers")
from tests.tiny import make_model  # noqa: E402

NAMES = ["model.layers.1.mlp.down_proj"]
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n" \
         "  2 Princeton University under the following license. | not a gloss  \n"


def _synset(offset: int, pos: str, word: str, gloss: str) -> str:
    return f"{offset:08d} 03 {pos} 01 {word} 0 001 @ 00001740 {pos} 0000 | {gloss}  \n"


@pytest.fixture()
def wordnet_dir(tmp_path, monkeypatch):
    """A tiny WordNet dict directory (licence header, synset lines), found through WNSEARCHDIR;
    the system directory is hidden. Returns (directory, glosses in the expected order)."""
    folder = tmp_path / "dict"
    folder.mkdir()
    expected = []
    for part, pos in (("adv", "r"), ("adj", "a"), ("verb", "v"), ("noun", "n")):  # written out of order
        lines = [HEADER]
        for i in range(4):
            gloss = f"{part} gloss {i}; \"an example | with a bar\"" if i == 1 else f"{part} gloss {i}"
            lines.append(_synset(1740 + i, pos, f"{part}{i}", gloss))
        lines.append(f"{1800:08d} 03 {pos} 01 nogloss 0 000\n")  # no gloss: skipped
        (folder / f"data.{part}").write_text("".join(lines), encoding="utf-8")
    for part in C.WORDNET_PARTS:
        expected += [f"{part} gloss {i}; \"an example | with a bar\"" if i == 1 else f"{part} gloss {i}" for i in range(4)]
    monkeypatch.setenv("WNSEARCHDIR", str(folder))
    monkeypatch.delenv("WNHOME", raising=False)
    monkeypatch.delenv("BLUE_PLUGIN_DATA", raising=False)
    monkeypatch.setattr(C, "WORDNET_SYSTEM_DIRS", (str(tmp_path / "no-system-wordnet"),))
    return folder, expected


@pytest.fixture()
def no_wordnet(tmp_path, monkeypatch):
    for var in ("WNSEARCHDIR", "WNHOME", "BLUE_PLUGIN_DATA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(C, "WORDNET_SYSTEM_DIRS", (str(tmp_path / "no-system-wordnet"),))


@pytest.fixture()
def llama(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUE_PLUGIN_CACHE", str(tmp_path / "cache-root"))
    torch.set_num_threads(1)
    return make_model("llama")


def _forward_calls(model):
    calls = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def _sha(texts):
    h = hashlib.sha256()
    for doc in texts:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ---- WordNet ------------------------------------------------------------------------------------


def test_wordnet_parsed_from_a_dict_dir(wordnet_dir):
    folder, expected = wordnet_dir
    assert C.find_wordnet() == folder
    assert C.parse_wordnet_glosses(folder) == expected  # noun, verb, adj, adv; header and gloss-less lines skipped
    assert read_corpus("wordnet", 100) == expected  # n >= N: all, in order
    assert read_corpus("wordnet", 5, subset="first") == expected[:5]
    ident = C.corpus_identity("wordnet", expected)
    assert ident["corpus_name"] == "wordnet" and ident["corpus_path"] == str(folder)
    assert ident["corpus_sha256"] == _sha(expected) and ident["corpus_subset"] == "random:seed=1"


def test_wordnet_search_order_and_fallback_file(wordnet_dir, tmp_path, monkeypatch, caplog):
    folder, expected = wordnet_dir
    home = tmp_path / "wnhome"
    (home / "dict").mkdir(parents=True)
    for part in C.WORDNET_PARTS:
        (home / "dict" / f"data.{part}").write_text(_synset(1740, "n", "x", f"home {part}"), encoding="utf-8")
    monkeypatch.setenv("WNHOME", str(home))
    assert C.find_wordnet() == folder  # WNSEARCHDIR first
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="blue_plugin.stats.sources"):
        assert C.find_wordnet() == home / "dict"
    assert any("WNSEARCHDIR" in r.getMessage() for r in caplog.records)  # a bad setting is not ignored silently
    assert read_corpus("wordnet", 9) == [f"home {p}" for p in C.WORDNET_PARTS]
    monkeypatch.delenv("WNHOME")
    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    (data / "corpus" / "wordnet-glosses.txt").write_text("\n".join(expected) + "\n", encoding="utf-8")
    monkeypatch.setenv("BLUE_PLUGIN_DATA", os.pathsep.join([str(tmp_path / "elsewhere"), str(data)]))
    assert C.find_wordnet() == data / "corpus" / "wordnet-glosses.txt"
    assert read_corpus("wordnet", 100) == expected
    # the same documents give the same identity, wherever they were read from
    assert C.corpus_identity("wordnet", expected)["corpus_sha256"] == _sha(expected)


def test_missing_wordnet_says_what_to_install(no_wordnet, tmp_path):
    llama_model, tok = make_model("llama")
    with pytest.raises(ValueError, match=r"apt-get install wordnet-base.*WNSEARCHDIR.*BLUE_PLUGIN_DATA.*sampled"):
        read_corpus("wordnet", 10)
    with pytest.raises(ValueError, match="apt-get install wordnet-base"):  # the engine's path: no silent fallback
        get_second_moments(llama_model, tok, NAMES, "wordnet", 10, 16, tmp_path / "stats", progress=False)
    with pytest.raises(ValueError, match="apt-get install wordnet-base"):
        read_corpus("wordnet+sampled", 10, model=llama_model, tok=tok)
    assert not (tmp_path / "stats").exists() or not list((tmp_path / "stats").glob("*.safetensors"))


def test_real_wordnet_matches_the_glosses_file(monkeypatch):
    """Debian's wordnet-base parsed at run time equals the one-gloss-per-line file (set
    BLUE_PLUGIN_DATA to the folder that holds corpus/wordnet-glosses.txt)."""
    found = [Path(d) / C.WORDNET_GLOSSES_FILE for d in os.environ.get("BLUE_PLUGIN_DATA", "").split(os.pathsep) if d]
    glosses = next((f for f in found if f.is_file()), None)
    if glosses is None:
        pytest.skip("BLUE_PLUGIN_DATA/corpus/wordnet-glosses.txt not available")
    monkeypatch.delenv("BLUE_PLUGIN_DATA")
    try:
        folder = C.find_wordnet()
    except ValueError:
        pytest.skip("no WordNet dict directory (apt-get install wordnet-base)")
    parsed = C.parse_wordnet_glosses(folder)
    lines = glosses.read_text(encoding="utf-8").splitlines()
    assert len(parsed) == len(lines) == 117_659
    assert parsed[:500] == lines[:500]
    assert parsed == lines


# ---- subsets ------------------------------------------------------------------------------------


def test_random_subset_is_seeded_and_not_the_first_documents(tmp_path):
    path = tmp_path / "c.txt"
    docs = [f"document {i}" for i in range(200)]
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    first = read_corpus(str(path), 20, subset="first")
    assert first == docs[:20]
    rnd = read_corpus(str(path), 20)
    assert rnd == read_corpus(str(path), 20, subset="random", seed=1)  # the default is seeded
    assert rnd != first and len(set(rnd)) == 20 and set(rnd) <= set(docs)
    assert rnd == sorted(rnd, key=docs.index)  # in corpus order
    # MEMIT's FixedRandomSubsetSampler(seed=1): the first n of a random.Random(1)-shuffled range
    order = list(range(200))
    random.Random(1).shuffle(order)
    assert rnd == [docs[i] for i in sorted(order[:20])]
    assert read_corpus(str(path), 20, seed=2) != rnd
    assert read_corpus(str(path), 500) == docs  # n >= N: everything
    with pytest.raises(ValueError, match="subset"):
        read_corpus(str(path), 5, subset="last")


def test_subset_and_mom2_dtype_are_part_of_the_cache_identity(tmp_path):
    model, tok = make_model("llama")
    path = tmp_path / "c.txt"
    path.write_text("\n".join(f"The capital of France is Paris {i}" for i in range(40)) + "\n", encoding="utf-8")
    cache = tmp_path / "stats"
    kw = dict(model_id="tiny", batch_size=8, progress=False)
    a = get_second_moments(model, tok, NAMES, str(path), 10, 16, cache, **kw)
    b = get_second_moments(model, tok, NAMES, str(path), 10, 16, cache, subset="first", **kw)
    c = get_second_moments(model, tok, NAMES, str(path), 10, 16, cache, mom2_dtype="float64", **kw)
    d = get_second_moments(model, tok, NAMES, str(path), 10, 16, cache, mom2_dtype="bfloat16", **kw)
    names = sorted(p.name for p in cache.glob("*.safetensors"))
    assert names == [
        "tiny__model.layers.1.mlp.down_proj__c__n10__len16.safetensors",
        "tiny__model.layers.1.mlp.down_proj__c__n10__len16__bfloat16.safetensors",
        "tiny__model.layers.1.mlp.down_proj__c__n10__len16__first.safetensors",
        "tiny__model.layers.1.mlp.down_proj__c__n10__len16__float64.safetensors",
    ]
    meta = _meta(cache / names[0])
    assert meta["format_version"] == "2" and meta["corpus_subset"] == "random:seed=1"
    assert meta["dtype"] == "float64" and meta["mom2_dtype"] == "float32"
    assert _meta(cache / names[2])["corpus_subset"] == "first"
    assert _meta(cache / names[3])["mom2_dtype"] == "float64"
    assert not torch.allclose(a[NAMES[0]], b[NAMES[0]])  # other documents
    torch.testing.assert_close(c[NAMES[0]], a[NAMES[0]], rtol=1e-5, atol=1e-7)  # float32 products vs float64
    assert not torch.equal(c[NAMES[0]], a[NAMES[0]])
    torch.testing.assert_close(d[NAMES[0]], a[NAMES[0]], rtol=5e-2, atol=5e-3)  # keys rounded to bfloat16
    assert not torch.allclose(d[NAMES[0]], a[NAMES[0]], rtol=1e-4, atol=1e-6)
    calls, handle = _forward_calls(model)
    try:
        get_second_moments(model, tok, NAMES, str(path), 10, 16, cache, subset="first", **kw)
        get_second_moments(model, tok, NAMES, str(path), 10, 16, cache, mom2_dtype="float64", **kw)
    finally:
        handle.remove()
    assert calls == []  # both found in the cache
    with pytest.raises(ValueError, match="mom2_dtype"):
        get_second_moments(model, tok, NAMES, str(path), 10, 16, cache, mom2_dtype="float8", **kw)


def test_float32_products_not_used_where_tf32_could_apply():
    from blue_plugin.stats import accumulate as stats

    assert stats._product_dtype(torch.device("cpu")) == torch.float32
    assert stats._product_dtype(torch.device("cpu"), "bfloat16") == torch.float32
    assert stats._product_dtype(torch.device("cpu"), "float64") == torch.float64
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert stats._product_dtype(torch.device("cuda", 0)) == torch.float32
        matmul.allow_tf32 = True
        assert stats._product_dtype(torch.device("cuda", 0)) == torch.float64
        assert stats._product_dtype(torch.device("cpu")) == torch.float32
    finally:
        matmul.allow_tf32 = before


# ---- sampled ------------------------------------------------------------------------------------


def test_sampled_is_seeded_cached_and_independent_of_batching(llama, tmp_path):
    model, tok = llama
    torch.manual_seed(123)
    calls, handle = _forward_calls(model)
    try:
        docs = read_corpus("sampled", 20, model=model, tok=tok, max_length=12)
        generated = len(calls)
        torch.manual_seed(456)  # the global RNG plays no part
        again = read_corpus("sampled", 20, model=model, tok=tok, max_length=12)
        assert len(calls) == generated > 0  # the second call read the cache file
    finally:
        handle.remove()
    assert again == docs and len(docs) == 20 and all(d.strip() == d and d for d in docs)
    assert [d.split()[0][:1] for d in docs[:3]] == ["T", "A", "I"]  # "The", "A", "In", ...
    files = list((tmp_path / "cache-root" / "corpus" / "sampled").glob("*.jsonl"))
    assert [f.name.split("__", 2)[2] for f in files] == ["n20__len12__seed1__v1.jsonl"]
    assert [json.loads(x)["text"] for x in files[0].read_text(encoding="utf-8").splitlines()] == docs
    assert stats.sample_corpus(model, tok, 20, 12, batch_size=3) == docs  # independent of the batch size
    assert stats.sample_corpus(model, tok, 7, 12) == docs[:7]  # document i does not depend on n
    assert stats.sample_corpus(model, tok, 4, 12, seed=2) != docs[:4]
    # an edit (FFN output projections) keeps the file; a damaged file is generated again
    weight = model.model.layers[0].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.01)
    assert stats.sampled_cache_path(model, tok, 20, 12) == files[0]
    files[0].write_text('{"text": "only one"}\n', encoding="utf-8")
    with torch.no_grad():
        weight.copy_(original)
    assert read_corpus("sampled", 20, model=model, tok=tok, max_length=12) == docs
    with pytest.raises(ValueError, match="pass model= and tok="):
        read_corpus("sampled", 5)


def test_kv_cache_sampling_equals_recomputing_every_step():
    """The batched, KV-cached sampler draws the same tokens as a plain loop that runs the model
    on the whole sequence at each step (same uniforms, inverse top-k CDF)."""
    model, tok = make_model("gpt2")
    prompt = tok("The")["input_ids"]
    g = torch.Generator().manual_seed(0)
    u = torch.rand(3, 10, generator=g)
    got = stats._sample_rows(model, prompt, u, 10, set(), torch.device("cpu"))
    for r in range(3):
        seq = list(prompt)
        with torch.no_grad():
            for t in range(10):
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()
                vals, idx = logits.topk(stats.SAMPLED_TOP_K)
                cdf = torch.softmax(vals, -1).cumsum(-1)
                seq.append(int(idx[min(int((cdf < u[r, t] * cdf[-1]).sum()), len(idx) - 1)]))
        assert got[r] == seq[len(prompt):]


def test_sampled_statistics_cache_carries_the_corpus_sha256(llama, tmp_path):
    model, tok = llama
    cache = tmp_path / "stats"
    kw = dict(model_id="tiny", batch_size=8, progress=False)
    first = get_second_moments(model, tok, NAMES, "sampled", 12, 16, cache, **kw)
    docs = read_corpus("sampled", 12, model=model, tok=tok, max_length=16)
    path = cache / "tiny__model.layers.1.mlp.down_proj__sampled__n12__len16.safetensors"
    meta = _meta(path)
    assert meta["corpus_name"] == "sampled" and meta["corpus_sha256"] == _sha(docs) and meta["n_docs"] == "12"
    calls, handle = _forward_calls(model)
    try:
        again = get_second_moments(model, tok, NAMES, "sampled", 12, 16, cache, **kw)
    finally:
        handle.remove()
    assert calls == [] and torch.equal(first[NAMES[0]], again[NAMES[0]])
    # the distributed entry point (one process) reads the same corpus and finds the same file
    from blue_plugin.stats.distributed import distributed_second_moments

    run = distributed_second_moments(model, tok, NAMES, "sampled", 12, 16, cache, **kw)
    assert run.cached == NAMES and torch.equal(run.moments[NAMES[0]], first[NAMES[0]])


def test_wordnet_plus_sampled(wordnet_dir, llama, tmp_path):
    _, glosses = wordnet_dir
    model, tok = llama
    docs = read_corpus("wordnet+sampled", 7, model=model, tok=tok, max_length=12)
    wn = read_corpus("wordnet", 4)
    assert docs[:4] == wn and docs[4:] == read_corpus("sampled", 3, model=model, tok=tok, max_length=12)
    assert read_corpus("wordnet+sampled", 7, subset="first", model=model, tok=tok, max_length=12)[:4] == glosses[:4]
    ident = C.corpus_identity("wordnet+sampled", docs)
    assert ident["corpus_name"] == "wordnet+sampled" and ident["corpus_sha256"] == _sha(docs)
    out = get_second_moments(model, tok, NAMES, "wordnet+sampled", 7, 12, tmp_path / "stats", model_id="tiny",
                             batch_size=4, progress=False)
    assert torch.isfinite(out[NAMES[0]]).all()
    path = tmp_path / "stats" / "tiny__model.layers.1.mlp.down_proj__wordnet_sampled__n7__len12.safetensors"
    assert _meta(path)["corpus_sha256"] == _sha(docs)
    # a file whose name contains '+' is still a file
    plus = tmp_path / "a+b.txt"
    plus.write_text("one doc\n", encoding="utf-8")
    assert read_corpus(str(plus), 3) == ["one doc"]
