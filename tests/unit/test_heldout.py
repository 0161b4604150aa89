"""Held-out documents (blue_plugin.stats.heldout): disjoint from the C0 subset read_corpus takes,
deterministic, prefix-stable and recorded, for text files, WordNet, hub corpora, sampled text and
combinations."""
from __future__ import annotations

import logging

import pytest
import torch

from blue_plugin.stats import heldout as H
from blue_plugin.stats import read_corpus
from blue_plugin.stats import sources as C
from blue_plugin.stats.heldout import heldout_documents, heldout_order, texts_sha256
from blue_plugin.stats.sampling import sample_corpus
from tests.tiny import make_model


@pytest.fixture()
def corpus_file(tmp_path):
    """60 documents, some repeated (a text repeated inside and outside C0 must not be held out)."""
    docs = [f"document number {i}" for i in range(50)] + ["a repeated text"] * 6 + [f"late {i}" for i in range(4)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path, docs


@pytest.fixture()
def wordnet_file(tmp_path, monkeypatch):
    """WordNet found as $BLUE_PLUGIN_DATA/corpus/wordnet-glosses.txt (no dict directory)."""
    glosses = [f"gloss {i}" for i in range(40)]
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    (tmp_path / "data" / "corpus" / "wordnet-glosses.txt").write_text("\n".join(glosses) + "\n", encoding="utf-8")
    for var in ("WNSEARCHDIR", "WNHOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BLUE_PLUGIN_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(C, "WORDNET_SYSTEM_DIRS", (str(tmp_path / "no-system-wordnet"),))
    return glosses


@pytest.fixture()
def llama(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUE_PLUGIN_CACHE", str(tmp_path / "cache-root"))
    torch.set_num_threads(1)
    return make_model("llama")


@pytest.mark.parametrize("subset", ["random", "first"])
def test_text_file_heldout_is_disjoint_deterministic_and_recorded(corpus_file, subset):
    path, docs = corpus_file
    c0 = read_corpus(str(path), 12, subset=subset)
    held = heldout_documents(str(path), 12, 20, subset=subset)
    assert len(held.texts) == 20 and len(set(held.texts)) == 20
    assert not set(held.texts) & set(c0)
    again = heldout_documents(str(path), 12, 20, subset=subset)
    assert again.texts == held.texts and again.record == held.record
    assert heldout_documents(str(path), 12, 7, subset=subset).texts == held.texts[:7]  # prefix-stable
    part = held.record["parts"][0]
    assert [docs[i] for i in part["indices"]] == held.texts  # the record says which documents
    assert part["corpus_documents"] == len(docs) and part["c0_documents"] == 12
    assert held.record["sha256"] == texts_sha256(held.texts) and held.record["subset"] == subset
    # a different C0 seed moves both
    other_c0 = read_corpus(str(path), 12, subset=subset, seed=5)
    other = heldout_documents(str(path), 12, 20, subset=subset, seed=5)
    assert not set(other.texts) & set(other_c0)
    if subset == "random":
        assert other.texts != held.texts


def test_c0_indices_are_those_choose_subset_takes():
    docs = [f"d{i}" for i in range(30)]
    for n in (1, 7, 29, 30, 40):
        c0, rest = heldout_order(len(docs), n, "random", 1)
        assert sorted(docs[i] for i in c0) == sorted(C.choose_subset(docs, n, "random", 1))
        assert sorted(c0 + rest) == list(range(30))


def test_repeated_texts_are_skipped_and_exhaustion_is_reported(corpus_file, caplog):
    path, docs = corpus_file
    c0 = set(read_corpus(str(path), 40))
    held = heldout_documents(str(path), 40, 100)
    distinct_left = {d for d in docs if d not in c0}
    assert set(held.texts) == distinct_left and len(held.texts) == len(distinct_left)  # all, once each
    assert "fewer than the 100 held-out documents" in caplog.text
    with pytest.raises(ValueError, match="no document .* is left outside"):
        heldout_documents(str(path), len(docs), 5)
    with pytest.raises(ValueError, match="n_docs"):
        heldout_documents(str(path), 10, 0)


def test_wordnet(wordnet_file):
    c0 = read_corpus("wordnet", 10)
    held = heldout_documents("wordnet", 10, 15)
    assert len(held.texts) == 15 and not set(held.texts) & set(c0)
    assert held.record["parts"][0]["kind"] == "corpus indices"
    assert [wordnet_file[i] for i in held.record["parts"][0]["indices"]] == held.texts


def test_hub_corpus_takes_the_stream_after_c0(monkeypatch):
    stream = [f"article {i}" for i in range(8)] + ["article 2", "article 30", "article 31", "article 32"]
    calls = []

    def fake_hub(name, n, subset="random", seed=1):
        calls.append((name, n, subset, seed))
        return stream[:n]

    monkeypatch.setattr(H, "read_hf_corpus", fake_hub)
    held = heldout_documents("wikitext", 8, 3)
    assert calls == [("wikitext", 11, "random", 1)]
    assert held.texts == ["article 30", "article 31"]  # "article 2" is C0's text: skipped
    assert held.record["parts"][0]["positions"] == [9, 10]


def test_sampled_uses_another_seed(llama):
    model, tok = llama
    c0 = read_corpus("sampled", 6, model=model, tok=tok, max_length=10)
    held = heldout_documents("sampled", 6, 4, model=model, tok=tok, max_length=10)
    assert held.record["parts"][0]["sampled_seed"] == 2
    fresh = sample_corpus(model, tok, 4, 10, seed=2)
    assert held.texts == [t for t in fresh if t not in set(c0)]
    assert not set(held.texts) & set(c0)
    assert heldout_documents("sampled", 6, 4, model=model, tok=tok, max_length=10).texts == held.texts
    with pytest.raises(ValueError, match="sampled_seed must differ"):
        heldout_documents("sampled", 6, 4, model=model, tok=tok, sampled_seed=1)


def test_combination_splits_like_read_corpus(wordnet_file, llama):
    model, tok = llama
    c0 = read_corpus("wordnet+sampled", 7, model=model, tok=tok, max_length=10)
    held = heldout_documents("wordnet+sampled", 7, 5, model=model, tok=tok, max_length=10)
    assert [p["c0_documents"] for p in held.record["parts"]] == [4, 3]
    assert [p["n_docs"] for p in held.record["parts"]] == [3, 2]
    assert not set(held.texts) & set(c0)
    assert all(t in wordnet_file for t in held.texts[:3])


def test_no_part_without_c0_documents(wordnet_file, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(ValueError, match="takes no document"):
        heldout_documents("wordnet+wordnet", 1, 4)
