"""Tests for blue_plugin.stats.projection and ``python -m blue_plugin.stats import ... --layers``:
AlphaEdit's null_space_project.pt becomes one projection cache file per layer (read back by
load_projection); non-projections, wrong shapes, wrong slice counts and pickles are refused with
the failed check named and nothing written."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from blue_plugin.errors import BLUEStatisticsError
from blue_plugin.model.loading import load_model
from blue_plugin.stats import load_projection
from blue_plugin.stats.cli import main as stats_main
from blue_plugin.stats.projection import check_projection, import_projection

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.tiny import low_rank_c0, make_hparams, make_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]  # d_in = 64
N_SAMPLES, MAX_LENGTH, THRESHOLD = 20, 16, 0.02

from tests.unit.test_stats_import import Opaque, cache  # noqa: E402,F401  (shared fixture and pickle class)


def projection(d: int = 64, rank: int = 40, seed: int = 0) -> torch.Tensor:
    """P = U U^T onto the null space (dimension d - rank) of a low-rank C0, float32 as AlphaEdit saves it."""
    _, U = low_rank_c0(d, rank, seed)
    return (torch.eye(d, dtype=torch.float64) - U @ U.T).float()


def stacked(n: int = 2) -> torch.Tensor:
    return torch.stack([projection(seed=i) for i in range(n)])


def cache_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def import_llama(model, tok, source, cache, modules=MODULES, **kw):
    return import_projection(source, model, tok, modules, corpus="wikipedia", n_samples=N_SAMPLES,
                             max_length=MAX_LENGTH, threshold=THRESHOLD, cache_dir=cache, progress=False, **kw)


def test_alphaedit_file_is_imported_and_read_back(tmp_path, cache):
    model, tok = make_model("llama")
    P = stacked()
    src = tmp_path / "null_space_project.pt"
    torch.save(P, src)
    results = import_llama(model, tok, src, cache)
    assert [r.module for r in results] == MODULES and [r.count for r in results] == [24, 24]
    for i, (r, name) in enumerate(zip(results, MODULES)):
        assert r.path.name.endswith("__P_thr0.02.safetensors")
        with safe_open(str(r.path), framework="pt") as f:
            meta = f.metadata()
        assert meta["kind"] == "projection" and meta["nullspace_threshold"] == repr(THRESHOLD)
        assert meta["rank"] == "24" and meta["source_slice"] == str(i) and meta["source_slices"] == "2"
        assert meta["source_path"] == str(src.absolute()) and meta["source_format"] == "alphaedit-projection"
        assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert meta["module"] == name and meta["corpus_name"].startswith("wikimedia/wikipedia")
        loaded = load_projection(model, tok, name, corpus="wikipedia", n_samples=N_SAMPLES, max_length=MAX_LENGTH,
                                 threshold=THRESHOLD, cache_dir=cache, progress=False)
        expected = P[i].double()
        assert loaded.dtype == torch.float64 and torch.allclose(loaded, (expected + expected.T) / 2, atol=0)
    # another threshold or other statistics settings: not this projection
    assert load_projection(model, tok, MODULES[0], corpus="wikipedia", n_samples=N_SAMPLES, max_length=MAX_LENGTH,
                           threshold=0.01, cache_dir=cache, progress=False) is None
    assert load_projection(model, tok, MODULES[0], corpus="wikipedia", n_samples=N_SAMPLES + 1,
                           max_length=MAX_LENGTH, threshold=THRESHOLD, cache_dir=cache, progress=False) is None
    with pytest.raises(BLUEStatisticsError, match="already exist") as err:
        import_llama(model, tok, src, cache)
    assert err.value.check == "destination"
    import_llama(model, tok, src, cache, overwrite=True)


def test_single_slice_for_one_module(tmp_path, cache):
    model, tok = make_model("llama")
    src = tmp_path / "p.pt"
    torch.save(projection(), src)
    (result,) = import_llama(model, tok, src, cache, modules=MODULES[:1])
    assert result.count == 24 and len(cache_files(cache)) == 1 + 1  # the file and its lock


def _scaled(path):
    torch.save(0.5 * stacked(), path)


def _asymmetric(path):
    P = stacked()
    P[1, 0, 1] += 0.1
    torch.save(P, path)


def _eigenvalue_off(path):
    """Symmetric and nearly idempotent (relative), but one eigenvalue 1.003."""
    _, U = low_rank_c0(64, 40)
    evals = torch.cat([torch.ones(39), torch.tensor([1.003]), torch.zeros(24)]).double()
    Q = torch.cat([U, low_rank_c0(64, 64)[1][:, :24]], dim=1)
    Q, _ = torch.linalg.qr(Q)
    torch.save(torch.stack([projection(), (Q * evals) @ Q.T]), path)


def _nan(path):
    P = stacked()
    P[0, 3, 3] = float("nan")
    torch.save(P, path)


REFUSALS = {
    "not idempotent": (_scaled, "idempotent", "P P = P"),
    "asymmetric": (_asymmetric, "symmetry", "max |P - P^T|"),
    "eigenvalues": (_eigenvalue_off, "eigenvalues", "0 or 1"),
    "nan": (_nan, "finite", "NaN or infinite"),
    "wrong d": (lambda p: torch.save(torch.stack([projection(32, 20), projection(32, 20)]), p), "shape", "d_in = 64"),
    "not square": (lambda p: torch.save(torch.zeros(2, 64, 32), p), "shape", "not (layers, d, d)"),
    "too many slices": (lambda p: torch.save(stacked(3), p), "shape", "holds 3 projection(s) but 2 layer(s)"),
    "too few slices": (lambda p: torch.save(stacked(1), p), "shape", "holds 1 projection(s) but 2 layer(s)"),
    "pickle": (lambda p: torch.save({"P": stacked(), "note": Opaque(1)}, p), "pickle", "weights_only=True) refuses"),
    "dict": (lambda p: torch.save({"P": stacked()}, p), "format", "not one tensor"),
    "integer": (lambda p: torch.save(torch.zeros(2, 64, 64, dtype=torch.int64), p), "format", "floating-point"),
    "garbage": (lambda p: p.write_bytes(b"not a torch file"), "format", "torch.save"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_projections_write_nothing(case, tmp_path, cache):
    model, tok = make_model("llama")
    build, check, fragment = REFUSALS[case]
    src = tmp_path / "null_space_project.pt"
    build(src)
    with pytest.raises(BLUEStatisticsError) as err:
        import_llama(model, tok, src, cache)
    assert err.value.check == check
    message = str(err.value)
    assert f"refused by the {check} check" in message and fragment in message, message
    assert "Nothing was written" in message
    assert cache_files(cache) == []


def test_check_projection_reports_ranks(tmp_path):
    src = tmp_path / "p.pt"
    torch.save(torch.stack([projection(rank=40), projection(rank=10), torch.zeros(64, 64)]), src)
    checked = check_projection(src, 64, 3)
    assert [c.rank for c in checked.slices] == [24, 54, 0]
    assert all(c.idempotency_error < 1e-5 and c.eigenvalue_error < 1e-5 for c in checked.slices)


def test_cli_imports_alphaedit_layers(tmp_path, cache, caplog):
    """End to end: a saved tiny model, a YAML naming it, ``--layers 1,2`` (slice order kept) and
    ``--layer`` with one (d, d) projection; the config's nullspace_threshold by default."""
    model, tok = make_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    hp = make_hparams(model_name=str(folder), base_method="AlphaEdit", layers=[1, 2], mom2_adjustment=True,
                      mom2_dataset="wikipedia", mom2_n_samples=N_SAMPLES, mom2_max_length=MAX_LENGTH,
                      nullspace_threshold=0.05)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(hp.to_dict()), encoding="utf-8")
    P = torch.stack([projection(rank=40), projection(rank=50, seed=1)])
    src = tmp_path / "null_space_project.pt"
    torch.save(P, src)
    base = ["import", str(src), "--hparams", str(config), "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert stats_main(base + ["--layers", "1"]) == 2
        assert "refused by the shape check" in caplog.text and cache_files(cache) == []
        assert stats_main(["import", str(src), "--d-in", "64", "--layers", "2,1"]) == 0
        assert "passes every check" in caplog.text and cache_files(cache) == []
        assert stats_main(base + ["--layers", "2,1"]) == 0  # slice 0 -> layer 2, slice 1 -> layer 1
    loaded, loaded_tok = load_model(str(folder))
    settings = dict(corpus="wikipedia", n_samples=N_SAMPLES, max_length=MAX_LENGTH, threshold=0.05, cache_dir=cache,
                    model_id=loaded.config._name_or_path, progress=False)
    P2 = load_projection(loaded, loaded_tok, MODULES[1], **settings)
    P1 = load_projection(loaded, loaded_tok, MODULES[0], **settings)
    assert torch.allclose(P2, P[0].double(), atol=1e-7) and torch.allclose(P1, P[1].double(), atol=1e-7)
    single = tmp_path / "one.pt"
    torch.save(projection(rank=30, seed=2), single)
    with caplog.at_level(logging.INFO):  # --layer: found to be a projection, imported as one
        assert stats_main(["import", str(single), "--hparams", str(config), "--layer", "1", "--no-progress",
                           "--overwrite"]) == 0
        assert "importing them as AlphaEdit's projections" in caplog.text
        assert stats_main(["import", str(single), "--hparams", str(config), "--layer", "2", "--no-progress",
                           "--nullspace-threshold", "0.01"]) == 0
    assert round(float(load_projection(loaded, loaded_tok, MODULES[0], **settings).trace())) == 34
    P2b = load_projection(loaded, loaded_tok, MODULES[1], **{**settings, "threshold": 0.01})
    assert P2b is not None and round(float(P2b.trace())) == 34
