"""Edit requests: validation, tokenisation and the position of the edited token.

A request is a dict with ``prompt`` (the full prompt with the subject inside, or a template with
``{}`` for the subject), ``subject``, ``target_new`` (a string, or ROME's ``{"str": ...}``),
optional ``ground_truth`` and ``case_id``. All checks run before the model is touched.

With ``use_chat_template`` a request carries ``chat_template=True`` and every prompt built from it
(context prefix + prompt, and the KL prompt) is wrapped as one user message of the tokenizer's chat
template (:func:`blue_plugin.model.prompts.chat_span`); the subject's tokens are found inside the
wrapped text and the target follows the generation prompt. ``max_length`` counts the prompt without
the template's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import BLUERequestError
from ..hparams import BLUEHyperParams
from ..model.prompts import chat_span
from ..model.tokens import encode_target


@dataclass
class EditRequest:
    """A validated request. ``before`` + subject + ``after`` is the full prompt; ``chat_template``:
    its prompts are wrapped in the tokenizer's chat template (``use_chat_template``)."""

    index: int
    before: str
    subject: str
    after: str
    target_new: str
    target_ids: list[int]
    ground_truth: str | None = None
    case_id: Any = None
    raw: dict = field(default_factory=dict, repr=False)
    chat_template: bool = False

    @property
    def prompt(self) -> str:
        return self.before + self.subject + self.after


@dataclass
class Row:
    """One tokenised sequence. ``lookup`` is the edited token's position. Rows that carry a
    target hold ``ids = prompt + targets[:-1]`` and ``target_start = len(prompt)``: the logits at
    positions ``target_start - 1 + j`` predict ``targets[j]``."""

    ids: list[int]
    lookup: int
    request: int
    target_start: int | None = None
    targets: list[int] | None = None


def _text(value: Any, key: str, index: int, case_id: Any) -> str:
    if isinstance(value, dict) and "str" in value:  # ROME format {"str": ..., "id": ...}
        value = value["str"]
    if not isinstance(value, str):
        raise BLUERequestError(f"request {index} (case_id={case_id!r}): {key!r} must be a string, got {type(value).__name__}.")
    return value


def prepare_requests(tok, requests: Sequence[dict], hparams: BLUEHyperParams) -> list[EditRequest]:
    """Validate and normalise requests; raise :class:`BLUERequestError` naming what to fix."""
    if isinstance(requests, dict):
        requests = [requests]
    if not isinstance(requests, (list, tuple)) or len(requests) == 0:
        raise BLUERequestError("requests must be a non-empty list of dicts with prompt, subject and target_new.")
    out: list[EditRequest] = []
    for i, req in enumerate(requests):
        if not isinstance(req, dict):
            raise BLUERequestError(f"request {i} must be a dict, got {type(req).__name__}.")
        case_id = req.get("case_id")
        for key in ("prompt", "target_new"):
            if key not in req:
                raise BLUERequestError(f"request {i} (case_id={case_id!r}) has no {key!r}; every request needs prompt, subject and target_new.")
        prompt = _text(req["prompt"], "prompt", i, case_id)
        target = _text(req["target_new"], "target_new", i, case_id)
        if not prompt.strip():
            raise BLUERequestError(f"request {i} (case_id={case_id!r}): 'prompt' is empty.")
        if not target.strip():
            raise BLUERequestError(f"request {i} (case_id={case_id!r}): 'target_new' is empty or only whitespace.")
        subject = req.get("subject")
        if subject is None:
            if hparams.fact_token != "last":
                raise BLUERequestError(
                    f"request {i} (case_id={case_id!r}) has no 'subject'; it is needed for fact_token={hparams.fact_token!r}."
                )
            subject = ""
        subject = _text(subject, "subject", i, case_id)
        if hparams.fact_token != "last" and not subject.strip():
            raise BLUERequestError(f"request {i} (case_id={case_id!r}): 'subject' is empty.")
        if "{}" in prompt:
            before, after = prompt.split("{}", 1)
            if "{}" in after:
                raise BLUERequestError(f"request {i} (case_id={case_id!r}): the prompt template has more than one '{{}}'.")
        else:
            pos = prompt.find(subject) if subject else len(prompt)
            if pos < 0:
                raise BLUERequestError(
                    f"request {i} (case_id={case_id!r}): subject {subject!r} does not occur in prompt {prompt!r}; "
                    "give the subject exactly as written in the prompt, or use '{}' in the prompt for it."
                )
            before, after = prompt[:pos], prompt[pos + len(subject):]
        gt = req.get("ground_truth")
        if isinstance(gt, dict) and "str" in gt:
            gt = gt["str"]
        target_ids = encode_target(tok, target)
        request = EditRequest(i, before, subject, after, target, target_ids, gt, case_id, dict(req),
                              chat_template=hparams.use_chat_template)
        n_prompt = len(tok(request.prompt)["input_ids"])
        if n_prompt + len(target_ids) > hparams.max_length:
            raise BLUERequestError(
                f"request {i} (case_id={case_id!r}): prompt ({n_prompt} tokens) plus target ({len(target_ids)} tokens) "
                f"exceeds max_length={hparams.max_length}; shorten them or raise max_length."
            )
        # Tokenising here also checks that the subject has clean token boundaries (and, with the
        # chat template, that the template has one and keeps the prompt as it is).
        encode_prompt(tok, "", request, hparams.fact_token)
        out.append(request)
    return out


def encode_prompt(tok, prefix: str, request: EditRequest, fact_token: str) -> tuple[list[int], int]:
    """Token ids of ``prefix + prompt`` (with ``request.chat_template``: that text as the user
    message of the chat template, so that the prefix is part of the message, as in EasyEdit) and the
    position of the edited token."""
    text = prefix + request.prompt
    s_start = len(prefix) + len(request.before)
    if request.chat_template:
        text, offset = chat_span(tok, text)
        s_start += offset
    s_end = s_start + len(request.subject)
    enc = tok(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = [(k, a, b) for k, (a, b) in enumerate(offsets) if b > a]
    if fact_token == "last":
        return ids, len(ids) - 1
    inside = [k for k, a, b in spans if a < s_end and b > s_start]
    if not inside:
        raise BLUERequestError(f"request {request.index} (case_id={request.case_id!r}): subject {request.subject!r} maps to no token.")
    last, first = inside[-1], inside[0]
    if offsets[last][1] != s_end and _cuts_a_word(text, s_end):
        # A token that only runs on into punctuation (")?" after "... (APA-56)") is still the
        # subject's last token, as in EasyEdit, which tokenises prompt-up-to-subject alone.
        raise BLUERequestError(
            f"request {request.index} (case_id={request.case_id!r}): subject {request.subject!r} does not end on a token "
            f"boundary inside the prompt (its last token {text[offsets[last][0]:offsets[last][1]]!r} runs on); "
            "give the whole word as the subject."
        )
    return ids, (last if fact_token == "subject_last" else first)


def _cuts_a_word(text: str, pos: int) -> bool:
    """Whether position ``pos`` of ``text`` falls inside a word (letters or digits on both sides)."""
    return 0 < pos < len(text) and text[pos - 1].isalnum() and text[pos].isalnum()


def target_rows(tok, requests: Sequence[EditRequest], prefixes: Sequence[str], fact_token: str) -> list[Row]:
    """Rows for the target optimisation: for each request, every context prefix + prompt +
    target[:-1] (one row each), then one KL row ``"{subject} is a"``."""
    rows: list[Row] = []
    for j, req in enumerate(requests):
        for prefix in prefixes:
            ids, lookup = encode_prompt(tok, prefix, req, fact_token)
            rows.append(Row(ids + req.target_ids[:-1], lookup, j, target_start=len(ids), targets=req.target_ids))
    for j, req in enumerate(requests):
        kl = EditRequest(req.index, "", req.subject, " is a", req.target_new, req.target_ids, case_id=req.case_id,
                         chat_template=req.chat_template)
        ids, lookup = encode_prompt(tok, "", kl, fact_token if fact_token != "last" else "subject_last")
        rows.append(Row(ids, lookup, j))
    return rows


def key_rows(tok, requests: Sequence[EditRequest], prefixes: Sequence[str], fact_token: str) -> list[Row]:
    """Rows for keys and current outputs: every context prefix + prompt, for each request
    (request-major, in the order of ``prefixes``, whose groups weight the keys: see
    :func:`blue_plugin.editing.keys.group_mean`). The first prefix must be the empty one (its row gives the
    current output h)."""
    rows = []
    for j, req in enumerate(requests):
        for prefix in prefixes:
            ids, lookup = encode_prompt(tok, prefix, req, fact_token)
            rows.append(Row(ids, lookup, j))
    return rows


def pad_rows(rows: Sequence[Row], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (right padding keeps positions intact)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        mask[k, : len(r.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def position_limit(model) -> int | None:
    """How many positions the model was built for (``config.n_positions`` /
    ``max_position_embeddings`` / ``n_ctx``), or None when its config does not say."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_rows_fit(tok, requests: Sequence[EditRequest], prefixes: Sequence[str], fact_token: str, limit: int | None) -> None:
    """Raise :class:`BLUERequestError` when a target row (context prefix + prompt + target) is
    longer than ``limit`` positions (see :func:`position_limit`); models with learned position
    embeddings (GPT-2) would otherwise fail with an IndexError in the middle of the batch."""
    if limit is None:
        return
    for req in requests:
        for prefix in prefixes:
            ids, _ = encode_prompt(tok, prefix, req, fact_token)
            n = len(ids) + len(req.target_ids) - 1
            if n > limit:
                raise BLUERequestError(
                    f"request {req.index} (case_id={req.case_id!r}): with context prefix {prefix!r} the prompt and "
                    f"target take {n} tokens, more than the {limit} positions of the model; shorten the prompt or "
                    "target (and keep max_length below the model's positions) or use shorter "
                    "context_template_length_params."
                )
