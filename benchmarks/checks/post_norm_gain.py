"""How much a small change of the FFN output projection's output moves the residual stream, per
critical layer (``python -m benchmarks.checks.post_norm_gain``).

The MEMIT family writes the residual change it wants at a layer into the output of that layer's
FFN output projection, which assumes that output is added to the residual as it is (gain 1). A
norm after the FFN (Gemma 2 and 3: ``post_feedforward_layernorm``) breaks that: a small change of
the projection's output m reaches the residual scaled by about |scale| / rms(m). This check
measures that factor directly, ||norm(m + e v) - norm(m)|| / ||e v|| for random directions v and
a small e, at the subject's last token of CounterFact prompts (the token an edit writes at).

    python -m benchmarks.checks.post_norm_gain --model gemma3-270m --hparams hparams/BLUE/gemma3-270m.yaml

Writes ``benchmarks/results/post_norm_gain/<model>.json``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

from blue_plugin.datafiles import resolve_data
from blue_plugin.evaluation.data import load_cases
from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.editing.requests import encode_prompt, prepare_requests
from blue_plugin.model.devices import input_device
from blue_plugin.model.hooks import capture
from blue_plugin.model.layout import find_module, resolve_layout
from blue_plugin.model.loading import load_model

from benchmarks.common import REPO_ROOT, write_json

logger = logging.getLogger("benchmarks.checks.post_norm_gain")
POST_NORM = "post_feedforward_layernorm"


def edited_outputs(model, tok, hp: BLUEHyperParams, cases) -> dict[int, list[torch.Tensor]]:
    """Per critical layer, the FFN output projection's output at each case's edited token (the
    engine's own request parsing and token choice, ``fact_token``), one forward pass per case."""
    layout = resolve_layout(model, hp)
    names = {layer: layout.rewrite(layer) for layer in hp.layers}
    requests = prepare_requests(tok, [{"prompt": c.prompt, "subject": c.subject, "target_new": c.target_new}
                                      for c in cases], hp)
    outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in hp.layers}
    with torch.no_grad():
        for request in requests:
            ids, pos = encode_prompt(tok, "", request, hp.fact_token)
            with capture(model, outputs_of=list(names.values())) as store:
                model(input_ids=torch.tensor([ids], device=input_device(model)))
            for layer, name in names.items():
                outputs[layer].append(store[f"out:{name}"][0, pos])
    return outputs


def layer_gains(model, tok, hp: BLUEHyperParams, cases, eps: float = 1e-3, directions: int = 4, seed: int = 0):
    """Per critical layer: the median gain over the cases' edited tokens and the median rms(m)."""
    layout = resolve_layout(model, hp)
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for layer, outputs in edited_outputs(model, tok, hp, cases).items():
        norm = getattr(find_module(model, layout.block(layer), "layer_module_tmp"), POST_NORM, None)
        gains, rms = [], []
        with torch.no_grad():
            for m in outputs:
                rms.append(float(m.float().pow(2).mean().sqrt()))
                if norm is None:
                    gains.append(1.0)
                    continue
                for _ in range(directions):
                    v = torch.randn(m.shape, generator=gen).to(m)
                    step = eps * m.norm() * v / v.norm()
                    gains.append(float((norm(m + step) - norm(m)).norm() / step.norm()))
        result[layer] = {"post_norm": norm is not None, "gain_median": statistics.median(gains),
                         "gain_min": min(gains), "gain_max": max(gains), "rms_median": statistics.median(rms),
                         "tokens": len(outputs)}
        logger.info("layer %d: gain %.1f (median; %.1f-%.1f), rms(m) %.4f", layer, result[layer]["gain_median"],
                    result[layer]["gain_min"], result[layer]["gain_max"], result[layer]["rms_median"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checks.post_norm_gain", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--hparams", default="hparams/BLUE/gemma3-270m.yaml")
    p.add_argument("--data", default="counterfact", help="CounterFact file or dataset name")
    p.add_argument("--n", type=int, default=20, help="first N cases (default 20)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/post_norm_gain/<model>.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hp = BLUEHyperParams.from_hparams(args.hparams)
    model, tok = load_model(args.model)
    model.eval()
    _, cases = load_cases(resolve_data(args.data), n=args.n)
    gains = layer_gains(model, tok, hp, cases)
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / "post_norm_gain" / f"{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"command": f"python -m benchmarks.checks.post_norm_gain {' '.join(argv)}".strip(),
                     "model": args.model, "hparams": args.hparams, "n_cases": len(cases), "layers": gains})
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
