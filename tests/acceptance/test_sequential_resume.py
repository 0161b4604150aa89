"""Resuming a sequential run stopped during its evaluations (tiny random Llama, seconds).

* evaluations of all cases (the unedited model's, a method's final one): a run stopped after some
  of their chunks resumes at the first unsaved chunk and ends with the scores of an uninterrupted
  run; saved chunks of other weights are not used;
* curve points: a run stopped while a curve point is evaluated keeps the batch it had edited and
  takes the point on resuming.
"""
from __future__ import annotations

import pytest

from benchmarks import sequential as seq
from benchmarks.sequential import run as run_module
from benchmarks.sequential.chunked import ChunkedEvaluation
from benchmarks.sequential.status import write_status
from blue_plugin.datafiles import locate

CF = locate("counterfact")
CORPUS = locate("wordnet-glosses")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(CF is None or CORPUS is None,
                                 reason="CounterFact or the WordNet corpus not found: set BLUE_PLUGIN_DATA (docs/data.md)")]


def _counting(real, calls, stop_at=None):
    """``evaluate_cases`` that records the number of cases per call and stops at call ``stop_at``."""
    def wrapped(model, tok, fmt, cases, *args, **kwargs):
        calls.append(len(cases))
        if stop_at is not None and len(calls) == stop_at:
            raise seq.BenchmarkInterrupted("stopped during an evaluation")
        return real(model, tok, fmt, cases, *args, **kwargs)
    return wrapped


def test_evaluations_of_all_cases_resume_at_their_first_unsaved_chunk(tiny_setup, tmp_path, monkeypatch):
    from benchmarks.common import read_json

    model, tok, hp_path = tiny_setup
    kw = dict(data=CF, methods="MEMIT", n=5, batch_size=5, seed=0, hparams=hp_path, model=model, tok=tok,
              fluency_tokens=4, heldout_docs=4, eval_chunk_cases=2, progress=False, plots=False)
    full = seq.run_benchmark(out=tmp_path / "full", **kw)
    real = run_module.evaluate_cases
    prog = tmp_path / "resumed" / "progress"

    calls: list[int] = []  # cases per evaluate_cases call
    monkeypatch.setattr(run_module, "evaluate_cases", _counting(real, calls, stop_at=2))
    with pytest.raises(seq.BenchmarkInterrupted):  # stopped in the unedited model's evaluation
        seq.run_benchmark(out=tmp_path / "resumed", **kw)
    assert calls == [2, 2] and len(read_json(prog / "eval_pre.json")["scores"]) == 2
    assert not (prog / "pre.json").exists()

    calls.clear()
    monkeypatch.setattr(run_module, "evaluate_cases", _counting(real, calls, stop_at=4))
    with pytest.raises(seq.BenchmarkInterrupted):  # stopped in MEMIT's final evaluation
        seq.run_benchmark(out=tmp_path / "resumed", **kw)
    assert calls == [2, 1, 2, 2]  # the rest of the unedited evaluation, then the final one
    assert (prog / "pre.json").is_file() and not (prog / "eval_pre.json").exists()
    saved = read_json(prog / "MEMIT" / "eval_served.json")
    assert len(saved["scores"]) == 2 and saved["key"]["n_edits"] == 5

    calls.clear()
    monkeypatch.setattr(run_module, "evaluate_cases", _counting(real, calls))
    resumed = seq.run_benchmark(out=tmp_path / "resumed", **kw)
    assert calls == [2, 1]  # the final evaluation's saved chunk is read back
    assert resumed["pre"]["scores"] == full["pre"]["scores"]
    m, f = resumed["methods"]["MEMIT"], full["methods"]["MEMIT"]
    assert m["scores"] == f["scores"] and m["summary"] == f["summary"]
    assert m["heldout"]["doc_nll"] == f["heldout"]["doc_nll"]
    assert not list(prog.rglob("eval_*.json"))  # removed once the results are written
    assert m["costs"]["eval_time_s"] > 0
    # --status of a finished method without curve points shows its final evaluation
    status = write_status(tmp_path / "resumed")
    assert status["methods"]["MEMIT"]["curves"] == [{"n_edits": 5, "source": "final", "summary": m["summary"],
                                                     "unrestrained": None, "restrained_minus_unrestrained": None}]
    assert "* MEMIT: finished, 5 of 5 edits" in status["table"] and "| MEMIT | 5 |" in status["table"]


def test_chunked_evaluation_ignores_parts_of_other_weights(tmp_path):
    digest = {"value": "a"}
    part = ChunkedEvaluation(tmp_path, 3, lambda: digest["value"], chunk_cases=2)
    seen: list[list[int]] = []

    def evaluate(cases, loc):
        seen.append(list(cases))
        return [{"index": c, "weights": digest["value"]} for c in cases]

    scores, _ = part.scores("served", [0, 1, 2], None, evaluate)
    assert seen == [[0, 1], [2]] and [s["weights"] for s in scores] == ["a"] * 3
    seen.clear()
    assert part.scores("served", [0, 1, 2], None, evaluate)[0] == scores and seen == []  # all read back
    digest["value"] = "b"  # other weights (e.g. a session saved again): nothing saved is used
    scores_b, _ = part.scores("served", [0, 1, 2], None, evaluate)
    assert seen == [[0, 1], [2]] and [s["weights"] for s in scores_b] == ["b"] * 3
    assert part.heldout("served", lambda: {"ppl": 2.0}) == {"ppl": 2.0}
    assert part.heldout("served", lambda: pytest.fail("measured again")) == {"ppl": 2.0}
    part.cleanup()
    assert not list(tmp_path.glob("eval_*.json"))
    with pytest.raises(ValueError, match="chunk_cases"):
        ChunkedEvaluation(tmp_path, 3, lambda: "a", chunk_cases=0)


def test_stop_during_a_curve_point_keeps_the_batch_and_takes_the_point_on_resuming(tiny_setup, tmp_path,
                                                                                   monkeypatch):
    from benchmarks.common import read_json

    model, tok, hp_path = tiny_setup
    kw = dict(data=CF, methods="MEMIT_BLUE", n=4, batch_size=2, seed=0, hparams=hp_path, model=model, tok=tok,
              fluency_tokens=4, curve_every=2, curve_cases=2, curve_fluency_cases=1, heldout_docs=4,
              progress=False, plots=False)
    full = seq.run_benchmark(out=tmp_path / "full", **kw)
    real_point = run_module.evaluate_point

    def stopping_point(*args, **kwargs):
        raise seq.BenchmarkInterrupted("stopped during a curve point")

    monkeypatch.setattr(run_module, "evaluate_point", stopping_point)
    with pytest.raises(seq.BenchmarkInterrupted):
        seq.run_benchmark(out=tmp_path / "resumed", **kw)
    prog = read_json(tmp_path / "resumed" / "progress" / "MEMIT_BLUE" / "progress.json")
    assert prog["batches_done"] == 1 and prog["curves"] == []  # the edit is saved, its point is not

    monkeypatch.setattr(run_module, "evaluate_point", real_point)
    resumed = seq.run_benchmark(out=tmp_path / "resumed", **kw)
    m, f = resumed["methods"]["MEMIT_BLUE"], full["methods"]["MEMIT_BLUE"]
    assert [p["n_edits"] for p in m["curves"]] == [0, 2, 4]
    for a, b in zip(m["curves"], f["curves"]):
        assert (a["scores"], a["doc_nll"], a["summary"]) == (b["scores"], b["doc_nll"], b["summary"])
    assert m["scores"] == f["scores"] and len(m["costs"]["batch_time_s"]) == 2
