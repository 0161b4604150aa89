"""EasyEdit integration (blue_plugin.integrations.easyedit, benchmarks/run_blue_editing.py).

Two groups:

* ``TestFakeEasyEdit`` / ``TestHelpers`` run everywhere: they build a miniature ``easyeditor``
  package in a temporary folder with the same registration points as the real one (``ALG_DICT``,
  ``BatchEditor`` enum, ``BaseEditor.__init__`` choosing the padding side from name lists, the
  restore sets) and check what registration does to them.
* ``TestRealEasyEdit`` runs BLUE through the real ``BaseEditor`` on the embedded SmolLM2 on the
  CPU. It needs an EasyEdit checkout: ``EASYEDIT_ROOT=/path/to/EasyEdit python -m pytest
  tests/integration/test_easyedit.py`` (and EasyEdit's pip dependencies, see docs/easyedit.md); without
  ``EASYEDIT_ROOT`` it is skipped.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from blue_plugin.integrations import easyedit as E
from blue_plugin.datafiles import fetch_command, locate

REPO_ROOT = Path(__file__).resolve().parents[2]
# found by blue_plugin.datafiles ($BLUE_PLUGIN_DATA, then the cache; never downloaded here); None if missing
CORPUS = locate("wordnet-glosses")
CF_FILE = locate("counterfact")


# ------------------------------------------------------------------------------------------------
# A miniature easyeditor with the registration points of the real one
# ------------------------------------------------------------------------------------------------
FAKE_FILES = {
    "easyeditor/__init__.py": """
        from .editors.editor import BaseEditor
        from .editors.batch_editor import BatchEditor
        from .util.alg_dict import ALG_DICT
        from .util.hparams import HyperParams
        from . import multimodal
    """,
    "easyeditor/multimodal.py": """
        # As in EasyEdit: vision / UnKE imports at module level, only called later.
        from torchvision.transforms.functional import InterpolationMode
        from timm.layers import drop_path
        from transformers.modeling_attn_mask_utils import AttentionMaskConverter

        def use_vision():
            return drop_path(None, InterpolationMode.BICUBIC)
    """,
    "easyeditor/util/__init__.py": "",
    "easyeditor/util/hparams.py": """
        from dataclasses import dataclass

        @dataclass
        class HyperParams:
            pass
    """,
    "easyeditor/util/alg_dict.py": """
        def apply_memit_to_model(model, tok, requests, hparams, **kwargs):
            return model, {}

        def apply_rome_to_model(model, tok, requests, hparams, **kwargs):
            return model, {}

        def apply_ft_to_model(model, tok, requests, hparams, **kwargs):
            return model, {}

        ALG_DICT = {"MEMIT": apply_memit_to_model, "ROME": apply_rome_to_model, "FT": apply_ft_to_model}
    """,
    "easyeditor/editors/__init__.py": "",
    "easyeditor/editors/batch_editor.py": """
        from enum import Enum

        class BatchEditor(Enum):
            MEMIT = "MEMIT"
            ALPHAEDIT = "AlphaEdit"

            @staticmethod
            def is_batchable_method(alg_name):
                return alg_name == BatchEditor.MEMIT.value or alg_name == BatchEditor.ALPHAEDIT.value
    """,
    "easyeditor/editors/utils.py": """
        CALLABLE_RESTORE_ALGS = {"KN", "GRACE"}
        PEFT_RESTORE_ALGS = {"LoRA"}
        KEEP_EDITED_MODEL_ALGS = {"MELO"}
    """,
    "easyeditor/editors/editor.py": """
        from ..util.alg_dict import *

        class BaseEditor:
            def __init__(self, hparams):
                self.alg_name = hparams.alg_name
                self.apply_algo = ALG_DICT[hparams.alg_name]
                self.seen_alg_name = hparams.alg_name
                if hparams.alg_name not in ["ROME", "MEMIT", "AlphaEdit"]:
                    self.padding_side = "left"
                else:
                    self.padding_side = "right"
                self.hparams = hparams
    """,
}


def _drop(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


@pytest.fixture
def fake_easyedit(tmp_path, monkeypatch):
    """Path of a miniature EasyEdit checkout; ``easyeditor`` is unloaded again afterwards."""
    if "easyeditor" in sys.modules:
        pytest.skip("a real easyeditor is already imported in this process")
    for rel, text in FAKE_FILES.items():
        path = tmp_path / "EasyEdit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    root = tmp_path / "EasyEdit"
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("EASYEDIT_ROOT", raising=False)
    monkeypatch.delenv("BLUE_PLUGIN_NO_EASYEDIT", raising=False)
    yield root
    _drop("easyeditor")


def _placeholders_expected() -> bool:
    """The fake imports torchvision/timm; placeholders are used only when they are missing."""
    if any(importlib.util.find_spec(m) is not None for m in ("torchvision", "timm")):
        return False
    return importlib.util.find_spec("transformers.modeling_attn_mask_utils") is None


class TestFakeEasyEdit:
    def test_register_all_points(self, fake_easyedit):
        if not _placeholders_expected():
            pytest.skip("torchvision/timm are installed here; the placeholder path is not exercised")
        report = E.register_with_easyedit(verbose=False, root=fake_easyedit)
        import easyeditor
        from easyeditor.editors.batch_editor import BatchEditor

        assert report["ALG_DICT"] == "registered"
        assert report["is_batchable_method"] == "wrapped"
        assert report["BaseEditor.__init__"].startswith("wrapped")
        assert report["restore"].startswith("default")
        assert easyeditor.ALG_DICT["BLUE"] is E.apply_blue_easyedit
        assert BatchEditor.is_batchable_method("BLUE") is True
        assert BatchEditor.is_batchable_method("MEMIT") is True
        assert BatchEditor.is_batchable_method("ROME") is False

        hp = types.SimpleNamespace(alg_name="BLUE")
        editor = easyeditor.BaseEditor(hp)
        assert editor.seen_alg_name == "MEMIT"  # constructed exactly as a MEMIT editor ...
        assert editor.padding_side == "right"  # ... so it gets MEMIT's padding side
        assert editor.alg_name == "BLUE" and hp.alg_name == "BLUE"
        assert editor.apply_algo is E.apply_blue_easyedit
        # other algorithms are untouched
        ft = easyeditor.BaseEditor(types.SimpleNamespace(alg_name="FT"))
        assert ft.seen_alg_name == "FT" and ft.padding_side == "left"
        assert ft.apply_algo is easyeditor.ALG_DICT["FT"]

    def test_placeholders_are_served_only_during_import(self, fake_easyedit):
        if not _placeholders_expected():
            pytest.skip("torchvision/timm are installed here; the placeholder path is not exercised")
        E.import_easyeditor(fake_easyedit)
        import easyeditor.multimodal as mm

        # nothing of the placeholders is left for other libraries ...
        for name in ("torchvision", "timm", "transformers.modeling_attn_mask_utils"):
            assert name not in sys.modules
        assert importlib.util.find_spec("torchvision") is None
        # ... and using one says what to install
        with pytest.raises(ImportError, match="placeholder"):
            mm.use_vision()
        with pytest.raises(ImportError, match="torchvision"):
            mm.AttentionMaskConverter()

    def test_without_compat_the_import_fails_with_a_hint(self, fake_easyedit):
        if not _placeholders_expected():
            pytest.skip("torchvision/timm are installed here")
        with pytest.raises(ImportError, match="install the missing package"):
            E.import_easyeditor(fake_easyedit, compat=False)
        assert "easyeditor" not in sys.modules  # a retry starts clean
        E.import_easyeditor(fake_easyedit)
        assert "easyeditor" in sys.modules

    def test_idempotent(self, fake_easyedit):
        first = E.register_with_easyedit(verbose=False, root=fake_easyedit)
        from easyeditor.editors.batch_editor import BatchEditor
        from easyeditor.editors.editor import BaseEditor

        init, batchable = BaseEditor.__init__, BatchEditor.is_batchable_method
        second = E.register_with_easyedit(verbose=False, root=fake_easyedit)
        assert first["ALG_DICT"] == "registered"
        assert (second["ALG_DICT"], second["is_batchable_method"], second["BaseEditor.__init__"]) == ("already",) * 3
        assert BaseEditor.__init__ is init and BatchEditor.is_batchable_method is batchable
        assert BaseEditor.__init__.__wrapped__.__name__ == "__init__"  # wrapped once, not twice

    def test_foreign_blue_entry_needs_force(self, fake_easyedit):
        E.import_easyeditor(fake_easyedit)
        import easyeditor

        def other(*args, **kwargs):
            return None

        easyeditor.ALG_DICT["BLUE"] = other
        with pytest.raises(ValueError, match="force=True"):
            E.register_with_easyedit(verbose=False)
        assert easyeditor.ALG_DICT["BLUE"] is other
        report = E.register_with_easyedit(verbose=False, force=True)
        assert report["ALG_DICT"] == "replaced" and easyeditor.ALG_DICT["BLUE"] is E.apply_blue_easyedit

    def test_blue_in_a_restore_set_is_refused(self, fake_easyedit):
        E.import_easyeditor(fake_easyedit)
        from easyeditor.editors import utils

        utils.CALLABLE_RESTORE_ALGS.add("BLUE")
        with pytest.raises(ValueError, match="CALLABLE_RESTORE_ALGS"):
            E.register_with_easyedit(verbose=False)

    def test_try_register_uses_env_and_is_quiet_without(self, fake_easyedit, monkeypatch):
        assert E.try_register() is None  # no EASYEDIT_ROOT, no easyeditor on sys.path
        monkeypatch.setenv("EASYEDIT_ROOT", str(fake_easyedit))
        monkeypatch.setenv("BLUE_PLUGIN_NO_EASYEDIT", "1")
        assert E.try_register() is None
        monkeypatch.delenv("BLUE_PLUGIN_NO_EASYEDIT")
        report = E.try_register()
        assert report is not None and report["alg_name"] == "BLUE"
        assert E.easyedit_hyperparams_base() is sys.modules["easyeditor.util.hparams"].HyperParams


class TestHelpers:
    def test_easyedit_root_validates(self, tmp_path, monkeypatch):
        monkeypatch.delenv("EASYEDIT_ROOT", raising=False)
        assert E.easyedit_root() is None
        with pytest.raises(ValueError, match="not an EasyEdit checkout"):
            E.easyedit_root(tmp_path)
        monkeypatch.setenv("EASYEDIT_ROOT", str(tmp_path))
        with pytest.raises(ValueError, match="EASYEDIT_ROOT"):
            E.easyedit_root()

    def test_easyedit_model_tuple(self):
        model, tok = torch.nn.Linear(2, 2), object()
        m = E.EasyEditModel(model, tok, name="My/SmolLM2")
        a, b = m  # BaseEditor unpacks it
        assert a is model and b is tok and type(m) is not str
        assert m.lower() == "my/smollm2" and str(m) == "My/SmolLM2" and "t5" not in m.lower()
        assert m.split("/")[-1] == "SmolLM2"
        import copy

        c = copy.deepcopy(m)
        assert isinstance(c, E.EasyEditModel) and c.name == m.name and c[0] is not model
        with pytest.raises(ValueError):
            E.EasyEditModel(None, tok)

    def test_with_model_sets_model_and_device(self):
        from blue_plugin.hparams import BLUEHyperParams

        hp = BLUEHyperParams(device=0)
        model = torch.nn.Linear(2, 2)
        new = E.with_model(hp, model, object(), name="tiny")
        assert new.device == "cpu" and new.model_name[0] is model and str(new.model_name) == "tiny"
        assert hp.device == 0 and hp.model_name == "smollm2-135m"  # the original is unchanged
        with pytest.raises(ValueError, match="parameters"):
            E.with_model(hp, object(), object())


PAPER_YAMLS = {
    # file: (critical layers, boundary layers, v_num_grad_steps, v_lr, mom2_update_weight, L2 with BLUE, rewrite module)
    "gpt2-xl": ([13, 14, 15, 16, 17], [13, 17], 20, 0.5, 20000.0, 80.0, "transformer.h.{}.mlp.c_proj"),
    "gpt-j-6b": ([3, 4, 5, 6, 7, 8], [3, 8], 25, 0.5, 15000.0, 95.0, "transformer.h.{}.mlp.fc_out"),
    "llama3-8b": ([4, 5, 6, 7, 8], [4, 8], 25, 0.1, 15000.0, 1.0, "model.layers.{}.mlp.down_proj"),
}


@pytest.mark.parametrize("name", sorted(PAPER_YAMLS))
def test_paper_yamls_load_with_every_base_method(name):
    from blue_plugin.hparams import BLUEHyperParams

    layers, boundary, steps, lr, lam, l2, rewrite = PAPER_YAMLS[name]
    hp = BLUEHyperParams.from_hparams(REPO_ROOT / "hparams" / "BLUE" / f"{name}.yaml")
    assert (hp.alg_name, hp.blue, hp.layers, hp.edit_layers) == ("BLUE", True, layers, boundary)
    assert (hp.v_num_grad_steps, hp.v_lr, hp.mom2_update_weight, hp.L2) == (steps, lr, lam, l2)
    assert (hp.nullspace_threshold, hp.clamp_norm_factor, hp.kl_factor) == (2e-2, 0.75, 0.0625)
    assert hp.rewrite_module_tmp == rewrite and hp.mom2_dataset == "wikipedia"
    for base in ("MEMIT", "RECT", "PRUNE", "AlphaEdit"):
        for blue in (True, False):
            other = hp.replace(base_method=base, blue=blue)
            assert other.edit_layers == (boundary if blue else layers)


# ------------------------------------------------------------------------------------------------
# The real EasyEdit (needs EASYEDIT_ROOT)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def easyedit():
    root = os.environ.get("EASYEDIT_ROOT", "").strip()
    if not root:
        pytest.skip("EASYEDIT_ROOT is not set: point it at an EasyEdit checkout (git clone zjunlp/EasyEdit) to run these tests")
    report = E.register_with_easyedit(verbose=False, root=root)  # fails loudly if EasyEdit is broken
    import easyeditor

    return types.SimpleNamespace(module=easyeditor, report=report, root=root)


def _test_hparams(**changes):
    """The SmolLM2 YAML with test-speed settings: a small C0 sample and 2 context prefixes.
    mom2_update_weight 1500 makes single edits take reliably on this 135M model."""
    from blue_plugin.hparams import BLUEHyperParams

    if CORPUS is None:
        pytest.skip("corpus for the key statistics (corpus/wordnet-glosses.txt) not found: set BLUE_PLUGIN_DATA "
                    "to the data folder (docs/data.md)")
    hp = BLUEHyperParams.from_hparams(REPO_ROOT / "hparams" / "BLUE" / "smollm2-135m.yaml")
    base = dict(
        device="cpu",
        mom2_dataset=str(CORPUS),
        mom2_n_samples=300,
        mom2_update_weight=1500.0,
        context_template_length_params=[[5, 2]],
        v_num_grad_steps=20,
        batch_size=1,
    )
    base.update(changes)
    return hp.replace(**base)


def _cf_file() -> Path:
    if CF_FILE is None:
        pytest.skip(f"CounterFact file not found: set BLUE_PLUGIN_DATA to the data folder or run "
                    f"`{fetch_command('counterfact')}` (docs/data.md)")
    return CF_FILE


def _cf_cases(n: int) -> list[dict]:
    with open(_cf_file(), encoding="utf-8") as fh:
        return json.load(fh)[:n]


@pytest.fixture
def editor_factory(easyedit, smollm2, tmp_path, monkeypatch):
    """Builds BaseEditors on the shared SmolLM2; restores its weights and state afterwards."""
    from blue_plugin.editing.state import reset_state

    monkeypatch.chdir(tmp_path)  # EasyEdit writes ./logs
    model, tok = smollm2
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp.down_proj" in n}
    reset_state(model)

    def make(**changes):
        hp = _test_hparams(**changes)
        return easyedit.module.BaseEditor.from_hparams(E.with_model(hp, model, tok, name="smollm2-135m")), hp

    yield make
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, w in saved.items():
            params[n].copy_(w)
    reset_state(model)


def _changed(model, saved_names_to_values) -> list[str]:
    params = dict(model.named_parameters())
    return [n for n, w in saved_names_to_values.items() if not torch.equal(params[n], w)]


class TestRealEasyEdit:
    def test_from_hparams_builds_a_blue_editor(self, easyedit, editor_factory, smollm2):
        from easyeditor.editors.batch_editor import BatchEditor

        from blue_plugin.hparams import BLUEHyperParams

        editor, hp = editor_factory()
        assert editor.alg_name == "BLUE" and editor.apply_algo is E.apply_blue_easyedit
        assert editor.model is smollm2[0] and editor.tok is smollm2[1]
        assert BatchEditor.is_batchable_method("BLUE") and not BatchEditor.is_batchable_method("ROME")
        assert easyedit.module.ALG_DICT["MEMIT"].__name__ == "apply_memit_to_model"
        # BLUEHyperParams is a plain dataclass; the integration hands EasyEdit a subclass that also
        # derives from EasyEdit's HyperParams.
        assert isinstance(editor.hparams, BLUEHyperParams)
        assert isinstance(editor.hparams, easyedit.module.HyperParams), (
            "the hyperparameters EasyEdit receives should derive from EasyEdit's HyperParams"
        )

    def test_single_edit_non_sequential_restores_weights_exactly(self, editor_factory, smollm2):
        from blue_plugin.editing.state import get_state

        model = smollm2[0]
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp.down_proj" in n}
        editor, _ = editor_factory()
        case = _cf_cases(1)[0]
        t0 = time.perf_counter()
        metrics, _, weights_copy = editor.edit(
            prompts=case["prompt"],
            target_new=case["target_new"],
            ground_truth=case["ground_truth"],
            subject=case["subject"],
            rephrase_prompts=case["rephrase_prompt"],
            locality_inputs={"neighborhood": {"prompt": case["locality_prompt"], "ground_truth": case["locality_ground_truth"]}},
            sequential_edit=False,
        )
        print(f"edit(): {time.perf_counter() - t0:.1f}s, pre rewrite_acc {metrics[0]['pre']['rewrite_acc']}, "
              f"post rewrite_acc {metrics[0]['post']['rewrite_acc']}")
        assert set(weights_copy) == {"model.layers.4.mlp.down_proj.weight", "model.layers.8.mlp.down_proj.weight"}
        assert metrics[0]["pre"]["rewrite_acc"] == [0.0]
        assert metrics[0]["post"]["rewrite_acc"] == [1.0]  # EasyEdit saw the edit ...
        assert _changed(model, before) == []  # ... and restored every weight bit for bit
        # the next edit starts a fresh sequence (no K_p K_p^T of the reverted edit)
        editor.edit(prompts=case["prompt"], target_new=case["target_new"], subject=case["subject"], sequential_edit=False)
        assert get_state(model).n_edits == 1
        assert _changed(model, before) == []

    def test_batch_edit_sequential_two_batches(self, easyedit, editor_factory, smollm2):
        from blue_plugin.editing.state import get_state

        model = smollm2[0]
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp.down_proj" in n}
        editor, hp = editor_factory(batch_size=1)
        cases = _cf_cases(2)
        metrics, edited, _ = editor.batch_edit(
            prompts=[c["prompt"] for c in cases],
            target_new=[c["target_new"] for c in cases],
            ground_truth=[c["ground_truth"] for c in cases],
            subject=[c["subject"] for c in cases],
            rephrase_prompts=[c["rephrase_prompt"] for c in cases],
            locality_inputs={"neighborhood": {"prompt": [c["locality_prompt"] for c in cases],
                                              "ground_truth": [c["locality_ground_truth"] for c in cases]}},
            sequential_edit=True,
        )
        post = [m["post"]["rewrite_acc"][0] for m in metrics]
        print(f"batch_edit (2 batches of 1, sequential): post rewrite_acc {post}")
        easyedit.module.summary_metrics(metrics)
        assert len(metrics) == 2 and edited is model
        assert post == [1.0, 1.0]
        state = get_state(model)
        assert state.n_edits == 2 and len(state.history) == 2  # kept, not restored
        assert sorted(_changed(model, before)) == ["model.layers.4.mlp.down_proj.weight", "model.layers.8.mlp.down_proj.weight"]

    def test_runner_matches_the_api(self, easyedit, editor_factory, smollm2, tmp_path):
        """benchmarks/run_blue_editing.py gives the same EasyEdit metrics as calling batch_edit."""
        sys.path.insert(0, str(REPO_ROOT))
        try:
            from benchmarks import run_blue_editing as runner
        finally:
            sys.path.remove(str(REPO_ROOT))
        hp = _test_hparams(batch_size=1)
        yaml_path = tmp_path / "hp.yaml"
        import yaml

        yaml_path.write_text(yaml.safe_dump({f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)}))
        result = runner.main([
            "--editing_method", "BLUE", "--hparams_dir", str(yaml_path), "--data_dir", str(_cf_file()),
            "--data_type", "CF", "--ds_size", "1", "--batch_size", "1", "--sequential_edit",
            "--output_dir", str(tmp_path / "out"), "--easyedit_root", easyedit.root,
        ])
        assert Path(result["output_file"]).is_file()
        assert result["n_cases"] == 1 and result["data_format"] == "counterfact"
        assert result["summary"]["post"]["rewrite_acc"] == 1.0

        editor, _ = editor_factory(batch_size=1)
        data = runner.load_edit_data(_cf_file(), "CF", 1)
        direct = runner.summarize(runner.run_edits(editor, data, editor.hparams, sequential_edit=True))
        print(f"runner summary {result['summary']}\ndirect summary {direct}")
        assert result["summary"]["post"]["rewrite_acc"] == pytest.approx(direct["post"]["rewrite_acc"], abs=1e-9)
        assert json.dumps(result["summary"], sort_keys=True) == json.dumps(direct, sort_keys=True)
