"""EditObserver: the phases of a batch arrive in order, with positive times that add up to the
batch record's timings and token counts that match the rows the engine builds."""
from __future__ import annotations

import pytest
import torch

from blue_plugin import EditSession, apply_blue_to_model, get_state
from blue_plugin.editing import EditObserver
from blue_plugin.editing.requests import key_rows, prepare_requests, target_rows
from blue_plugin.errors import BLUEConfigError
from tests.tiny import PREFIXES, REQUESTS, inject_prefixes, make_hparams, make_llama, make_tokenizer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


class Recorder(EditObserver):
    def __init__(self):
        self.events: list[tuple] = []

    def phase_started(self, phase, layer):
        self.events.append(("start", phase, layer))

    def phase_finished(self, phase, layer, seconds, info):
        self.events.append(("finish", phase, layer, seconds, dict(info)))

    def finished(self) -> list[tuple]:
        return [e[1:] for e in self.events if e[0] == "finish"]


def _setup(**hp):
    torch.manual_seed(0)
    tok = make_tokenizer()
    model = make_llama(n_layers=4, seed=0)
    hp = make_hparams(**hp)
    inject_prefixes(model, hp)
    return model, tok, hp


def _counts(rows) -> tuple[int, int]:
    return len(rows), sum(len(r.ids) for r in rows)


@pytest.mark.parametrize("blue", [True, False])
def test_phases_in_order_with_times_and_token_counts(blue):
    model, tok, hp = _setup(blue=blue, layers=[0, 1, 2])
    obs = Recorder()
    apply_blue_to_model(model, tok, REQUESTS[:2], hp, observer=obs)
    rec = get_state(model).history[-1]

    # every phase starts, then finishes, before the next one starts
    starts = [e[1:] for e in obs.events if e[0] == "start"]
    fins = obs.finished()
    assert [e[0] for e in obs.events] == ["start", "finish"] * len(fins)
    assert starts == [(phase, layer) for phase, layer, _, _ in fins]

    if blue:
        walk = [(p, l) for l in (0, 2) for p in ("targets", "keys", "update")]
    else:
        walk = [("targets", 2)] + [(p, l) for l in (0, 1, 2) for p in ("keys", "update")]
    assert [(p, l) for p, l, _, _ in fins] == [("statistics", None), ("prefixes", None)] + walk + [("write", None)]
    assert all(s > 0 for _, _, s, _ in fins)

    # the seconds are the record's timings
    for phase in ("targets", "keys", "update"):
        total = 0.0
        for p, _, s, _ in fins:
            if p == phase:
                total += s
        assert total == pytest.approx(rec["time"][phase], rel=1e-12, abs=0.0)

    # token counts are those of the rows the engine optimises / reads keys from
    reqs = prepare_requests(tok, REQUESTS[:2], hp)
    t_rows, t_tokens = _counts(target_rows(tok, reqs, PREFIXES, hp.fact_token))
    k_rows, k_tokens = _counts(key_rows(tok, reqs, PREFIXES, hp.fact_token))
    assert t_rows == len(reqs) * (len(PREFIXES) + 1) and k_rows == len(reqs) * len(PREFIXES)
    for p, l, _, info in fins:
        if p == "targets":
            assert (info["rows"], info["tokens"]) == (t_rows, t_tokens)
            assert info["steps"] == rec["steps"][l] and len(info["steps"]) == len(reqs)
        elif p == "keys":
            assert (info["rows"], info["tokens"]) == (k_rows, k_tokens)
        elif p == "update":
            assert info["requests"] == len(reqs) and info["delta_norm"] == rec["delta_norm"][l]
        elif p == "statistics":
            assert info["layers"] == list(hp.edit_layers)
        elif p == "prefixes":
            assert info["prefixes"] == len(PREFIXES)
        elif p == "write":
            assert info["layers"] == rec["layers"]


def test_session_passes_the_observer_and_a_failed_phase_does_not_finish(monkeypatch):
    model, tok, hp = _setup()
    obs = Recorder()
    session = EditSession(model, tok, hp, observer=obs)
    session.edit(REQUESTS[:1])
    assert [p for p, *_ in obs.finished()][-1] == "write"

    from blue_plugin.editing import editor as engine

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(engine, "compute_targets", boom)
    obs.events.clear()
    with pytest.raises(RuntimeError, match="injected"):
        session.edit(REQUESTS[1:2])
    assert obs.events[-1] == ("start", "targets", hp.layers[0])


def test_no_op_observer_and_bad_observer():
    model, tok, hp = _setup()
    apply_blue_to_model(model, tok, REQUESTS[:1], hp, observer=EditObserver())
    with pytest.raises(BLUEConfigError, match="phase_started and phase_finished"):
        apply_blue_to_model(model, tok, REQUESTS[:1], hp, observer=object())
