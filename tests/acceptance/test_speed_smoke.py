"""Smoke tests of the speed benchmarks on tiny random models (no EasyEdit, no GPU).

* ``benchmarks.speed``: a whole run (statistics cold + curve, prepare, alternating repetitions,
  plain forward+backward, scaling sweep, efficacy) on a tiny Llama saved as a local HF folder.
* ``benchmarks.gpu_check --small``: the GPU script's code path on the CPU with a tiny config.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.tiny import make_llama, make_tokenizer, write_corpus

REPO = Path(__file__).resolve().parents[2]

CASES = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 1, "prompt": "Michel Rocard is a native speaker of", "subject": "Michel Rocard",
     "target_new": "German", "ground_truth": "French", "rephrase_prompt": "Michel Rocard speaks",
     "locality_prompt": "The capital of Italy is", "locality_ground_truth": "Rome"},
    {"case_id": 2, "prompt": "The capital of Germany is", "subject": "Germany", "target_new": "Rome",
     "ground_truth": "Berlin", "rephrase_prompt": "Germany has the capital",
     "locality_prompt": "A cat sat on the", "locality_ground_truth": "mat"},
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny Llama + tokenizer folder, a 3-case CounterFact file, a corpus and a YAML."""
    root = tmp_path_factory.mktemp("speed")
    model = make_llama(n_layers=4, hidden=32, intermediate=64)
    model.config._name_or_path = str(root / "model")
    model.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "cf.json").write_text(json.dumps(CASES), encoding="utf-8")
    write_corpus(root / "corpus.txt", n=40)
    hp = yaml.safe_load((REPO / "hparams" / "BLUE" / "smollm2-135m.yaml").read_text(encoding="utf-8"))
    hp.update(model_name=str(root / "model"), layers=[1, 2, 3], v_loss_layer=3, v_num_grad_steps=4, v_lr=1.0,
              mom2_dataset=str(root / "corpus.txt"), mom2_n_samples=30, mom2_max_length=16,
              context_template_length_params=[[4, 2]], mom2_update_weight=10.0, max_length=64)
    (root / "tiny.yaml").write_text(yaml.safe_dump(hp), encoding="utf-8")
    return root


def test_speed_tiny_in_process(tiny_setup, tmp_path):
    from benchmarks import speed

    root = tiny_setup
    cfg = speed.SpeedConfig(
        model=str(root / "model"), hparams=str(root / "tiny.yaml"), data=str(root / "cf.json"), n=2, batch_size=1,
        reps=2, scaling=[1, 3], scaling_methods=["MEMIT", "AlphaEdit_BLUE"], stats_curve=[10], threads=1,
        isolation="none", plain_iters=1,
    )
    res = speed.run_speed(cfg, tmp_path / "out", command="pytest")
    out = tmp_path / "out"
    assert (out / "results.json").is_file() and (out / "table.md").is_file()
    assert (out / "per_batch_vs_B.png").is_file() and (out / "stats_vs_samples.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"] == "pytest" and saved["same_weights"] is True
    assert "easyedit" not in saved["workers"]

    # 4 methods x 2 repetitions, alternating order; 2 batches of 1 each
    runs = saved["runs"]
    assert len(runs) == 8
    assert [r["method"] for r in runs[:4]] == [r["method"] for r in runs[4:]][::-1]
    for r in runs:
        assert len(r["batch_wall_s"]) == 2 and all(t > 0 for t in r["batch_wall_s"])
        assert r["target_tokens"][0] > 0 and r["target_tokens_per_s"][0] > 0
        ph = r["phases"][0]
        assert ph["targets"] > 0 and ph["keys"] > 0 and ph["total"] >= ph["targets"]
        assert r["edit"]["peak_rss_mib"] > 0
    # evaluation in the first repetition only; efficacy is a fraction
    assert all(("quality" in r) == (r["rep"] == 0) for r in runs)
    assert all(0.0 <= r["quality"]["efficacy"] <= 1.0 for r in runs if r["rep"] == 0)

    # statistics: main count (30) and curve (10); prepare returned the context prefixes
    counts = sorted(s["n_samples"] for s in saved["statistics"])
    assert counts == [10, 30] and all(s["seconds"] > 0 for s in saved["statistics"])
    assert saved["prepare"]["ours"]["prefixes"][0] == "" and len(saved["prepare"]["ours"]["prefixes"]) == 3

    # plain forward+backward measured at the shapes the target phase used
    plain = saved["plain"]
    assert set(plain) == {f"ours/{m}" for m in speed.OUR_METHODS}
    for p in plain.values():
        assert p["tokens_per_s"] > 0 and 0 < p["token_coverage"] <= 1

    # scaling: one batch per (B, method)
    sc = saved["summary"]["scaling"]
    assert set(sc) == {"ours/MEMIT", "ours/AlphaEdit_BLUE"} and set(sc["ours/MEMIT"]) == {"1", "3"}

    w = res["summary"]["methods"]["ours/MEMIT"]
    assert w["batch_s"]["n"] == 4 and w["throughput_ratio"] > 0
    table = (out / "table.md").read_text()
    assert "ours/AlphaEdit_BLUE" in table and "statistics" in table


def test_speed_jobs_alternate():
    from benchmarks import speed

    cfg = speed.SpeedConfig(isolation="none")
    jobs = speed._jobs(cfg, have_ee=True)
    assert jobs == [("ours", "MEMIT"), ("easyedit", "MEMIT"), ("ours", "MEMIT_BLUE"),
                    ("ours", "AlphaEdit"), ("easyedit", "AlphaEdit"), ("ours", "AlphaEdit_BLUE")]
    assert speed._jobs(cfg, have_ee=False) == [("ours", m) for m in speed.OUR_METHODS]


@pytest.mark.parametrize("bad", [dict(n=0), dict(batch_size=5, n=2), dict(methods=["ROME"]),
                                 dict(ee_methods=["RECT"]), dict(scaling=[0]), dict(isolation="thread")])
def test_speed_config_rejects_bad_input(bad):
    from benchmarks import speed

    with pytest.raises(ValueError):
        speed.SpeedConfig(**bad).validate()


def test_tokens_counter_and_plain_fb():
    from benchmarks import speed

    model = make_llama(n_layers=2, hidden=32, intermediate=64)
    counter = speed.TokenCounter(speed.base_module(model))
    ids = torch.ones(3, 5, dtype=torch.long)
    model(input_ids=ids)  # not active: not counted
    counter.active = True
    model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids[:2, :4])
    counter.close()
    assert counter.tokens == 15 + 8 and counter.calls == 2 and counter.shapes == {(3, 5): 1}
    assert speed.plain_forward_backward(model, (2, 6), iters=1) > 0
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the measurement


def test_gpu_check_small_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--small", "--n-requests", "6", "--steps", "3",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "BLUE_PLUGIN_NO_EASYEDIT": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"]["type"] == "cpu" and res["config"]["small"] is True
    assert set(res["runs"]) == {"MEMIT_BLUE", "AlphaEdit_BLUE"}
    for name, run in res["runs"].items():
        assert run["ok"], run
        assert run["n_requests"] == 6 and run["batch_time_s"] > 0
        assert set(run["phase_time_s"]) >= {"targets", "keys", "update"}
        assert set(run["steps"]) == {"4", "8"}  # BLUE edits the boundary layers of [4, ..., 8]
        assert all(len(s) == 6 for s in run["steps"].values())
        assert all(1 <= max(s) <= 3 for s in run["steps"].values())
        assert run["weights_changed"] is True
    assert res["runs"]["AlphaEdit_BLUE"]["projector_s"] is not None


def test_speed_cli_process_isolation(tiny_setup, tmp_path, monkeypatch, capsys):
    """The default isolation: each system in a spawned worker process, driven through the CLI."""
    from benchmarks import speed

    monkeypatch.delenv("EASYEDIT_ROOT", raising=False)
    monkeypatch.setenv("BLUE_PLUGIN_NO_EASYEDIT", "1")
    root = tiny_setup
    rc = speed.main(["--out", str(tmp_path / "p"), "--model", str(root / "model"), "--hparams", str(root / "tiny.yaml"),
                     "--data", str(root / "cf.json"), "--n", "1", "--batch-size", "1", "--reps", "1",
                     "--methods", "MEMIT_BLUE", "--threads", "1", "--plain-iters", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["config"]["isolation"] == "process"
    assert res["workers"]["ours"]["pid"] != os.getpid()  # ran in a worker process
    # edits ran in a fresh worker that found the statistics in the run's cache
    assert res["restarted_workers"] is True
    assert res["workers_edit"]["ours"]["pid"] != res["workers"]["ours"]["pid"]
    assert res["prepare"]["ours"]["seconds"] < 60
    assert res["command"].endswith("--plain-iters 1") and "--isolation" not in res["command"]
    (run,) = res["runs"]
    assert run["method"] == "MEMIT_BLUE" and run["edit"]["rss_reset"] in (True, False)
    assert (tmp_path / "p" / "worker-ours.log").is_file()
    assert "ours/MEMIT_BLUE" in capsys.readouterr().out


def test_speed_bad_data_is_reported(tiny_setup, tmp_path):
    """A data file with fewer cases than the run needs fails before anything is measured, with
    the cause, and no result files are written."""
    from benchmarks import speed

    root = tiny_setup
    cfg = speed.SpeedConfig(model=str(root / "model"), hparams=str(root / "tiny.yaml"), data=str(root / "cf.json"),
                            n=5, batch_size=5, reps=1, isolation="none", threads=1)
    with pytest.raises(ValueError, match="holds only 3 records"):
        speed.run_speed(cfg, tmp_path / "e")
    assert not (tmp_path / "e" / "results.json").exists()


def test_peak_rss_one_process_per_configuration(tiny_setup, tmp_path):
    """benchmarks.peak_rss: each (method, chunk) runs in its own process and reports a peak at
    least as large as the model-loaded RSS, the steps of the edited layers and a table row."""
    from benchmarks.checks import peak_rss

    root = tiny_setup
    res = peak_rss.run(["MEMIT", "AlphaEdit_BLUE"], [16, 64], 2, tmp_path / "out", model=str(root / "model"),
                       hparams=str(root / "tiny.yaml"), data=str(root / "cf.json"), threads=1,
                       overrides={"v_num_grad_steps": 2})
    runs = res["runs"]
    assert [(r["method"], r["chunk_tokens"]) for r in runs] == [("MEMIT", 16), ("MEMIT", 64), ("AlphaEdit_BLUE", 16), ("AlphaEdit_BLUE", 64)]
    for r in runs:
        assert r["peak_rss_mib"] >= r["rss_after_load_mib"] > 0
        assert r["edit_s"] > 0 and r["batch_size"] == 2
    assert sorted(runs[0]["steps"]) == ["3"] and sorted(runs[2]["steps"]) == ["1", "3"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("| AlphaEdit_BLUE |") == 2 and json.loads((tmp_path / "out" / "results.json").read_text())["runs"] == runs


@pytest.mark.parametrize("bad", ["MEMITX", "ROME_BLUE"])
def test_peak_rss_rejects_unknown_methods(bad, tmp_path):
    from benchmarks.checks import peak_rss

    with pytest.raises(ValueError, match="unknown method"):
        peak_rss.run([bad], [16], 1, tmp_path, model="x", hparams="x", data="x", threads=1, overrides={})
