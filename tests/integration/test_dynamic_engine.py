"""layer_selection: dynamic, wired into the engine: each batch edits the two boundary layers that
blue_plugin.editing.selection chooses, and nothing else."""
import torch

from blue_plugin import apply_blue_to_model, get_state
from blue_plugin.editing.selection import window_layers
from tests.tiny import REQUESTS, inject_c0, inject_prefixes, make_hparams, make_llama, make_tokenizer, weights


def test_dynamic_selection_edits_exactly_the_chosen_layers():
    torch.manual_seed(0)
    tok = make_tokenizer()
    model = make_llama(n_layers=5, seed=0)
    hp = make_hparams(layers=[0, 1, 2, 3], layer_selection="dynamic", dynamic_window=1, v_num_grad_steps=4)
    inject_prefixes(model, hp)
    d = model.model.layers[0].mlp.down_proj.weight.shape[1]
    inject_c0(model, tok, hp, {l: torch.eye(d) for l in window_layers(hp)})
    w0 = weights(model)
    apply_blue_to_model(model, tok, REQUESTS[:2], hp)
    rec = get_state(model).history[-1]
    chosen = rec["layer_selection"]["chosen"]
    assert rec["layers"] == sorted(chosen)
    assert chosen[0] in (0, 1) and chosen[1] in (2, 3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, w0[n])}
    assert changed == {f"model.layers.{l}.mlp.down_proj.weight" for l in chosen}


def test_dynamic_criterion_is_validated():
    import pytest

    with pytest.raises(ValueError, match="dynamic_criterion"):
        make_hparams(layer_selection="dynamic", dynamic_criterion="fastest")
