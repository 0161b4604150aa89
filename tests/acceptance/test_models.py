"""Tests for blue_plugin.model.loading: embedded SmolLM2 loading, local folders, atomic caching."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from blue_plugin.model import loading as models
from blue_plugin.model.loading import default_cache_dir, embedded_model_dir, load_model

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- cache dir
def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("BLUE_PLUGIN_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("BLUE_PLUGIN_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "blue_plugin"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "blue_plugin"


# --------------------------------------------------------------------------- embedded model
def test_smollm2_architecture(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert cfg.intermediate_size == 1536
    down = model.get_submodule("model.layers.29.mlp.down_proj")
    assert tuple(down.weight.shape) == (576, 1536)  # (d_out, d_in) of nn.Linear
    assert down.weight.dtype == torch.float32
    assert down.weight.device.type == "cpu"
    assert not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(cfg, "quantization_config", None) is None
    assert tok.is_fast
    assert tok.pad_token is not None


def test_smollm2_tokenizer(smollm2):
    _, tok = smollm2
    # No BOS is prepended to plain text; a leading space is part of the word token.
    assert tok("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    assert tok(" Paris")["input_ids"] == [7042]
    assert tok("Paris")["input_ids"] == [38634]
    enc = tok("The capital", return_offsets_mapping=True)
    assert [tuple(o) for o in enc["offset_mapping"]] == [(0, 3), (3, 11)]


def test_smollm2_knows_capital_of_france(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].softmax(-1)
    paris = tok(" Paris")["input_ids"][0]
    assert probs[paris].item() > 0.3
    assert probs.argmax().item() == paris


def test_cache_folder_and_second_load_identical(smollm2):
    model, _ = smollm2
    folder = embedded_model_dir()
    assert folder.is_dir()
    assert (folder / "config.json").is_file()
    assert (folder / models._MARKER_FILE).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    t0 = time.perf_counter()
    model2, tok2 = load_model("SmolLM2-135M-Instruct")  # alias, case-insensitive path
    elapsed = time.perf_counter() - t0
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys()
    for key in sd1:
        assert torch.equal(sd1[key], sd2[key]), key
    assert elapsed < 60  # a cached load, not a conversion (~2 s unloaded)


# --------------------------------------------------------------------------- bad input
def test_unknown_name_raises_helpful_error():
    with pytest.raises(ValueError, match="hub") as info:
        load_model("gpt2-xl")
    assert "smollm2-135m" in str(info.value)
    assert "config.json" in str(info.value)


def test_folder_without_config_raises(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_bad_types_raise():
    with pytest.raises(ValueError, match="name_or_path"):
        load_model(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2-135m", dtype="float16")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- local folders
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2):
    """A tiny random Llama saved with save_pretrained, with SmolLM2's tokenizer minus its pad."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return folder


def test_local_folder_dtype_device_and_pad(tiny_llama_dir, smollm2):
    from transformers import AutoTokenizer

    _, ref_tok = smollm2
    assert AutoTokenizer.from_pretrained(tiny_llama_dir).pad_token is None  # precondition
    model, tok = load_model(str(tiny_llama_dir), device="cpu", dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 2
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert next(model.parameters()).device == torch.device("cpu")
    assert not model.training
    # The pad token was missing: EOS is reused, no token is added.
    assert tok.pad_token == tok.eos_token
    assert len(tok) == len(ref_tok)
    assert tok.padding_side == ref_tok.padding_side


# --------------------------------------------------------------------------- atomic cache
def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"weights")


def _tmp_dirs(parent: Path, target: Path) -> list[Path]:
    return list(parent.glob(f".{target.name}.tmp-*"))


def test_leftover_temp_dir_is_ignored_and_removed(tmp_path):
    target = tmp_path / "models" / "m-f32"
    leftover = target.parent / f".{target.name}.tmp-dead"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{\"half\": ")
    out = models._ensure_converted(target, Path(__file__), convert=_fake_convert)
    assert out == target and models._is_complete(target)
    assert not leftover.exists()
    assert _tmp_dirs(target.parent, target) == []


def test_failed_conversion_leaves_nothing_then_retry_works(tmp_path):
    target = tmp_path / "models" / "m-f32"

    def boom(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # an interruption, not just an error

    with pytest.raises(KeyboardInterrupt):
        models._ensure_converted(target, Path(__file__), convert=boom)
    assert not target.exists()
    assert _tmp_dirs(target.parent, target) == []
    models._ensure_converted(target, Path(__file__), convert=_fake_convert)
    assert models._is_complete(target)


def test_incomplete_target_is_rebuilt(tmp_path):
    target = tmp_path / "models" / "m-f32"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no weights, no marker
    models._ensure_converted(target, Path(__file__), convert=_fake_convert)
    assert models._is_complete(target)


def test_concurrent_callers_convert_once(tmp_path):
    target = tmp_path / "models" / "m-f32"
    calls = []

    def slow(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.5)
        _fake_convert(gguf_path, out_dir)

    threads = [
        threading.Thread(target=models._ensure_converted, args=(target, Path(__file__), slow))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert models._is_complete(target)


def test_killed_conversion_process_does_not_break_later_loads(tmp_path):
    """SIGKILL a process mid-conversion: no target, lock released, next call succeeds."""
    target = tmp_path / "models" / "m-f32"
    code = (
        "import time; from pathlib import Path; from blue_plugin.model import loading as models\n"
        "def slow(g, out):\n"
        "    (out / 'config.json').write_text('{}')\n"
        "    time.sleep(120)\n"
        f"models._ensure_converted(Path({str(target)!r}), Path({__file__!r}), slow)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (target.parent.exists() and _tmp_dirs(target.parent, target)):
            assert proc.poll() is None, "conversion subprocess exited early"
            assert time.monotonic() < deadline, "conversion subprocess never started"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not target.exists()
    assert len(_tmp_dirs(target.parent, target)) == 1
    models._ensure_converted(target, Path(__file__), convert=_fake_convert)
    assert models._is_complete(target)
    assert _tmp_dirs(target.parent, target) == []


def test_load_model_end_to_end_with_leftover(monkeypatch, tmp_path, smollm2):
    """load_model in a fresh cache with a leftover temp dir: cleans it and loads real weights.

    The slow GGUF conversion is replaced by hard-linking the already converted folder.
    """
    model, _ = smollm2
    src = embedded_model_dir()
    monkeypatch.setenv("BLUE_PLUGIN_CACHE", str(tmp_path))
    target = embedded_model_dir()
    assert target != src and target.is_relative_to(tmp_path)
    leftover = target.parent / f".{target.name}.tmp-killed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")

    def link_convert(gguf_path: Path, out_dir: Path) -> None:
        for f in src.iterdir():
            if f.name != models._MARKER_FILE:
                try:
                    os.link(f, out_dir / f.name)
                except OSError:
                    (out_dir / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(models, "_convert_gguf", link_convert)
    model2, _ = load_model("SMOLLM2-135M")
    assert not leftover.exists()
    assert models._is_complete(target)
    w1 = model.get_submodule("model.layers.5.mlp.down_proj").weight
    w2 = model2.get_submodule("model.layers.5.mlp.down_proj").weight
    assert torch.equal(w1, w2)
