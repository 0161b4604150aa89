"""Editing a model dispatched with an accelerate ``device_map`` (model parallel).

On CI every layer sits on the CPU, but the model goes through ``accelerate.dispatch_model`` with
an explicit per-layer map and ``force_hooks=True``, so accelerate's device-alignment hooks wrap
every block exactly as they do for a model split over GPUs. The edit must equal the plain model's.
``benchmarks/gpu_split_check.py`` runs the same comparison with half the layers on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from blue_plugin import apply_blue_to_model, get_state
from blue_plugin.errors import BLUEConfigError
from blue_plugin.hparams import BLUEHyperParams
from benchmarks.checks.gpu_split_check import make_tokenizer

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

WORDS = (
    "the a of is in and to mother tongue native speaker language capital city france paris rome "
    "italy germany berlin english french german danielle darrieux michel rocard cat sat on mat "
    "i see dog you like red house river big old because plays guitar toko yasuda"
).split()
N_LAYERS = 4

REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French"},
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"},
]


def _tokenizer():
    return make_tokenizer(WORDS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved with save_pretrained, and a small corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mp")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    _tokenizer().save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=g))
             for n in torch.randint(4, 20, (40,), generator=g)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _device_map() -> dict[str, str]:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": "cpu" for i in range(N_LAYERS)})
    return dm


def _load(root, dispatched: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    if not dispatched:
        return AutoModelForCausalLM.from_pretrained(root / "model").eval(), tok
    dm = _device_map()
    model = AutoModelForCausalLM.from_pretrained(root / "model", device_map=dm).eval()
    # transformers only dispatches maps with several devices; force accelerate's hooks here.
    model = accelerate.dispatch_model(model, device_map=dm, force_hooks=True)
    assert all(hasattr(model.model.layers[i], "_hf_hook") for i in range(N_LAYERS))
    return model, tok


def _hparams(root, **kw) -> BLUEHyperParams:
    base = dict(
        base_method="MEMIT", blue=True, layers=[1, 2], v_num_grad_steps=6, v_lr=0.5, v_loss_layer=-1,
        context_template_length_params=[[3, 2]], mom2_adjustment=True, mom2_update_weight=10.0,
        mom2_dataset=str(root / "corpus.txt"), mom2_n_samples=40, mom2_max_length=32,
        stats_dir=str(root / "stats"), max_length=40,
    )
    base.update(kw)
    return BLUEHyperParams(**base)


@pytest.mark.parametrize(
    "method,blue",
    [("MEMIT", True), ("AlphaEdit", False)],
    ids=["BLUE-MEMIT", "original-AlphaEdit"],
)
def test_dispatched_model_gives_same_edit(saved, method, blue):
    torch.set_num_threads(1)
    hp = _hparams(saved, base_method=method, blue=blue, nullspace_threshold=1e-2, L2=1.0)
    plain, tok = _load(saved, dispatched=False)
    split, tok2 = _load(saved, dispatched=True)
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in hp.edit_layers]
    before = {n: plain.get_parameter(n).detach().clone() for n in names}

    # Statistics come from the same cache in both runs (the plain run computes, the split run loads).
    _, orig_plain = apply_blue_to_model(plain, tok, REQUESTS, hp, return_orig_weights=True)
    _, orig_split = apply_blue_to_model(split, tok2, REQUESTS, hp, return_orig_weights=True)

    assert set(orig_plain) == set(orig_split) == set(names)
    sp, ss = get_state(plain), get_state(split)
    assert list(sp.prefixes.values()) == list(ss.prefixes.values())  # generated under the hooks too
    for n in names:
        w_plain, w_split = plain.get_parameter(n), split.get_parameter(n)
        assert torch.equal(orig_split[n], before[n])
        assert (w_plain - before[n]).norm() > 1e-4, f"{n} was not edited"
        assert torch.allclose(w_split, w_plain, rtol=1e-5, atol=1e-7), (w_split - w_plain).abs().max()
    rec_p, rec_s = sp.history[-1], ss.history[-1]
    assert rec_p["steps"] == rec_s["steps"]
    for layer in rec_p["residual_norm"]:
        assert rec_p["residual_norm"][layer] == pytest.approx(rec_s["residual_norm"][layer], rel=1e-5)


def test_offloaded_edit_layer_is_refused(saved, tmp_path):
    """Weights offloaded to disk live on the meta device; editing them in place cannot work."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dm = _device_map()
    dm["model.layers.1"] = "disk"
    model = AutoModelForCausalLM.from_pretrained(saved / "model", device_map=dm, offload_folder=str(tmp_path)).eval()
    tok = AutoTokenizer.from_pretrained(saved / "model")
    assert model.model.layers[1].mlp.down_proj.weight.is_meta
    with pytest.raises(BLUEConfigError, match="offloaded"):
        apply_blue_to_model(model, tok, REQUESTS[:1], _hparams(saved))
