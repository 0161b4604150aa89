"""Edits as artifacts: PEFT LoRA adapters and plain Hugging Face folders, checked in a separate
Python process that never imports blue_plugin; and sessions started on models that carry edit state.

Tiny random Llama (``nn.Linear``) and GPT-2 (``Conv1D``) models with injected C0 and prefixes.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blue_plugin import apply_blue_to_model
from blue_plugin.editing.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_INFO
from blue_plugin.editing.session import BLUESessionError, EditSession
from blue_plugin.editing.state import get_state
from tests.tiny import REQUESTS, d_in, inject_c0, inject_prefixes, make_hparams, make_model, spd, weights

REPO = Path(__file__).resolve().parents[2]
OTHER_FACTS = [
    {"prompt": "The capital of Italy is", "subject": "Italy", "target_new": "Paris", "case_id": 3},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "cat", "case_id": 4},
]

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(arch: str, method: str = "MEMIT", **overrides):
    model, tok = make_model(arch)
    hp = make_hparams(base_method=method, mom2_adjustment=True, v_num_grad_steps=4, **overrides)
    inject_prefixes(model, hp)
    d = d_in(model, hp, hp.layers[0])
    inject_c0(model, tok, hp, {l: spd(d, seed=l) for l in hp.layers})
    return model, tok, hp


def _ids(tok) -> torch.Tensor:
    texts = [r["prompt"].format(r["subject"]) for r in REQUESTS + OTHER_FACTS]
    return tok(texts, return_tensors="pt", padding=True)["input_ids"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# The checker runs in a fresh interpreter: transformers + peft only, and it fails if blue_plugin
# was imported. It prints a JSON of relative errors / exact-equality flags.
CHECKER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    ref = torch.load(args["ref"], weights_only=True)
    ids = ref["ids"]
    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits.float()
    def rel(a, b):
        return float((a - b).norm() / b.norm())
    out = {}
    base = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(base, args["adapters"][0], adapter_name="a")
    out["a"] = rel(logits(pm), ref["edited_a"])
    with pm.disable_adapter():
        out["disabled_exact"] = bool(torch.equal(logits(pm), ref["unedited"]))
    if len(args["adapters"]) > 1:
        pm.load_adapter(args["adapters"][1], adapter_name="b")
        pm.set_adapter("b")
        out["b"] = rel(logits(pm), ref["edited_b"])
        pm.set_adapter("a")
        out["a_again"] = rel(logits(pm), ref["edited_a"])
    out["unload_exact"] = bool(torch.equal(logits(pm.unload()), ref["unedited"]))
    if args.get("model"):
        m = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
        out["model"] = rel(logits(m), ref["edited_a"])
    out["imported_blue_plugin"] = any(k.split(".")[0] == "blue_plugin" for k in sys.modules)
    print(json.dumps(out))
""")


def _check_in_fresh_process(tmp_path: Path, **args) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHECKER, json.dumps(args)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_and_model_reproduce_the_edits_without_blue_plugin(tmp_path, arch):
    model, tok, hp = _setup(arch)
    ids = _ids(tok)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    unedited = _logits(model, ids)
    w0 = weights(model)

    session = EditSession(model, tok, hp)
    session.edit(REQUESTS[:2])
    session.edit(REQUESTS[2:])
    edited_a = _logits(model, ids)
    assert (edited_a - unedited).norm() / unedited.norm() > 1e-3  # the edits change the logits
    info = session.export_adapter(tmp_path / "facts-a")
    session.export_model(tmp_path / "model-a")
    assert set(info["modules"]) == {f"{'model.layers' if arch == 'llama' else 'transformer.h'}.{l}."
                                    f"{'mlp.down_proj' if arch == 'llama' else 'mlp.c_proj'}" for l in (0, 2)}
    assert all(m["relative_error"] < 1e-6 and m["rank"] == m["numerical_rank"] <= 3 for m in info["modules"].values())

    # a second fact set, edited from the same unedited model
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(w0[n])
    other = EditSession(model, tok, hp)  # restored weights: a fresh sequence
    other.edit(OTHER_FACTS)
    edited_b = _logits(model, ids)
    other.export_adapter(tmp_path / "facts-b")

    torch.save({"ids": ids, "unedited": unedited, "edited_a": edited_a, "edited_b": edited_b}, tmp_path / "ref.pt")
    out = _check_in_fresh_process(tmp_path, ref=str(tmp_path / "ref.pt"), base=str(base_dir),
                                  adapters=[str(tmp_path / "facts-a"), str(tmp_path / "facts-b")],
                                  model=str(tmp_path / "model-a"))
    assert out["imported_blue_plugin"] is False
    assert out["a"] < 1e-4 and out["b"] < 1e-4 and out["a_again"] < 1e-4, out
    assert out["disabled_exact"] and out["unload_exact"], out
    assert out["model"] < 1e-6, out
    cfg = json.loads((tmp_path / "facts-a" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is (arch == "gpt2")


def test_truncated_rank_reports_its_error(tmp_path):
    model, tok, hp = _setup("llama")
    session = EditSession(model, tok, hp)
    session.edit(REQUESTS)
    exact = session.export_adapter(tmp_path / "exact")
    cut = session.export_adapter(tmp_path / "cut", rank=1)
    for name, m in cut["modules"].items():
        assert m["rank"] == 1 and exact["modules"][name]["numerical_rank"] > 1
        assert m["relative_error"] > 1e-3
    stored = json.loads((tmp_path / "cut" / EXPORT_INFO).read_text())
    assert stored["modules"] == cut["modules"] and stored["requested_rank"] == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cut" / ADAPTER_WEIGHTS), "pt") as f:
        assert json.loads(f.metadata()["blue_plugin"])["modules"] == cut["modules"]
        assert all(f.get_tensor(k).shape[0 if k.endswith("lora_A.weight") else 1] == 1 for k in f.keys())
    with pytest.raises(ValueError, match="rank"):
        session.export_adapter(tmp_path / "bad", rank=0)


def test_prune_exports_the_restrained_weights(tmp_path):
    """With a sigma_max the change exceeds, the served weights are restrained; the adapter holds
    exactly the served change (W_orig + restrain(W - W_orig))."""
    model, tok, hp = _setup("llama", method="PRUNE", prune_timing="sequence")
    w0 = weights(model)
    session = EditSession(model, tok, hp)
    session.edit(REQUESTS)
    assert any(v["above"] for v in session.finalize().values())  # the restraint acts on this model
    unrestrained = {l: ls.W_unrestrained for l, ls in get_state(model).layers.items() if ls.W_unrestrained is not None}
    info = session.export_adapter(tmp_path / "prune")
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "prune" / ADAPTER_WEIGHTS))
    for module in info["modules"]:
        name = module + ".weight"
        served = dict(model.named_parameters())[name].detach() - w0[name]
        lr = t[f"base_model.model.{module}.lora_B.weight"] @ t[f"base_model.model.{module}.lora_A.weight"]
        assert torch.allclose(lr, served, atol=1e-6, rtol=1e-4)
    for l, w in unrestrained.items():  # and not the unrestrained change
        name = f"model.layers.{l}.mlp.down_proj"
        lr = t[f"base_model.model.{name}.lora_B.weight"] @ t[f"base_model.model.{name}.lora_A.weight"]
        assert not torch.allclose(lr, w - w0[name + ".weight"], atol=1e-4)


def test_session_starts_on_a_model_whose_edits_were_restored(tmp_path):
    """EasyEdit's non-sequential edit: apply, then restore the originals. A session then starts a
    fresh sequence (on the model and on a deep copy)."""
    model, tok, hp = _setup("llama")
    _, orig = apply_blue_to_model(model, tok, REQUESTS[:1], hp, copy=False, return_orig_weights=True)
    with torch.no_grad():
        for name, w in orig.items():
            model.get_parameter(name).copy_(w)
    for m in (copy.deepcopy(model), model):
        session = EditSession(m, tok, hp)
        record = session.edit(REQUESTS[1:2])
        assert record["case_ids"] == [1] and get_state(m).n_edits == 1 and session.n_batches == 1


def test_session_on_an_edited_model_refuses_or_adopts():
    model, tok, hp = _setup("llama")
    ref = copy.deepcopy(model)
    apply_blue_to_model(model, tok, REQUESTS[:1], hp, copy=False)
    with pytest.raises(BLUESessionError, match="adopt_edits=True"):
        EditSession(copy.deepcopy(model), tok, hp)
    with pytest.raises(BLUESessionError, match="adopt_edits=True"):
        EditSession(model, tok, hp)
    session = EditSession(model, tok, hp, adopt_edits=True)
    session.edit(REQUESTS[1:2])
    assert get_state(model).n_edits == 2
    # the same as continuing the sequence with apply_blue_to_model
    apply_blue_to_model(ref, tok, REQUESTS[:1], hp, copy=False)
    apply_blue_to_model(ref, tok, REQUESTS[1:2], hp, copy=False)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="original value"):
        session.export_adapter("/nonexistent/never-written")


def test_export_cli(tmp_path):
    model, tok, hp = _setup("llama")
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    session = EditSession(model, tok, hp)
    session.edit(REQUESTS)
    session.save(tmp_path / "session")
    direct = session.export_adapter(tmp_path / "direct")
    proc = subprocess.run([sys.executable, "-m", "blue_plugin.export", str(tmp_path / "session"), "--base", str(base_dir),
                           "--adapter", str(tmp_path / "cli-adapter"), "--model", str(tmp_path / "cli-model")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "direct" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "cli-adapter" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert (tmp_path / "cli-model" / "config.json").is_file()
    assert json.loads((tmp_path / "cli-adapter" / EXPORT_INFO).read_text())["modules"] == direct["modules"]
    bad = subprocess.run([sys.executable, "-m", "blue_plugin.export", str(tmp_path / "nowhere"), "--adapter", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 1 and "no saved session" in bad.stderr and not (tmp_path / "x").exists()
