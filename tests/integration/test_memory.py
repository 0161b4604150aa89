"""Memory under load: 1,000 sequential single edits on a tiny model keep the process's memory
flat. The only per-edit growth is the history record (~0.35 KB as JSON, ~2 KB as Python objects);
``EditSession(history_limit=...)`` caps it, and then the resident set size must not grow.

Reference figures (tiny Llama, 2 layers, hidden 32; one CPU thread): without a cap RSS grew
409.2 -> 411.2 MiB from edit 100 to edit 1,000 (415.2 MiB at 3,000, i.e. ~2.3 KB per edit, all
history); with ``history_limit=100`` 409.3 -> 409.6 MiB (409.8 MiB at 3,000).
"""
from __future__ import annotations

import gc
import json
import os
import time

import pytest
import torch

from blue_plugin.editing.session import EditSession
from blue_plugin.editing.state import get_state
from tests.tiny import inject_prefixes, make_hparams, make_llama, make_tokenizer

psutil = pytest.importorskip("psutil")

N_EDITS = int(os.environ.get("BLUE_MEMORY_TEST_EDITS", "1000"))
SUBJECTS = ["France", "Italy", "Germany", "Danielle Darrieux", "Michel Rocard"]
TARGETS = ["Rome", "Paris", "English", "German", "French"]


def _request(i: int) -> dict:
    s = SUBJECTS[i % len(SUBJECTS)]
    return {"prompt": f"The capital of {s} is", "subject": s, "target_new": TARGETS[(i // 5) % len(TARGETS)], "case_id": i}


def _rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_thousand_sequential_edits_keep_memory_flat():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = make_tokenizer(add_bos=True)
        model = make_llama(n_layers=2)
        # one edited layer, one optimisation step, no context prefixes: as cheap as an edit gets
        hp = make_hparams(layers=[1], v_num_grad_steps=1, context_template_length_params=[[4, 0]])
        inject_prefixes(model, hp, [""])
        session = EditSession(model, tok, hp, undo_depth=1, history_limit=100)
        state = get_state(model)
        t0 = time.perf_counter()
        rss = {}
        kpkp_shape = None
        for i in range(N_EDITS):
            session.edit([_request(i)])
            if i + 1 == 100:
                rss[100] = _rss_mib()
                kpkp_shape = tuple(state.layers[1].kpkp.shape)
        rss[N_EDITS] = _rss_mib()
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(n_threads)

    assert state.n_edits == N_EDITS and session.n_batches == N_EDITS
    assert len(state.history) == 100 and state.history[-1]["case_ids"] == [N_EDITS - 1]
    # the state it must keep does not grow: one K_p K_p^T per edited layer, fixed size
    assert set(state.layers) == {1} and tuple(state.layers[1].kpkp.shape) == kpkp_shape == (64, 64)
    assert session.can_undo == 1
    # a history record is small (so an uncapped history costs ~2 KB per edit in memory)
    assert len(json.dumps(state.history[-1], default=str)) < 1000
    growth = rss[N_EDITS] - rss[100]
    print(f"RSS at edit 100: {rss[100]:.1f} MiB, at edit {N_EDITS}: {rss[N_EDITS]:.1f} MiB "
          f"(+{growth:.2f} MiB); {elapsed:.1f}s for {N_EDITS} edits")
    # flat: a leak of even one small tensor (e.g. a 64x64 float64 K K^T, 32 KB) per edit would add ~28 MiB
    assert growth < 4.0, f"RSS grew by {growth:.1f} MiB from edit 100 to {N_EDITS}"
