"""Edit a model with BLUE through EasyEdit's ``BaseEditor``, in the style of EasyEdit's example scripts.

Example (CPU, embedded SmolLM2, 20 CounterFact cases in sequential batches of 10)::

    python benchmarks/run_blue_editing.py --editing_method BLUE \\
        --hparams_dir hparams/BLUE/smollm2-135m.yaml \\
        --data_dir counterfact --data_type CF \\
        --ds_size 20 --batch_size 10 --sequential_edit \\
        --easyedit_root /path/to/EasyEdit --output_dir benchmarks/results

Data (``--data_dir`` is a JSON file, a folder holding one of the usual file names, or a dataset name
of :mod:`blue_plugin.datafiles`, ``counterfact`` / ``zsre``; without it ``CF`` and ``ZsRE`` use
those datasets, found via ``$BLUE_PLUGIN_DATA`` or the cache, else downloaded; see docs/data.md):

* ``CF`` / ``MCF``: EasyEdit's CounterFact (``counterfact-edit.json``, read with EasyEdit's
  ``CounterFactDataset``) or the ROME/MEMIT schema (``counterfact.json``,
  ``multi_counterfact.json``, ``rome_format_*.json``: ``requested_rewrite`` ...);
* ``ZsRE``: MEND/EasyEdit zsRE (``zsre_mend_eval*.json``). EasyEdit's ``ZsreDataset`` drops the
  ``subject`` that locate-then-edit methods need, so the file is read directly, as EasyEdit's own
  ``examples/run_AlphaEdit_editing.py`` does. A record's ``portability`` field (``New Question`` /
  ``New Answer``) is passed as ``portability_inputs["one_hop"]``, as ``examples/run_zsre_llama2.py`` does;
* ``counterfact`` / ``recent`` / ``zsre`` / ``wikibio`` (lower case, also spelt ``--datatype``): the
  KnowEdit datasets, read as EasyEdit's ``examples/run_knowedit_llama2.py`` reads them, with its
  portability (``Subject_Aliasing``, ``reasoning``, ``Logical_Generalization``) and locality
  (``Relation_Specificity``, ``Forgetfulness``) inputs; see :mod:`blue_plugin.evaluation.knowedit`.

``--batch_size 1`` runs ``editor.edit`` (one request at a time), larger batches run
``editor.batch_edit``; ``--sequential_edit`` keeps the edits, otherwise EasyEdit restores the
weights after each request / batch. The metrics are EasyEdit's (``compute_edit_quality``; its
``summary_metrics`` is printed, then a table of rewrite, rephrase, locality and portability
accuracy per phase, each averaged per case first as EasyEdit's KnowEdit example does).
``--eval_final`` additionally re-evaluates every case on the final model after all edits (the
paper's sequential-editing protocol).

Writes ``<output_dir>/<model>_BLUE-<base>_<blue|orig>_N=<n>_B=<b>_seq=<bool>.json`` with the
arguments, the hyperparameters, EasyEdit's per-case metrics, their summary per key (``summary``) and
the table (``table``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402  (this import and those below: after the sys.path line above)
import torch  # noqa: E402

from blue_plugin.datafiles import get_spec, resolve_data  # noqa: E402
from blue_plugin.evaluation.data import detect_format, records_to_cases  # noqa: E402
from blue_plugin.evaluation.knowedit import (  # noqa: E402
    KNOWEDIT_TYPES,
    editor_inputs,
    format_table,
    knowedit_cases,
    looks_like_knowedit,
    summary_by_key as summarize,
    summary_table,
)
from blue_plugin.hparams import BLUEHyperParams  # noqa: E402
from blue_plugin.integrations.easyedit import register_with_easyedit, with_model  # noqa: E402
from blue_plugin.model.loading import EMBEDDED_MODEL_NAMES, load_model  # noqa: E402

logger = logging.getLogger("run_blue_editing")

DEFAULT_FILES = {
    "CF": ("counterfact-edit.json", "counterfact.json", "counterfact/counterfact-edit.json"),
    "MCF": ("multi_counterfact.json", "counterfact/multi_counterfact.json"),
    "ZsRE": ("zsre_mend_eval.json", "zsre_mend_eval_portability_gpt4.json", "zsre/zsre_mend_eval_portability_gpt4.json"),
    # KnowEdit (EasyEdit's examples/KnowEdit.md file layout)
    "counterfact": ("test_cf.json", "wiki_counterfact/test_cf.json"),
    "recent": ("recent_test.json", "wiki_recent/recent_test.json"),
    "zsre": ("ZsRE-test-all.json", "ZsRE/ZsRE-test-all.json"),
    "wikibio": ("wikibio-test-all.json", "WikiBio/wikibio-test-all.json"),
}
ACCEPTED_FORMATS = {"CF": ("counterfact", "counterfact_rome"), "MCF": ("counterfact", "counterfact_rome"), "ZsRE": ("zsre",)}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
#: --data_type -> the blue_plugin.datafiles dataset used when --data_dir is not given
DEFAULT_DATASETS = {"CF": "counterfact", "ZsRE": "zsre"}


def resolve_data_file(data_dir: str | os.PathLike | None, data_type: str) -> Path:
    """``data_dir`` itself when it is a file, else the first usual file name for ``data_type`` in it;
    a dataset name, or None (the default dataset of ``data_type``), goes through
    :func:`blue_plugin.datafiles.resolve_data`."""
    if data_dir is None:
        if data_type not in DEFAULT_DATASETS:
            raise ValueError(f"--data_type {data_type} has no default dataset; pass --data_dir")
        return resolve_data(DEFAULT_DATASETS[data_type])
    path = Path(data_dir)
    if not path.exists() and get_spec(str(data_dir)) is not None:
        return resolve_data(str(data_dir))
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"--data_dir {str(path)!r} does not exist; give a JSON file or a folder containing one.")
    for name in DEFAULT_FILES[data_type]:
        if (path / name).is_file():
            return path / name
    raise ValueError(
        f"--data_dir {str(path)!r} holds none of {list(DEFAULT_FILES[data_type])} for --data_type {data_type}; "
        "pass the JSON file itself."
    )


def load_edit_data(path: Path, data_type: str, ds_size: Optional[int]) -> dict[str, Any]:
    """Read ``path`` into the keyword arguments of ``BaseEditor.edit`` / ``batch_edit``.

    Returns a dict with ``prompts, target_new, ground_truth, subject, rephrase_prompts,
    locality_inputs, portability_inputs`` (one entry per case; the last None where the data has no
    portability) and ``format`` / ``case_ids`` for the record.
    """
    with open(path, encoding="utf-8") as fh:
        records = json.load(fh)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of records.")
    if ds_size is not None and ds_size <= 0:
        raise ValueError(f"--ds_size must be positive, got {ds_size}.")
    knowedit = looks_like_knowedit(records[0])
    if (data_type in KNOWEDIT_TYPES) != knowedit:
        raise ValueError(f"{path} {'is' if knowedit else 'is not'} KnowEdit data but --data_type is {data_type}: use "
                         f"{'one of ' + ', '.join(KNOWEDIT_TYPES) if knowedit else 'CF, MCF or ZsRE'}.")
    if data_type in KNOWEDIT_TYPES:
        return {**editor_inputs(knowedit_cases(records, data_type, ds_size)), "format": f"knowedit_{data_type}"}
    fmt = detect_format(records)
    if fmt not in ACCEPTED_FORMATS[data_type]:
        raise ValueError(f"{path} is in the {fmt!r} format, which does not fit --data_type {data_type} (expects {ACCEPTED_FORMATS[data_type]}).")
    if ds_size is not None:
        records = records[:ds_size]

    if fmt == "counterfact":
        # EasyEdit's own loader for its CounterFact format.
        from easyeditor import CounterFactDataset  # type: ignore

        records = list(CounterFactDataset(str(path), size=len(records)))
        def one(v: Any) -> Any:
            return v[0] if isinstance(v, list) else v
        data = {
            "prompts": [r["prompt"] for r in records],
            "target_new": [r["target_new"] for r in records],
            "ground_truth": [r["ground_truth"] for r in records],
            "subject": [r["subject"] for r in records],
            "rephrase_prompts": [one(r["rephrase_prompt"]) for r in records],
            "locality_inputs": {
                "neighborhood": {
                    "prompt": [r["locality_prompt"] for r in records],
                    "ground_truth": [r["locality_ground_truth"] for r in records],
                }
            },
            "portability_inputs": None,
            "case_ids": [r.get("case_id", i) for i, r in enumerate(records)],
        }
    else:  # ROME CounterFact: all neighbourhood prompts of a case answered by target_true; zsRE: 'loc'
        data = editor_inputs(records_to_cases(records, fmt)[1])
    data["format"] = fmt
    return data


# ------------------------------------------------------------------------------------------------
# Editing
# ------------------------------------------------------------------------------------------------
def build_hparams(args: argparse.Namespace):
    """BLUEHyperParams from ``--hparams_dir`` with the command-line overrides applied."""
    hp = BLUEHyperParams.from_hparams(args.hparams_dir)
    changes: dict[str, Any] = {}
    if args.base_method is not None:
        changes["base_method"] = args.base_method
    if args.blue is not None:
        changes["blue"] = args.blue == "on"
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.device is not None:
        changes["device"] = args.device
    if args.mom2_dataset is not None:
        changes["mom2_dataset"] = args.mom2_dataset
    return hp.replace(**changes) if changes else hp


def make_editor(hp, load_with: str = "auto"):
    """``BaseEditor`` for ``hp``. Models that EasyEdit cannot load by name (the embedded SmolLM2,
    or ``--load_with blue``) are loaded with :func:`blue_plugin.model.loading.load_model` and passed as
    ``(model, tok)``."""
    from easyeditor import BaseEditor  # type: ignore

    name = str(hp.model_name)
    embedded = name.lower() in {n.lower() for n in EMBEDDED_MODEL_NAMES}
    if load_with == "blue" or (load_with == "auto" and embedded):
        model, tok = load_model(name)
        if isinstance(hp.device, int) or (isinstance(hp.device, str) and hp.device.startswith("cuda")):
            if torch.cuda.is_available():
                model.to(f"cuda:{hp.device}" if isinstance(hp.device, int) else hp.device)
            else:
                logger.warning("device %r requested but CUDA is not available; editing on the CPU", hp.device)
        return BaseEditor.from_hparams(with_model(hp, model, tok, name=Path(name).name))
    return BaseEditor.from_hparams(hp)


def run_edits(editor, data: dict[str, Any], hp, sequential_edit: bool, test_generation: bool = False) -> list[dict]:
    """EasyEdit's ``edit`` (batch size 1) or ``batch_edit``; returns its per-case metrics."""
    kwargs = dict(
        prompts=data["prompts"],
        target_new=data["target_new"],
        ground_truth=data["ground_truth"],
        subject=data["subject"],
        rephrase_prompts=data["rephrase_prompts"],
        locality_inputs=json.loads(json.dumps(data["locality_inputs"])),  # EasyEdit mutates them
        portability_inputs=json.loads(json.dumps(data["portability_inputs"])),
        sequential_edit=sequential_edit,
        test_generation=test_generation,
    )
    if hp.batch_size == 1:
        metrics, _, _ = editor.edit(**kwargs)
    else:
        metrics, _, _ = editor.batch_edit(**kwargs)
    return metrics


def evaluate_final(editor, metrics: list[dict]) -> list[dict]:
    """Re-evaluate every request on the editor's current (final) model with EasyEdit's evaluator."""
    from easyeditor.editors.editor import finalize_locality_metrics  # type: ignore
    from easyeditor.evaluate import compute_edit_quality  # type: ignore

    out = []
    for m in metrics:
        request = m["requested_rewrite"]
        entry = {"pre": m["pre"], "post": compute_edit_quality(editor.model, editor.model_name, editor.hparams, editor.tok, request, editor.hparams.device)}
        finalize_locality_metrics(entry, request, editor.hparams, editor.model_name)
        out.append(entry)
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editing_method", default="BLUE", choices=["BLUE"], help="Only BLUE (use --base_method / --blue off for the originals).")
    p.add_argument("--hparams_dir", required=True, help="BLUE YAML file, e.g. hparams/BLUE/llama3-8b.yaml.")
    p.add_argument("--data_dir", default=None,
                   help="Dataset JSON file, a folder containing one, or a dataset name (counterfact, zsre); "
                        "default: the --data_type's dataset (see the module docstring).")
    p.add_argument("--data_type", "--datatype", required=True, choices=["CF", "MCF", "ZsRE", *KNOWEDIT_TYPES],
                   help="CF / MCF / ZsRE, or a KnowEdit dataset as EasyEdit's run_knowedit_llama2.py names it.")
    p.add_argument("--ds_size", type=int, default=None, help="Use the first N cases (default: all).")
    p.add_argument("--batch_size", type=int, default=None, help="Edits per batch (overrides the YAML); 1 = editor.edit.")
    p.add_argument("--sequential_edit", action="store_true", help="Keep edits (no restore between requests/batches).")
    p.add_argument("--base_method", default=None, choices=["MEMIT", "RECT", "PRUNE", "AlphaEdit"], help="Override the YAML's base_method.")
    p.add_argument("--blue", default=None, choices=["on", "off"], help="Override the YAML's blue (off = the original method).")
    p.add_argument("--device", default=None, help="Override the YAML's device ('cpu', or a CUDA index).")
    p.add_argument("--mom2_dataset", default=None, help="Override the corpus for the key statistics.")
    p.add_argument("--load_with", default="auto", choices=["auto", "easyedit", "blue"],
                   help="Who loads the model: EasyEdit by model_name, or blue_plugin.model.loading.load_model "
                        "(passed to BaseEditor as (model, tok)); auto = blue for the embedded SmolLM2.")
    p.add_argument("--test_generation", action="store_true", help="Also EasyEdit's fluency (n-gram entropy; slow).")
    p.add_argument("--eval_final", action="store_true", help="Re-evaluate all cases on the final model after all edits.")
    p.add_argument("--output_dir", default="./outputs")
    p.add_argument("--easyedit_root", default=None, help="EasyEdit checkout (default: $EASYEDIT_ROOT or an importable easyeditor).")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size <= 0:
        p.error("--batch_size must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to the output JSON."""
    args = parse_args(argv)
    report = register_with_easyedit(verbose=False, root=args.easyedit_root)
    from easyeditor import summary_metrics  # type: ignore

    hp = build_hparams(args)
    data_file = resolve_data_file(args.data_dir, args.data_type)
    data = load_edit_data(data_file, args.data_type, args.ds_size)
    editor = make_editor(hp, args.load_with)

    t0 = time.perf_counter()
    metrics = run_edits(editor, data, hp, args.sequential_edit, args.test_generation)
    elapsed = time.perf_counter() - t0
    for m, cid in zip(metrics, data["case_ids"]):
        m["dataset_case_id"] = cid
    print("EasyEdit summary_metrics:")
    summary_metrics(metrics)

    result: dict[str, Any] = {
        "args": vars(args),
        "data_file": str(data_file),
        "data_format": data["format"],
        "n_cases": len(metrics),
        "hparams": {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)},
        "easyedit": report,
        "edit_and_eval_seconds": elapsed,
        "summary": summarize(metrics),
        "table": summary_table(metrics),
        "metrics": metrics,
    }
    print(format_table(result["table"]))
    if args.eval_final:
        final = evaluate_final(editor, metrics)
        result["final_summary"] = summarize(final)
        result["final_table"] = summary_table(final)
        result["final_metrics"] = final
        print("Final model (all edits applied):", result["final_summary"])
        print(format_table(result["final_table"]))

    os.makedirs(args.output_dir, exist_ok=True)
    model_tag = Path(str(hp.model_name)).name
    mode = "blue" if hp.blue else "orig"
    out = Path(args.output_dir) / (
        f"{model_tag}_BLUE-{hp.base_method}_{mode}_N={len(metrics)}_B={hp.batch_size}_seq={args.sequential_edit}.json"
    )
    result = _jsonable(result)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(f"Summary: {json.dumps(result['summary'])}")
    print(f"See results at: {out}")
    result["output_file"] = str(out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
