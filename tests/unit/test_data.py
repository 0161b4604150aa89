"""Tests for blue_plugin.evaluation.data: format detection, loading and validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from blue_plugin.evaluation.data import EditCase, detect_format, load_cases, records_to_cases
from blue_plugin.datafiles import fetch_command, get_spec, locate


def data_file(name: str) -> Path:
    """A dataset (name or relative path) found by :mod:`blue_plugin.datafiles` without downloading;
    the test is skipped when it is nowhere."""
    path = locate(name)
    if path is None:
        spec = get_spec(name)
        fetch = f", or run `{fetch_command(spec.name)}`" if spec is not None and spec.url else ""
        pytest.skip(f"{name} not found: set BLUE_PLUGIN_DATA to the data folder{fetch} (docs/data.md)")
    return path


def test_counterfact_easyedit():
    fmt, cases = load_cases(data_file("counterfact"), n=3)
    assert fmt == "counterfact"
    assert [c.case_id for c in cases] == [0, 1, 4]
    c = cases[0]
    assert c.prompt == "The mother tongue of Danielle Darrieux is"
    assert (c.subject, c.target_new, c.ground_truth) == ("Danielle Darrieux", "English", "French")
    assert c.rephrase_prompts == ["Where Danielle Darrieux is from, people speak the language of"]
    assert c.locality_prompts == ["Michel Rocard is a native speaker of"]
    assert c.locality_answers == ["French"]
    assert c.generation_prompts == [c.prompt]
    assert c.to_request() == {
        "prompt": c.prompt, "subject": "Danielle Darrieux", "target_new": "English",
        "ground_truth": "French", "case_id": 0,
    }


def test_counterfact_full_file_loads():
    fmt, cases = load_cases(data_file("counterfact"))
    assert fmt == "counterfact" and len(cases) == 10_000
    assert all(c.subject in c.prompt for c in cases)


def test_counterfact_templates():
    fmt, cases = load_cases(data_file("counterfact/counterfact-templates-1k.json"))
    assert fmt == "counterfact_templates" and len(cases) == 1000
    c = cases[0]
    assert c.case_id == "0"
    assert c.prompt == "The mother tongue of Danielle Darrieux is"
    assert (c.target_new, c.ground_truth) == ("English", "French")
    assert c.rephrase_prompts[0].endswith("Danielle Darrieux, a native")
    assert c.locality_prompts == ["The mother tongue of Léon Blum is"] and c.locality_answers == ["French"]
    assert c.extra["relation_id"] == "P103" and "sbj_hop_test" in c.extra
    assert all("{}" not in x.prompt for x in cases)


@pytest.mark.parametrize("name", ["rome_format_most_orthogonal.json", "rome_format_least_orthogonal.json"])
def test_counterfact_rome(name):
    path = data_file(f"counterfact/{name}")
    fmt, cases = load_cases(path)
    assert fmt == "counterfact_rome" and len(cases) == 10
    raw = json.loads(path.read_text())
    for c, r in zip(cases, raw):
        rw = r["requested_rewrite"]
        assert c.prompt == rw["prompt"].format(rw["subject"])
        assert c.target_new == rw["target_new"]["str"] and c.ground_truth == rw["target_true"]["str"]
        assert c.rephrase_prompts == r["paraphrase_prompts"]
        assert c.locality_prompts == r["neighborhood_prompts"]
        assert c.locality_answers == [rw["target_true"]["str"]] * len(r["neighborhood_prompts"])
        assert c.generation_prompts == r["generation_prompts"]
        assert c.extra["relation_id"] == rw["relation_id"] and "attribute_prompts" in c.extra
    first = {"rome_format_most_orthogonal.json": "Ferdinand de Saussure, a citizen of",
             "rome_format_least_orthogonal.json": "Luigi Snozzi, who has a citizenship from"}
    assert cases[0].prompt == first[name]


def test_zsre():
    fmt, cases = load_cases(data_file("zsre"))
    assert fmt == "zsre" and len(cases) == 1037
    c = cases[0]
    assert c.case_id == 0 and cases[5].case_id == 5
    assert c.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert (c.target_new, c.ground_truth) == ("2006", "1998")
    assert c.rephrase_prompts == ["When was the IAAF Combined Events Challenge launched?"]
    assert c.locality_prompts == ["nq question: what is the name of the last episode of spongebob"]
    assert c.locality_answers == ["The String"]
    assert "portability" in c.extra


def test_detect_format_unknown_names_keys():
    with pytest.raises(ValueError, match="foo"):
        detect_format([{"foo": 1, "bar": 2}])
    with pytest.raises(ValueError):
        detect_format([])
    with pytest.raises(ValueError):
        detect_format(["not a dict"])


def test_detect_format_each():
    assert detect_format([{"requested_rewrite": {}}]) == "counterfact_rome"
    assert detect_format([{k: "" for k in ["src", "alt", "answers", "rephrase", "loc", "loc_ans", "subject"]}]) == "zsre"
    assert detect_format([{"prompt": "", "subject": "", "fact_knowledge": "", "edited_knowledge": ""}]) == "counterfact_templates"
    assert detect_format([{"prompt": "", "subject": "", "target_new": "", "ground_truth": ""}]) == "counterfact"


def test_subject_not_in_prompt_names_case(tmp_path):
    rec = {"case_id": 77, "prompt": "The capital of France is", "subject": "Germany", "target_new": "Rome",
           "ground_truth": "Paris", "rephrase_prompt": "x", "locality_prompt": "y", "locality_ground_truth": "z"}
    p = tmp_path / "cf.json"
    p.write_text(json.dumps([rec]))
    with pytest.raises(ValueError, match="77"):
        load_cases(p)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_cases(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cases(bad)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="list"):
        load_cases(obj)
    rec = {"case_id": 1, "prompt": "A B is", "subject": "A B", "target_new": "x", "ground_truth": "y"}
    good = tmp_path / "good.json"
    good.write_text(json.dumps([rec, rec | {"case_id": 2}]))
    assert [c.case_id for c in load_cases(good, n=1)[1]] == [1]
    with pytest.raises(ValueError, match="only 2"):
        load_cases(good, n=3)
    with pytest.raises(ValueError, match="positive"):
        load_cases(good, n=0)


def test_missing_key_and_list_fields():
    fmt, cases = records_to_cases([{"case_id": 3, "prompt": "A B is", "subject": "A B", "target_new": "x",
                                    "ground_truth": "y", "rephrase_prompt": ["r1", "r2"],
                                    "locality_prompt": ["l1", "l2"], "locality_ground_truth": ["a1", "a2"]}])
    assert cases[0].rephrase_prompts == ["r1", "r2"] and cases[0].locality_answers == ["a1", "a2"]
    with pytest.raises(ValueError, match="ground_truth"):
        records_to_cases([{"prompt": "A is", "subject": "A", "target_new": "x", "ground_truth": "y"},
                          {"case_id": 9, "prompt": "A is", "subject": "A", "target_new": "x"}])
    with pytest.raises(ValueError, match="locality"):
        EditCase(case_id=1, prompt="A is", subject="A", target_new="x", ground_truth=None,
                 locality_prompts=["p"], locality_answers=[])
    with pytest.raises(ValueError, match="target_new"):
        EditCase(case_id=1, prompt="A is", subject="A", target_new=" ", ground_truth=None)


def test_builtin_facts_ship_with_the_package():
    """The data-free main job's facts: 20 CounterFact-format cases, each with a paraphrase and a
    neighbourhood prompt, subjects in their prompts, new objects different from the true ones."""
    from blue_plugin.evaluation.data import BUILTIN_FACTS

    fmt, cases = load_cases(BUILTIN_FACTS)
    assert fmt == "counterfact" and len(cases) == 20
    assert len({c.case_id for c in cases}) == 20
    for c in cases:
        assert c.subject in c.prompt and c.target_new != c.ground_truth
        assert len(c.rephrase_prompts) == 1 and len(c.locality_prompts) == 1 and len(c.locality_answers) == 1
