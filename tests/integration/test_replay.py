"""TargetLog: a sequence replayed from its recorded targets writes bit-identical weights without
optimising a target, and replayed targets are refused for other requests."""
from __future__ import annotations

import pytest
import torch

from blue_plugin import EditSession, get_state, reset_state
from blue_plugin.editing.replay import TargetLog, read_targets, write_targets
from blue_plugin.errors import BLUEEditError
from tests.tiny import REQUESTS, d_in, inject_c0, inject_prefixes, low_rank_c0, make_hparams, make_model, targets_spy, weights

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def _setup(arch: str, **hp):
    torch.manual_seed(0)
    model, tok = make_model(arch, n_layers=4, seed=0)
    hp = make_hparams(**hp)
    return model, tok, hp


def _prepare(model, tok, hp):
    inject_prefixes(model, hp)
    inject_c0(model, tok, hp, {l: low_rank_c0(d_in(model, hp, l), d_in(model, hp, l) // 2, seed=l)[0] for l in hp.layers})


@pytest.mark.parametrize("arch,base,blue", [("llama", "MEMIT", True), ("llama", "AlphaEdit", False),
                                            ("gpt2", "PRUNE", True), ("gpt2", "MEMIT", False)])
def test_replayed_sequence_is_bit_identical(tmp_path, monkeypatch, arch, base, blue):
    model, tok, hp = _setup(arch, base_method=base, blue=blue, layers=[0, 1, 2])
    original = weights(model)
    _prepare(model, tok, hp)
    batches = [REQUESTS[:2], REQUESTS[2:4]]

    log = TargetLog()
    session = EditSession(model, tok, hp, undo_depth=0)
    session.target_log = log
    files = []
    for b, reqs in enumerate(batches):
        session.edit([dict(r) for r in reqs])
        digest, results = log.pop_batch()
        assert sorted(results) == ([0, 2] if blue else [2])
        files.append(write_targets(tmp_path / f"batch-{b}.safetensors", digest, results, {"batch": b},
                                   {"mark": torch.full((3,), float(b))}))
    edited = weights(model)
    steps = [get_state(model).history[b]["steps"] for b in range(2)]

    # the same model, unedited again: replay without any target optimisation
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(original[name])
    reset_state(model)
    _prepare(model, tok, hp)
    calls = targets_spy(monkeypatch)
    session = EditSession(model, tok, hp, undo_depth=0)
    session.target_log = TargetLog()
    for b, reqs in enumerate(batches):
        digest, results, meta, extra = read_targets(files[b])
        assert meta == {"batch": b} and torch.equal(extra["mark"], torch.full((3,), float(b)))
        session.target_log.queue(digest, results)
        session.edit([dict(r) for r in reqs])
        assert session.target_log.pending() == []
        assert get_state(model).history[-1]["replayed_targets"] is True
        assert get_state(model).history[-1]["steps"] == steps[b]
    assert calls == []
    after = weights(model)
    assert all(torch.equal(after[n], edited[n]) for n in edited)
    assert any(not torch.equal(after[n], original[n]) for n in edited)


def test_replay_refuses_other_requests_and_leaves_the_model(tmp_path):
    model, tok, hp = _setup("llama", layers=[0, 1, 2])
    _prepare(model, tok, hp)
    log = TargetLog()
    session = EditSession(model, tok, hp, undo_depth=0)
    session.target_log = log
    session.edit([dict(r) for r in REQUESTS[:2]])
    digest, results = log.pop_batch()
    before = weights(model)
    log.queue(digest, results)
    with pytest.raises(BLUEEditError, match="other requests"):
        session.edit([dict(r) for r in REQUESTS[2:4]])
    assert all(torch.equal(weights(model)[n], before[n]) for n in before)
    assert session.n_batches == 1


def test_unreadable_target_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BLUEEditError, match="not a readable target file"):
        read_targets(bad)
