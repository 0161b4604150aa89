"""KnowEdit datasets, the evaluation inputs of EasyEdit's ``BaseEditor.edit``, and their summaries.

**KnowEdit** (EasyEdit's benchmark, ``examples/KnowEdit.md`` in an EasyEdit checkout) ships one JSON
list per dataset; ``data_type`` names the dataset as EasyEdit's ``examples/run_knowedit_llama2.py``
does (its ``--datatype``): ``counterfact`` (WikiData counterfact, ``test_cf.json``), ``recent``
(WikiData recent, ``recent_test.json``), ``zsre`` (``ZsRE-test-all.json``; not the MEND zsRE file)
and ``wikibio`` (``wikibio-test-all.json``). A record holds

* ``subject``, ``prompt``, ``target_new`` (WikiBio: ``concept``, ``text``, ``labels``), optionally
  ``ground_truth`` (a string or a list: the first answer is kept) and a paraphrase in
  ``rephrase_prompt`` or ``rephrase``;
* ``locality``: ``{"Relation_Specificity" | "Forgetfulness": [{"prompt", "ground_truth"}, ...]}``;
* ``portability``: ``{"Reasoning" | "Subject_Aliasing" | "Logical_Generalization": [...]}``, same shape.

Answers may be nested lists (several acceptable answers): the first string is used and pairs whose
answer is blank are dropped, as that script does. Its input keys are kept, so EasyEdit reports
``Subject_Aliasing_acc``, ``reasoning_acc``, ``Logical_Generalization_acc``,
``Relation_Specificity_acc`` and ``Forgetfulness_acc``; WikiBio has only ``Relation_Specificity``
locality and no portability. Two deliberate differences from the script: a category left with no
pair is omitted for that record (the script passes empty lists, whose mean is NaN), and the record's
paraphrase and ground truth are passed to ``BaseEditor`` too (the script passes neither; the ground
truth does not change any metric, the paraphrase adds ``rephrase_acc``).

**Inputs for ``BaseEditor.edit``** (:func:`editor_inputs`): from any :class:`EditCase` list, the keyword
arguments ``prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs,
portability_inputs`` in EasyEdit's format ``{key: {"prompt": [one per case], "ground_truth": [...]}}``
with ``None`` where a case has nothing for that key (EasyEdit then skips it). Locality of the other
formats is ``neighborhood``; the MEND zsRE file's ``portability`` field
(``{"New Question", "New Answer"}``) becomes ``one_hop``, as in EasyEdit's ``examples/run_zsre_llama2.py``.

**Summaries** of EasyEdit's per-case metrics: :func:`summary_by_key` (as EasyEdit's
``summary_metrics``: one mean per locality / portability key) and :func:`summary_table` (as the
KnowEdit script: per case the mean over its keys, then the mean over cases).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .data import EditCase

logger = logging.getLogger(__name__)

#: EasyEdit's ``--datatype`` choices for KnowEdit (examples/run_knowedit_llama2.py).
KNOWEDIT_TYPES = ("counterfact", "recent", "zsre", "wikibio")
#: record key -> the key EasyEdit's KnowEdit script passes (its metric is ``<key>_acc``).
PORTABILITY_KEYS = {"Subject_Aliasing": "Subject_Aliasing", "Reasoning": "reasoning",
                    "Logical_Generalization": "Logical_Generalization"}
LOCALITY_KEYS = ("Relation_Specificity", "Forgetfulness")
#: key of the MEND zsRE file's one portability question, and of the other formats' locality prompts.
ZSRE_PORTABILITY_KEY = "one_hop"
NEIGHBORHOOD_KEY = "neighborhood"
#: columns of :func:`summary_table`
TABLE_COLUMNS = ("rewrite_acc", "rephrase_acc", "locality", "portability")


def looks_like_knowedit(record: Any) -> bool:
    """True if ``record`` has KnowEdit's ``locality`` object or KnowEdit portability categories."""
    if not isinstance(record, dict):
        return False
    portability = record.get("portability")
    return isinstance(record.get("locality"), dict) or (
        isinstance(portability, dict) and bool(set(portability) & set(PORTABILITY_KEYS)))


def first_string(value: Any) -> Optional[str]:
    """The first string of a possibly nested list (a string itself); None for an empty list or None."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"expected a string or a (nested) list of strings, got {value!r}")


def probe_pairs(items: Any, where: str) -> Optional[dict[str, list[str]]]:
    """``[{"prompt", "ground_truth"}, ...]`` -> ``{"prompt": [...], "ground_truth": [...]}`` with the
    first answer of each pair, dropping pairs whose answer is blank; None when none is left."""
    if items is None:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{where}: expected a list of {{'prompt', 'ground_truth'}} objects, got {items!r}")
    prompts, answers = [], []
    for item in items:
        if "prompt" not in item or "ground_truth" not in item:
            raise ValueError(f"{where}: every entry needs 'prompt' and 'ground_truth', got keys {sorted(item)}")
        prompt, answer = first_string(item["prompt"]), first_string(item["ground_truth"])
        if answer is None or not answer.strip():
            continue
        if prompt is None or not prompt.strip():
            raise ValueError(f"{where}: blank prompt in {item!r}")
        prompts.append(prompt)
        answers.append(answer)
    return {"prompt": prompts, "ground_truth": answers} if prompts else None


def _section(record: dict, name: str, keys: dict[str, str], cid: Any) -> dict[str, dict[str, list[str]]]:
    raw = record.get(name) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"case {cid!r}: {name!r} must be an object of categories, got {raw!r}")
    out = {}
    for key, as_key in keys.items():
        pairs = probe_pairs(raw.get(key), f"case {cid!r} {name}.{key}")
        if pairs is not None:
            out[as_key] = pairs
    return out


def knowedit_case(record: dict, index: int, data_type: str) -> EditCase:
    """One KnowEdit record as an :class:`EditCase`; its EasyEdit inputs are in ``extra["locality_inputs"]``
    and ``extra["portability_inputs"]`` (``{key: {"prompt": [...], "ground_truth": [...]}}``), and
    ``locality_prompts`` / ``locality_answers`` hold all its locality pairs."""
    if data_type not in KNOWEDIT_TYPES:
        raise ValueError(f"unknown KnowEdit data type {data_type!r}; choose one of {KNOWEDIT_TYPES}")
    if not isinstance(record, dict):
        raise ValueError(f"record {index} is a {type(record).__name__}, expected a JSON object")
    cid = record.get("case_id", index)

    def field(*names: str) -> Any:
        for name in names:
            if name in record:
                return record[name]
        raise ValueError(f"case {cid!r}: record has none of {list(names)} (keys: {sorted(record)})")

    locality_keys = LOCALITY_KEYS[:1] if data_type == "wikibio" else LOCALITY_KEYS
    locality = _section(record, "locality", {k: k for k in locality_keys}, cid)
    portability = {} if data_type == "wikibio" else _section(record, "portability", PORTABILITY_KEYS, cid)
    rephrase = first_string(record.get("rephrase_prompt", record.get("rephrase")))
    used = {"case_id", "subject", "concept", "prompt", "text", "target_new", "labels", "ground_truth",
            "rephrase_prompt", "rephrase", "locality", "portability"}
    extra = {k: v for k, v in record.items() if k not in used}
    extra.update(locality_inputs=locality, portability_inputs=portability, knowedit_type=data_type)
    prompt = field("prompt", "text")
    return EditCase(
        case_id=cid,
        prompt=prompt,
        subject=field("subject", "concept"),
        target_new=first_string(field("target_new", "labels")),
        ground_truth=first_string(record.get("ground_truth")),
        rephrase_prompts=[rephrase] if rephrase else [],
        locality_prompts=[p for v in locality.values() for p in v["prompt"]],
        locality_answers=[a for v in locality.values() for a in v["ground_truth"]],
        generation_prompts=[prompt],
        extra=extra,
    )


def knowedit_cases(records: list, data_type: str, n: Optional[int] = None) -> list[EditCase]:
    """The first ``n`` (all when None) KnowEdit records as :class:`EditCase` records, in order."""
    if not isinstance(records, list) or not records:
        raise ValueError("expected a non-empty JSON list of KnowEdit records")
    if not looks_like_knowedit(records[0]):
        raise ValueError(
            f"the first record (keys {sorted(records[0]) if isinstance(records[0], dict) else records[0]!r}) has no "
            "KnowEdit 'locality' object or portability categories; is this KnowEdit data?")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer or None, got {n!r}")
        records = records[:n]
    return [knowedit_case(r, i, data_type) for i, r in enumerate(records)]


def load_knowedit(path: str | Path, data_type: str, n: Optional[int] = None) -> list[EditCase]:
    """Read a KnowEdit JSON file (see the module docstring) into :class:`EditCase` records."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"KnowEdit file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as fh:
        records = json.load(fh)
    cases = knowedit_cases(records, data_type, n)
    logger.info("loaded %d KnowEdit %s cases from %s", len(cases), data_type, path)
    return cases


def zsre_portability(case: EditCase) -> dict[str, dict[str, str]]:
    """The MEND zsRE file's ``portability`` field of ``case`` as ``{"one_hop": {"prompt", "ground_truth"}}``
    (strings, as EasyEdit's zsRE example passes them); empty when the case has none."""
    raw = case.extra.get("portability")
    if not isinstance(raw, dict) or "New Question" not in raw or "New Answer" not in raw:
        return {}
    question, answer = first_string(raw["New Question"]), first_string(raw["New Answer"])
    if not question or not answer or not answer.strip():  # no question, or a blank answer
        return {}
    return {ZSRE_PORTABILITY_KEY: {"prompt": question, "ground_truth": answer}}


def case_probes(case: EditCase) -> tuple[dict, dict]:
    """``(locality, portability)`` of one case in EasyEdit's per-request format ``{key: {"prompt",
    "ground_truth"}}``: KnowEdit's categories; else ``neighborhood`` (one prompt as a string, several as
    lists, each answered by its locality answer) and zsRE's ``one_hop``."""
    if "locality_inputs" in case.extra or "portability_inputs" in case.extra:
        return dict(case.extra.get("locality_inputs") or {}), dict(case.extra.get("portability_inputs") or {})
    locality = {}
    if case.locality_prompts:
        single = len(case.locality_prompts) == 1
        locality[NEIGHBORHOOD_KEY] = {
            "prompt": case.locality_prompts[0] if single else list(case.locality_prompts),
            "ground_truth": case.locality_answers[0] if single else list(case.locality_answers),
        }
    return locality, zsre_portability(case)


def _columns(per_case: list[dict]) -> Optional[dict[str, dict[str, list]]]:
    keys = list(dict.fromkeys(k for probes in per_case for k in probes))
    if not keys:
        return None
    return {key: {field: [probes[key][field] if key in probes else None for probes in per_case]
                  for field in ("prompt", "ground_truth")} for key in keys}


def editor_inputs(cases: list[EditCase]) -> dict[str, Any]:
    """Keyword arguments of ``BaseEditor.edit`` / ``batch_edit`` for ``cases``, plus ``case_ids``.

    ``rephrase_prompts`` holds each case's first paraphrase (None without one; the argument is None
    when no case has one); ``locality_inputs`` / ``portability_inputs`` are EasyEdit's
    ``{key: {"prompt": [...], "ground_truth": [...]}}`` with None for a case without that key, or None
    when no case has any. EasyEdit changes these dicts in place: pass copies.
    """
    if not cases:
        raise ValueError("no cases to edit")
    probes = [case_probes(c) for c in cases]
    rephrase = [c.rephrase_prompts[0] if c.rephrase_prompts else None for c in cases]
    return {
        "prompts": [c.prompt for c in cases],
        "target_new": [c.target_new for c in cases],
        "ground_truth": [c.ground_truth for c in cases],
        "subject": [c.subject for c in cases],
        "rephrase_prompts": rephrase if any(r is not None for r in rephrase) else None,
        "locality_inputs": _columns([p[0] for p in probes]),
        "portability_inputs": _columns([p[1] for p in probes]),
        "case_ids": [c.case_id for c in cases],
    }


def summary_by_key(metrics: list[dict]) -> dict[str, Any]:
    """Means per phase (``pre`` / ``post``) as EasyEdit's ``summary_metrics`` computes them:
    rewrite/rephrase accuracy over all cases' values; each locality/portability ``*_acc`` key averaged
    per case first, then over the cases that have it."""
    summary: dict[str, Any] = {}
    for phase in ("pre", "post"):
        block: dict[str, Any] = {}
        for key in ("rewrite_acc", "rephrase_acc"):
            values = [m[phase][key] for m in metrics if phase in m and key in m[phase]]
            if values:
                block[key] = float(np.mean(values))
        for section in ("locality", "portability"):
            per_key: dict[str, list[float]] = {}
            for m in metrics:
                for k, v in (m.get(phase, {}).get(section) or {}).items():
                    if k.endswith("acc"):
                        per_key.setdefault(k, []).append(float(np.mean(v)))
            if per_key:
                block[section] = {k: float(np.mean(v)) for k, v in per_key.items()}
        if block:
            summary[phase] = block
    return summary


def summary_table(metrics: list[dict]) -> dict[str, dict[str, float]]:
    """``{phase: {column: mean}}`` for :data:`TABLE_COLUMNS`, as EasyEdit's KnowEdit example sums up:
    per case the mean of its rewrite / rephrase accuracies; for locality and portability the mean over
    the case's ``*_acc`` keys of each key's mean; then the mean over the cases that have the column
    (missing columns are left out; EasyEdit computes no ``pre`` locality accuracy)."""
    table: dict[str, dict[str, float]] = {}
    for phase in ("pre", "post"):
        columns: dict[str, list[float]] = {c: [] for c in TABLE_COLUMNS}
        for m in metrics:
            block = m.get(phase) or {}
            for key in ("rewrite_acc", "rephrase_acc"):
                if key in block:
                    columns[key].append(float(np.mean(block[key])))
            for section in ("locality", "portability"):
                means = [float(np.mean(v)) for k, v in (block.get(section) or {}).items() if k.endswith("acc")]
                if means:
                    columns[section].append(float(np.mean(means)))
        row = {c: float(np.mean(v)) for c, v in columns.items() if v}
        if row:
            table[phase] = row
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """:func:`summary_table` as aligned text, one row per phase (``-`` where a column is missing)."""
    lines = ["phase " + " ".join(f"{c:>12}" for c in TABLE_COLUMNS)]
    for phase, row in table.items():
        lines.append(f"{phase:<5} " + " ".join(f"{row[c]:>12.4f}" if c in row else f"{'-':>12}" for c in TABLE_COLUMNS))
    return "\n".join(lines)
