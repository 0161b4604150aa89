"""benchmarks.speed_combine: merging split cost-growth sweeps."""
from __future__ import annotations

import json

import pytest

from benchmarks.speed.combine import combine, main


def _entry(system, method, b, seconds):
    return {"system": system, "method": method, "batch_size": b, "batch_wall_s": [seconds],
            "phases": [{"targets": seconds, "steps": {"8": [3] * b}}]}


def _stats(system, n, seconds):
    return {"system": system, "n_samples": n, "seconds": seconds, "peak_rss_mib": 1.0, "peak_rss_tree_mib": 2.0}


def _write(path, systems, scaling, statistics):
    path.mkdir()
    (path / "results.json").write_text(json.dumps({
        "benchmark": "speed", "command": "python -m benchmarks.speed ...", "config": {"scaling_systems": systems},
        "scaling": scaling, "statistics": statistics}))
    return path


def test_each_source_contributes_only_its_own_systems(tmp_path):
    ee = _write(tmp_path / "ee", ["easyedit"],
                [_entry("easyedit", "MEMIT", 1, 10.0), _entry("easyedit", "MEMIT", 50, 800.0),
                 _entry("ours", "MEMIT", 1, 99.0)],  # measured incidentally: must not count
                [_stats("easyedit", 1000, 120.0), _stats("ours", 1000, 99.0)])
    ours = _write(tmp_path / "ours", ["ours"], [_entry("ours", "MEMIT", 1, 4.0), _entry("ours", "MEMIT", 50, 200.0)],
                  [_stats("ours", 1000, 12.0)])
    merged = combine([ee, ours / "results.json"])
    sc = merged["summary"]["scaling"]
    assert sc == {"easyedit/MEMIT": {"1": 10.0, "50": 800.0}, "ours/MEMIT": {"1": 4.0, "50": 200.0}}
    st = merged["summary"]["statistics"]
    assert st["ours"]["1000"]["seconds"]["median"] == 12.0 and st["easyedit"]["1000"]["seconds"]["median"] == 120.0
    out = tmp_path / "out"
    assert main([str(ee), str(ours), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| ratio ours MEMIT / EasyEdit MEMIT | 0.400 | 0.250 |" in table
    assert (out / "per_batch_vs_B.png").stat().st_size > 0


def test_duplicate_and_bad_sources_are_refused(tmp_path):
    a = _write(tmp_path / "a", ["ours"], [_entry("ours", "MEMIT", 1, 4.0)], [])
    b = _write(tmp_path / "b", ["ours"], [_entry("ours", "MEMIT", 1, 5.0)], [])
    with pytest.raises(ValueError, match="in both"):
        combine([a, b])
    with pytest.raises(ValueError, match="does not exist"):
        combine([tmp_path / "missing"])
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "sequential"}))
    with pytest.raises(ValueError, match="not a results.json of benchmarks.speed"):
        combine([tmp_path / "other.json"])
