"""AlphaEdit with a projection imported from an AlphaEdit-style ``null_space_project.pt`` instead of
C0: the same weights as with C0 computed, and C0 is never computed; MEMIT with only a projection
in the cache still computes C0; asking for C0 with only a projection loaded is a clear error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blue_plugin import apply_blue_to_model, get_state
from blue_plugin.editing import statistics as statistics_mod
from blue_plugin.editing.editor import Editor
from blue_plugin.editing.rules import get_rule, null_space_projector
from blue_plugin.errors import BLUEStatisticsError
from blue_plugin.model.layout import resolve_layout
from blue_plugin.stats import get_second_moments
from blue_plugin.stats import moments as moments_mod
from blue_plugin.stats.projection import import_projection, load_projection

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.tiny import all_requests, inject_prefixes, make_hparams, make_model, weight_name, write_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = [1, 2]
N_SAMPLES, MAX_LENGTH = 24, 16


def _hparams(corpus: Path, **kw):
    return make_hparams(base_method="AlphaEdit", layers=LAYERS, mom2_adjustment=True, mom2_dataset=str(corpus),
                        mom2_n_samples=N_SAMPLES, mom2_max_length=MAX_LENGTH, L2=1.0, **kw)


def _names(model, hp) -> list[str]:
    layout = resolve_layout(model, hp)
    return [layout.rewrite(l) for l in LAYERS]


def _model_id(model, hp) -> str:
    return str(getattr(model.config, "_name_or_path", None) or hp.model_name)


def _use_cache(monkeypatch, root: Path) -> Path:
    monkeypatch.setenv("BLUE_PLUGIN_CACHE", str(root))
    return root / "stats"


def _forbid_c0(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("C0 was computed although an imported projection was available")

    monkeypatch.setattr(moments_mod, "collect_second_moments", boom)
    monkeypatch.setattr(statistics_mod, "get_second_moments", boom)


@pytest.fixture()
def reference(tmp_path, monkeypatch):
    """C0 of the tiny Llama's layers 1 and 2 over a corpus file (cache A), a threshold that splits
    each spectrum, and AlphaEdit's null_space_project.pt computed from that C0."""
    corpus = write_corpus(tmp_path / "corpus.txt", n=N_SAMPLES)
    cache_a = _use_cache(monkeypatch, tmp_path / "cache_a")
    model, tok = make_model("llama")
    hp = _hparams(corpus)
    names = _names(model, hp)
    C0 = get_second_moments(model, tok, names, str(corpus), N_SAMPLES, MAX_LENGTH, cache_a,
                            model_id=_model_id(model, hp), progress=False)
    threshold = float(torch.linalg.eigvalsh(C0[names[0]]).median())
    P = torch.stack([null_space_projector(C0[n], threshold)[0] for n in names])
    ranks = [null_space_projector(C0[n], threshold)[1] for n in names]
    assert all(0 < r < P.shape[-1] for r in ranks), ranks
    source = tmp_path / "null_space_project.pt"
    torch.save(P, source)
    return {"corpus": corpus, "threshold": threshold, "source": source, "P": P, "ranks": ranks, "C0": C0}


def _edit(model, tok, hp):
    inject_prefixes(model, hp)
    apply_blue_to_model(model, tok, all_requests(2), hp)
    apply_blue_to_model(model, tok, all_requests(3)[2:], hp)  # a second batch: K_p K_p^T accumulated
    return {l: model.get_parameter(weight_name(model, hp, l)).detach().clone() for l in LAYERS}


@pytest.mark.parametrize("blue", [False, True], ids=["original", "BLUE"])
def test_alphaedit_with_imported_projection_matches_c0(blue, reference, tmp_path, monkeypatch):
    hp = _hparams(reference["corpus"], blue=blue, nullspace_threshold=reference["threshold"])
    model_a, tok = make_model("llama")
    with_c0 = _edit(model_a, tok, hp)  # C0 from cache A, P derived from it
    assert all(Editor(model_a, tok, hp).c0_key(l) in get_state(model_a).second_moments for l in LAYERS)

    cache_b = _use_cache(monkeypatch, tmp_path / "cache_b")  # no C0 here: only the imported projection
    model_b, _ = make_model("llama")
    results = import_projection(reference["source"], model_b, tok, _names(model_b, hp), corpus=str(reference["corpus"]),
                                n_samples=N_SAMPLES, max_length=MAX_LENGTH, threshold=reference["threshold"],
                                cache_dir=cache_b, model_id=_model_id(model_b, hp), progress=False)
    assert [r.count for r in results] == reference["ranks"]
    assert all("__P_thr" in r.path.name for r in results)
    _forbid_c0(monkeypatch)
    with_p = _edit(model_b, tok, hp)
    for l in LAYERS:
        assert not torch.equal(with_p[l], make_model("llama")[0].get_parameter(weight_name(model_b, hp, l)))
        assert torch.allclose(with_p[l], with_c0[l], rtol=1e-6, atol=1e-7), (l, (with_p[l] - with_c0[l]).abs().max())
    state = get_state(model_b)
    editor = Editor(model_b, tok, hp)
    for i, l in enumerate(LAYERS):
        assert editor.c0_key(l) not in state.second_moments
        assert torch.allclose(editor.projector(l), reference["P"][i], atol=1e-12)
        with pytest.raises(BLUEStatisticsError, match="import the layer_stats|Import the layer_stats") as err:
            editor.C0(l)
        assert "compute the statistics" in str(err.value)
    assert sorted(p.name for p in cache_b.glob("*.safetensors")) == sorted(r.path.name for r in results)


def test_rules_say_whether_they_need_c0():
    assert not get_rule("AlphaEdit").needs_c0 and get_rule("AlphaEdit").needs_projector
    assert all(get_rule(m).needs_c0 for m in ("MEMIT", "RECT", "PRUNE"))


def test_memit_with_only_a_projection_still_computes_c0(reference, tmp_path, monkeypatch):
    cache_b = _use_cache(monkeypatch, tmp_path / "cache_b")
    model, tok = make_model("llama")
    hp = _hparams(reference["corpus"], nullspace_threshold=reference["threshold"]).replace(base_method="MEMIT")
    names = _names(model, hp)
    import_projection(reference["source"], model, tok, names, corpus=str(reference["corpus"]), n_samples=N_SAMPLES,
                      max_length=MAX_LENGTH, threshold=reference["threshold"], cache_dir=cache_b,
                      model_id=_model_id(model, hp), progress=False)
    calls = []
    original = moments_mod.collect_second_moments

    def counting(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(moments_mod, "collect_second_moments", counting)
    inject_prefixes(model, hp)
    apply_blue_to_model(model, tok, all_requests(2), hp)
    assert calls == [names]
    state = get_state(model)
    editor = Editor(model, tok, hp)
    for l, n in zip(LAYERS, names):
        assert torch.allclose(editor.C0(l), reference["C0"][n].to(torch.float64), rtol=1e-10, atol=1e-12)
    assert not state.projectors


def test_projection_found_by_threshold_and_c0_preferred(reference, tmp_path, monkeypatch):
    """load_projection finds P only for the threshold it was imported with; with C0 in the cache
    as well, AlphaEdit reads C0 (and derives P) rather than the projection."""
    model, tok = make_model("llama")
    hp = _hparams(reference["corpus"], nullspace_threshold=reference["threshold"])
    names = _names(model, hp)
    cache_a = tmp_path / "cache_a" / "stats"  # holds C0 already
    settings = dict(corpus=str(reference["corpus"]), n_samples=N_SAMPLES, max_length=MAX_LENGTH,
                    model_id=_model_id(model, hp), progress=False)
    assert load_projection(model, tok, names[0], threshold=reference["threshold"], cache_dir=cache_a, **settings) is None
    import_projection(reference["source"], model, tok, names, threshold=reference["threshold"], cache_dir=cache_a,
                      **settings)
    P = load_projection(model, tok, names[1], threshold=reference["threshold"], cache_dir=cache_a, **settings)
    assert P is not None and torch.allclose(P, reference["P"][1], atol=1e-15)
    assert load_projection(model, tok, names[1], threshold=2 * reference["threshold"], cache_dir=cache_a,
                           **settings) is None
    editor = Editor(model, tok, hp)
    assert editor.ensure_second_moments(LAYERS, progress=False) == LAYERS
    assert all(editor.c0_key(l) in editor.state.second_moments for l in LAYERS)
