"""``pre_from`` (``--pre-from``): a run of the same configuration with other methods takes the
unedited evaluation from a first run's folder instead of measuring it again; a run of another
configuration is refused before anything is copied (tiny random Llama)."""
from __future__ import annotations

import json

import pytest

from benchmarks import sequential as seq
from blue_plugin.datafiles import locate

CF, CORPUS = locate("counterfact"), locate("wordnet-glosses")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(CF is None or CORPUS is None,
                                 reason="CounterFact or the WordNet corpus not found: set BLUE_PLUGIN_DATA (docs/data.md)")]


@pytest.fixture
def tiny(tmp_path):
    from tests.tiny import make_llama, make_tokenizer, write_benchmark_yaml

    path = write_benchmark_yaml(seq.DEFAULT_HPARAMS, tmp_path, layers=[1, 2], v_num_grad_steps=3)
    return make_llama(n_layers=4, hidden=32, intermediate=64), make_tokenizer(), path


def test_second_pair_takes_the_unedited_evaluation_of_the_first(tiny, tmp_path):
    model, tok, hp_path = tiny
    kw = dict(data=CF, n=2, batch_size=2, seed=0, hparams=hp_path, model=model, tok=tok, fluency_tokens=2,
              heldout_docs=3, progress=False, plots=False)
    first = seq.run_benchmark(methods="MEMIT", out=tmp_path / "a", **kw)
    second = seq.run_benchmark(methods="MEMIT_BLUE", out=tmp_path / "b", pre_from=tmp_path / "a", **kw)
    assert second["config_hash"] == first["config_hash"]
    for name in ("pre.json", "heldout.json", "pre_heldout.json", "statistics.json"):
        a = json.loads((tmp_path / "a" / "progress" / name).read_text())
        assert json.loads((tmp_path / "b" / "progress" / name).read_text()) == a, name
    assert second["pre"]["eval_time_s"] == first["pre"]["eval_time_s"]  # taken, not measured again
    assert second["pre"]["heldout"] == first["pre"]["heldout"]

    # a folder of another configuration (N differs) is refused, and nothing is copied
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['n'\]\)"):
        seq.run_benchmark(methods="MEMIT", out=tmp_path / "c", pre_from=tmp_path / "a", **{**kw, "n": 1})
    assert not (tmp_path / "c" / "progress" / "pre.json").exists()
    with pytest.raises(ValueError, match="holds no progress/config.json"):
        seq.run_benchmark(methods="MEMIT", out=tmp_path / "d", pre_from=tmp_path / "nothing", **kw)
