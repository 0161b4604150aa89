"""Distributed statistics (blue_plugin.stats.distributed, ``python -m blue_plugin.stats``).

The main test launches ``torchrun --nproc_per_node 2`` (gloo, CPU) on a tiny random Llama saved
with ``save_pretrained`` and a 7-document corpus (uneven split: 4 + 3 documents), and checks the
files rank 0 writes against single-process statistics to float64 tolerance.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blue_plugin import stats
from blue_plugin.stats import moments
from blue_plugin.stats.distributed import distributed_second_moments
from blue_plugin.stats.process_group import shard_indices

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "the a an cat dog bird sat on mat ran fast slow red blue green house tree river city "
    "king queen paris france capital is of in and big small old new runs sees likes"
).split()
LAYERS = [1, 2]
MODULES = [f"model.layers.{l}.mlp.down_proj" for l in LAYERS]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny Llama + tokenizer, a 7-document corpus and a YAML config pointing at them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    rng = random.Random(1)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
                                for _ in range(7)) + "\n", encoding="utf-8")
    hparams = root / "tiny.yaml"
    hparams.write_text(
        "alg_name: BLUE\n"
        f"model_name: '{model_dir}'\n"
        "layers: [1, 2]\n"
        "blue: true\n"
        "v_loss_layer: 3\n"
        f"mom2_dataset: '{corpus}'\n"
        "mom2_n_samples: 100\n"
        "mom2_max_length: 32\n",
        encoding="utf-8",
    )
    return {"root": root, "model_dir": model_dir, "corpus": corpus, "hparams": hparams}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["MASTER_ADDR"] = "127.0.0.1"
    return env


def _read(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(stats.TENSOR_KEY), f.metadata()


def _single_process(setup, batch_size: int, cache_dir: Path | None):
    from blue_plugin.model.loading import load_model

    torch.set_num_threads(1)
    model, tok = load_model(str(setup["model_dir"]))
    texts = stats.read_corpus(str(setup["corpus"]), 100)
    raw = stats.collect_second_moments(model, tok, MODULES, texts, 32, batch_size=batch_size, progress=False)
    return model, tok, raw


def _cached_worker(rank: int, world: int, port: int, model_dir: str, corpus: str, cache_dir: str, out_dir: str):
    """One gloo rank calling distributed_second_moments directly; saves what it got."""
    import torch.distributed as dist

    from blue_plugin.stats.process_group import init_distributed
    from blue_plugin.model.loading import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        assert info.backend == "gloo" and info.world_size == world
        model, tok = load_model(model_dir)
        run = distributed_second_moments(model, tok, MODULES, corpus, 100, 32, cache_dir, batch_size=1,
                                         progress=False)
        torch.save({"cached": run.cached, "computed": run.computed, "moments": run.moments},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shard_indices_cover_uneven_split():
    shards = [list(shard_indices(7, r, 2)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    shards = [list(shard_indices(2, r, 3)) for r in range(3)]
    assert shards == [[0], [1], []]
    assert sorted(i for r in range(5) for i in shard_indices(23, r, 5)) == list(range(23))
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)


def test_torchrun_two_processes_equal_single_process(setup, tmp_path):
    """2 gloo ranks (4 + 3 documents) write the same statistics as one process."""
    stats_dir = tmp_path / "stats"
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "blue_plugin.stats", "--hparams", str(setup["hparams"]), "--stats-dir", str(stats_dir),
        "--batch-size", "1", "--device", "cpu", "--threads", "1", "--no-progress", "--report", str(report),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    rep = json.loads(report.read_text())
    assert rep["world_size"] == 2 and rep["backend"] == "gloo"
    assert sorted(r["docs"] for r in rep["ranks"]) == [3, 4]
    assert rep["computed"] == MODULES

    # Single process, batch size 1: the same per-document forward passes, so only the summation
    # differs (on the CPU: float32 partial sums over up to 4,096 tokens, then float64).
    model, tok, raw = _single_process(setup, batch_size=1, cache_dir=None)
    files = sorted(stats_dir.glob("*.safetensors"))
    assert len(files) == 2
    for name in MODULES:
        s, c = raw[name]
        path = Path(rep["paths"][name])
        assert path.parent == stats_dir and path.exists()
        mean, meta = _read(path)
        assert int(meta["count"]) == c == rep["count"][name]
        assert meta["n_docs"] == "7" and meta["n_processes"] == "2"
        assert mean.dtype == torch.float64 and mean.shape == (48, 48)
        assert torch.allclose(mean, s / c, rtol=1e-6, atol=1e-7 * float((s / c).abs().max())), (mean - s / c).abs().max()
        assert not torch.equal(mean, torch.zeros_like(mean))

    # The engine's loader (get_second_moments with the engine's model id) finds these files and
    # computes nothing.
    def boom(*a, **k):
        raise AssertionError("statistics were recomputed instead of read from the distributed cache")

    orig = moments.collect_second_moments
    moments.collect_second_moments = boom
    try:
        model_id = str(getattr(model.config, "_name_or_path", None))
        got = stats.get_second_moments(model, tok, MODULES, str(setup["corpus"]), 100, 32, stats_dir,
                                       model_id=model_id, progress=False)
    finally:
        moments.collect_second_moments = orig
    for name in MODULES:
        s, c = raw[name]
        assert torch.allclose(got[name], s / c, rtol=1e-6, atol=1e-7 * float((s / c).abs().max()))

    # A second launch (torch.multiprocessing, library API) finds the files on rank 0, computes
    # nothing, and every rank receives the cached statistics.
    import torch.multiprocessing as mp

    out_dir = tmp_path / "ranks"
    out_dir.mkdir()
    mp.spawn(_cached_worker, args=(2, _free_port(), str(setup["model_dir"]), str(setup["corpus"]),
                                   str(stats_dir), str(out_dir)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(out_dir / f"rank{rank}.pt")
        assert got["cached"] == MODULES and got["computed"] == []
        for name in MODULES:
            assert torch.equal(got["moments"][name], _read(Path(rep["paths"][name]))[0])

    # The single-process get_second_moments writes byte-compatible metadata for the compared keys.
    single_dir = tmp_path / "single"
    stats.get_second_moments(model, tok, MODULES, str(setup["corpus"]), 100, 32, single_dir,
                             model_id=model_id, batch_size=1, progress=False)
    for name in MODULES:
        _, meta_d = _read(Path(rep["paths"][name]))
        mean_s, meta_s = _read(single_dir / Path(rep["paths"][name]).name)
        for key in stats.COMPARED_KEYS + ("count", "n_docs", "d_in", "model_id"):
            assert meta_d[key] == meta_s[key], key


def test_single_process_matches_get_second_moments(setup, tmp_path):
    """Without a process group the distributed function equals get_second_moments and caches."""
    from blue_plugin.model.loading import load_model

    torch.set_num_threads(1)
    model, tok = load_model(str(setup["model_dir"]))
    run = distributed_second_moments(model, tok, MODULES, str(setup["corpus"]), 100, 32, tmp_path / "a",
                                     batch_size=3, progress=False)
    assert run.computed == MODULES and run.cached == [] and run.world_size == 1
    ref = stats.get_second_moments(model, tok, MODULES, str(setup["corpus"]), 100, 32, tmp_path / "b",
                                   batch_size=3, progress=False)
    for name in MODULES:
        assert torch.equal(run.moments[name], ref[name])
        assert run.paths[name].name == next((tmp_path / "b").glob(f"*{name}*")).name
    again = distributed_second_moments(model, tok, MODULES, str(setup["corpus"]), 100, 32, tmp_path / "a",
                                       batch_size=3, progress=False)
    assert again.computed == [] and again.cached == MODULES
    for name in MODULES:
        assert torch.equal(again.moments[name], ref[name])


def test_cli_rejects_bad_layers(setup, tmp_path, caplog):
    from blue_plugin.stats.cli import main

    assert main(["--hparams", str(setup["hparams"]), "--layers", "1,x", "--stats-dir", str(tmp_path)]) == 2
    assert main(["--hparams", str(setup["hparams"]), "--layers", "9", "--stats-dir", str(tmp_path),
                 "--device", "cpu", "--no-progress"]) == 2
    assert "outside the model" in caplog.text
    assert not list(tmp_path.glob("*.safetensors"))
