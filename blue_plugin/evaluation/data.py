"""Loading knowledge-editing datasets into one record type, :class:`EditCase`.

Four on-disk formats are recognised from the keys of their records (see :func:`detect_format`):

``"counterfact"``
    EasyEdit's CounterFact (``counterfact-edit.json``): ``case_id, prompt, subject, target_new,
    ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``. ``prompt`` already
    contains the subject. The rephrase / locality fields may be strings or lists of strings.
``"counterfact_rome"``
    The ROME/MEMIT CounterFact schema: ``requested_rewrite{prompt, subject, target_new{str},
    target_true{str}, relation_id}``, ``paraphrase_prompts``, ``neighborhood_prompts``,
    ``generation_prompts`` (and ``attribute_prompts``). ``prompt`` is a template whose ``{}`` is
    filled with the subject; the true answer of every neighbourhood prompt is ``target_true``.
``"counterfact_templates"``
    ``counterfact-templates-1k.json``: ``prompt`` is a ``{}`` template, ``fact_knowledge`` is the
    true object, ``edited_knowledge`` the new one, ``rephrased_prompt``, ``locality_prompt``,
    ``locality_ground_truth``.
``"zsre"``
    MEND/EasyEdit zsRE: ``subject, src, alt, answers, rephrase, loc, loc_ans`` (the edit is
    ``src -> alt``; ``answers[0]`` is the ground truth). Records have no id, so the case id is the
    record's index in the file.

Where a format has no generation prompts (everything but ``counterfact_rome``) the edit prompt
itself is the one generation prompt, as in EasyEdit's fluency evaluation.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

FORMATS = ("counterfact", "counterfact_rome", "counterfact_templates", "zsre")

#: 20 counterfactual facts written for this project (EasyEdit CounterFact format, each with a
#: paraphrase and a neighbourhood prompt): the data-free main job and tests use them.
BUILTIN_FACTS = Path(__file__).resolve().parents[1] / "resources" / "counterfacts.json"

_ZSRE_KEYS = {"src", "alt", "answers", "rephrase", "loc", "loc_ans"}
_TEMPLATES_KEYS = {"prompt", "subject", "fact_knowledge", "edited_knowledge"}
_COUNTERFACT_KEYS = {"prompt", "subject", "target_new", "ground_truth"}


@dataclass
class EditCase:
    """One edit request plus the prompts used to evaluate it.

    Attributes:
        case_id: the dataset's id (int, or str where the file uses strings); zsRE: file index.
        prompt: the full edit prompt; ``subject`` occurs in it verbatim.
        subject: the edited subject.
        target_new: the new object o*.
        ground_truth: the true object (None where the dataset has none).
        rephrase_prompts: paraphrases of ``prompt`` (generalization).
        locality_prompts: unrelated / neighbourhood prompts (specificity).
        locality_answers: the true answer of each locality prompt (same length).
        generation_prompts: prompts for free generation (fluency).
        extra: any further fields of the record (relation id, portability, ...).
    """

    case_id: int | str
    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality_prompts: list[str] = field(default_factory=list)
    locality_answers: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"case {self.case_id!r}: {name} must be a non-empty string, got {value!r}")
        if self.subject not in self.prompt:
            raise ValueError(
                f"case {self.case_id!r}: subject {self.subject!r} does not occur in prompt {self.prompt!r}; "
                "fix the record so that the prompt contains the subject verbatim"
            )
        if self.ground_truth is not None and not isinstance(self.ground_truth, str):
            raise ValueError(f"case {self.case_id!r}: ground_truth must be a string or None, got {self.ground_truth!r}")
        for name in ("rephrase_prompts", "locality_prompts", "locality_answers", "generation_prompts"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"case {self.case_id!r}: {name} must be a list of strings, got {value!r}")
        if len(self.locality_prompts) != len(self.locality_answers):
            raise ValueError(
                f"case {self.case_id!r}: {len(self.locality_prompts)} locality prompts but "
                f"{len(self.locality_answers)} locality answers; give one answer per prompt"
            )

    def to_request(self) -> dict[str, Any]:
        """The edit request in the engine's (EasyEdit's) format.

        Returns:
            ``{"prompt", "subject", "target_new", "ground_truth", "case_id"}``.
        """
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "ground_truth": self.ground_truth,
            "case_id": self.case_id,
        }


def detect_format(records: list[dict]) -> str:
    """Name the dataset format of ``records`` (one of :data:`FORMATS`) from the keys of the first one.

    Raises:
        ValueError: empty input, a record that is not a JSON object, or keys of no known format
            (the message lists the keys seen).
    """
    if not isinstance(records, list) or not records:
        raise ValueError("expected a non-empty JSON list of records")
    first = records[0]
    if not isinstance(first, dict):
        raise ValueError(f"expected each record to be a JSON object, got {type(first).__name__}")
    keys = set(first)
    if "requested_rewrite" in keys:
        return "counterfact_rome"
    if _ZSRE_KEYS <= keys:
        return "zsre"
    if _TEMPLATES_KEYS <= keys:
        return "counterfact_templates"
    if _COUNTERFACT_KEYS <= keys:
        return "counterfact"
    raise ValueError(
        f"unknown dataset format; the first record has keys {sorted(keys)}. Expected EasyEdit CounterFact "
        f"({sorted(_COUNTERFACT_KEYS)} ...), ROME CounterFact ('requested_rewrite', ...), "
        f"CounterFact templates ({sorted(_TEMPLATES_KEYS)} ...) or zsRE ({sorted(_ZSRE_KEYS)})"
    )


def _get(record: dict, key: str, case_id: Any) -> Any:
    if key not in record:
        raise ValueError(f"case {case_id!r}: record has no {key!r} key (keys: {sorted(record)})")
    return record[key]


def _str_list(value: Any, key: str, case_id: Any) -> list[str]:
    """A string or a list of strings -> list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"case {case_id!r}: {key!r} must be a string or a list of strings, got {value!r}")


def _fill(template: Any, subject: str, case_id: Any) -> str:
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(f"case {case_id!r}: prompt template {template!r} must be a string containing '{{}}'")
    return template.replace("{}", subject)


def _locality_pairs(prompts: Any, answers: Any, case_id: Any) -> tuple[list[str], list[str]]:
    p = _str_list(prompts, "locality_prompt", case_id)
    a = _str_list(answers, "locality_ground_truth", case_id)
    if len(p) == 1 and len(a) > 1:  # one prompt with several acceptable answers: keep the first
        a = a[:1]
    return p, a


@dataclass(frozen=True)
class _FlatLayout:
    """Key names of a flat CounterFact layout (EasyEdit's edit file, or its template variant)."""

    target_new: str
    ground_truth: str
    rephrase: str
    template: bool  # the prompt holds '{}' for the subject (else the subject is in the prompt)


_COUNTERFACT = _FlatLayout("target_new", "ground_truth", "rephrase_prompt", template=False)
_COUNTERFACT_TEMPLATES = _FlatLayout("edited_knowledge", "fact_knowledge", "rephrased_prompt", template=True)


def _parse_flat(r: dict, index: int, keys: _FlatLayout) -> EditCase:
    cid = r.get("case_id", index)
    subject = _get(r, "subject", cid)
    prompt = _get(r, "prompt", cid)
    if keys.template:
        prompt = _fill(prompt, subject, cid)
    loc_p, loc_a = _locality_pairs(r.get("locality_prompt"), r.get("locality_ground_truth"), cid)
    known = {"case_id", "prompt", "subject", keys.target_new, keys.ground_truth, keys.rephrase,
             "locality_prompt", "locality_ground_truth"}
    return EditCase(
        case_id=cid,
        prompt=prompt,
        subject=subject,
        target_new=_get(r, keys.target_new, cid),
        ground_truth=_get(r, keys.ground_truth, cid),
        rephrase_prompts=_str_list(r.get(keys.rephrase), keys.rephrase, cid),
        locality_prompts=loc_p,
        locality_answers=loc_a,
        generation_prompts=[prompt],
        extra={k: v for k, v in r.items() if k not in known},
    )


def _parse_counterfact_rome(r: dict, index: int) -> EditCase:
    cid = r.get("case_id", index)
    rw = _get(r, "requested_rewrite", cid)
    if not isinstance(rw, dict):
        raise ValueError(f"case {cid!r}: 'requested_rewrite' must be an object, got {rw!r}")
    subject = _get(rw, "subject", cid)
    prompt = _fill(_get(rw, "prompt", cid), subject, cid)

    def obj(key: str) -> str:
        value = _get(rw, key, cid)
        if isinstance(value, dict):
            return _get(value, "str", cid)
        return value

    target_true = obj("target_true")
    neighbours = _str_list(r.get("neighborhood_prompts"), "neighborhood_prompts", cid)
    gen = _str_list(r.get("generation_prompts"), "generation_prompts", cid) or [prompt]
    extra = {k: v for k, v in r.items() if k not in {"case_id", "requested_rewrite", "paraphrase_prompts",
                                                      "neighborhood_prompts", "generation_prompts"}}
    if "relation_id" in rw:
        extra["relation_id"] = rw["relation_id"]
    return EditCase(
        case_id=cid,
        prompt=prompt,
        subject=subject,
        target_new=obj("target_new"),
        ground_truth=target_true,
        rephrase_prompts=_str_list(r.get("paraphrase_prompts"), "paraphrase_prompts", cid),
        locality_prompts=neighbours,
        locality_answers=[target_true] * len(neighbours),
        generation_prompts=gen,
        extra=extra,
    )


def _parse_zsre(r: dict, index: int) -> EditCase:
    cid = r.get("case_id", index)
    prompt = _get(r, "src", cid)
    answers = _str_list(_get(r, "answers", cid), "answers", cid)
    loc_p = _str_list(_get(r, "loc", cid), "loc", cid)
    loc_a = _str_list(_get(r, "loc_ans", cid), "loc_ans", cid)
    known = {"case_id", "src", "subject", "alt", "answers", "rephrase", "loc", "loc_ans"}
    return EditCase(
        case_id=cid,
        prompt=prompt,
        subject=_get(r, "subject", cid),
        target_new=_get(r, "alt", cid),
        ground_truth=answers[0] if answers else None,
        rephrase_prompts=_str_list(r.get("rephrase"), "rephrase", cid),
        locality_prompts=loc_p,
        locality_answers=loc_a,
        generation_prompts=[prompt],
        extra={k: v for k, v in r.items() if k not in known} | {"answers": answers},
    )


_PARSERS: dict[str, Callable[[dict, int], EditCase]] = {
    "counterfact": lambda r, i: _parse_flat(r, i, _COUNTERFACT),
    "counterfact_rome": _parse_counterfact_rome,
    "counterfact_templates": lambda r, i: _parse_flat(r, i, _COUNTERFACT_TEMPLATES),
    "zsre": _parse_zsre,
}


def records_to_cases(records: list[dict], fmt: str | None = None) -> tuple[str, list[EditCase]]:
    """Convert already-loaded records; ``fmt`` None -> :func:`detect_format`.

    Returns:
        (format name, one :class:`EditCase` per record, in order).
    """
    fmt = fmt or detect_format(records)
    if fmt not in _PARSERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    cases = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {i} is a {type(record).__name__}, expected a JSON object")
        cases.append(_PARSERS[fmt](record, i))
    return fmt, cases


def load_cases(path: str | Path, n: int | None = None) -> tuple[str, list[EditCase]]:
    """Read a dataset file and return its format and its first ``n`` cases (all when None), in file order.

    Raises:
        ValueError: missing file, invalid JSON, not a list of records, unknown format,
            ``n`` < 1 or larger than the file, or an invalid record (the message names the case).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file {str(path)!r} does not exist; pass the path to a JSON dataset")
    try:
        with path.open(encoding="utf-8") as fh:
            records = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"{str(path)!r} must hold a JSON list of records, got {type(records).__name__}")
    fmt = detect_format(records)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer or None, got {n!r}")
        if n > len(records):
            raise ValueError(f"n={n} but {str(path)!r} holds only {len(records)} records; lower n")
        records = records[:n]
    fmt, cases = records_to_cases(records, fmt)
    logger.info("loaded %d %s cases from %s", len(cases), fmt, path)
    return fmt, cases
