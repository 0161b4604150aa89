"""GPU check: edit a model split between a GPU and the CPU, compare with the all-CPU edit.

A tiny-but-not-trivial random Llama (8 layers, hidden 256, MLP 768) is saved with
``save_pretrained`` and loaded three ways:

* ``cpu``: plain, all on the CPU (the reference);
* ``gpu-first``: embeddings and layers 0-3 on ``cuda:0``, layers 4-7, final norm and head on the CPU;
* ``cpu-first``: the reverse (embeddings and layers 0-3 on the CPU, the rest on ``cuda:0``).

The split loads go through ``from_pretrained(device_map=...)`` (accelerate's dispatch). Each
placement computes the key statistics of the edited layers (no cache) and runs the same BLUE
edits (MEMIT, layers [1..5] so layer 1 and layer 5 sit on different devices; and the original
AlphaEdit). Context prefixes are copied from the CPU run (sampling on a GPU draws other numbers).
Printed: max relative differences of the statistics and of the edited weights against the CPU,
and the edited model's probability of each new target. Exit status 1 when a difference exceeds
the tolerance (GPU float32 with TF32 off: expected ~1e-5 .. 1e-3 after 20 Adam steps).

Run on a machine with a GPU, from the repository root::

    python benchmarks/gpu_split_check.py --out benchmarks/results/gpu_split_check.json

``--cpu-only`` runs the same pipeline with both halves on the CPU (accelerate hooks forced), to
check the script itself on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from blue_plugin import apply_blue_to_model, get_state
from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.stats.moments import get_second_moments

N_LAYERS = 8
WORDS = (
    "the a of is in and to was by for with on at from as it his her their its this that which "
    "mother tongue native speaker language capital city country france paris rome italy germany "
    "berlin spain madrid english french german spanish italian danielle darrieux michel rocard "
    "toko yasuda plays guitar piano apple makes iphone microsoft windows company founded born "
    "river mountain big small old new red blue house cat dog sat mat see like because work"
).split()
REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French"},
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano", "ground_truth": "guitar"},
]


def make_tokenizer(words=WORDS):
    """A word-level tokenizer over ``words`` (lower-cased, whitespace-split, BOS prepended)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build(root: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=N_LAYERS,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.05,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=g))
             for n in torch.randint(5, 40, (200,), generator=g)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def device_map(first: str, second: str) -> dict[str, str]:
    half = N_LAYERS // 2
    dm = {"model.embed_tokens": first, "model.rotary_emb": first}
    dm.update({f"model.layers.{i}": first if i < half else second for i in range(N_LAYERS)})
    dm.update({"model.norm": second, "lm_head": second})
    return dm


def load(root: Path, dm: dict[str, str] | None):
    import accelerate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    if dm is None:
        return AutoModelForCausalLM.from_pretrained(root / "model").eval(), tok
    model = AutoModelForCausalLM.from_pretrained(root / "model", device_map=dm).eval()
    if len(set(dm.values())) == 1:  # --cpu-only: transformers does not dispatch a one-device map
        model = accelerate.dispatch_model(model, device_map=dm, force_hooks=True)
    return model, tok


def hparams(root: Path, method: str, blue: bool) -> BLUEHyperParams:
    return BLUEHyperParams(
        base_method=method, blue=blue, layers=[1, 2, 3, 4, 5], v_num_grad_steps=15, v_lr=0.5,
        v_loss_layer=-1, context_template_length_params=[[5, 2]], mom2_adjustment=True,
        mom2_update_weight=100.0, mom2_dataset=str(root / "corpus.txt"), mom2_n_samples=200,
        mom2_max_length=48, stats_dir=str(root / "stats"), L2=1.0, max_length=40,
    )


@torch.no_grad()
def target_probs(model, tok) -> list[float]:
    """P(first token of target_new | prompt) for each request."""
    out = []
    dev = model.get_input_embeddings().weight.device
    for r in REQUESTS:
        prompt = r["prompt"].replace("{}", r["subject"])
        ids = torch.tensor([tok(prompt)["input_ids"]], device=dev)
        target = tok(" " + r["target_new"], add_special_tokens=False)["input_ids"][0]
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        out.append(float(torch.softmax(logits, -1)[target].cpu()))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-only", action="store_true", help="both halves on the CPU (checks the script)")
    p.add_argument("--gpu", default="cuda:0")
    p.add_argument("--tol-stats", type=float, default=1e-4, help="max relative difference of C0")
    p.add_argument("--tol-weights", type=float, default=1e-2, help="max relative difference of the weight change")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    gpu = "cpu" if args.cpu_only else args.gpu
    if gpu != "cpu" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-only to check the script, or on a GPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    results: dict = {"device": torch.cuda.get_device_name(0) if gpu != "cpu" else "cpu only",
                     "torch": torch.__version__, "placements": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        placements = {"cpu": None, "gpu-first": device_map(gpu, "cpu"), "cpu-first": device_map("cpu", gpu)}
        for method, blue in (("MEMIT", True), ("AlphaEdit", False)):
            hp = hparams(root, method, blue)
            names = [f"model.layers.{l}.mlp.down_proj" for l in hp.edit_layers]
            ref: dict = {}
            for place, dm in placements.items():
                t0 = time.perf_counter()
                model, tok = load(root, dm)
                entry: dict = {"devices": {n: str(model.get_submodule(n).weight.device) for n in names}}
                c0 = get_second_moments(model, tok, names, hp.mom2_dataset, hp.mom2_n_samples,
                                        hp.mom2_max_length, cache_dir=None, progress=False)
                if place == "cpu" and method == "AlphaEdit":  # a null space of about half of d_in
                    thr = min(float(torch.linalg.eigvalsh(c0[n].double().cpu()).median()) for n in names)
                    hp = hp.replace(nullspace_threshold=thr)
                    results["alphaedit_nullspace_threshold"] = thr
                before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
                if place != "cpu":  # the CPU run's prefixes (sampling on a GPU draws other numbers)
                    get_state(model).prefixes.update(ref["prefixes"])
                apply_blue_to_model(model, tok, REQUESTS, hp)
                after = {n: model.get_submodule(n).weight.detach().clone() for n in names}
                entry["p_target"] = target_probs(model, tok)
                entry["steps"] = get_state(model).history[-1]["steps"]
                entry["seconds"] = round(time.perf_counter() - t0, 2)
                if place == "cpu":
                    ref = {"c0": c0, "delta": {n: after[n] - before[n] for n in names},
                           "prefixes": dict(get_state(model).prefixes)}
                else:
                    entry["c0_rel_diff"] = {n: rel(c0[n], ref["c0"][n]) for n in names}
                    entry["delta_rel_diff"] = {n: rel(after[n] - before[n], ref["delta"][n]) for n in names}
                    bad = [n for n in names if entry["c0_rel_diff"][n] > args.tol_stats
                           or entry["delta_rel_diff"][n] > args.tol_weights]
                    entry["ok"] = not bad
                    ok &= not bad
                results["placements"][f"{method}{'-BLUE' if blue else ''}/{place}"] = entry
                print(f"{method:9s} {'BLUE' if blue else 'orig'} {place:9s} {json.dumps(entry)}", flush=True)
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    results["ok"] = ok
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("OK" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
