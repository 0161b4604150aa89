"""Edits on the embedded SmolLM2 handed over as artifacts: a PEFT LoRA adapter and a plain model,
loaded in a fresh Python process that has only ``transformers`` and ``peft``.

``python -m benchmarks.checks.export_check [--n 10] [--out benchmarks/results/export]`` edits the
first ``n`` of the 20 facts that ship with blue_plugin (MEMIT_BLUE, the SmolLM2 YAML; ``--quick``:
10 steps, 200 corpus documents), exports the session both ways, and reports from the fresh process:
the relative logit error of the adapter and of the exported model against the edited model, whether
disabling the adapter gives the unedited logits exactly, and the edit's efficacy (new object
preferred over the true one) measured through the adapter. Writes ``export_check.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, versions, write_json
from blue_plugin import EditSession, load_model
from blue_plugin.evaluation.data import BUILTIN_FACTS, load_cases
from blue_plugin.hparams import BLUEHyperParams

logger = logging.getLogger("benchmarks.export_check")

# Runs in a fresh interpreter: transformers + peft, nothing of blue_plugin.
CHECKER = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    a = json.loads(sys.argv[1]); torch.set_num_threads(1)
    ref = torch.load(a["ref"], weights_only=True)
    def logits(m, ids, mask):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits.float()
    def rel(x, y):
        return float((x - y).norm() / y.norm())
    out = {}
    tok = AutoTokenizer.from_pretrained(a["model"])
    base = AutoModelForCausalLM.from_pretrained(a["base"], dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(base, a["adapter"]).eval()
    ids, mask = ref["ids"], ref["mask"]
    out["adapter_rel_error"] = rel(logits(pm, ids, mask), ref["edited"])
    wins = 0
    for prompt, new, old in a["facts"]:
        p = tok(prompt)["input_ids"]
        def nll(target):
            t = tok(" " + target, add_special_tokens=False)["input_ids"]
            x = torch.tensor([p + t])
            with torch.no_grad():
                lp = pm(input_ids=x).logits.float().log_softmax(-1)[0]
            return -sum(float(lp[len(p) + i - 1, t[i]]) for i in range(len(t))) / len(t)
        wins += nll(new) < nll(old)
    out["adapter_efficacy"] = wins / len(a["facts"])
    with pm.disable_adapter():
        out["disabled_equals_unedited"] = bool(torch.equal(logits(pm, ids, mask), ref["unedited"]))
    m = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32).eval()
    out["model_rel_error"] = rel(logits(m, ids, mask), ref["edited"])
    out["imported_blue_plugin"] = any(k.split(".")[0] == "blue_plugin" for k in sys.modules)
    print(json.dumps(out))
""")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10, help="how many of the shipped facts to edit (1-20)")
    ap.add_argument("--quick", action="store_true", help="10 steps and 200 corpus documents")
    ap.add_argument("--out", default="benchmarks/results/export")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    hp = BLUEHyperParams.from_hparams("smollm2-135m")
    if args.quick:
        hp = hp.replace(v_num_grad_steps=10, mom2_n_samples=200)
    _, cases = load_cases(BUILTIN_FACTS, n=args.n)
    requests = [c.to_request() for c in cases]
    prompts = [r["prompt"].format(r["subject"]) for r in requests]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        unedited = model(**enc).logits.float()
    t0 = time.perf_counter()
    session = EditSession(model, tok, hp)
    session.edit(requests)
    edit_s = time.perf_counter() - t0
    with torch.no_grad():
        edited = model(**enc).logits.float()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        info = session.export_adapter(tmp / "adapter")
        adapter_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        session.export_model(tmp / "model")
        model_s = time.perf_counter() - t0
        adapter_bytes = sum(f.stat().st_size for f in (tmp / "adapter").iterdir())
        torch.save({"ids": enc["input_ids"], "mask": enc["attention_mask"], "unedited": unedited, "edited": edited},
                   tmp / "ref.pt")
        facts = [[p, r["target_new"], r["ground_truth"]] for p, r in zip(prompts, requests)]
        base = model.config._name_or_path
        proc = subprocess.run([sys.executable, "-c", CHECKER, json.dumps({
            "ref": str(tmp / "ref.pt"), "base": base, "adapter": str(tmp / "adapter"), "model": str(tmp / "model"),
            "facts": facts})], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                                                   "HOME": str(Path.home())})
        if proc.returncode != 0:
            logger.error("the fresh process failed:\n%s", proc.stderr[-3000:])
            return 1
        fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "command": "python -m benchmarks.checks.export_check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "n_edits": len(requests), "hparams": {"base_method": hp.base_method, "blue": hp.blue,
                                              "v_num_grad_steps": hp.v_num_grad_steps, "mom2_n_samples": hp.mom2_n_samples},
        "edit_s": edit_s, "export_adapter_s": adapter_s, "export_model_s": model_s, "adapter_bytes": adapter_bytes,
        "modules": info["modules"], "fresh_process": fresh, "machine": machine_info(), "versions": versions(),
    }
    path = write_json(out / "export_check.json", result)
    print(json.dumps({k: result[k] for k in ("n_edits", "adapter_bytes", "modules", "fresh_process")}, indent=1))
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
