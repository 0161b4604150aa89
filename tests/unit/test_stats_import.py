"""Tests for blue_plugin.stats.importer and ``python -m blue_plugin.stats import``: ROME / EasyEdit
layer_stats files (.npz, and the same state as a torch .pt) become cache files that
get_second_moments reads without recomputing; bad, pickled and projection files are refused as second
moments with the failed check named and nothing written (projections are imported as such by
blue_plugin.stats.projection: tests/unit/test_projection_import.py)."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from blue_plugin.errors import BLUEStatisticsError
from blue_plugin.model.loading import load_model
from blue_plugin.stats import get_second_moments
from blue_plugin.stats import moments as moments_mod
from blue_plugin.stats.cli import main as stats_main
from blue_plugin.stats.importer import check_file, import_second_moment, looks_like_projection

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.tiny import make_hparams, make_model, write_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_MODULE = "model.layers.1.mlp.down_proj"  # d_in = intermediate = 64
GPT2_MODULE = "transformer.h.2.mlp.c_proj"  # Conv1D, d_in = 4 * 32 = 128
N_SAMPLES, MAX_LENGTH = 20, 16


class Opaque:
    """A custom class: pickling an instance needs arbitrary-code unpickling to read it back."""

    def __init__(self, value):
        self.value = value


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "blue_cache"
    monkeypatch.setenv("BLUE_PLUGIN_CACHE", str(root))
    return root / "stats"


@pytest.fixture()
def llama():
    return make_model("llama")


@pytest.fixture()
def no_recompute(monkeypatch):
    """get_second_moments may neither read a corpus nor run the model."""
    def boom(*args, **kwargs):
        raise AssertionError("statistics were recomputed instead of read from the imported cache file")

    monkeypatch.setattr(moments_mod, "read_corpus", boom)
    monkeypatch.setattr(moments_mod, "collect_second_moments", boom)


def moment_sum(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """sum_t k_t k_t^T over n random keys (float64), as ROME's SecondMoment accumulates it."""
    keys = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return keys.T @ keys


def rome_npz(path: Path, total, count=None, **extra) -> Path:
    """A file laid out like layer_stats' ``numpy.savez`` of a combined statistic's state."""
    arrays = {"mom2.constructor": np.array("util.runningstats.SecondMoment()"), **extra}
    if total is not None:
        arrays["mom2.mom2"] = np.asarray(total, dtype=np.float32)
    if count is not None:
        arrays["mom2.count"] = np.array(count)
    np.savez(path, **arrays)
    return path


def import_llama(model, tok, source, cache, **kw):
    return import_second_moment(source, model, tok, LLAMA_MODULE, corpus="wikipedia", n_samples=N_SAMPLES,
                                max_length=MAX_LENGTH, cache_dir=cache, progress=False, **kw)


def read_llama(model, tok, cache):
    return get_second_moments(model, tok, [LLAMA_MODULE], "wikipedia", N_SAMPLES, MAX_LENGTH, cache,
                              progress=False)[LLAMA_MODULE]


def cache_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_rome_npz_is_read_back_without_recomputation(llama, cache, tmp_path, no_recompute):
    model, tok = llama
    total, count = moment_sum(64, 500), 500
    src = rome_npz(tmp_path / "model.layers.1.mlp.down_proj_float32_mom2_20.npz", total, count,
                   sample_size=np.array(20))
    result = import_llama(model, tok, src, cache)
    C = read_llama(model, tok, cache)
    expected = torch.from_numpy(np.asarray(total, dtype=np.float32)).double() / count  # the stored sum / count
    assert C.dtype == torch.float64 and torch.allclose(C, expected, rtol=0, atol=1e-12)
    assert torch.equal(C, C.T)
    assert cache_files(cache) and result.path in cache_files(cache)
    with safe_open(str(result.path), framework="pt") as f:
        meta = f.metadata()
    assert meta["source_format"] == "rome-npz"
    assert meta["source_path"] == str(src.absolute())
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["source_count"] == meta["count"] == "500"
    assert meta["source_dtype"] == "float32" and meta["n_docs"] == "20"
    assert meta["corpus_name"].startswith("wikimedia/wikipedia") and meta["n_samples"] == str(N_SAMPLES)


def test_torch_state_for_gpt2_conv1d_with_a_local_corpus(tmp_path, cache, monkeypatch):
    """A .pt state dict (tensors only) for a Conv1D module; a local corpus is fingerprinted
    (read) but the statistics are not computed."""
    model, tok = make_model("gpt2")
    corpus = write_corpus(tmp_path / "corpus.txt")
    total, count = moment_sum(128, 300, seed=1), 300
    src = tmp_path / "cov.pt"
    torch.save({"mom2.count": torch.tensor(count), "mom2.mom2": total}, src)
    import_second_moment(src, model, tok, GPT2_MODULE, corpus=str(corpus), n_samples=N_SAMPLES,
                         max_length=MAX_LENGTH, cache_dir=cache, progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(moments_mod, "collect_second_moments", boom)
    C = get_second_moments(model, tok, [GPT2_MODULE], str(corpus), N_SAMPLES, MAX_LENGTH, cache,
                           progress=False)[GPT2_MODULE]
    assert torch.allclose(C, total / count, rtol=0, atol=1e-12)


def test_existing_file_is_kept_unless_overwrite(llama, cache, tmp_path, no_recompute):
    model, tok = llama
    first = rome_npz(tmp_path / "a.npz", moment_sum(64, 100), 100)
    second = rome_npz(tmp_path / "b.npz", moment_sum(64, 100, seed=3), 100)
    import_llama(model, tok, first, cache)
    with pytest.raises(BLUEStatisticsError, match="already exists") as err:
        import_llama(model, tok, second, cache)
    assert err.value.check == "destination"
    assert torch.allclose(read_llama(model, tok, cache), moment_sum(64, 100).float().double() / 100)
    import_llama(model, tok, second, cache, overwrite=True)
    assert torch.allclose(read_llama(model, tok, cache), moment_sum(64, 100, seed=3).float().double() / 100)


def _asymmetric(d=64):
    t = moment_sum(d, 100)
    t[0, 1] += 5.0
    return t


def _with(value, i=3, j=5):
    t = moment_sum(64, 100)
    t[i, j] = t[j, i] = value
    return t


def _pickled_npz(path):
    np.savez(path, **{"mom2.mom2": moment_sum(64, 10).numpy(), "mom2.count": np.array(10),
                      "note": np.array([Opaque(1)], dtype=object)})


def _pickled_pt(path):
    torch.save({"mom2.mom2": moment_sum(64, 10), "mom2.count": 10, "note": Opaque(1)}, path)


def _projection_pt(path):
    """AlphaEdit's null_space_project.pt: torch.save of P (layers, d, d), P = U U^T."""
    P = torch.zeros(2, 64, 64)
    for i in range(2):
        C = moment_sum(64, 40, seed=i)  # rank 40 < 64: a null space of dimension 24
        evals, evecs = torch.linalg.eigh(C)
        U = evecs[:, evals < 1e-6 * evals.max()]
        P[i] = (U @ U.T).float()
    torch.save(P, path)


REFUSALS = {
    "wrong shape": ("x.npz", lambda p: rome_npz(p, moment_sum(32, 100), 100), "shape", "d_in = 64"),
    "not square": ("x.npz", lambda p: rome_npz(p, np.ones((64, 32)), 100), "shape", "not a square matrix"),
    "nan": ("x.npz", lambda p: rome_npz(p, _with(float("nan")), 100), "finite", "NaN or infinite"),
    "inf": ("x.npz", lambda p: rome_npz(p, _with(float("inf")), 100), "finite", "NaN or infinite"),
    "asymmetric": ("x.npz", lambda p: rome_npz(p, _asymmetric(), 100), "symmetry", "max |C - C^T|"),
    "negative diagonal": ("x.npz", lambda p: rome_npz(p, -moment_sum(64, 100), 100), "diagonal", "negative"),
    "missing count": ("x.npz", lambda p: rome_npz(p, moment_sum(64, 100)), "count", "no sample count (mom2.count)"),
    "zero count": ("x.npz", lambda p: rome_npz(p, moment_sum(64, 100), 0), "count", "it must be > 0"),
    "null count": ("x.npz", lambda p: rome_npz(p, moment_sum(64, 100), float("nan")), "count", "not a whole number"),
    "pickled npz": ("x.npz", _pickled_npz, "pickle", "allow_pickle=False"),
    "pickle as npz": ("x.npz", lambda p: p.write_bytes(b"\x80\x04K\x01."), "pickle", "pickled Python objects"),
    "pickled pt": ("x.pt", _pickled_pt, "pickle", "weights_only=True) refuses; it needs"),
    "garbage pt": ("x.pt", lambda p: p.write_bytes(b"not a torch file"), "format", "torch.save"),
    "list pt": ("x.pt", lambda p: torch.save([torch.ones(2)], p), "format", "not a state dict"),
    "no second moment": ("x.npz", lambda p: np.savez(p, **{"mean.mean": np.zeros(64)}), "format", "mom2.mom2"),
    "unknown suffix": ("x.txt", lambda p: p.write_text("1 2 3"), "format", "suffix '.txt'"),
    "projection": ("null_space_project.pt", _projection_pt, "projection", "Import it as a projection for AlphaEdit"),
    "bare covariance": ("cov.pt", lambda p: torch.save(moment_sum(64, 100) / 100, p), "count", "no sample count"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_files_write_nothing(case, llama, cache, tmp_path):
    model, tok = llama
    name, build, check, fragment = REFUSALS[case]
    src = tmp_path / name
    build(src)
    with pytest.raises(BLUEStatisticsError) as err:
        import_llama(model, tok, src, cache)
    assert err.value.check == check
    message = str(err.value)
    assert f"refused by the {check} check" in message and fragment in message
    assert "Nothing was written" in message
    assert cache_files(cache) == []


def test_projection_detection():
    C = moment_sum(16, 8)
    evals, evecs = torch.linalg.eigh(C)
    U = evecs[:, evals < 1e-8 * evals.max()]
    assert looks_like_projection(U @ U.T) and looks_like_projection(torch.stack([U @ U.T, torch.eye(16)]))
    assert not looks_like_projection(C / 8) and not looks_like_projection(torch.ones(3, 4))


def test_symmetry_tolerance_is_relative(tmp_path):
    t = moment_sum(8, 50)
    t[0, 1] *= 1 + 1e-6  # float32-level asymmetry passes the default tolerance
    src = rome_npz(tmp_path / "s.npz", t, 50)
    _, mean, asym = check_file(src, 8)
    assert 0 < asym and torch.equal(mean, mean.T)
    with pytest.raises(BLUEStatisticsError, match="symmetry check"):
        check_file(src, 8, symmetry_tol=1e-12)


def test_cli_check_only_with_d_in(tmp_path, cache, caplog):
    src = rome_npz(tmp_path / "ok.npz", moment_sum(64, 100), 100)
    with caplog.at_level(logging.INFO):
        assert stats_main(["import", str(src), "--d-in", "64"]) == 0
    assert "passes every check" in caplog.text and cache_files(cache) == []
    caplog.clear()
    assert stats_main(["import", str(src), "--d-in", "32"]) == 2
    assert "refused by the shape check" in caplog.text and cache_files(cache) == []


def test_cli_imports_for_the_config_layer(tmp_path, cache, caplog, no_recompute):
    """End to end: a saved tiny model, a YAML naming it, ``--layer`` -> the file the engine reads."""
    model, tok = make_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    hp = make_hparams(model_name=str(folder), mom2_adjustment=True, mom2_dataset="wikipedia",
                      mom2_n_samples=N_SAMPLES, mom2_max_length=MAX_LENGTH)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(hp.to_dict()), encoding="utf-8")
    total = moment_sum(64, 200, seed=7)
    src = rome_npz(tmp_path / "l1.npz", total, 200)
    bad = rome_npz(tmp_path / "bad.npz", moment_sum(64, 200), 0)
    with caplog.at_level(logging.INFO):
        assert stats_main(["import", str(bad), "--hparams", str(config), "--layer", "1"]) == 2
        assert "refused by the count check" in caplog.text and cache_files(cache) == []
        assert stats_main(["import", str(src), "--hparams", str(config), "--layer", "1", "--no-progress",
                           "--dtype", "bfloat16"]) == 0  # the engine below loads float32: same file
    assert len(list(cache.glob("*.safetensors"))) == 1
    loaded, loaded_tok = load_model(str(folder))  # as the engine would load the config's model
    C = get_second_moments(loaded, loaded_tok, [LLAMA_MODULE], "wikipedia", N_SAMPLES, MAX_LENGTH, cache,
                           model_id=loaded.config._name_or_path, progress=False)[LLAMA_MODULE]
    assert torch.allclose(C, total.float().double() / 200, rtol=0, atol=1e-12)
