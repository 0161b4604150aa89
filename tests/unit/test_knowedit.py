"""Tests for blue_plugin.evaluation.knowedit (KnowEdit reader, BaseEditor inputs, summaries) and the
runner's data path (benchmarks/run_blue_editing.py), on small JSON files written here."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from blue_plugin.evaluation.data import EditCase, records_to_cases
from blue_plugin.evaluation.knowedit import (
    KNOWEDIT_TYPES,
    case_probes,
    editor_inputs,
    first_string,
    format_table,
    knowedit_cases,
    load_knowedit,
    looks_like_knowedit,
    probe_pairs,
    summary_by_key,
    summary_table,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def cf_record(**changes) -> dict:
    """A WikiData-counterfact-style KnowEdit record (written for this test)."""
    record = {
        "subject": "Lake Alpha",
        "prompt": "Lake Alpha is located in the country of",
        "target_new": "Norway",
        "ground_truth": "Chile",
        "rephrase": "The country where Lake Alpha lies is",
        "portability": {
            "Subject_Aliasing": [{"prompt": "Alpha Lake is located in the country of", "ground_truth": ["Norway"]}],
            "Reasoning": [
                {"prompt": "The capital of the country Lake Alpha is in is", "ground_truth": [["Oslo", "Oslo city"]]},
                {"prompt": "The currency of the country Lake Alpha is in is", "ground_truth": [[""]]},
            ],
            "Logical_Generalization": [],
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "The area of Lake Alpha is", "ground_truth": [["12 km2"]]}],
            "Forgetfulness": [
                {"prompt": "Lake Alpha is located in the country of Norway, which is in", "ground_truth": "Europe"},
                {"prompt": "Lake Alpha is fed by the river", "ground_truth": ["Beta"]},
            ],
        },
    }
    record.update(changes)
    return record


def zsre_knowedit_record() -> dict:
    return {
        "subject": "Quux Bridge",
        "prompt": "Which river does Quux Bridge cross?",
        "target_new": "Danube",
        "ground_truth": ["Rhine", "Rhein"],
        "rephrase_prompt": "What river is crossed by Quux Bridge?",
        "cond": "Rhine >> Danube || Which river does Quux Bridge cross?",
        "portability": {"Reasoning": [{"prompt": "Quux Bridge crosses a river that flows into the", "ground_truth": ["Black Sea"]}]},
        "locality": {"Relation_Specificity": [{"prompt": "Quux Bridge was opened in", "ground_truth": ["1901"]}]},
    }


def wikibio_record() -> dict:
    return {
        "concept": "Ada Example",
        "text": "Ada Example (born 1950) is a",
        "labels": "retired chess player from Ruritania.",
        "locality": {
            "Relation_Specificity": [{"prompt": "Ada Example was born in", "ground_truth": ["1950"]}],
            "Forgetfulness": [{"prompt": "Ada Example plays", "ground_truth": ["chess"]}],
        },
    }


def mend_zsre_record(i: int, portability: bool = True) -> dict:
    record = {
        "subject": f"Thing {i}", "src": f"When was Thing {i} founded?", "pred": "1990", "alt": f"19{i}0",
        "answers": ["1980"], "rephrase": f"In which year was Thing {i} founded?",
        "loc": "nq question: who wrote a book", "loc_ans": "Someone",
    }
    if portability:
        record["portability"] = {"Recalled Relation": "(x, y, z)", "New Question": f"Thing {i}, founded in 19{i}0, is how old?",
                                 "New Answer": f"{i} decades"}
    return record


# ------------------------------------------------------------------------------------------------
# The reader
# ------------------------------------------------------------------------------------------------
def test_first_string_and_probe_pairs():
    assert first_string([["a", "b"], "c"]) == "a" and first_string("x") == "x"
    assert first_string([]) is None and first_string([[]]) is None and first_string(None) is None
    with pytest.raises(ValueError):
        first_string([3])
    pairs = probe_pairs([{"prompt": "p1", "ground_truth": [["a1", "b1"]]}, {"prompt": "p2", "ground_truth": " "},
                         {"prompt": "p3", "ground_truth": []}, {"prompt": ["p4"], "ground_truth": "a4"}], "here")
    assert pairs == {"prompt": ["p1", "p4"], "ground_truth": ["a1", "a4"]}
    assert probe_pairs([], "here") is None and probe_pairs(None, "here") is None
    with pytest.raises(ValueError, match="needs 'prompt'"):
        probe_pairs([{"prompt": "p"}], "here")
    with pytest.raises(ValueError, match="list of"):
        probe_pairs({"prompt": "p"}, "here")


def test_counterfact_record_as_easyedit_builds_it(tmp_path):
    path = tmp_path / "test_cf.json"
    path.write_text(json.dumps([cf_record(), cf_record(subject="Lake Gamma", prompt="Lake Gamma is located in the country of")]))
    cases = load_knowedit(path, "counterfact", n=1)
    assert len(cases) == 1
    c = cases[0]
    assert (c.case_id, c.prompt, c.subject, c.target_new, c.ground_truth) == (
        0, "Lake Alpha is located in the country of", "Lake Alpha", "Norway", "Chile")
    assert c.rephrase_prompts == ["The country where Lake Alpha lies is"]
    # EasyEdit's keys (Reasoning -> reasoning), first answers, blank answers and empty categories dropped
    assert c.extra["portability_inputs"] == {
        "Subject_Aliasing": {"prompt": ["Alpha Lake is located in the country of"], "ground_truth": ["Norway"]},
        "reasoning": {"prompt": ["The capital of the country Lake Alpha is in is"], "ground_truth": ["Oslo"]},
    }
    assert c.extra["locality_inputs"] == {
        "Relation_Specificity": {"prompt": ["The area of Lake Alpha is"], "ground_truth": ["12 km2"]},
        "Forgetfulness": {"prompt": ["Lake Alpha is located in the country of Norway, which is in", "Lake Alpha is fed by the river"],
                          "ground_truth": ["Europe", "Beta"]},
    }
    assert c.locality_prompts[0] == "The area of Lake Alpha is" and c.locality_answers == ["12 km2", "Europe", "Beta"]
    assert c.generation_prompts == [c.prompt] and c.extra["knowedit_type"] == "counterfact"
    assert case_probes(c) == (c.extra["locality_inputs"], c.extra["portability_inputs"])


def test_zsre_recent_and_wikibio():
    (z,) = knowedit_cases([zsre_knowedit_record()], "zsre")
    assert z.ground_truth == "Rhine" and z.rephrase_prompts == ["What river is crossed by Quux Bridge?"]
    assert z.extra["cond"].startswith("Rhine >>")
    assert list(z.extra["portability_inputs"]) == ["reasoning"]
    recent = cf_record()
    del recent["ground_truth"], recent["rephrase"]
    (r,) = knowedit_cases([recent], "recent")
    assert r.ground_truth is None and r.rephrase_prompts == []
    (w,) = knowedit_cases([wikibio_record()], "wikibio")
    assert (w.subject, w.prompt, w.target_new) == ("Ada Example", "Ada Example (born 1950) is a", "retired chess player from Ruritania.")
    # WikiBio: Relation_Specificity only, no portability (as EasyEdit's KnowEdit script)
    assert w.extra["locality_inputs"] == {"Relation_Specificity": {"prompt": ["Ada Example was born in"], "ground_truth": ["1950"]}}
    assert w.extra["portability_inputs"] == {}


def test_reader_refuses_bad_input():
    with pytest.raises(ValueError, match="does not occur in prompt"):
        knowedit_cases([cf_record(subject="Lake Omega")], "counterfact")
    with pytest.raises(ValueError, match="KnowEdit data"):
        knowedit_cases([mend_zsre_record(1)], "zsre")
    with pytest.raises(ValueError, match="unknown KnowEdit data type"):
        knowedit_cases([cf_record()], "CF")
    with pytest.raises(ValueError, match="none of"):
        knowedit_cases([{k: v for k, v in cf_record().items() if k != "target_new"}], "counterfact")
    with pytest.raises(ValueError, match="positive"):
        knowedit_cases([cf_record()], "counterfact", n=0)
    with pytest.raises(ValueError, match="does not exist"):
        load_knowedit("/nonexistent/test_cf.json", "counterfact")
    assert looks_like_knowedit(cf_record()) and looks_like_knowedit(wikibio_record())
    assert not looks_like_knowedit(mend_zsre_record(1)) and not looks_like_knowedit([])


# ------------------------------------------------------------------------------------------------
# BaseEditor inputs
# ------------------------------------------------------------------------------------------------
def test_editor_inputs_knowedit_columns():
    cases = knowedit_cases([cf_record(), zsre_knowedit_record()], "counterfact")
    data = editor_inputs(cases)
    assert data["prompts"] == [cases[0].prompt, cases[1].prompt]
    assert data["ground_truth"] == ["Chile", "Rhine"] and data["case_ids"] == [0, 1]
    assert data["rephrase_prompts"] == ["The country where Lake Alpha lies is", "What river is crossed by Quux Bridge?"]
    port = data["portability_inputs"]
    assert list(port) == ["Subject_Aliasing", "reasoning"]
    # one entry per case; None where a case lacks the key (EasyEdit then skips it for that case)
    assert port["Subject_Aliasing"] == {"prompt": [["Alpha Lake is located in the country of"], None],
                                        "ground_truth": [["Norway"], None]}
    assert port["reasoning"]["prompt"][1] == ["Quux Bridge crosses a river that flows into the"]
    loc = data["locality_inputs"]
    assert list(loc) == ["Relation_Specificity", "Forgetfulness"] and loc["Forgetfulness"]["prompt"][1] is None
    for section in (port, loc):
        for columns in section.values():
            assert len(columns["prompt"]) == len(columns["ground_truth"]) == 2


def test_editor_inputs_mend_zsre_portability_and_neighborhood():
    _, cases = records_to_cases([mend_zsre_record(1), mend_zsre_record(2, portability=False), mend_zsre_record(3)])
    data = editor_inputs(cases)
    # as EasyEdit's examples/run_zsre_llama2.py: one string per case under "one_hop"
    assert data["portability_inputs"] == {"one_hop": {
        "prompt": ["Thing 1, founded in 1910, is how old?", None, "Thing 3, founded in 1930, is how old?"],
        "ground_truth": ["1 decades", None, "3 decades"]}}
    assert data["locality_inputs"] == {"neighborhood": {"prompt": ["nq question: who wrote a book"] * 3,
                                                        "ground_truth": ["Someone"] * 3}}
    assert data["ground_truth"] == ["1980"] * 3 and data["target_new"] == ["1910", "1920", "1930"]
    _, none = records_to_cases([mend_zsre_record(1, portability=False)])
    assert editor_inputs(none)["portability_inputs"] is None


def test_editor_inputs_several_neighbours_and_no_rephrase():
    case = EditCase(0, "A B is", "A B", "x", "y", locality_prompts=["C is", "D is"], locality_answers=["y", "y"])
    bare = EditCase(1, "E F is", "E F", "x", None)
    data = editor_inputs([case, bare])
    assert data["locality_inputs"] == {"neighborhood": {"prompt": [["C is", "D is"], None], "ground_truth": [["y", "y"], None]}}
    assert data["rephrase_prompts"] is None and data["portability_inputs"] is None
    assert editor_inputs([EditCase(0, "A B is", "A B", "x", None, rephrase_prompts=["r"]), bare])["rephrase_prompts"] == ["r", None]
    with pytest.raises(ValueError, match="no cases"):
        editor_inputs([])


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------
METRICS = [
    {"pre": {"rewrite_acc": [0.0], "rephrase_acc": [0.0], "locality": {"Forgetfulness_output": [[1, 2]]},
             "portability": {"reasoning_acc": [0.0, 0.5], "Subject_Aliasing_acc": [1.0]}},
     "post": {"rewrite_acc": [1.0], "rephrase_acc": [0.5], "locality": {"Relation_Specificity_acc": [1.0], "Forgetfulness_acc": [0.5, 0.0]},
              "portability": {"reasoning_acc": [1.0, 0.5], "Subject_Aliasing_acc": [1.0]}}},
    {"pre": {"rewrite_acc": [0.5], "portability": {}},
     "post": {"rewrite_acc": [0.5], "locality": {"Relation_Specificity_acc": [0.0]}, "portability": {}}},
]


def test_summary_by_key_is_summary_metrics_shape():
    s = summary_by_key(METRICS)
    assert s["pre"] == {"rewrite_acc": 0.25, "rephrase_acc": 0.0,
                        "portability": {"reasoning_acc": 0.25, "Subject_Aliasing_acc": 1.0}}
    assert s["post"]["locality"] == {"Relation_Specificity_acc": 0.5, "Forgetfulness_acc": 0.25}
    assert s["post"]["portability"] == {"reasoning_acc": 0.75, "Subject_Aliasing_acc": 1.0}


def test_summary_table_averages_per_case_first():
    t = summary_table(METRICS)
    # case 0 post: locality mean(1.0, 0.25) = 0.625, case 1: 0.0 -> 0.3125; portability only case 0: mean(0.75, 1.0)
    assert t["post"] == {"rewrite_acc": 0.75, "rephrase_acc": 0.5, "locality": 0.3125, "portability": 0.875}
    assert t["pre"] == {"rewrite_acc": 0.25, "rephrase_acc": 0.0, "portability": 0.625}  # no pre locality accuracy
    text = format_table(t)
    lines = text.splitlines()
    assert lines[0].split() == ["phase", "rewrite_acc", "rephrase_acc", "locality", "portability"]
    assert lines[1].split() == ["pre", "0.2500", "0.0000", "-", "0.6250"]
    assert lines[2].split() == ["post", "0.7500", "0.5000", "0.3125", "0.8750"]
    assert summary_table([]) == {} and not any(math.isnan(v) for row in t.values() for v in row.values())


# ------------------------------------------------------------------------------------------------
# The runner's data path (no EasyEdit needed for these formats)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner():
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from benchmarks import run_blue_editing
    finally:
        sys.path.remove(str(REPO_ROOT))
    return run_blue_editing


def test_runner_reads_knowedit(runner, tmp_path):
    folder = tmp_path / "wiki_counterfact"
    folder.mkdir()
    (folder / "test_cf.json").write_text(json.dumps([cf_record(), cf_record(), cf_record()]))
    path = runner.resolve_data_file(tmp_path, "counterfact")
    assert path == folder / "test_cf.json"
    data = runner.load_edit_data(path, "counterfact", 2)
    assert data["format"] == "knowedit_counterfact" and len(data["prompts"]) == 2
    assert data["portability_inputs"]["reasoning"]["ground_truth"] == [["Oslo"], ["Oslo"]]
    assert set(data["locality_inputs"]) == {"Relation_Specificity", "Forgetfulness"}
    assert runner.parse_args(["--hparams_dir", "x.yaml", "--datatype", "wikibio"]).data_type == "wikibio"
    for t in KNOWEDIT_TYPES:
        assert runner.parse_args(["--hparams_dir", "x.yaml", "--data_type", t]).data_type == t
    with pytest.raises(ValueError, match="no default dataset"):
        runner.resolve_data_file(None, "recent")


def test_runner_passes_zsre_portability_and_refuses_mismatches(runner, tmp_path):
    mend = tmp_path / "zsre_mend_eval.json"
    mend.write_text(json.dumps([mend_zsre_record(1), mend_zsre_record(2)]))
    data = runner.load_edit_data(mend, "ZsRE", None)
    assert data["format"] == "zsre" and data["portability_inputs"]["one_hop"]["ground_truth"] == ["1 decades", "2 decades"]
    with pytest.raises(ValueError, match="is not KnowEdit data"):
        runner.load_edit_data(mend, "zsre", None)
    knowedit = tmp_path / "ZsRE-test-all.json"
    knowedit.write_text(json.dumps([zsre_knowedit_record()]))
    with pytest.raises(ValueError, match="is KnowEdit data"):
        runner.load_edit_data(knowedit, "ZsRE", None)
    assert runner.load_edit_data(knowedit, "zsre", None)["portability_inputs"] == {
        "reasoning": {"prompt": [["Quux Bridge crosses a river that flows into the"]], "ground_truth": [["Black Sea"]]}}
