"""Paths recorded in committed results read the same on every machine and checkout."""
from __future__ import annotations

import os

from benchmarks.common import DEFAULT_HPARAMS, REPO_ROOT, recorded_path


def test_a_repository_file_is_recorded_relative_to_the_root(monkeypatch):
    monkeypatch.delenv("BLUE_PLUGIN_DATA", raising=False)
    assert recorded_path(DEFAULT_HPARAMS) == "hparams/BLUE/smollm2-135m.yaml"
    monkeypatch.chdir(REPO_ROOT / "hparams")
    assert recorded_path("BLUE/smollm2-135m.yaml") == "hparams/BLUE/smollm2-135m.yaml"


def test_a_data_file_is_recorded_under_the_data_variable(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    (second / "counterfact").mkdir(parents=True)
    monkeypatch.setenv("BLUE_PLUGIN_DATA", os.pathsep.join([str(first), str(second)]))
    assert recorded_path(second / "counterfact" / "x.json") == "$BLUE_PLUGIN_DATA/counterfact/x.json"


def test_other_paths_stay_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUE_PLUGIN_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    assert recorded_path("elsewhere.json") == str((tmp_path / "elsewhere.json").resolve())
