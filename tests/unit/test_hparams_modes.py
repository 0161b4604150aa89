"""Values per mode (``mode_overrides`` / ``for_mode``), shipped configurations found by name, and
the reference defaults."""
from __future__ import annotations

import pytest

from blue_plugin import BLUEHyperParams
from blue_plugin.errors import BLUEConfigError
from blue_plugin.hparams import shipped_configs


@pytest.mark.parametrize("name, blue_l2", [("gpt2-xl", 80.0), ("gpt-j-6b", 95.0), ("llama3-8b", 1.0)])
def test_paper_yamls_state_alphaedit_l2_for_both_modes(name, blue_l2):
    hp = BLUEHyperParams.from_hparams(name)  # found by name among the shipped configurations
    assert hp.blue and hp.L2 == blue_l2
    original = hp.for_mode(False)
    assert not original.blue and original.L2 == 10.0
    assert original.for_mode(True).L2 == blue_l2 and original.for_mode(True) == hp
    assert hp.accumulate_keys is None and (hp.clamp_norm_factor, hp.v_weight_decay) == (0.75, 0.5)


def test_shipped_configs_and_paths_both_work(tmp_path):
    assert {"smollm2-135m", "gpt2-xl", "gpt-j-6b", "llama3-8b"} <= set(shipped_configs())
    by_name = BLUEHyperParams.from_hparams("smollm2-135m")
    path = tmp_path / "mine.yaml"
    path.write_text("alg_name: BLUE\nmodel_name: m\nlayers: [1, 3]\nbase_method: MEMIT\nblue: false\n"
                    "L2: 10\nmode_overrides:\n  blue:\n    L2: 2\n")
    from_path = BLUEHyperParams.from_hparams(path)
    assert by_name.layers == [4, 5, 6, 7, 8] and from_path.L2 == 10.0 and from_path.for_mode(True).L2 == 2.0
    with pytest.raises(BLUEConfigError, match="not found.*shipped names"):
        BLUEHyperParams.from_hparams("no-such-config")


def test_round_trip_keeps_the_stated_values():
    hp = BLUEHyperParams(L2=10, mode_overrides={"blue": {"L2": 80}, "original": {"v_lr": 0.2}})
    assert hp.L2 == 80.0 and hp.v_lr == 0.5
    d = hp.to_dict()
    assert d["L2"] == 10.0 and d["mode_overrides"] == {"blue": {"L2": 80}, "original": {"v_lr": 0.2}}
    assert BLUEHyperParams.from_dict(d) == hp
    original = hp.for_mode(False)
    assert (original.L2, original.v_lr) == (10.0, 0.2)
    assert BLUEHyperParams.from_dict(original.to_dict()).for_mode(True) == hp


def test_changing_an_overridden_key_is_refused_not_ignored():
    hp = BLUEHyperParams(mode_overrides={"blue": {"L2": 80}})
    with pytest.raises(BLUEConfigError, match="'L2' is set for the 'blue' mode in mode_overrides"):
        hp.replace(L2=5)
    assert hp.replace(mode_overrides={"blue": {"L2": 5}}).L2 == 5.0
    assert hp.for_mode(False).replace(L2=5).L2 == 5.0  # not overridden in the original mode


@pytest.mark.parametrize("overrides, match", [
    ({"both": {"L2": 1}}, "modes are"),
    ({"blue": {"v_lrr": 1}}, "unknown hyperparameter 'v_lrr'.*did you mean 'v_lr'"),
    ({"blue": {"base_method": "RECT"}}, "may not set 'base_method'"),
    ({"blue": {"L2": "abc"}}, "'L2' must be a number"),
    ({"blue": {"L2": -1}}, "'L2': must be >= 0"),
    ({"blue": 3}, "must be a mapping"),
])
def test_bad_mode_overrides_are_refused(overrides, match):
    with pytest.raises(BLUEConfigError, match=match):
        BLUEHyperParams(mode_overrides=overrides)


def test_reference_defaults_and_key_accumulation_per_base_method():
    hp = BLUEHyperParams()
    assert (hp.clamp_norm_factor, hp.v_weight_decay, hp.mom2_dataset) == (0.75, 0.5, "wikipedia")
    assert (hp.rect_mask_timing, hp.prune_timing) == ("batch", "sequence")
    assert {m: hp.replace(base_method=m).accumulates_keys for m in ("MEMIT", "RECT", "PRUNE", "AlphaEdit")} == {
        "MEMIT": True, "RECT": False, "PRUNE": False, "AlphaEdit": True}
    assert hp.replace(base_method="RECT", accumulate_keys=True).accumulates_keys
    assert hp.replace(base_method="AlphaEdit", accumulate_keys=False).accumulates_keys


def test_for_mode_needs_a_bool():
    with pytest.raises(BLUEConfigError, match="True or False"):
        BLUEHyperParams().for_mode("yes")
