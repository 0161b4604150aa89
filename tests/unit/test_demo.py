"""The main job's choices on a machine without data: our own facts and the model-sampled corpus,
each said out loud; with the data present, CounterFact and the configured corpus."""
from __future__ import annotations

import pytest

from benchmarks import demo
from blue_plugin import BLUEHyperParams
from blue_plugin.evaluation.data import BUILTIN_FACTS


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    monkeypatch.delenv("BLUE_PLUGIN_DATA", raising=False)
    monkeypatch.setenv("BLUE_PLUGIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_facts_fall_back_to_the_shipped_ones_without_data(no_data):
    path, note = demo.choose_facts(None)
    assert path == BUILTIN_FACTS and "20 counterfactual facts" in note and "fetch counterfact" in note


def test_an_explicit_missing_dataset_is_an_error(no_data):
    with pytest.raises(ValueError, match="does not exist"):
        demo.choose_facts(str(no_data / "missing.json"))


def test_unreadable_corpus_falls_back_to_sampled_text_and_says_why(no_data):
    hp = BLUEHyperParams.from_hparams("smollm2-135m").replace(mom2_dataset=str(no_data / "no-corpus.txt"))
    corpus, note = demo.choose_corpus(hp)
    assert corpus == "sampled" and "cannot be read here" in note and "no-corpus.txt" in note


def test_readable_or_sampled_corpus_is_kept(no_data):
    text = no_data / "corpus.txt"
    text.write_text("one document\nanother document\n")
    hp = BLUEHyperParams.from_hparams("smollm2-135m")
    assert demo.choose_corpus(hp.replace(mom2_dataset=str(text)))[0] == str(text)
    assert demo.choose_corpus(hp.replace(mom2_dataset="sampled"))[0] == "sampled"
