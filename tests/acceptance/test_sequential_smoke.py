"""Tests for benchmarks.sequential: the CLI/API of the sequential editing benchmark.

* unit tests of method parsing, the markdown table and compare mode, the curve sample and the
  resumption of progress written before curves;
* resume: a run interrupted after a checkpoint and continued ends bit-for-bit like an
  uninterrupted one (tiny random Llama with the SmolLM2 tokenizer, seconds);
* curves: points 0, K and N per method, held-out perplexity of pre and every method, points
  kept across an interruption;
* the smoke run of the issue: SmolLM2, N=4, B=2, MEMIT_BLUE and AlphaEdit, small statistics
  sample and few optimisation steps; every metric present per method, table and plots written,
  the fixture's weights restored.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import sequential as seq
from blue_plugin.datafiles import locate

REPO_ROOT = Path(__file__).resolve().parents[2]
# found by blue_plugin.datafiles ($BLUE_PLUGIN_DATA, then the cache; never downloaded here); None if missing
CF = locate("counterfact")
ZSRE = locate("zsre")
CORPUS = locate("wordnet-glosses")

needs_data = pytest.mark.skipif(
    CF is None or ZSRE is None or CORPUS is None,
    reason="CounterFact, zsRE or the WordNet corpus not found: set BLUE_PLUGIN_DATA to the data folder (docs/data.md)")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- unit
def test_parse_methods():
    assert seq.parse_methods("memit_blue, AlphaEdit,MEMIT_BLUE") == ["MEMIT_BLUE", "AlphaEdit"]
    assert seq.parse_methods(["RECT", "prune-blue"]) == ["RECT", "PRUNE_BLUE"]
    with pytest.raises(ValueError, match="unknown method 'ROME'"):
        seq.parse_methods("MEMIT,ROME")
    with pytest.raises(ValueError, match="at least one method"):
        seq.parse_methods(" , ")


def test_method_hparams_switch_only_base_and_blue():
    base = seq.build_base_hparams(None, batch_size=3, seed=7)
    for name, (bm, blue) in seq.METHODS.items():
        hp = seq.method_hparams(base, name)
        assert (hp.base_method, hp.blue, hp.batch_size, hp.seed) == (bm, blue, 3, 7)
        assert hp.layers == base.layers and hp.L2 == base.L2
    # the YAML names its corpus (wordnet), which passes through unchanged (a relative path would be
    # resolved against the repository root)
    assert base.mom2_dataset == "wordnet"


def test_steps_per_layer_aggregates_over_batches():
    history = [{"steps": {4: [3, 25], 8: [1, 2]}}, {"steps": {"4": [5], "8": [25]}}]
    out = seq.steps_per_layer(history, max_steps=25)
    assert list(out) == [4, 8]
    assert out[4] == {"mean": 11.0, "max": 25, "total": 33, "n": 3, "not_converged": 1}
    assert out[8]["n"] == 3 and out[8]["not_converged"] == 1


# ------------------------------------------------------------------------------------------- tiny
def _raw(result):
    """Everything numeric that depends on the final weights of each method."""
    return {name: ([(s["rewrite_nll_new"], s["rewrite_nll_true"], s["paraphrase_nll_new"], s["neighborhood_nll_new"],
                     s["fluency"]) for s in m["scores"]],
                   [r["steps"] for r in m["history"]], m["curve"])
            for name, m in result["methods"].items()}


def test_blue_vs_base_pairs_cases_and_skips_unpaired_methods():
    """Differences are per case (X_BLUE - X) on the cases both scored, averaged; a method without
    its BLUE twin (RECT here) gets no row; the table shows the rows x100 with signs."""
    def scores(vals):
        return [{"case_id": i, "efficacy": e, "specificity": s, "fluency": None} for i, (e, s) in enumerate(vals)]

    result = {"config": {"seed": 0, "format": "counterfact", "data": "cf.json", "model": "m", "n": 3, "batch_size": 1},
              "methods": {"MEMIT": {"scores": scores([(0.0, 1.0), (1.0, 1.0), (0.0, 0.5)])},
                          "MEMIT_BLUE": {"scores": scores([(1.0, 1.0), (1.0, 0.0), (1.0, 0.5)])},
                          "RECT": {"scores": scores([(1.0, 1.0)] * 3)}}}
    d = seq.blue_vs_base(result)
    assert list(d) == ["MEMIT"]
    assert d["MEMIT"]["efficacy"]["mean"] == pytest.approx(2 / 3) and d["MEMIT"]["efficacy"]["n"] == 3
    assert d["MEMIT"]["specificity"]["mean"] == pytest.approx(-1 / 3)
    assert d["MEMIT"]["specificity"]["ci_low"] <= -1 / 3 <= d["MEMIT"]["specificity"]["ci_high"]
    assert "fluency" not in d["MEMIT"]  # no paired values
    assert seq._diff_cell(d["MEMIT"]["efficacy"]).startswith("+66.7 [")


@needs_data
@pytest.mark.parametrize("checkpoints", ["session"])  # EditSession is the only progress format
def test_resume_after_interruption_matches_uninterrupted_run(tiny_setup, tmp_path, checkpoints):
    from blue_plugin.editing.state import get_state

    model, tok, hp_path = tiny_setup
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if "down_proj" in n}
    kw = dict(data=CF, methods="MEMIT,PRUNE_BLUE", n=5, batch_size=2, seed=1, hparams=hp_path, model=model,
              tok=tok, fluency_tokens=4, eval_every=2, progress=False, plots=False, checkpoints=checkpoints)
    finals: dict[str, dict[str, torch.Tensor]] = {}

    def capture(run):
        def hook(method, batches):
            if method == "PRUNE_BLUE" and batches == 3:  # the final edited model and state
                st = get_state(model)
                finals[run] = {n: p.detach().clone() for n, p in model.named_parameters() if "down_proj" in n}
                finals[run].update({f"kpkp{l}": ls.kpkp.clone() for l, ls in st.layers.items() if ls.kpkp is not None})
            if run == "interrupted" and method == "PRUNE_BLUE" and batches == 2:
                raise seq.BenchmarkInterrupted("simulated interruption")
        return hook

    full = seq.run_benchmark(out=tmp_path / "full", on_batch=capture("full"), **kw)
    with pytest.raises(seq.BenchmarkInterrupted):
        seq.run_benchmark(out=tmp_path / "resumed", on_batch=capture("interrupted"), **kw)
    # the interrupted run left the model unedited, MEMIT finished and PRUNE_BLUE saved after batch 2
    for n, p in model.named_parameters():
        if n in W0:
            assert torch.equal(p, W0[n]), n
    assert get_state(model).n_edits == 0
    assert (tmp_path / "resumed" / "progress" / "MEMIT" / "done.json").is_file()
    assert not (tmp_path / "resumed" / "progress" / "PRUNE_BLUE" / "done.json").exists()

    resumed = seq.run_benchmark(out=tmp_path / "resumed", on_batch=capture("resumed"), **kw)
    assert resumed["methods"]["PRUNE_BLUE"]["checkpoints"] == ("EditSession" if checkpoints == "session" else "local")
    assert len(resumed["methods"]["PRUNE_BLUE"]["costs"]["batch_time_s"]) == 3
    assert _raw(resumed) == _raw(full)
    assert resumed["methods"]["PRUNE_BLUE"]["summary"] == full["methods"]["PRUNE_BLUE"]["summary"]
    # the final edited weights and accumulated keys are bit-identical
    a, b = finals["full"], finals["resumed"]
    assert a.keys() == b.keys() and any(k.startswith("kpkp") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the edits did change the weights (otherwise the comparison above would be vacuous)
    assert not torch.equal(a["model.layers.3.mlp.down_proj.weight"], W0["model.layers.3.mlp.down_proj.weight"])
    # finished methods' checkpoint tensors are removed
    assert not list((tmp_path / "resumed" / "progress").rglob("*.safetensors"))

    # a different configuration in the same folder is refused unless restart=True
    with pytest.raises(ValueError, match="different run"):
        seq.run_benchmark(out=tmp_path / "resumed", **{**kw, "n": 4})


def test_curve_plan_samples_edited_cases():
    plan = seq.CurvePlan(n=50, seed=3, every=10, cases=8, fluency_cases=3)
    assert sorted(plan.order) == list(range(50)) and plan.order == seq.CurvePlan(50, 3, 10).order
    for n_edits in (5, 10, 30):
        idx = plan.sample(n_edits)
        assert len(idx) == min(8, n_edits) and all(i < n_edits for i in idx)
        assert idx == [i for i in plan.order if i < n_edits][:8]  # a fixed order filtered: seeded, reproducible
    assert plan.sample(0) == plan.sample(50) == plan.order[:8]  # point 0 and N: the same cases
    # N itself is read off the final evaluation
    assert [n for n in (2, 4, 10, 12, 20, 24, 48, 50) if plan.due(n - 2, n)] == [10, 20]
    assert plan.due(18, 22) and not seq.CurvePlan(50, 3, None).due(0, 10)
    assert plan.docs(500) == 500 and seq.CurvePlan(50, 3, 10, heldout_docs=100).docs(60) == 60


def test_progress_from_before_curves_is_resumed(tmp_path):
    from benchmarks.common import read_json, write_json
    from benchmarks.sequential.checkpoints import LATER_KEYS, config_hash, open_progress

    config = {"n": 4, "batch_size": 2, "seed": 0, "heldout_docs": 500, "curve_every": 2, "curve_cases": 200,
              "curve_fluency_cases": 50, "curve_heldout_docs": None}
    legacy = {k: v for k, v in config.items() if k not in LATER_KEYS}
    write_json(tmp_path / "progress" / "config.json", {"hash": config_hash(legacy), "config": legacy})
    _, chash = open_progress(tmp_path, config, restart=False)
    assert read_json(tmp_path / "progress" / "config.json")["hash"] == chash  # now recorded with the new keys
    with pytest.raises(ValueError, match=r"differs in \['curve_every'\]"):
        open_progress(tmp_path, {**config, "curve_every": 3}, restart=False)


def test_table_of_results_without_perplexity():
    """Results of schema 1 (no held-out perplexity, no curves) still render: n/a in the new column."""
    summ = {k: {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 2} for k in seq.METRIC_LABELS}
    result = {"config": {"seed": 0, "format": "counterfact", "data": "cf.json", "model": "m", "n": 2, "batch_size": 1},
              "pre": {"summary": summ}, "methods": {"MEMIT": {"summary": summ, "scores": [], "costs": {}}},
              "costs": {"statistics": {}}}
    rows = [l for l in seq.render_table(result).splitlines() if "| 50.0 [40.0, 60.0] |" in l]
    assert [r.split(" | ")[0] for r in rows] == ["| pre", "| MEMIT"]
    assert all(r.endswith("| n/a |") for r in rows)


@needs_data
def test_curves_heldout_perplexity_and_resume_keep_points(tiny_setup, tmp_path):
    from benchmarks.common import read_json
    from blue_plugin.evaluation.perplexity import perplexity_summary
    from blue_plugin.stats import read_corpus

    model, tok, hp_path = tiny_setup
    kw = dict(data=CF, methods="MEMIT,MEMIT_BLUE", n=4, batch_size=2, seed=0, hparams=hp_path, model=model, tok=tok,
              fluency_tokens=4, curve_every=2, curve_cases=3, curve_fluency_cases=2, heldout_docs=6,
              curve_heldout_docs=4, progress=False, plots=False)
    full = seq.run_benchmark(out=tmp_path / "full", **kw)

    def stop(method, batches):
        if method == "MEMIT_BLUE" and batches == 1:
            raise seq.BenchmarkInterrupted("simulated interruption")

    with pytest.raises(seq.BenchmarkInterrupted):
        seq.run_benchmark(out=tmp_path / "resumed", on_batch=stop, **kw)
    saved = read_json(tmp_path / "resumed" / "progress" / "MEMIT_BLUE" / "progress.json")["curves"]
    assert [p["n_edits"] for p in saved] == [2]
    resumed = seq.run_benchmark(out=tmp_path / "resumed", **{**kw, "plots": True})

    assert resumed["schema_version"] == full["schema_version"] == 2
    held = resumed["heldout_documents"]
    assert held["n_docs"] == 6 and held["source"] == "wordnet" and held["c0_n_samples"] == 20
    texts = read_json(tmp_path / "resumed" / "progress" / "heldout.json")["texts"]
    assert len(texts) == 6 and not set(texts) & set(read_corpus("wordnet", 20))  # held out from C0
    pre = resumed["pre"]
    assert pre["summary"]["perplexity"]["n"] == 6 and pre["summary"]["perplexity"]["mean"] > 1
    for name in ("MEMIT", "MEMIT_BLUE"):
        m, f = resumed["methods"][name], full["methods"][name]
        assert m["summary"]["perplexity"]["n"] == 6 and len(m["heldout"]["doc_nll"]) == 6
        pts = m["curves"]
        assert [(p["n_edits"], p["source"], p["n_cases"], p["n_fluency_cases"]) for p in pts] == \
            [(0, "pre", 3, 2), (2, "evaluated", 2, 2), (4, "final", 3, 2)]
        assert all(p["summary"]["perplexity"]["n"] == 4 for p in pts)
        assert all(set(p["summary"]) == set(seq.CURVE_METRICS) for p in pts)
        # point 0 is the unedited model: its perplexity is that of the first 4 held-out documents
        assert pts[0]["summary"]["perplexity"] == perplexity_summary(pre["heldout"]["doc_nll"][:4],
                                                                      pre["heldout"]["doc_tokens"][:4], seed=0)
        assert sorted(s["index"] for s in pts[1]["scores"]) == [0, 1]  # the cases edited by then
        assert [s["index"] for s in pts[2]["scores"]] == resumed["curve_plan"]["sample_at_n"]
        # the same values as without the interruption
        for a, b in zip(pts, f["curves"]):
            assert (a["scores"], a["doc_nll"], a["summary"]) == (b["scores"], b["doc_nll"], b["summary"])
        assert m["costs"]["heldout_eval_s"] >= 0 and len(m["costs"]["curve_eval_s"]) == 1
    # the point saved before the interruption was kept, not evaluated again
    assert resumed["methods"]["MEMIT_BLUE"]["curves"][1]["eval_s"] == saved[0]["eval_s"]
    assert "perplexity" in resumed["blue_vs_base"]["MEMIT"]
    table = (tmp_path / "resumed" / "table.md").read_text()
    assert "| Held-out PPL |" in table and "6 documents of wordnet held out from the 20 of C0" in table
    for key in seq.CURVE_METRICS:
        assert (tmp_path / "resumed" / f"curve_{key}.png").stat().st_size > 1000, key


@needs_data
def test_zsre_run_and_compare(tiny_setup, tmp_path):
    model, tok, hp_path = tiny_setup
    res = seq.run_benchmark(data=ZSRE, methods="RECT_BLUE", n=3, batch_size=2, out=tmp_path / "z",
                            hparams=hp_path, model=model, tok=tok, progress=False, plots=False)
    assert res["config"]["format"] == "zsre"
    summary = res["methods"]["RECT_BLUE"]["summary"]
    assert set(summary) == {"efficacy", "generalization", "specificity", "fluency", "consistency", "perplexity"}
    assert summary["fluency"]["mean"] is None and summary["consistency"]["mean"] is None
    assert res["pre"]["summary"]["specificity"]["mean"] == 1.0  # the unedited model agrees with itself
    assert len(res["methods"]["RECT_BLUE"]["costs"]["batch_time_s"]) == 2
    table = (tmp_path / "z" / "table.md").read_text()
    assert "| pre |" in table and "| RECT_BLUE |" in table and "Fluency" not in table.split("\n\n")[2]

    assert seq.main(["--compare", str(tmp_path / "z"), str(tmp_path / "z"), "--out", str(tmp_path / "cmp")]) == 0
    cmp = (tmp_path / "cmp" / "comparison.md").read_text()
    assert cmp.count("| RECT_BLUE |") == 2 and cmp.count("| pre |") == 2
    with pytest.raises(ValueError, match="holds no results.json"):
        seq.compare_runs([tmp_path / "nothing"], tmp_path / "cmp2")


def test_cli_errors_and_script_mode(tmp_path):
    with pytest.raises(SystemExit):
        seq.main(["--out", str(tmp_path)])  # --data etc. missing
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "sequential"), "--help"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--batch-size" in proc.stdout and "AlphaEdit_BLUE" in proc.stdout


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        seq.run_benchmark(data=CF, methods="MEMIT", n=4, batch_size=0, out=tmp_path)
    with pytest.raises(ValueError, match="unknown method"):
        seq.run_benchmark(data=CF, methods="MEMIT_XL", n=4, batch_size=2, out=tmp_path)
    with pytest.raises(ValueError, match="both model and tok"):
        seq.run_benchmark(data=CF, methods="MEMIT", n=4, batch_size=2, out=tmp_path, model=object())


# ------------------------------------------------------------------------------------------- smoke
@needs_data
def test_smoke_smollm2_counterfact(smollm2, tmp_path):
    """The issue's CI smoke run: N=4, B=2, two methods, small statistics sample."""
    model, tok = smollm2
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in range(4, 9)]
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}

    res = seq.run_benchmark(data=CF, methods="MEMIT_BLUE,AlphaEdit", n=4, batch_size=2, seed=0, out=tmp_path / "run",
                            model=model, tok=tok, mom2_n_samples=200, steps=5, stats_dir=str(tmp_path / "stats"),
                            overrides={"context_template_length_params": [[5, 2]]}, fluency_tokens=8,
                            heldout_docs=20, curve_every=2, curve_cases=4, curve_fluency_cases=2, progress=False)

    for n in names:
        assert torch.equal(params[n], before[n]), f"{n} not restored"
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["config"]["n"] == 4 and data["config"]["methods"] == ["MEMIT_BLUE", "AlphaEdit"]
    assert {"torch", "transformers", "python"} <= set(data["versions"]) and "cpu_count" in data["machine"]
    for block in [data["pre"]] + [data["methods"][m] for m in ("MEMIT_BLUE", "AlphaEdit")]:
        s = block["summary"]
        for key in ("efficacy", "generalization", "specificity", "fluency"):
            assert s[key]["n"] == 4 and 0.0 <= s[key]["ci_low"] <= s[key]["mean"] <= s[key]["ci_high"], key
        assert s["consistency"]["mean"] is None
        assert len(block["scores"]) == 4 and all("efficacy" in c for c in block["scores"])
    st = data["costs"]["statistics"]
    assert st["source"] == "computed" and st["cold_s"] > 0 and st["cached_s"] >= 0
    blue, alpha = data["methods"]["MEMIT_BLUE"]["costs"], data["methods"]["AlphaEdit"]["costs"]
    assert list(blue["steps_per_layer"]) == ["4", "8"] and list(alpha["steps_per_layer"]) == ["8"]
    assert len(blue["batch_time_s"]) == 2 and blue["peak_rss_mib"] > 100
    assert data["methods"]["MEMIT_BLUE"]["edit_layers"] == [4, 8]
    # the edits did something: the new object became more likely on the edit prompts
    pre_nll = [c["rewrite_nll_new"] for c in data["pre"]["scores"]]
    post_nll = [c["rewrite_nll_new"] for c in data["methods"]["MEMIT_BLUE"]["scores"]]
    assert sum(post_nll) < sum(pre_nll)

    table = (tmp_path / "run" / "table.md").read_text()
    lines = [l for l in table.splitlines() if l.startswith("| ")]
    assert lines[0].startswith("| Method | Efficacy | Generalization | Specificity | Fluency | Consistency |")
    assert [l.split("|")[1].strip() for l in lines[1:4]] == ["pre", "MEMIT_BLUE", "AlphaEdit"]
    assert (tmp_path / "run" / "steps_per_layer.png").stat().st_size > 1000
    # curves: the unedited model at 0, a point after the first batch, the final model at N
    for name in ("MEMIT_BLUE", "AlphaEdit"):
        pts = data["methods"][name]["curves"]
        assert [(p["n_edits"], p["n_cases"], p["n_fluency_cases"]) for p in pts] == [(0, 4, 2), (2, 2, 2), (4, 4, 2)]
        assert all(p["summary"]["perplexity"]["n"] == 20 and p["summary"]["fluency"]["n"] == 2 for p in pts)
        assert data["methods"][name]["summary"]["perplexity"]["mean"] > 1
    assert data["pre"]["summary"]["perplexity"]["n"] == 20 and data["heldout_documents"]["c0_n_samples"] == 200
    assert lines[0].rstrip().endswith("| Held-out PPL |")
    assert (tmp_path / "run" / "curve_perplexity.png").stat().st_size > 1000


@needs_data
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_run_on_cuda(tiny_setup, tmp_path):
    """device='cuda' moves the model; editing, checkpoints, evaluation and costs work there."""
    from tests.tiny import make_llama

    _, tok, hp_path = tiny_setup
    model = make_llama(n_layers=4, hidden=32, intermediate=64)
    W0 = model.model.layers[3].mlp.down_proj.weight.detach().clone()
    res = seq.run_benchmark(data=CF, methods="MEMIT_BLUE,PRUNE,AlphaEdit", n=4, batch_size=2, out=tmp_path / "cuda",
                            hparams=hp_path, model=model, tok=tok, device="cuda", fluency_tokens=4, eval_every=2,
                            progress=False, plots=False)
    assert res["config"]["device"].startswith("cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight.cpu(), W0)
    for m in res["methods"].values():
        assert m["summary"]["efficacy"]["n"] == 4 and m["costs"]["cuda_peak_mib"] > 0
