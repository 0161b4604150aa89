"""EditSession: all-or-nothing batches, undo, atomic save / verified load, resume after SIGKILL.

Tiny random Llama models and the byte-level BPE tokenizer of :mod:`tests.tiny`. The resume test
runs this module as a worker process (``python -m tests.integration.test_session --worker <json>``).
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blue_plugin import apply_blue_to_model

from blue_plugin.editing import editor as engine

from blue_plugin.editing import rules
from blue_plugin.errors import BLUEEditError
from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.editing.session import MANIFEST_NAME, BLUESessionError, EditSession
from blue_plugin.editing.state import EditState, get_state
from tests.tiny import (
    REQUESTS,
    changed_params,
    d_in,
    inject_c0,
    inject_prefixes,
    low_rank_c0,
    make_llama,
    make_hparams,
    make_tokenizer,
    spd,
    weights,
    write_corpus,
)

REPO = Path(__file__).resolve().parents[2]
METHODS = ["MEMIT", "RECT", "PRUNE", "AlphaEdit"]
BATCHES = [
    [REQUESTS[0]],
    [REQUESTS[1], REQUESTS[2]],
    [{"prompt": "The capital of Italy is", "subject": "Italy", "target_new": "Paris", "case_id": 3}],
    [{"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "cat", "case_id": 4}],
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine more threads make these tiny ops ~20x
    slower, and the resume test compares bit patterns across processes that use one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(add_bos=True)


def _setup(tok, method: str = "MEMIT", seed: int = 0, **hp_overrides):
    """A tiny Llama with injected prefixes and C0 (low rank for AlphaEdit, so that its null
    space is not empty), and matching hyperparameters."""
    model = make_llama(seed=seed)
    hp = make_hparams(base_method=method, mom2_adjustment=True, v_num_grad_steps=4, **hp_overrides)
    inject_prefixes(model, hp)
    _inject_c0(model, tok, hp)
    return model, hp


def _inject_c0(model, tok, hp):
    d = d_in(model, hp, hp.layers[0])
    if hp.base_method == "AlphaEdit":
        c0 = {l: low_rank_c0(d, d // 2, seed=l)[0] for l in hp.layers}
    else:
        c0 = {l: spd(d, seed=l) for l in hp.layers}
    inject_c0(model, tok, hp, c0)


def _fail_rule_on_call(monkeypatch, method: str, n: int, make_result):
    """Make the rule's ``delta`` misbehave on its n-th call: ``make_result(delta)`` returns the
    replacement (or raises)."""
    rule = rules.RULES[method]
    original = type(rule).delta
    calls = []

    def delta(x, hp):
        out = original(rule, x, hp)
        calls.append(1)
        return make_result(out) if len(calls) == n else out

    monkeypatch.setattr(rule, "delta", delta)
    return calls


def _nan_residual_on_call(monkeypatch, n: int):
    """Targets of the n-th target optimisation become NaN (so its residual is NaN)."""
    original = engine.compute_targets
    calls = []

    def wrapped(*args, **kwargs):
        res = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            res.z = torch.full_like(res.z, math.nan)
        return res

    monkeypatch.setattr(engine, "compute_targets", wrapped)
    return calls


def _boom(_):
    raise RuntimeError("injected failure in the second layer's update")


def _interrupt(_):
    raise KeyboardInterrupt


FAILURES = {
    # name: (installer, expected exception)
    "raise_in_rule": (lambda mp, method: _fail_rule_on_call(mp, method, 2, _boom), RuntimeError),
    "nan_update": (lambda mp, method: _fail_rule_on_call(mp, method, 2, lambda d: d * math.nan), BLUEEditError),
    "inf_update": (lambda mp, method: _fail_rule_on_call(mp, method, 2, lambda d: d + math.inf), BLUEEditError),
    "nan_residual": (lambda mp, method: _nan_residual_on_call(mp, 2), BLUEEditError),
    "interrupt": (lambda mp, method: _fail_rule_on_call(mp, method, 2, _interrupt), KeyboardInterrupt),
}


# ------------------------------------------------------------------------------------------------
# All-or-nothing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("method", ["MEMIT", "PRUNE", "AlphaEdit"])
def test_session_batch_failing_midway_changes_nothing(tok, monkeypatch, method, failure):
    """A batch that fails in its second layer (after the first layer was written) leaves every
    parameter bit-identical and the edit state equal to before, for the first and a later batch."""
    model, hp = _setup(tok, method)
    session = EditSession(model, tok, hp)
    install, exc = FAILURES[failure]
    for n_before in (0, 1):
        if n_before:
            session.edit(BATCHES[0])
        w0, s0 = weights(model), get_state(model).snapshot()
        with monkeypatch.context() as mp:
            calls = install(mp, method)
            with pytest.raises(exc):
                session.edit(BATCHES[1])
            assert len(calls) == 2  # it really got to the second layer
        assert changed_params(w0, model) == set()
        assert get_state(model).same_edits(s0)
        assert session.n_batches == n_before
    # and the session still works afterwards, giving what a run without the failure gives
    session.edit(BATCHES[1])
    ref, _ = _setup(tok, method)
    ref_session = EditSession(ref, tok, hp)
    ref_session.edit(BATCHES[0])
    ref_session.edit(BATCHES[1])
    assert changed_params(weights(ref), model) == set()


@pytest.mark.parametrize("failure", ["raise_in_rule", "nan_residual", "nan_update"])
@pytest.mark.parametrize("method", ["MEMIT", "PRUNE"])
def test_engine_later_batch_failure_changes_nothing(tok, monkeypatch, method, failure):
    """apply_blue_to_model itself (no session): a failing second batch leaves weights and state."""
    model, hp = _setup(tok, method)
    apply_blue_to_model(model, tok, BATCHES[0], hp)
    w0, s0 = weights(model), get_state(model).snapshot()
    install, exc = FAILURES[failure]
    install(monkeypatch, method)
    # (the engine turns a non-finite PRUNE update into BLUEEditError before the SVD)
    with pytest.raises((exc, torch.linalg.LinAlgError)):
        apply_blue_to_model(model, tok, BATCHES[1], hp)
    assert changed_params(w0, model) == set()
    assert get_state(model).same_edits(s0)


def test_engine_nonfinite_prune_update_is_blue_edit_error(tok, monkeypatch):
    model, hp = _setup(tok, "PRUNE")
    _fail_rule_on_call(monkeypatch, "PRUNE", 2, lambda d: d * math.nan)
    with pytest.raises(BLUEEditError):
        apply_blue_to_model(model, tok, BATCHES[1], hp)


@pytest.mark.parametrize("method", ["MEMIT", "PRUNE"])
def test_engine_first_batch_failure_leaves_state_empty(tok, monkeypatch, method):
    model, hp = _setup(tok, method)
    w0, s0 = weights(model), get_state(model).snapshot()
    _fail_rule_on_call(monkeypatch, method, 2, _boom)
    with pytest.raises(RuntimeError):
        apply_blue_to_model(model, tok, BATCHES[1], hp)
    assert changed_params(w0, model) == set()
    assert get_state(model).same_edits(s0)


def test_session_refuses_nan_weights_before_anything(tok, tmp_path):
    """NaN in any parameter is refused up front: no statistics pass, no cache file, no change."""
    model, hp = _setup(tok)
    corpus = write_corpus(tmp_path / "corpus.txt")
    hp = hp.replace(mom2_dataset=str(corpus), stats_dir=str(tmp_path / "stats"))
    get_state(model).second_moments.clear()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = math.nan
    session = EditSession(model, tok, hp)
    w0 = weights(model)
    with pytest.raises(BLUEEditError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*NaN"):
        session.edit(BATCHES[0])
    assert not (tmp_path / "stats").exists()
    w1 = weights(model)
    assert all(torch.equal(w0[k], w1[k]) or (w0[k].isnan() == w1[k].isnan()).all() for k in w0)


# ------------------------------------------------------------------------------------------------
# Undo
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_undo_restores_previous_batch_exactly(tok, method):
    model, hp = _setup(tok, method)
    session = EditSession(model, tok, hp)
    w0, s0 = weights(model), get_state(model).snapshot()
    session.edit(BATCHES[0])
    w1, s1 = weights(model), get_state(model).snapshot()
    session.edit(BATCHES[1])
    assert changed_params(w1, model)  # the second batch did change something
    session.undo()
    assert changed_params(w1, model) == set()
    assert get_state(model).same_edits(s1)
    assert session.n_batches == 1 and session.n_edits == 1
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()
    # editing after an undo continues from the restored state: same as never having edited B1
    session.edit(BATCHES[2])
    ref, _ = _setup(tok, method)
    ref_session = EditSession(ref, tok, hp)
    ref_session.edit(BATCHES[0])
    ref_session.edit(BATCHES[2])
    assert changed_params(weights(ref), model) == set()
    assert get_state(ref).same_edits(get_state(model), compare_history=False)
    assert w0 is not None and s0.n_edits == 0


def test_undo_depth_two(tok):
    model, hp = _setup(tok)
    session = EditSession(model, tok, hp, undo_depth=2)
    w0, s0 = weights(model), get_state(model).snapshot()
    session.edit(BATCHES[0])
    w1, s1 = weights(model), get_state(model).snapshot()
    session.edit(BATCHES[1])
    session.edit(BATCHES[2])
    session.undo()
    session.undo()
    assert changed_params(w1, model) == set() and get_state(model).same_edits(s1)
    assert session.can_undo == 0 and session.n_batches == 1
    with pytest.raises(ValueError, match="raise undo_depth"):
        session.undo()
    session.edit(BATCHES[1])
    session.undo()
    assert changed_params(w1, model) == set() and get_state(model).same_edits(s1)
    fresh, _ = _setup(tok)
    session = EditSession(fresh, tok, hp, undo_depth=2)
    session.edit(BATCHES[0])
    session.edit(BATCHES[1])
    session.undo()
    session.undo()
    assert changed_params(w0, fresh) == set() and get_state(fresh).same_edits(s0)


def test_undo_depth_zero_and_bad_arguments(tok):
    model, hp = _setup(tok)
    session = EditSession(model, tok, hp, undo_depth=0)
    session.edit(BATCHES[0])
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()
    with pytest.raises(ValueError, match="undo_depth"):
        EditSession(model, tok, hp, undo_depth=-1)
    with pytest.raises(ValueError, match="history_limit"):
        EditSession(model, tok, hp, history_limit=0)
    with pytest.raises(ValueError, match="hparams must be"):
        EditSession(model, tok, 3.5)


def test_history_limit_caps_records(tok):
    model, hp = _setup(tok)
    session = EditSession(model, tok, hp, history_limit=2)
    for b in BATCHES:
        rec = session.edit(b)
        assert rec["n_requests"] == len(b)
    assert len(get_state(model).history) == 2 and session.n_edits == 5 and session.n_batches == 4


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_and_continue(tok, tmp_path, method):
    model, hp = _setup(tok, method)
    session = EditSession(model, tok, hp)
    session.edit(BATCHES[0])
    session.edit(BATCHES[1])
    session.save(tmp_path / "s")
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files[0] == ".session.lock" and files[1] == MANIFEST_NAME and re.fullmatch(r"session-000002-[0-9a-f]{8}\.safetensors", files[2])
    assert len(files) == 3

    fresh = make_llama(seed=0)  # the unedited model; prefixes come from the session
    _inject_c0(fresh, tok, hp)
    loaded = EditSession.load(tmp_path / "s", fresh, tok)
    assert loaded.n_batches == 2 and loaded.n_edits == 3
    assert loaded.hparams == hp
    assert changed_params(weights(model), fresh) == set()
    assert get_state(fresh).same_edits(get_state(model))  # history included
    assert get_state(fresh).prefixes == get_state(model).prefixes
    if method == "PRUNE":
        assert all(get_state(fresh).layers[l].W_orig is not None for l in hp.edit_layers)
    session.edit(BATCHES[2])
    loaded.edit(BATCHES[2])
    assert changed_params(weights(model), fresh) == set()
    assert get_state(fresh).same_edits(get_state(model), compare_history=False)


def _prune_restraining(tok, seed: int = 0):
    """PRUNE on a model whose edited weights have sigma_max = 1.5, with weak regularisation: the
    accumulated change exceeds sigma_max, so the state holds unrestrained weights."""
    model, hp = _setup(tok, "PRUNE", seed=seed, mom2_update_weight=1e-6)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for l in hp.edit_layers:
            w = params[f"model.layers.{l}.mlp.down_proj.weight"]
            w.mul_(1.5 / float(torch.linalg.svdvals(w)[0]))
    return model, hp


def test_prune_sequence_save_load_undo_keep_the_unrestrained_weights(tok, tmp_path):
    """PRUNE restrained once per sequence: the session saves and restores the unrestrained weights
    along with the served ones, so a resumed sequence goes on bit-identically; undo restores them."""
    model, hp = _prune_restraining(tok)
    assert hp.prune_timing == "sequence"
    session = EditSession(model, tok, hp)
    session.edit(BATCHES[0])
    session.edit(BATCHES[1])
    state = get_state(model)
    assert state.unrestrained_layers() == hp.edit_layers
    w2, s2 = weights(model), state.snapshot()
    session.save(tmp_path / "s")

    fresh, _ = _prune_restraining(tok)
    loaded = EditSession.load(tmp_path / "s", fresh, tok)
    assert changed_params(w2, fresh) == set()
    assert get_state(fresh).same_edits(state)  # W_unrestrained included
    assert loaded.finalize() == session.finalize() == state.history[-1]["change_sigma"]
    assert changed_params(w2, fresh) == set()
    session.edit(BATCHES[2])
    loaded.edit(BATCHES[2])
    assert changed_params(weights(model), fresh) == set()
    assert get_state(fresh).same_edits(state, compare_history=False)

    session.undo()
    assert changed_params(w2, model) == set() and state.same_edits(s2)
    session.edit(BATCHES[2])  # the same batch again: the same result as the loaded session's
    assert changed_params(weights(fresh), model) == set()


def test_save_overwrites_and_cleans_up(tok, tmp_path):
    model, hp = _setup(tok)
    session = EditSession(model, tok, hp)
    for b in BATCHES[:3]:
        session.edit(b)
        session.save(tmp_path)
    tensor_files = [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    assert len(tensor_files) == 1 and tensor_files[0].startswith("session-000003-")
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["n_batches"] == 3 and manifest["n_edits"] == 4
    assert manifest["tensors_file"] == tensor_files[0]
    assert manifest["hparams"]["base_method"] == "MEMIT"
    assert set(manifest["weights"]) == {"model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}


def test_state_tensors_round_trip_bit_exact(tok):
    model, hp = _setup(tok, "PRUNE")
    apply_blue_to_model(model, tok, BATCHES[0], hp)
    apply_blue_to_model(model, tok, BATCHES[1], hp)
    state = get_state(model)
    state.history[-1]["odd"] = {(1, 2): math.nan, "t": (1, "a"), 3: [math.inf]}
    tensors, meta = state.to_tensors()
    meta = json.loads(json.dumps(meta))  # through JSON, as on disk
    back = EditState.from_tensors(tensors, meta)
    assert back.same_edits(state)
    assert back.prefixes == state.prefixes
    odd = back.history[-1]["odd"]
    assert math.isnan(odd[(1, 2)]) and odd["t"] == (1, "a") and odd[3] == [math.inf]
    assert back.history[-1]["steps"] == state.history[-1]["steps"]  # int layer keys survive
    with pytest.raises(ValueError, match="format version"):
        EditState.from_tensors(tensors, {**meta, "state_format_version": 99})
    with pytest.raises(ValueError, match="unexpected tensor"):
        EditState.from_tensors({**tensors, "layers.x.kpkp": torch.zeros(1)}, meta)


def _saved_session(tok, tmp_path, method="MEMIT"):
    model, hp = _setup(tok, method)
    session = EditSession(model, tok, hp)
    session.edit(BATCHES[0])
    session.save(tmp_path / "s")
    return model, hp, tmp_path / "s"


def _fresh(tok, hp, seed=0):
    m = make_llama(seed=seed)
    _inject_c0(m, tok, hp)
    return m


def _corrupt_flip(d: Path):
    p = next(d.glob("session-*.safetensors"))
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x10
    p.write_bytes(bytes(data))


def _corrupt_truncate(d: Path):
    p = next(d.glob("session-*.safetensors"))
    p.write_bytes(p.read_bytes()[:100])


def _delete_tensors(d: Path):
    next(d.glob("session-*.safetensors")).unlink()


def _garble_manifest(d: Path):
    (d / MANIFEST_NAME).write_text('{"format": "blue_plugin.EditSession", "format_ver')


def _manifest_edit(**changes):
    def f(d: Path):
        m = json.loads((d / MANIFEST_NAME).read_text())
        m.update(changes)
        (d / MANIFEST_NAME).write_text(json.dumps(m))
    return f


def _delete_manifest(d: Path):
    (d / MANIFEST_NAME).unlink()


@pytest.mark.parametrize("corrupt, match", [
    (_corrupt_flip, "checksum"),
    (_corrupt_truncate, "checksum"),
    (_delete_tensors, "missing"),
    (_garble_manifest, "not a readable session manifest"),
    (_delete_manifest, "no saved session"),
    (_manifest_edit(format_version=2), "session format 2"),
    (_manifest_edit(format="something else"), "not a blue_plugin session"),
    (_manifest_edit(tensors_file="../outside.safetensors"), "missing"),
], ids=["flipped-byte", "truncated", "no-tensor-file", "garbled-manifest", "no-manifest",
        "future-version", "foreign-manifest", "path-traversal"])
def test_load_refuses_broken_session(tok, tmp_path, corrupt, match):
    _, hp, d = _saved_session(tok, tmp_path)
    corrupt(d)
    fresh = _fresh(tok, hp)
    w0 = weights(fresh)
    with pytest.raises(BLUESessionError, match=match):
        EditSession.load(d, fresh, tok)
    assert changed_params(w0, fresh) == set() and get_state(fresh).n_edits == 0


def test_load_refuses_other_or_edited_model(tok, tmp_path):
    edited, hp, d = _saved_session(tok, tmp_path)
    with pytest.raises(BLUESessionError, match="already carries the session's edits"):
        EditSession.load(d, edited, tok)
    other = _fresh(tok, hp, seed=1)  # same architecture, other weights
    w0 = weights(other)
    with pytest.raises(BLUESessionError, match="weights differ"):
        EditSession.load(d, other, tok)
    assert changed_params(w0, other) == set()
    bigger = make_llama(seed=0, n_layers=5)
    with pytest.raises(BLUESessionError, match="another model.*num_layers"):
        EditSession.load(d, bigger, tok)
    half = make_llama(seed=0).to(torch.bfloat16)
    with pytest.raises(BLUESessionError, match="dtype"):
        EditSession.load(d, half, tok)
    # an unedited model whose edited matrix was changed some other way
    tampered = _fresh(tok, hp)
    with torch.no_grad():
        tampered.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(BLUESessionError, match="not at the original value"):
        EditSession.load(d, tampered, tok)


def test_load_with_other_hparams_warns(tok, tmp_path, caplog):
    _, hp, d = _saved_session(tok, tmp_path)
    fresh = _fresh(tok, hp)
    with caplog.at_level("WARNING", logger="blue_plugin.editing.session"):
        s = EditSession.load(d, fresh, tok, hparams=hp.replace(v_lr=0.25))
    assert s.hparams.v_lr == 0.25
    assert any("v_lr" in r.getMessage() for r in caplog.records)


def test_save_crash_keeps_previous_session(tok, tmp_path, monkeypatch):
    """A save that dies while writing the tensor file or the manifest leaves the previous
    session intact and loadable, and no stray files."""
    import safetensors.torch

    from blue_plugin.editing import session_io as session_mod

    model, hp = _setup(tok)
    session = EditSession(model, tok, hp)
    session.edit(BATCHES[0])
    d = tmp_path / "s"
    session.save(d)
    w1 = weights(model)
    session.edit(BATCHES[1])
    before = sorted(p.name for p in d.iterdir())

    real_save = safetensors.torch.save_file

    def half_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:50])
        raise OSError("No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(safetensors.torch, "save_file", half_save)
        with pytest.raises(OSError, match="No space"):
            session.save(d)
    assert sorted(p.name for p in d.iterdir()) == before

    def bad_manifest(path, data):
        raise OSError("I/O error")

    with monkeypatch.context() as mp:
        mp.setattr(session_mod, "write_atomic", bad_manifest)
        with pytest.raises(OSError, match="I/O"):
            session.save(d)
    assert sorted(p.name for p in d.iterdir()) == before
    fresh = _fresh(tok, hp)
    loaded = EditSession.load(d, fresh, tok)
    assert loaded.n_batches == 1 and changed_params(w1, fresh) == set()


def test_no_pickle_no_unsafe_loading():
    """Security: the package never unpickles (pickle, torch.load without weights_only) and
    reads YAML only with safe_load."""
    bad = []
    for path in sorted((REPO / "blue_plugin").glob("*.py")):
        src = path.read_text(encoding="utf-8")
        for pattern in (r"^\s*import\s+pickle", r"^\s*from\s+pickle", r"\bpickle\.load", r"\bdill\b", r"\bjoblib\b",
                        r"yaml\.load\(", r"yaml\.unsafe_load", r"yaml\.full_load", r"(?<![\w.])eval\(", r"(?<![\w.])exec\("):
            for m in re.finditer(pattern, src, flags=re.M):
                bad.append(f"{path.name}: {m.group(0).strip()}")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{path.name}: {m.group(0)}")
    assert bad == []


# ------------------------------------------------------------------------------------------------
# Resume after SIGKILL (subprocesses)
# ------------------------------------------------------------------------------------------------


def _worker(cfg: dict) -> None:
    """Run the batches of ``cfg`` on the model in ``cfg['model_dir']``, saving the session after
    each; after batch ``stop_after`` write ``marker`` and wait to be killed. At the end write all
    parameters to ``cfg['final']``."""
    import logging

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"]).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(cfg["model_dir"])
    session_dir = Path(cfg["session_dir"])
    if (session_dir / MANIFEST_NAME).exists():
        session = EditSession.load(session_dir, model, tok)
    else:
        session = EditSession(model, tok, BLUEHyperParams.from_dict(cfg["hparams"]))
    for b in range(session.n_batches, len(cfg["batches"])):
        session.edit(cfg["batches"][b])
        session.save(session_dir)
        if cfg.get("stop_after") == b + 1:
            Path(cfg["marker"]).write_text(str(b + 1))
            time.sleep(600)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, cfg["final"])


def _spawn(cfg: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "tests.integration.test_session", "--worker", json.dumps(cfg)],
                            cwd=str(REPO), env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, log.read_text(errors="replace")[-3000:]


def test_resume_after_sigkill_is_bit_identical(tok, tmp_path):
    """Process A edits 4 batches uninterrupted. Process B saves after each batch and is
    SIGKILLed after batch 2; process C loads B's session onto a freshly loaded model and finishes.
    C's final weights are bit-identical to A's. Statistics come from a corpus file (computed once,
    then read from the cache), context prefixes are generated by the model (and restored)."""
    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    model = make_llama(seed=3)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = write_corpus(tmp_path / "corpus.txt", n=40)
    hp = make_hparams(mom2_adjustment=True, mom2_dataset=str(corpus), mom2_n_samples=40,
                      stats_dir=str(tmp_path / "stats"), v_num_grad_steps=4,
                      context_template_length_params=[[4, 2]])
    common = {"model_dir": str(model_dir), "hparams": hp.to_dict(), "batches": BATCHES}
    ref = {**common, "session_dir": str(tmp_path / "ref"), "final": str(tmp_path / "ref.safetensors")}
    run = {**common, "session_dir": str(tmp_path / "run"), "final": str(tmp_path / "run.safetensors"),
           "stop_after": 2, "marker": str(tmp_path / "marker")}

    proc_a = _spawn(ref, tmp_path / "a.log")
    proc_b = _spawn(run, tmp_path / "b.log")
    try:
        deadline = time.time() + 240
        while not (tmp_path / "marker").exists():
            assert proc_b.poll() is None, (tmp_path / "b.log").read_text(errors="replace")[-3000:]
            assert time.time() < deadline, "worker B did not reach batch 2"
            time.sleep(0.2)
        proc_b.send_signal(signal.SIGKILL)
        assert proc_b.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc_b.poll() is None:
            proc_b.kill()
    assert not (tmp_path / "run.safetensors").exists()
    assert EditSession.read_manifest(tmp_path / "run")["n_batches"] == 2

    proc_c = _spawn({k: v for k, v in run.items() if k != "stop_after"}, tmp_path / "c.log")
    _wait(proc_c, tmp_path / "c.log")
    _wait(proc_a, tmp_path / "a.log")

    final_ref, final_run = load_file(ref["final"]), load_file(run["final"])
    assert set(final_ref) == set(final_run)
    different = [n for n in final_ref if not torch.equal(final_ref[n], final_run[n])]
    assert different == []
    edited = [n for n in final_ref if not torch.equal(final_ref[n], dict(model.named_parameters())[n].detach())]
    assert edited == ["model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    # the saved states agree too (K_p K_p^T, fingerprints, prefixes, edit counts)
    ma, mc = EditSession.read_manifest(tmp_path / "ref"), EditSession.read_manifest(tmp_path / "run")
    ta = load_file(str(tmp_path / "ref" / ma["tensors_file"]))
    tc = load_file(str(tmp_path / "run" / mc["tensors_file"]))
    assert set(ta) == set(tc) and all(torch.equal(ta[k], tc[k]) for k in ta)
    assert ma["n_batches"] == mc["n_batches"] == 4 and ma["n_edits"] == mc["n_edits"] == 5
    assert ma["state"]["prefixes"] == mc["state"]["prefixes"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m tests.integration.test_session --worker '<json config>'")
