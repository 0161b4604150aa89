"""Target-value optimisation (blue_plugin.editing.targets): RowAdam against torch.optim.Adam, and the
batched optimisation of several requests against optimising each request alone."""
from __future__ import annotations

import pytest
import torch

from blue_plugin.model.hooks import frozen
from blue_plugin.editing.requests import prepare_requests, target_rows
from blue_plugin.editing.targets import RowAdam, compute_targets
from tests.tiny import PREFIXES, all_requests, make_hparams, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- RowAdam -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.01, 0.5])
def test_row_adam_equals_torch_adam(lr):
    """Rows stop at different steps and are passed in arbitrary order; each row follows exactly
    the trajectory of torch.optim.Adam on that row alone, with its own step count."""
    g = torch.Generator().manual_seed(0)
    n, d, n_steps = 4, 7, 12
    start = torch.randn(n, d, generator=g)
    param = start.clone()
    refs = [start[i].clone().requires_grad_(True) for i in range(n)]
    opts = [torch.optim.Adam([r], lr=lr) for r in refs]
    adam = RowAdam(n, d, lr, param.device, param.dtype)
    stops = [3, 12, 7, 12]
    for t in range(n_steps):
        rows = [i for i in range(n) if t < stops[i]]
        if t % 2:
            rows = rows[::-1]
        grad = torch.randn(len(rows), d, generator=g) * (1 + t)
        adam.step(param, grad, torch.tensor(rows))
        for k, i in enumerate(rows):
            refs[i].grad = grad[k].clone()
            opts[i].step()
    expected = torch.stack([r.detach() for r in refs])
    assert torch.allclose(param, expected, rtol=1e-5, atol=1e-6)
    assert adam.t.tolist() == stops
    assert not torch.allclose(param, start)


# ---- batched targets -------------------------------------------------------------------------------

# (arch, initializer range, v_lr, v_early_stop_loss): settings under which the three requests
# stop at different steps on these tiny random models (checked in the test itself).
CASES = [
    ("llama", 0.5, 5.0, 9.5),   # all three stop early, at different steps
    ("llama", 0.5, 5.0, 8.0),   # one stops, two use every step
    ("gpt2", 0.3, 2.0, 5.6),    # two stop early, one uses every step
]
N_STEPS = 25


def _run(model, tok, hp, requests, layer=1):
    reqs = prepare_requests(tok, requests, hp)
    rows = target_rows(tok, reqs, PREFIXES, hp.fact_token)
    block = f"model.layers.{layer}" if model.config.model_type == "llama" else f"transformer.h.{layer}"
    with frozen(model):
        return compute_targets(model, tok, block, rows, len(reqs), len(PREFIXES), hp)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-stop{c[3]}")
def batched(request):
    arch, init, lr, stop = request.param
    model, tok = make_model(arch, init=init)
    hp = make_hparams(v_num_grad_steps=N_STEPS, v_lr=lr, v_early_stop_loss=stop)
    reqs = all_requests()
    return model, tok, hp, reqs, _run(model, tok, hp, reqs)


def test_batched_targets_equal_one_at_a_time(batched):
    model, tok, hp, reqs, res = batched
    assert len(set(res.steps)) > 1, "precondition: requests must stop at different steps"
    assert min(res.steps) < N_STEPS
    for j, req in enumerate(reqs):
        alone = _run(model, tok, hp, [req])
        assert alone.steps == [res.steps[j]]
        assert torch.allclose(alone.h, res.h[j:j + 1], rtol=1e-5, atol=1e-5 * float(res.h.abs().max()))
        scale = float(res.z[j].abs().max())
        assert torch.allclose(alone.z, res.z[j:j + 1], rtol=1e-4, atol=1e-4 * scale), f"request {j}"
        assert alone.nll[0] == pytest.approx(res.nll[j], rel=1e-4)


def test_early_stopped_requests_keep_their_delta(batched):
    """A request that stopped at step s keeps z from that step while the others go on: it
    equals the request optimised alone for exactly s steps."""
    model, tok, hp, reqs, res = batched
    stopped = [j for j, s in enumerate(res.steps) if s < max(res.steps)]
    assert stopped, "precondition: some request stops while another continues"
    for j in stopped:
        short = _run(model, tok, hp.replace(v_num_grad_steps=res.steps[j] + 1, v_early_stop_loss=0.0), [reqs[j]])
        assert short.steps == [res.steps[j] + 1]  # ran the same number of updates, no early stop
        scale = float(res.z[j].abs().max())
        assert torch.allclose(short.z, res.z[j:j + 1], rtol=1e-4, atol=1e-4 * scale)


def test_optimisation_lowers_the_nll_and_respects_the_clamp(batched):
    model, tok, hp, reqs, res = batched
    start = _run(model, tok, hp.replace(v_num_grad_steps=1), reqs)  # NLL at delta = 0
    assert torch.equal(start.z, start.h)
    for j, s in enumerate(res.steps):
        if s > 0:
            assert res.nll[j] < start.nll[j]
    norms = (res.z - res.h).norm(dim=1)
    assert bool((norms <= hp.clamp_norm_factor * res.h.norm(dim=1) * (1 + 1e-5)).all())
    assert bool((norms > 0).any())


def test_clamp_binds():
    model, tok = make_model("llama", init=0.5)
    hp = make_hparams(v_num_grad_steps=6, v_lr=5.0, v_early_stop_loss=0.0, clamp_norm_factor=0.05)
    res = _run(model, tok, hp, all_requests())
    ratio = (res.z - res.h).norm(dim=1) / res.h.norm(dim=1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.05), rtol=1e-4)
    assert res.steps == [6, 6, 6]


# ---- prefix cache ----------------------------------------------------------------------------------


def _run_counting(model, tok, hp, requests, layer=1, replay=False, prefixes=PREFIXES):
    """compute_targets, also returning how many (row x position) hidden states the last block
    processed over the whole optimisation."""
    reqs = prepare_requests(tok, requests, hp)
    rows = target_rows(tok, reqs, prefixes, hp.fact_token)
    stem = "model.layers" if model.config.model_type == "llama" else "transformer.h"
    lower = [f"{stem}.{i}" for i in range(layer)] if replay else ()
    last = model.get_submodule(f"{stem}.{model.config.num_hidden_layers - 1}")
    seen = []
    handle = last.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0] * args[0].shape[1]))
    try:
        with frozen(model):
            res = compute_targets(model, tok, f"{stem}.{layer}", rows, len(reqs), len(prefixes), hp, lower)
    finally:
        handle.remove()
    return res, sum(seen)


@pytest.mark.parametrize("replay", [False, True], ids=["no-replay", "replay"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-stop{c[3]}")
def test_prefix_cache_gives_the_same_targets_from_fewer_tokens(case, replay):
    """Running only the tokens from the edited token on, over cached keys/values of the tokens
    before it, gives the same targets, steps and NLLs as running whole rows, and the upper
    blocks see markedly fewer positions. Small chunks (v_max_batch_tokens 40) mix rows of
    different prefix lengths, which exercises the padding of the cached prefixes."""
    arch, init, lr, stop = case
    model, tok = make_model(arch, init=init)
    hp = make_hparams(v_num_grad_steps=N_STEPS, v_lr=lr, v_early_stop_loss=stop, v_max_batch_tokens=40)
    full, n_full = _run_counting(model, tok, hp.replace(v_prefix_cache=False), all_requests(), replay=replay)
    cached, n_cached = _run_counting(model, tok, hp, all_requests(), replay=replay)
    assert cached.steps == full.steps
    assert torch.allclose(cached.h, full.h, rtol=1e-5, atol=1e-6)
    scale = float(full.z.abs().max())
    assert torch.allclose(cached.z, full.z, rtol=1e-4, atol=1e-4 * scale)
    assert cached.nll == pytest.approx(full.nll, rel=1e-4)
    assert n_cached < 0.7 * n_full, (n_cached, n_full)


@pytest.mark.parametrize("layer", [0, 2])
def test_prefix_cache_with_the_edited_token_first(layer):
    """A subject that is the first token (GPT-2 has no BOS) leaves nothing to cache for the
    rows without a prefix; mixed with rows that have one, the results still match."""
    model, tok = make_model("gpt2", init=0.3)
    request = {"prompt": "{} is a word of", "subject": "The", "target_new": "Rome", "case_id": 9}
    hp = make_hparams(v_num_grad_steps=6, v_lr=2.0, v_early_stop_loss=0.0)
    for prefixes in ([""], PREFIXES):
        rows = target_rows(tok, prepare_requests(tok, [request], hp), prefixes, hp.fact_token)
        assert rows[0].lookup == 0 and rows[-1].lookup == 0  # precondition
        full, _ = _run_counting(model, tok, hp.replace(v_prefix_cache=False), [request], layer, True, prefixes)
        cached, _ = _run_counting(model, tok, hp, [request], layer, True, prefixes)
        assert cached.steps == full.steps == [6]
        assert torch.allclose(cached.z, full.z, rtol=1e-4, atol=1e-4 * float(full.z.abs().max()))
        assert cached.nll == pytest.approx(full.nll, rel=1e-4)


def test_prefix_cache_falls_back_to_whole_rows_when_the_model_has_no_cache(monkeypatch, caplog):
    """A decoder whose forward takes no key/value cache: a warning, then the whole-row path,
    with the same result."""
    model, tok = make_model("llama", init=0.5)
    hp = make_hparams(v_num_grad_steps=4, v_lr=5.0, v_early_stop_loss=0.0)
    full, _ = _run_counting(model, tok, hp.replace(v_prefix_cache=False), all_requests())
    forward = model.base_model.forward

    def no_cache(*args, cache=None, past_key_values=None, **kwargs):
        if cache is not None or past_key_values is not None:
            raise TypeError("forward() got an unexpected keyword argument 'cache'")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.base_model, "forward", no_cache)
    with caplog.at_level("WARNING", logger="blue_plugin.editing.targets"):
        res, _ = _run_counting(model, tok, hp, all_requests())
    assert "optimising over whole rows instead" in caplog.text
    assert res.steps == full.steps
    assert torch.allclose(res.z, full.z, rtol=1e-5, atol=1e-5 * float(full.z.abs().max()))
