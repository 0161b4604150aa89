"""The evidence summary (``python -m benchmarks.sequential --evidence``): verdicts follow the
interval (and the direction in which a metric is better), rows come from ``blue_vs_base`` or
from per-case scores, and folders without results are refused."""
import json

import pytest

from benchmarks.sequential import cli
from benchmarks.sequential.evidence import evidence_rows, render_evidence, verdict, write_evidence


def d(mean, lo, hi):
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": 10}


def test_verdict_follows_the_interval_and_the_better_direction():
    assert verdict(d(0.07, 0.03, 0.12), "generalization") == "better"
    assert verdict(d(-0.05, -0.09, -0.01), "specificity") == "worse"
    assert verdict(d(0.04, -0.02, 0.11), "efficacy") == "tie"
    assert verdict(d(-0.01, -0.03, 0.0), "efficacy") == "tie"  # an interval ending at 0 resolves nothing
    assert verdict(d(-0.5, -0.8, -0.2), "perplexity") == "better"  # lower perplexity is better
    assert verdict(d(0.5, 0.2, 0.8), "perplexity") == "worse"
    assert verdict(None, "fluency") is None and verdict({"mean": None}, "fluency") is None


def _result(tmp_path, name, with_diffs):
    scores = lambda vals: [{"case_id": i, "efficacy": v, "generalization": v, "specificity": 1.0, "fluency": None}
                           for i, v in enumerate(vals)]
    result = {"config": {"seed": 0, "format": "counterfact", "data": "/x/cf.json", "model": "/m/smollm2-135m",
                         "n": 20, "batch_size": 10},
              "methods": {"MEMIT": {"scores": scores([0.0] * 20)}, "MEMIT_BLUE": {"scores": scores([1.0] * 20)}}}
    if with_diffs:
        result["blue_vs_base"] = {"MEMIT": {"efficacy": d(-0.1, -0.2, -0.05), "perplexity": d(-0.4, -0.6, -0.1)}}
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(result))
    return folder


def test_rows_from_stored_differences_and_from_scores(tmp_path):
    stored, computed = _result(tmp_path, "a", True), _result(tmp_path, "b", False)
    rows = evidence_rows([stored, computed])
    assert [(r["model"], r["data"], r["n"], r["base"]) for r in rows] == [("smollm2-135m", "counterfact", 20, "MEMIT")] * 2
    assert rows[0]["metrics"]["efficacy"]["verdict"] == "worse"
    assert rows[0]["metrics"]["perplexity"]["verdict"] == "better"
    assert rows[1]["metrics"]["efficacy"]["verdict"] == "better"  # every case 0 -> 1
    assert rows[1]["metrics"]["specificity"]["verdict"] == "tie"  # no difference at all
    table = render_evidence(rows)
    assert "**worse** -10.0 [-20.0, -5.0]" in table and "**better** -0.40 [-0.60, -0.10]" in table
    assert "**better** +100.0 [+100.0, +100.0]" in table and "tie +0.0 [+0.0, +0.0]" in table
    assert "Consistency" not in table  # no run has it


def test_cli_writes_files_and_refuses_folders_without_results(tmp_path, capsys):
    run = _result(tmp_path, "a", True)
    assert cli.main(["--evidence", str(run), "--out", str(tmp_path / "ev")]) == 0
    saved = json.loads((tmp_path / "ev" / "evidence.json").read_text())
    assert saved["rows"][0]["metrics"]["efficacy"]["verdict"] == "worse"
    assert "| smollm2-135m | counterfact | 20 (10) | 20 | MEMIT |" in (tmp_path / "ev" / "evidence.md").read_text()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--evidence", str(tmp_path / "missing"), "--out", str(tmp_path / "ev2")])
    assert exc.value.code == 2 and "holds no results.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="both modes"):
        unpaired = tmp_path / "u"
        unpaired.mkdir()
        (unpaired / "results.json").write_text(json.dumps({"config": {"seed": 0, "format": "zsre", "data": "z",
                                                                      "model": "m", "n": 1, "batch_size": 1},
                                                           "methods": {"MEMIT": {"scores": []}}}))
        write_evidence([unpaired], tmp_path / "ev3")


def test_curve_points_give_rows_on_their_samples(tmp_path, capsys):
    """A run with curve points: the row of a point pairs the two methods' scores on the point's
    sample (and its held-out documents); points that are not asked for, or missing, give no row."""
    def point(n, vals, nll):
        return {"n_edits": n, "source": "evaluated", "n_cases": len(vals), "doc_nll": nll,
                "scores": [{"index": i, "case_id": i, "efficacy": v, "fluency": None} for i, v in enumerate(vals)]}

    folder = _result(tmp_path, "c", False)
    result = json.loads((folder / "results.json").read_text())
    result["pre"] = {"heldout": {"doc_tokens": [10, 10, 10]}}
    result["methods"]["MEMIT"]["curves"] = [point(10, [0.0] * 8, [30.0, 30.0, 30.0])]
    result["methods"]["MEMIT_BLUE"]["curves"] = [point(10, [0.0] * 4 + [1.0] * 4, [20.0, 20.0, 20.0])]
    (folder / "results.json").write_text(json.dumps(result))
    rows = evidence_rows([folder], points=[10, 15])
    assert [(r["n"], r["of_n"], r["cases"]) for r in rows] == [(10, 20, 8), (20, 20, 20)]
    at10 = rows[0]["metrics"]
    assert at10["efficacy"]["diff"]["mean"] == pytest.approx(0.5) and at10["efficacy"]["diff"]["n"] == 8
    assert at10["perplexity"]["verdict"] == "better"  # NLL 2 per token instead of 3 on every document
    assert at10["perplexity"]["diff"]["mean"] == pytest.approx(2.718281828 ** 2 - 2.718281828 ** 3, rel=1e-6)
    assert "| 10 of 20 (10) | 8 | MEMIT |" in render_evidence(rows)
    assert cli.main(["--evidence", str(folder), "--evidence-points", "10", "--out", str(tmp_path / "ev")]) == 0
    with pytest.raises(SystemExit):
        cli.main(["--evidence", str(folder), "--evidence-points", "ten", "--out", str(tmp_path / "ev")])
    assert "numbers of edits separated by commas" in capsys.readouterr().err


def test_status_of_a_folder_without_progress_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--status", "--out", str(tmp_path / "nothing")])
    assert exc.value.code == 2 and "not the --out folder of a started run" in capsys.readouterr().err


def test_keep_results_of_a_folder_without_results_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--keep-results", "--out", str(tmp_path / "nothing")])
    assert exc.value.code == 2 and "results.json' does not exist" in capsys.readouterr().err


def test_fluency_above_the_unedited_interval_is_not_called_better(tmp_path):
    """BLUE's fluency resolved above its base's is "better" while it stays within the unedited
    model's interval, "above pre" beyond it; at a curve point, point 0 gives the unedited interval."""
    def flu(v):
        return {"fluency": {"mean": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 4}}

    def point(n, vals, summary):
        return {"n_edits": n, "source": "pre" if n == 0 else "evaluated", "n_cases": len(vals), "summary": summary,
                "scores": [{"index": i, "case_id": i, "efficacy": 1.0, "fluency": v} for i, v in enumerate(vals)]}

    folder = _result(tmp_path, "f", False)
    result = json.loads((folder / "results.json").read_text())
    for name, v in (("MEMIT", 3.0), ("MEMIT_BLUE", 6.0)):
        m = result["methods"][name]
        for s in m["scores"]:
            s["fluency"] = v + 0.01 * s["case_id"]
        m["summary"] = flu(v)
        m["curves"] = [point(0, [5.0] * 4, flu(5.0)), point(10, [v] * 4, flu(v))]
    for pre_level, expected in ((5.0, "above pre"), (6.5, "better")):
        result["pre"] = {"summary": flu(pre_level)}
        (folder / "results.json").write_text(json.dumps(result))
        final = evidence_rows([folder])[0]["metrics"]["fluency"]
        assert final["verdict"] == expected and final["diff"]["mean"] == pytest.approx(3.0)
    at10 = evidence_rows([folder], points=[10])[0]
    assert at10["n"] == 10 and at10["metrics"]["fluency"]["verdict"] == "above pre"  # point 0: 5.0 [4.9, 5.1]
    assert "**above pre** +300.0" in render_evidence([at10])
    result["methods"]["MEMIT_BLUE"]["summary"] = flu(2.0)  # BLUE below its base: "worse" is left alone
    for s in result["methods"]["MEMIT_BLUE"]["scores"]:
        s["fluency"] = 2.0
    (folder / "results.json").write_text(json.dumps(result))
    assert evidence_rows([folder])[0]["metrics"]["fluency"]["verdict"] == "worse"
