"""PRUNE's restraint in the sequential benchmark: where it acts, every curve point and the final
evaluation are repeated on the unrestrained sequence, which is MEMIT without accumulated keys, so
the recorded difference is the restraint's own effect (tiny random Llama whose rewrite weights
have sigma_max = 1.5, weak regularisation)."""
from __future__ import annotations

import pytest
import torch

from benchmarks import sequential as seq
from benchmarks.sequential.status import run_status, write_status
from blue_plugin.datafiles import locate

CF, CORPUS = locate("counterfact"), locate("wordnet-glosses")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(CF is None or CORPUS is None,
                                 reason="CounterFact or the WordNet corpus not found: set BLUE_PLUGIN_DATA (docs/data.md)")]


@pytest.fixture
def small_sigma_model(tmp_path):
    from tests.tiny import make_llama, make_tokenizer, write_benchmark_yaml

    path = write_benchmark_yaml(seq.DEFAULT_HPARAMS, tmp_path, layers=[1, 3], v_num_grad_steps=6, clamp_norm_factor=4,
                                mom2_update_weight=1e-6)
    model = make_llama(n_layers=4, hidden=32, intermediate=64)
    with torch.no_grad():
        for l in (1, 3):
            w = model.model.layers[l].mlp.down_proj.weight
            w.mul_(1.5 / float(torch.linalg.svdvals(w)[0]))
    return model, make_tokenizer(), path


def test_prune_run_records_where_the_restraint_acts_and_its_effect(small_sigma_model, tmp_path):
    model, tok, hp_path = small_sigma_model
    before = {l: model.model.layers[l].mlp.down_proj.weight.detach().clone() for l in (1, 3)}
    res = seq.run_benchmark(data=CF, methods="PRUNE,MEMIT", n=4, batch_size=2, seed=0, hparams=hp_path, model=model,
                            tok=tok, fluency_tokens=3, curve_every=2, curve_cases=3, curve_fluency_cases=2,
                            heldout_docs=4, overrides={"accumulate_keys": False}, progress=False, plots=True,
                            out=tmp_path / "run")
    prune, memit = res["methods"]["PRUNE"], res["methods"]["MEMIT"]
    r = prune["restraint"]
    assert [t["n_edits"] for t in r["sigma_trace"]] == [2, 4]
    assert r["first_acting_n_edits"] == 2
    assert all(v["max_over_sigma_max"] > 1 for v in r["sigma_trace"][-1]["layers"].values())
    fin = r["final"]
    assert fin["layers"] == [1, 3]
    # the unrestrained sequence is MEMIT without accumulated keys: the same scores, case by case
    assert fin["scores"] == memit["scores"]
    assert fin["heldout"]["doc_nll"] == memit["heldout"]["doc_nll"]
    # and the restraint changes what the served model predicts
    nll = lambda scores: [s["rewrite_nll_new"] for s in scores]
    assert nll(prune["scores"]) != nll(memit["scores"])
    diff = fin["restrained_minus_unrestrained"]
    assert set(diff) >= {"efficacy", "specificity", "fluency", "perplexity"} and diff["efficacy"]["n"] == 4
    # curve points: the one after 2 edits and the final one carry the unrestrained twin on the same cases
    pts = prune["curves"]
    assert [(p["n_edits"], "unrestrained" in p) for p in pts] == [(0, False), (2, True), (4, True)]
    for p in pts[1:]:
        assert [s["index"] for s in p["unrestrained"]["scores"]] == [s["index"] for s in p["scores"]]
    assert pts[2]["unrestrained"]["scores"] == memit["curves"][2]["scores"]
    assert memit["restraint"] is None and "unrestrained" not in memit["curves"][1]
    table = (tmp_path / "run" / "table.md").read_text()
    assert "PRUNE's restraint" in table and "| PRUNE | 2 | L1: " in table
    assert (tmp_path / "run" / "curve_efficacy.png").stat().st_size > 1000
    for l in (1, 3):  # the benchmark leaves the model as it found it
        assert torch.equal(model.model.layers[l].mlp.down_proj.weight, before[l])


def test_resumed_prune_run_keeps_the_unrestrained_sequence(small_sigma_model, tmp_path):
    """Interrupted after its first batch and resumed, the PRUNE run continues from the saved
    unrestrained weights: the same restraint record and evaluations as without the interruption."""
    model, tok, hp_path = small_sigma_model
    kw = dict(data=CF, methods="PRUNE", n=4, batch_size=2, seed=0, hparams=hp_path, model=model, tok=tok,
              fluency_tokens=2, curve_every=2, curve_cases=3, curve_fluency_cases=1, heldout_docs=3,
              progress=False, plots=False)
    full = seq.run_benchmark(out=tmp_path / "full", **kw)

    def stop(method, batches):
        raise seq.BenchmarkInterrupted("simulated interruption")

    with pytest.raises(seq.BenchmarkInterrupted):
        seq.run_benchmark(out=tmp_path / "resumed", on_batch=stop, **kw)
    # --status reads where the interrupted run stands from its progress folder alone
    status = write_status(tmp_path / "resumed")
    prune = status["methods"]["PRUNE"]
    assert (prune["state"], prune["edits"], prune["first_acting_n_edits"]) == ("in progress", 2, 2)
    assert [c["n_edits"] for c in prune["curves"]] == [2] and prune["curves"][0]["unrestrained"] is not None
    assert prune["sigma_last"] == full["methods"]["PRUNE"]["restraint"]["sigma_trace"][0]
    assert "* PRUNE: in progress, 2 of 4 edits" in status["table"] and "| PRUNE unrestrained | 2 |" in status["table"]
    assert (tmp_path / "resumed" / "status.json").is_file()
    # and, paired over the point's cases, the served model minus the unrestrained one
    point = next(c for c in full["methods"]["PRUNE"]["curves"] if c["n_edits"] == 2 and c["source"] != "pre")
    unrestrained = {u["case_id"]: u for u in point["unrestrained"]["scores"]}
    effect = prune["curves"][0]["restrained_minus_unrestrained"]
    for key in ("efficacy", "specificity", "fluency"):
        expected = [r[key] - unrestrained[r["case_id"]][key] for r in point["scores"] if r.get(key) is not None]
        assert effect[key]["n"] == len(expected) and effect[key]["mean"] == pytest.approx(sum(expected) / len(expected))
    assert effect["perplexity"]["n"] == 3
    assert "| PRUNE restrained minus unrestrained, paired | 2 |" in status["table"]
    resumed = seq.run_benchmark(out=tmp_path / "resumed", **kw)
    assert run_status(tmp_path / "resumed")["methods"]["PRUNE"]["state"] == "finished"
    a, b = full["methods"]["PRUNE"], resumed["methods"]["PRUNE"]
    assert b["restraint"]["final"]["layers"] == [1, 3]
    assert b["restraint"]["sigma_trace"] == a["restraint"]["sigma_trace"]
    assert b["restraint"]["final"]["scores"] == a["restraint"]["final"]["scores"]
    assert b["scores"] == a["scores"]
    assert b["curves"][1]["unrestrained"]["scores"] == a["curves"][1]["unrestrained"]["scores"]
