"""One MEMIT_BLUE edit per CounterFact case on the embedded Gemma 3 270M with the shipped YAML, restored
after each: NLL of the new and the true object on the prompt and its paraphrase, and of the locality
prompt's answer, before and after (one JSON line per case in the log).

    BLUE_PLUGIN_DATA=/work/shared/data OMP_NUM_THREADS=1 python benchmarks/results/tracing/gemma3-270m/sanity_edit.py 0 5 7 8
"""
import json
import logging
import sys
import time

import torch

from blue_plugin import BLUEHyperParams, apply_blue_to_model
from blue_plugin.datafiles import locate
from blue_plugin.editing.state import EditState
from blue_plugin.evaluation.metrics import answer_nll
from blue_plugin.model.loading import load_model

logger = logging.getLogger("sanity_edit")


def main(indices: list[int]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = load_model("gemma3-270m")
    logger.info("load_s %.1f", time.perf_counter() - t0)
    cases = json.loads(locate("counterfact").read_text())
    hp = BLUEHyperParams.from_hparams("gemma3-270m").replace(
        base_method="MEMIT", blue=True, mom2_dataset=str(locate("wordnet-glosses")), stats_dir="/tmp/gem/stats")
    logger.info("layers %s, v_lr %s", hp.layers, hp.v_lr)

    def nll(prompts, answers):
        return answer_nll(model, tok, prompts, answers).tolist()

    for i in indices:
        c = cases[i]
        req = {k: c[k] for k in ("prompt", "subject", "target_new", "ground_truth", "case_id")}
        ps = [c["prompt"], c["rephrase_prompt"]]

        def scores():
            return {"nll_new[prompt,rephrase]": nll(ps, [c["target_new"]] * 2),
                    "nll_true": nll(ps, [c["ground_truth"]] * 2),
                    "locality_nll": nll([c["locality_prompt"]], [c["locality_ground_truth"]])}

        before = scores()
        state = EditState()
        t = time.perf_counter()
        _, weights_copy = apply_blue_to_model(model, tok, [req], hp, return_orig_weights=True, state=state)
        seconds = time.perf_counter() - t
        after = scores()
        record = state.history[-1]
        logger.info("%s", json.dumps({
            "case": i, "subject": c["subject"], "new": c["target_new"], "true": c["ground_truth"],
            "edit_s": round(seconds, 1), "before": before, "after": after,
            "efficacy": after["nll_new[prompt,rephrase]"][0] < after["nll_true"][0],
            "generalization": after["nll_new[prompt,rephrase]"][1] < after["nll_true"][1],
            "record": {k: record[k] for k in ("steps", "nll", "layers") if k in record}}, default=str))
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, w in weights_copy.items():
                params[name].copy_(w)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [0])
