"""Kept copies (``OUT/kept/``): a run whose progress folder is gone (a new machine) restores the
unedited evaluation and every finished method from them, replays the kept batches of a method in
progress without optimising their targets, measures only the rest, and ends with the results of an
uninterrupted run; a kept batch that does not give its recorded weights is refused; kept copies of another configuration are refused before anything
is written, and ``restart`` discards them; the finished methods of a folder that holds only
``results.json`` are kept from it (tiny random Llama, seconds)."""
from __future__ import annotations

import gzip
import json
import shutil

import pytest

from benchmarks import sequential as seq
from benchmarks.sequential import run as run_module
from benchmarks.common import write_json
from benchmarks.sequential.checkpoints import config_hash
from benchmarks.sequential.kept import INVOCATION_KEYS, KeptBatches, keep_finished, keep_results, restore_kept
from blue_plugin.datafiles import locate
from tests.tiny import targets_spy

CF = locate("counterfact")
CORPUS = locate("wordnet-glosses")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(CF is None or CORPUS is None,
                                 reason="CounterFact or the WordNet corpus not found: set BLUE_PLUGIN_DATA (docs/data.md)")]


def _stop_in(method):
    def on_batch(name, batches_done):
        if name == method:
            raise seq.BenchmarkInterrupted(f"stopped in {method}")
    return on_batch


def test_a_run_on_a_new_machine_resumes_after_its_last_finished_method(tiny_setup, tmp_path, monkeypatch):
    model, tok, hp_path = tiny_setup
    kw = dict(data=CF, methods="MEMIT,MEMIT_BLUE", n=4, batch_size=2, seed=0, hparams=hp_path, model=model,
              tok=tok, fluency_tokens=3, curve_every=2, curve_cases=2, curve_fluency_cases=1, heldout_docs=3,
              progress=False, plots=False)
    full = seq.run_benchmark(out=tmp_path / "full", **kw)
    out = tmp_path / "run"
    with pytest.raises(seq.BenchmarkInterrupted):  # MEMIT finished, MEMIT_BLUE edited one batch
        seq.run_benchmark(out=out, on_batch=_stop_in("MEMIT_BLUE"), **kw)
    kept = sorted(p.relative_to(out / "kept").as_posix() for p in (out / "kept").rglob("*") if p.is_file())
    assert kept == ["MEMIT/done.json.gz", "MEMIT_BLUE/progress.json.gz", "MEMIT_BLUE/targets/batch-00001.safetensors",
                    "config.json", "heldout.json.gz", "pre.json.gz", "pre_heldout.json.gz", "statistics.json.gz"]
    with gzip.open(out / "kept" / "pre.json.gz", "rt") as fh:
        assert json.load(fh) == json.loads((out / "progress" / "pre.json").read_text())
    before = (out / "kept" / "pre.json.gz").read_bytes()
    assert keep_finished(out) == []  # nothing newer to copy
    assert (out / "kept" / "pre.json.gz").read_bytes() == before

    kept_time = KeptBatches(out / "kept" / "MEMIT_BLUE").read_batch(1)[2]["time"]
    assert kept_time["targets"] > 0
    shutil.rmtree(out / "progress")  # another machine: only what is committed is there
    calls = []

    def no_pre_evaluation(*args, **kwargs):
        calls.append("pre")
        raise AssertionError("the unedited model was evaluated again")

    monkeypatch.setattr(run_module, "pre_locality", no_pre_evaluation)
    monkeypatch.setattr(run_module, "select_heldout", no_pre_evaluation)
    targets = targets_spy(monkeypatch)
    resumed = seq.run_benchmark(out=out, **kw)
    assert calls == []
    assert len(targets) == 2  # MEMIT_BLUE's second batch only (two layers); its first was replayed
    history = resumed["methods"]["MEMIT_BLUE"]["history"]
    assert [r.get("replayed_targets", False) for r in history] == [True, False]
    assert history[0]["time"] == kept_time  # the replayed batch costs what it cost when it ran
    assert resumed["pre"]["scores"] == full["pre"]["scores"]
    assert resumed["pre"]["eval_time_s"] == json.loads(gzip.open(out / "kept" / "pre.json.gz").read())["eval_time_s"]
    for method in ("MEMIT", "MEMIT_BLUE"):
        m, f = resumed["methods"][method], full["methods"][method]
        assert m["scores"] == f["scores"] and m["summary"] == f["summary"], method
        assert [p["scores"] for p in m["curves"]] == [p["scores"] for p in f["curves"]], method
    # MEMIT was read back, not run again: its costs are those of the first invocation
    first = json.loads(gzip.open(out / "kept" / "MEMIT" / "done.json.gz").read())
    assert resumed["methods"]["MEMIT"]["costs"] == first["costs"]
    assert (out / "kept" / "MEMIT_BLUE" / "done.json.gz").is_file()
    assert sorted(p.name for p in (out / "kept" / "MEMIT_BLUE").iterdir()) == ["done.json.gz"]  # batches discarded


def test_a_kept_batch_that_gives_other_weights_is_refused(tiny_setup, tmp_path):
    model, tok, hp_path = tiny_setup
    kw = dict(data=CF, methods="MEMIT", n=4, batch_size=2, seed=0, hparams=hp_path, model=model, tok=tok,
              fluency_tokens=2, heldout_docs=0, progress=False, plots=False)
    out = tmp_path / "run"
    with pytest.raises(seq.BenchmarkInterrupted):
        seq.run_benchmark(out=out, on_batch=_stop_in("MEMIT"), **kw)
    batches = KeptBatches(out / "kept" / "MEMIT")
    digest, results, meta, extra = batches.read_batch(1)
    assert sorted(extra) == ["change1", "change2", "change3"]
    for r in results.values():
        r.z += 0.01  # not the targets the batch was run with
    batches.write_batch(1, digest, results, meta, extra)
    shutil.rmtree(out / "progress")
    with pytest.raises(ValueError, match=r"replaying batch 1 kept in .* gave other weights than the run that kept it "
                                         r"\(relative difference of the change [0-9.e-]+, tolerance 0.001"):
        seq.run_benchmark(out=out, **kw)


def test_a_replay_within_the_tolerance_continues_and_is_recorded(tiny_setup, tmp_path):
    """Another machine may round differently: a replayed batch whose change is within the tolerance
    of the kept one continues (simulated here by a kept digest that no weights have); a batch kept
    without the change sample gets it when it replays exactly."""
    model, tok, hp_path = tiny_setup
    kw = dict(data=CF, methods="MEMIT", n=6, batch_size=2, seed=0, hparams=hp_path, model=model, tok=tok,
              fluency_tokens=2, heldout_docs=0, progress=False, plots=False)
    full = seq.run_benchmark(out=tmp_path / "full", **kw)
    out = tmp_path / "run"
    with pytest.raises(seq.BenchmarkInterrupted):
        seq.run_benchmark(out=out, on_batch=lambda name, b: b == 2 and _stop_in("MEMIT")(name, b), **kw)
    batches = KeptBatches(out / "kept" / "MEMIT")
    digest, results, meta, extra = batches.read_batch(1)
    batches.write_batch(1, digest, results, dict(meta, weights_digest="0" * 16), extra)
    digest, results, meta, _ = batches.read_batch(2)
    batches.write_batch(2, digest, results, meta)  # as kept by an earlier version: no change sample
    shutil.rmtree(out / "progress")
    with pytest.raises(seq.BenchmarkInterrupted):  # replays 1 and 2, edits 3, stops
        seq.run_benchmark(out=out, on_batch=lambda name, b: b == 3 and _stop_in("MEMIT")(name, b), **kw)
    assert sorted(batches.read_batch(2)[3]) == ["change1", "change2", "change3"]  # added by the exact replay
    resumed = seq.run_benchmark(out=out, **kw)
    history = resumed["methods"]["MEMIT"]["history"]
    assert [r.get("replay_difference") for r in history] == [0.0, None, None]
    assert [r.get("replayed_targets", False) for r in history] == [True, True, False]
    assert resumed["methods"]["MEMIT"]["scores"] == full["methods"]["MEMIT"]["scores"]

    # the same with bit-identical replays only (tolerance 0): refused
    shutil.rmtree(out)
    with pytest.raises(seq.BenchmarkInterrupted):
        seq.run_benchmark(out=out, on_batch=_stop_in("MEMIT"), **kw)
    digest, results, meta, extra = batches.read_batch(1)
    assert sorted(extra) == ["change1", "change2", "change3"]
    batches.write_batch(1, digest, results, dict(meta, weights_digest="0" * 16), extra)
    shutil.rmtree(out / "progress")
    with pytest.raises(ValueError, match=r"relative difference of the change 0, tolerance 0;"):
        seq.run_benchmark(out=out, replay_tolerance=0, **kw)


def test_kept_copies_of_another_configuration_are_refused_and_restart_discards_them(tiny_setup, tmp_path):
    model, tok, hp_path = tiny_setup
    kw = dict(data=CF, methods="MEMIT", n=2, batch_size=2, seed=0, hparams=hp_path, model=model, tok=tok,
              fluency_tokens=2, heldout_docs=0, progress=False, plots=False)
    out = tmp_path / "run"
    seq.run_benchmark(out=out, **kw)
    assert (out / "kept" / "MEMIT" / "done.json.gz").is_file()
    shutil.rmtree(out / "progress")
    with pytest.raises(ValueError, match=r"kept' holds finished measurements of a different run \(differs in \['hparams', 'seed'\]\); pass --restart"):
        seq.run_benchmark(out=out, **{**kw, "seed": 1})
    assert not (out / "progress").exists()  # refused before anything was written
    other = seq.run_benchmark(out=out, restart=True, **{**kw, "seed": 1})
    assert other["config"]["seed"] == 1
    kept_cfg = json.loads((out / "kept" / "config.json").read_text())
    assert kept_cfg["hash"] == other["config_hash"]


def test_the_chunks_of_a_final_evaluation_under_way_are_kept_until_the_method_finishes(tmp_path):
    out, config = tmp_path / "run", {"n": 4, "batch_size": 2}
    prog = out / "progress"
    write_json(prog / "config.json", {"hash": config_hash(config), "config": config})
    chunk = {"key": {"n_edits": 4, "weights": "0123"}, "scores": [{"case": 0}], "eval_s": 1.0}
    write_json(prog / "MEMIT" / "eval_served.json", chunk)
    assert keep_finished(out) == ["MEMIT/eval_served.json"]
    shutil.rmtree(prog)  # another machine
    write_json(prog / "config.json", {"hash": config_hash(config), "config": config})
    assert restore_kept(out, config) == ["MEMIT/eval_served.json"]
    assert json.loads((prog / "MEMIT" / "eval_served.json").read_text()) == chunk
    (prog / "MEMIT" / "eval_served.json").unlink()  # the evaluation completed: its chunks are removed
    write_json(prog / "MEMIT" / "done.json", {"method": "MEMIT"})
    assert keep_finished(out) == ["MEMIT/done.json"]
    assert sorted(p.name for p in (out / "kept" / "MEMIT").iterdir()) == ["done.json.gz"]


def test_finished_methods_of_a_results_file_are_kept_and_not_edited_again(tiny_setup, tmp_path, monkeypatch):
    """A folder whose methods finished before ``kept/`` existed holds only ``results.json``: its
    methods are kept from there, and the pair's run restores them and edits only the other method."""
    model, tok, hp_path = tiny_setup
    kw = dict(data=CF, n=4, batch_size=2, seed=0, hparams=hp_path, model=model, tok=tok, fluency_tokens=2,
              heldout_docs=2, progress=False, plots=False)
    first = seq.run_benchmark(out=tmp_path / "first", methods="MEMIT", **kw)  # also the unedited evaluation
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tmp_path / "first" / "results.json", old / "results.json")
    assert keep_results(old) == ["MEMIT"]
    assert keep_results(old) == []  # already kept
    kept_cfg = json.loads((old / "kept" / "config.json").read_text())
    assert kept_cfg["hash"] == first["config_hash"]
    with gzip.open(old / "kept" / "MEMIT" / "done.json.gz", "rt") as fh:
        assert json.load(fh) == json.loads((tmp_path / "first" / "progress" / "MEMIT" / "done.json").read_text())

    targets = targets_spy(monkeypatch)
    pair = seq.run_benchmark(out=old, methods="MEMIT,MEMIT_BLUE", pre_from=tmp_path / "first", **kw)
    assert len(targets) == 4  # MEMIT_BLUE's two batches at two layers; MEMIT was not edited again
    assert pair["methods"]["MEMIT"]["scores"] == first["methods"]["MEMIT"]["scores"]
    assert pair["methods"]["MEMIT"]["costs"] == first["methods"]["MEMIT"]["costs"]
    assert sorted(pair["methods"]) == ["MEMIT", "MEMIT_BLUE"]


def test_a_results_file_that_cannot_be_kept_is_refused_with_the_reason(tiny_setup, tmp_path):
    model, tok, hp_path = tiny_setup
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"results.json' does not exist"):
        keep_results(out)
    seq.run_benchmark(out=out, data=CF, methods="MEMIT", n=2, batch_size=2, seed=0, hparams=hp_path, model=model,
                      tok=tok, fluency_tokens=2, heldout_docs=0, progress=False, plots=False)
    results = json.loads((out / "results.json").read_text())
    shutil.rmtree(out / "kept")
    changed = out.parent / "changed"
    write_json(changed / "results.json", {**results, "config": {**results["config"], "seed": 1}})
    with pytest.raises(ValueError, match=r"does not give its recorded hash .* changed after the run wrote it"):
        keep_results(changed)
    assert not (changed / "kept").exists()
    bad = {**results, "methods": {**results["methods"], "MEMIT_BLUE": {"method": "MEMIT_BLUE"}}}
    write_json(changed / "results.json", bad)
    with pytest.raises(ValueError, match=r"methods\['MEMIT_BLUE'\] is not a finished method's record"):
        keep_results(changed)
    assert not (changed / "kept").exists()  # MEMIT, which is sound, was not kept either
    write_json(changed / "results.json", {k: v for k, v in results.items() if k != "methods"})
    with pytest.raises(ValueError, match=r"lacks the run's configuration or its methods"):
        keep_results(changed)
    write_json(changed / "results.json", [results])
    with pytest.raises(ValueError, match=r"schema version None, this code writes 2"):
        keep_results(changed)
    write_json(changed / "results.json", {**results, "schema_version": 1})
    with pytest.raises(ValueError, match=r"schema version 1, this code writes 2"):
        keep_results(changed)
    other = {**results, "config": {**results["config"], "seed": 1}}
    other["config_hash"] = config_hash({k: v for k, v in other["config"].items() if k not in INVOCATION_KEYS})
    write_json(changed / "results.json", other)
    write_json(changed / "kept" / "config.json", {"hash": results["config_hash"], "config": {}})
    with pytest.raises(ValueError, match=r"holds finished measurements of a different run"):
        keep_results(changed)
    assert sorted(p.name for p in (changed / "kept").iterdir()) == ["config.json"]
