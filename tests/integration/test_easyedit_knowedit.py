"""KnowEdit data with portability through EasyEdit's ``BaseEditor`` and through the runner
(``benchmarks/run_blue_editing.py``): the same requests give the same numbers.

Needs an EasyEdit checkout (``EASYEDIT_ROOT``, see docs/easyedit.md), the embedded SmolLM2 and the
corpus for the key statistics (``BLUE_PLUGIN_DATA``); skipped otherwise::

    EASYEDIT_ROOT=/path/to/EasyEdit python -m pytest tests/integration/test_easyedit_knowedit.py -q
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from blue_plugin.datafiles import locate
from blue_plugin.evaluation.knowedit import summary_by_key, summary_table
from blue_plugin.integrations import easyedit as E

pytestmark = pytest.mark.easyedit

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = locate("wordnet-glosses")

#: Two WikiData-counterfact-style KnowEdit records written for this test (facts from CounterFact).
RECORDS = [
    {
        "subject": "Danielle Darrieux",
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase": "Where Danielle Darrieux is from, people speak the language of",
        "portability": {
            "Subject_Aliasing": [{"prompt": "The mother tongue of the actress Danielle Darrieux is", "ground_truth": ["English"]}],
            "Reasoning": [{"prompt": "Danielle Darrieux grew up speaking the language whose home country is",
                           "ground_truth": [["England", "the United Kingdom"]]}],
            "Logical_Generalization": [],
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "Danielle Darrieux was born in the city of", "ground_truth": [["Bordeaux"]]}],
            "Forgetfulness": [{"prompt": "Michel Rocard is a native speaker of", "ground_truth": ["French"]}],
        },
    },
    {
        "subject": "Apple A5",
        "prompt": "Apple A5 was created by",
        "target_new": "Google",
        "ground_truth": "Apple",
        "rephrase": "Apple A5 is my favorite product out of everything created by",
        "portability": {
            "Reasoning": [{"prompt": "The company that created Apple A5 has its headquarters in",
                           "ground_truth": [["Mountain View"]]},
                          {"prompt": "The company that created Apple A5 was founded by", "ground_truth": [[""]]}],
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "Calendar and Contacts Server was created by", "ground_truth": ["Apple"]}],
        },
    },
]

#: What BaseEditor.edit receives for RECORDS, written out by hand as EasyEdit's KnowEdit example builds it.
DIRECT_INPUTS = dict(
    prompts=["The mother tongue of Danielle Darrieux is", "Apple A5 was created by"],
    target_new=["English", "Google"],
    ground_truth=["French", "Apple"],
    subject=["Danielle Darrieux", "Apple A5"],
    rephrase_prompts=["Where Danielle Darrieux is from, people speak the language of",
                      "Apple A5 is my favorite product out of everything created by"],
    locality_inputs={
        "Relation_Specificity": {"prompt": [["Danielle Darrieux was born in the city of"], ["Calendar and Contacts Server was created by"]],
                                 "ground_truth": [["Bordeaux"], ["Apple"]]},
        "Forgetfulness": {"prompt": [["Michel Rocard is a native speaker of"], None], "ground_truth": [["French"], None]},
    },
    portability_inputs={
        "Subject_Aliasing": {"prompt": [["The mother tongue of the actress Danielle Darrieux is"], None],
                             "ground_truth": [["English"], None]},
        "reasoning": {"prompt": [["Danielle Darrieux grew up speaking the language whose home country is"],
                                 ["The company that created Apple A5 has its headquarters in"]],
                      "ground_truth": [["England"], ["Mountain View"]]},
    },
)


@pytest.fixture(scope="module")
def easyedit():
    root = os.environ.get("EASYEDIT_ROOT", "").strip()
    if not root:
        pytest.skip("EASYEDIT_ROOT is not set: point it at an EasyEdit checkout (git clone zjunlp/EasyEdit) to run these tests")
    report = E.register_with_easyedit(verbose=False, root=root)
    import easyeditor

    return types.SimpleNamespace(module=easyeditor, report=report, root=root)


def _hparams():
    """The SmolLM2 YAML with the test settings of tests/integration/test_easyedit.py."""
    from blue_plugin.hparams import BLUEHyperParams

    if CORPUS is None:
        pytest.skip("corpus for the key statistics (corpus/wordnet-glosses.txt) not found: set BLUE_PLUGIN_DATA (docs/data.md)")
    hp = BLUEHyperParams.from_hparams(REPO_ROOT / "hparams" / "BLUE" / "smollm2-135m.yaml")
    return hp.replace(device="cpu", mom2_dataset=str(CORPUS), mom2_n_samples=300, mom2_update_weight=1500.0,
                      context_template_length_params=[[5, 2]], v_num_grad_steps=20, batch_size=1)


def _runner():
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from benchmarks import run_blue_editing
    finally:
        sys.path.remove(str(REPO_ROOT))
    return run_blue_editing


def _scores(metrics: list[dict]) -> list[dict]:
    """The accuracies EasyEdit reports per case and phase (JSON round trip: the runner writes JSON)."""
    keep = ("rewrite_acc", "rephrase_acc", "locality", "portability")
    out = [{phase: {k: m[phase][k] for k in keep if k in m[phase]} for phase in ("pre", "post")} for m in metrics]
    return json.loads(json.dumps(out, default=lambda x: x.tolist() if hasattr(x, "tolist") else float(x)))


def acc_keys(block: dict) -> set:
    return {k for k in block if k.endswith("_acc")}


@pytest.fixture
def run_both(easyedit, smollm2, tmp_path, monkeypatch):
    """``run(runner_args, direct_inputs)`` -> (the runner's result, BaseEditor.edit's metrics on the
    shared SmolLM2, whose weights and BLUE state are restored afterwards); non-sequential, batch size 1."""
    from blue_plugin.editing.state import reset_state

    import yaml

    monkeypatch.chdir(tmp_path)  # EasyEdit writes ./logs
    hp = _hparams()
    yaml_path = tmp_path / "hp.yaml"
    yaml_path.write_text(yaml.safe_dump({f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)}))

    def run(runner_args: list[str], direct_inputs: dict):
        result = _runner().main(["--editing_method", "BLUE", "--hparams_dir", str(yaml_path), "--batch_size", "1",
                                 "--output_dir", str(tmp_path / "out"), "--easyedit_root", easyedit.root, *runner_args])
        model, tok = smollm2
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp.down_proj" in n}
        reset_state(model)
        try:
            editor = easyedit.module.BaseEditor.from_hparams(E.with_model(hp, model, tok, name="smollm2-135m"))
            direct, _, _ = editor.edit(**json.loads(json.dumps(direct_inputs)), sequential_edit=False)
        finally:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n, w in saved.items():
                    params[n].copy_(w)
            reset_state(model)
        print(f"runner table {result['table']}\ndirect table {summary_table(direct)}")
        assert _scores(result["metrics"]) == _scores(direct)
        assert result["summary"] == json.loads(json.dumps(summary_by_key(direct)))
        assert result["table"] == json.loads(json.dumps(summary_table(direct)))
        return result, _scores(direct)

    return run


def test_knowedit_portability_runner_matches_base_editor(easyedit, run_both, tmp_path):
    data_file = tmp_path / "test_cf.json"
    data_file.write_text(json.dumps(RECORDS))
    # the reader gives what EasyEdit's own KnowEditDataset reads, and the inputs written out above
    ee = list(easyedit.module.KnowEditDataset(str(data_file)))
    data = _runner().load_edit_data(data_file, "counterfact", None)
    assert data["prompts"] == [r["prompt"] for r in ee] and data["subject"] == [r["subject"] for r in ee]
    assert {k: data[k] for k in DIRECT_INPUTS} == DIRECT_INPUTS

    result, theirs = run_both(["--data_dir", str(data_file), "--datatype", "counterfact"], DIRECT_INPUTS)
    assert result["data_format"] == "knowedit_counterfact" and result["n_cases"] == 2
    assert acc_keys(theirs[0]["post"]["portability"]) == {"Subject_Aliasing_acc", "reasoning_acc"}
    assert acc_keys(theirs[1]["post"]["portability"]) == {"reasoning_acc"}
    assert acc_keys(theirs[0]["post"]["locality"]) == {"Relation_Specificity_acc", "Forgetfulness_acc"}
    assert acc_keys(theirs[1]["post"]["locality"]) == {"Relation_Specificity_acc"}
    assert set(result["table"]["post"]) == {"rewrite_acc", "rephrase_acc", "locality", "portability"}
    assert [m["post"]["rewrite_acc"] for m in theirs] == [[1.0], [1.0]]


def test_mend_zsre_portability_runner_matches_base_editor(run_both):
    """The MEND zsRE file's portability question is passed as ``one_hop`` (EasyEdit's zsRE example)."""
    zsre = locate("zsre")
    if zsre is None:
        pytest.skip("zsre_mend_eval_portability_gpt4.json not found: set BLUE_PLUGIN_DATA (docs/data.md)")
    records = json.loads(Path(zsre).read_text(encoding="utf-8"))[:2]
    if not all("portability" in r for r in records):
        pytest.skip(f"{zsre} has no portability field")
    direct_inputs = dict(
        prompts=[r["src"] for r in records], target_new=[r["alt"] for r in records],
        ground_truth=[r["answers"][0] for r in records], subject=[r["subject"] for r in records],
        rephrase_prompts=[r["rephrase"] for r in records],
        locality_inputs={"neighborhood": {"prompt": [r["loc"] for r in records], "ground_truth": [r["loc_ans"] for r in records]}},
        portability_inputs={"one_hop": {"prompt": [r["portability"]["New Question"] for r in records],
                                        "ground_truth": [r["portability"]["New Answer"] for r in records]}},
    )
    result, theirs = run_both(["--data_dir", str(zsre), "--data_type", "ZsRE", "--ds_size", "2"], direct_inputs)
    assert result["data_format"] == "zsre"
    assert [acc_keys(m["post"]["portability"]) for m in theirs] == [{"one_hop_acc"}] * 2
    assert set(result["summary"]["post"]["portability"]) == {"one_hop_acc"}
