"""benchmarks.checks.post_norm_gain on tiny models: gain 1 where the FFN output is added to the
residual as it is (Llama), |scale| / rms(m) where a norm follows the FFN (Gemma 3)."""
import pytest
import torch

from benchmarks.checks.post_norm_gain import layer_gains
from blue_plugin.evaluation.data import EditCase
from tests.tiny import VOCAB, make_hparams, make_llama, make_tokenizer

CASES = [EditCase(case_id=i, prompt=f"{s} plays the", subject=s, target_new="piano", ground_truth=None,
                  rephrase_prompts=[], locality_prompts=[], locality_answers=[], generation_prompts=[])
         for i, s in enumerate(["Miles Davis", "Yo-Yo Ma"])]


def test_no_norm_after_the_ffn_gives_gain_one():
    model, tok = make_llama(), make_tokenizer(add_bos=True)
    gains = layer_gains(model, tok, make_hparams(layers=[0, 2]), CASES)
    assert set(gains) == {0, 2}
    for g in gains.values():
        assert not g["post_norm"] and g["gain_median"] == 1.0 and g["tokens"] == len(CASES)


def test_post_ffn_norm_scales_a_small_change_by_scale_over_rms():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.3)
    model, tok = Gemma3ForCausalLM(cfg).eval(), make_tokenizer(add_bos=True)
    with torch.no_grad():
        model.model.layers[1].post_feedforward_layernorm.weight.fill_(99.0)  # scale 1 + 99 = 100
    hp = make_hparams(layers=[1], v_loss_layer=-1)
    g = layer_gains(model, tok, hp, CASES, directions=8)[1]
    assert g["post_norm"]
    # in the tangent directions the gain is exactly scale / rms(m); a random direction loses its
    # (small, 1/d) radial part, so the median sits just below that
    expected = 100.0 / g["rms_median"]
    assert 0.6 * expected < g["gain_median"] <= 1.01 * expected
    assert g["gain_median"] > 5
