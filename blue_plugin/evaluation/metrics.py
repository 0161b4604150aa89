"""Evaluation metrics of the BLUE paper (the ROME / MEMIT / AlphaEdit conventions).

Tokenisation convention (shared with the editing engine, see :func:`encode_prompt_target`): a prompt
is tokenised with the tokenizer's default special tokens (e.g. a BOS for Llama), an answer as
``" " + answer`` without special tokens, and the answer ids are appended to the prompt ids.
Teacher-forced scores read the logits at positions ``len(prompt)-1 .. len(prompt)+len(answer)-2``.

Instruct models (``chat_template=True``, keyword-only in every score; the evaluation side of the
hyperparameter ``use_chat_template``): every prompt -- rewrite, paraphrase, neighbourhood and
locality alike -- is put into the tokenizer's chat template as one user message with the generation
prompt (:func:`blue_plugin.model.prompts.format_prompt`), and the answer follows it as above. An
edit made with ``use_chat_template: true`` is measured with ``chat_template=True``. (EasyEdit's
``test_prediction_acc`` wraps the rewrite and paraphrase prompts but leaves locality prompts bare.)

CounterFact (per case, :func:`counterfact_case_scores`):
    * efficacy       = [NLL(o* | p) < NLL(o_true | p)], NLL = mean per-token negative log-likelihood
      (i.e. P(o*|p) > P(o_true|p) with per-token-normalised probabilities, as in ROME's code);
    * generalization = mean over paraphrase prompts of the same indicator;
    * specificity    = mean over neighbourhood prompts n of [NLL(true answer of n | n) < NLL(o* | n)];
    * fluency        = weighted bi/tri-gram entropy of greedy generations (:func:`ngram_entropy`);
    * consistency    = None (needs ROME's reference snippets about o*, which are not available).

zsRE (per case, :func:`zsre_case_scores`):
    * efficacy       = token-level top-1 accuracy of ``alt`` after ``src`` under teacher forcing;
    * generalization = same on the rephrase;
    * specificity    = fraction of ``loc_ans`` tokens (teacher-forced after ``loc``) where the edited
      model's argmax equals the unedited model's argmax (:func:`zsre_locality_predictions`).
      MEMIT's code instead compares with the ``loc_ans`` tokens themselves; that number is kept
      as ``locality_answer_accuracy`` for analysis.

Values are fractions in [0, 1] (entropy in bits); the paper's tables multiply everything by 100.
Fluency and generation live in :mod:`blue_plugin.evaluation.generation`, the bootstrap summary in
:mod:`blue_plugin.evaluation.summary`; both are re-exported here.
All model calls run under ``torch.no_grad()`` in eval mode (the previous mode is restored), on the
device of the model's parameters; results come back on the CPU.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

import torch

from .data import EditCase
from .generation import (  # noqa: F401  (fluency is part of the metrics' public face)
    NGRAM_ORDERS,
    NGRAM_WEIGHTS,
    case_fluency,
    check_batch_size,
    fluency_scores,
    generate_greedy,
    inference,
    ngram_entropy,
    word_tokens,
)
from .summary import METRICS, bootstrap_ci, mean_or_none, summarize  # noqa: F401
from ..model.devices import input_device
from ..model.prompts import format_prompt
from ..model.tokens import encode_target, pad_token_id

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS", "NGRAM_ORDERS", "NGRAM_WEIGHTS", "answer_argmax_tokens", "answer_nll", "answer_token_accuracy",
    "bootstrap_ci", "case_fluency", "counterfact_case_scores", "encode_prompt_target", "fluency_scores",
    "generate_greedy", "ngram_entropy", "summarize", "word_tokens", "zsre_case_scores", "zsre_locality_predictions",
]

# ----------------------------------------------------------------------------------------------
# tokenisation and batching helpers


def encode_prompt_target(tok: Any, prompt: str, target: str, *, chat_template: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (with default special tokens; with ``chat_template`` wrapped as the
    engine wraps it) and of the target as the engine encodes it
    (:func:`blue_plugin.model.tokens.encode_target`: ``" " + target.strip()``, no special tokens).

    The model is scored on ``prompt_ids + target_ids``; the editing engine uses the same split.

    Raises:
        ValueError: a non-string or empty prompt/target, or a prompt that tokenises to nothing
            (no position would predict the first answer token).
    """
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise ValueError(f"prompt and target must be strings, got {type(prompt).__name__} / {type(target).__name__}")
    if not target.strip():
        raise ValueError(f"empty answer for prompt {prompt!r}; every answer needs at least one token")
    prompt_ids = list(tok(format_prompt(tok, prompt, chat_template))["input_ids"])
    target_ids = list(encode_target(tok, target))
    if not prompt_ids:
        raise ValueError(
            f"prompt {prompt!r} tokenises to no tokens and the tokenizer adds no BOS; give a non-empty prompt"
        )
    if not target_ids:
        raise ValueError(f"answer {target!r} tokenises to no tokens")
    return prompt_ids, target_ids


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _check_pairs(prompts: Sequence[str], answers: Sequence[str], batch_size: int) -> None:
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
    check_batch_size(batch_size)


def _teacher_forced(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32,
    chat_template: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Score each answer after its prompt in one teacher-forced pass.

    Sequences are sorted by length, right-padded (so absolute positions match the unpadded run)
    and run ``batch_size`` at a time; only the logits from the first answer position on are kept.

    Returns:
        per pair ``(logprobs [a], argmax [a], target_ids [a])`` on the CPU, ``a`` = answer tokens;
        ``logprobs[j] = log p(target_ids[j] | prompt, target_ids[:j])`` (float32) and ``argmax[j]``
        the model's top-1 token at that position.
    """
    _check_pairs(prompts, answers, batch_size)
    encoded = [encode_prompt_target(tok, p, a, chat_template=chat_template) for p, a in zip(prompts, answers)]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    results: list[Any] = [None] * len(encoded)
    device = input_device(model)
    pad = pad_token_id(tok)
    keep_ok = _accepts_logits_to_keep(model)
    with inference(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [encoded[i] for i in idx]
            width = max(len(p) + len(t) for p, t in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (p, t) in enumerate(rows):
                seq = p + t
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            first = min(len(p) for p, _ in rows) - 1  # first position whose logits are needed
            kwargs: dict[str, Any] = {"use_cache": False}
            offset = 0
            if keep_ok:
                kwargs["logits_to_keep"] = width - first
                offset = first
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
            n_ans = max(len(t) for _, t in rows)
            pos = torch.zeros((len(rows), n_ans), dtype=torch.long)
            tgt = torch.zeros((len(rows), n_ans), dtype=torch.long)
            for r, (p, t) in enumerate(rows):
                pos[r, : len(t)] = torch.arange(len(p) - 1, len(p) - 1 + len(t)) - offset
                tgt[r, : len(t)] = torch.tensor(t)
            pos, tgt = pos.to(logits.device), tgt.to(logits.device)
            picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.size(-1))).float()  # [B, A, V]
            logprobs = picked.log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu()  # [B, A]
            argmax = picked.argmax(-1).cpu()  # [B, A]
            for r, i in enumerate(idx):
                a = len(rows[r][1])
                results[i] = (logprobs[r, :a].clone(), argmax[r, :a].clone(), torch.tensor(rows[r][1]))
    return results


# ----------------------------------------------------------------------------------------------
# teacher-forced answer scores


def answer_nll(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32,
    *, chat_template: bool = False,
) -> torch.Tensor:
    """Mean per-token negative log-likelihood of each answer after its prompt.

    Returns:
        float32 tensor ``[n]`` on the CPU (natural log).
    """
    res = _teacher_forced(model, tok, prompts, answers, batch_size, chat_template)
    return torch.tensor([float(-lp.mean()) for lp, _, _ in res], dtype=torch.float32)


def answer_token_accuracy(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32,
    *, chat_template: bool = False,
) -> torch.Tensor:
    """Token-level top-1 accuracy of each answer under teacher forcing (zsRE efficacy).

    Returns:
        float32 tensor ``[n]``: fraction of answer tokens that are the model's argmax.
    """
    res = _teacher_forced(model, tok, prompts, answers, batch_size, chat_template)
    return torch.tensor([float((am == t).float().mean()) for _, am, t in res], dtype=torch.float32)


def answer_argmax_tokens(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32,
    *, chat_template: bool = False,
) -> list[list[int]]:
    """The model's top-1 token at each answer position under teacher forcing.

    Returns:
        ``n`` lists, each as long as its answer's token ids.
    """
    return [am.tolist() for _, am, _ in _teacher_forced(model, tok, prompts, answers, batch_size, chat_template)]


# ----------------------------------------------------------------------------------------------
# CounterFact


def counterfact_case_scores(
    model: torch.nn.Module, tok: Any, cases: Sequence[EditCase], batch_size: int = 32, *, chat_template: bool = False
) -> list[dict[str, Any]]:
    """Efficacy, generalization and specificity of each CounterFact case (see the module docstring).

    All (prompt, answer) pairs of all cases are scored together, identical pairs once.

    Returns:
        one dict per case: ``case_id``, ``efficacy`` (0/1), ``generalization`` and ``specificity``
        (means of 0/1 indicators, None when the case has no such prompts), ``consistency`` (None),
        and the raw NLLs ``rewrite_nll_new``/``rewrite_nll_true`` (floats),
        ``paraphrase_nll_new``/``paraphrase_nll_true``, ``neighborhood_nll_new``/
        ``neighborhood_nll_true`` (lists; "true" = each neighbourhood prompt's own answer).
    """
    index: dict[tuple[str, str], int] = {}

    def slot(prompt: str, answer: str) -> int:
        return index.setdefault((prompt, answer), len(index))

    plan = []
    for case in cases:
        if case.ground_truth is None:
            raise ValueError(f"case {case.case_id!r} has no ground_truth; CounterFact scores compare o* with it")
        rewrite = (slot(case.prompt, case.target_new), slot(case.prompt, case.ground_truth))
        para = [(slot(p, case.target_new), slot(p, case.ground_truth)) for p in case.rephrase_prompts]
        neigh = [(slot(p, case.target_new), slot(p, a)) for p, a in zip(case.locality_prompts, case.locality_answers)]
        plan.append((rewrite, para, neigh))
    pairs = list(index)
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    nll = answer_nll(model, tok, prompts, answers, batch_size, chat_template=chat_template).tolist() if pairs else []

    out = []
    for case, (rewrite, para, neigh) in zip(cases, plan):
        para_new, para_true = [nll[i] for i, _ in para], [nll[j] for _, j in para]
        nb_new, nb_true = [nll[i] for i, _ in neigh], [nll[j] for _, j in neigh]
        out.append({
            "case_id": case.case_id,
            "efficacy": float(nll[rewrite[0]] < nll[rewrite[1]]),
            "generalization": mean_or_none([float(n < t) for n, t in zip(para_new, para_true)]),
            "specificity": mean_or_none([float(t < n) for n, t in zip(nb_new, nb_true)]),
            "consistency": None,
            "rewrite_nll_new": nll[rewrite[0]],
            "rewrite_nll_true": nll[rewrite[1]],
            "paraphrase_nll_new": para_new,
            "paraphrase_nll_true": para_true,
            "neighborhood_nll_new": nb_new,
            "neighborhood_nll_true": nb_true,
        })
    return out


# ----------------------------------------------------------------------------------------------
# zsRE


def zsre_locality_predictions(
    model: torch.nn.Module, tok: Any, cases: Sequence[EditCase], batch_size: int = 32, *, chat_template: bool = False
) -> list[list[list[int]]]:
    """Argmax tokens of the (unedited) model over each ``loc_ans`` after its ``loc`` prompt.

    Call once on the unedited model, with the ``chat_template`` the edited model is scored with;
    pass the result to :func:`zsre_case_scores`.

    Returns:
        per case, per locality prompt, the list of argmax token ids (one per answer token).
    """
    prompts = [p for c in cases for p in c.locality_prompts]
    answers = [a for c in cases for a in c.locality_answers]
    flat = answer_argmax_tokens(model, tok, prompts, answers, batch_size, chat_template=chat_template) if prompts else []
    out, k = [], 0
    for c in cases:
        out.append(flat[k : k + len(c.locality_prompts)])
        k += len(c.locality_prompts)
    return out


def zsre_case_scores(
    model: torch.nn.Module,
    tok: Any,
    cases: Sequence[EditCase],
    pre_locality_predictions: Sequence[Sequence[Sequence[int]]],
    batch_size: int = 32,
    *,
    chat_template: bool = False,
) -> list[dict[str, Any]]:
    """Efficacy, generalization and specificity of each zsRE case (see the module docstring).

    Args:
        pre_locality_predictions: :func:`zsre_locality_predictions` of the unedited model on the
            same cases with the same tokenizer.

    Returns:
        one dict per case: ``case_id``, ``efficacy`` (token accuracy of ``target_new`` after
        ``prompt``), ``generalization`` (mean token accuracy over rephrases, None if none),
        ``specificity`` (fraction of all locality answer tokens whose argmax is unchanged, None if
        none), ``consistency`` (None), ``fluency`` (None) and ``locality_answer_accuracy``
        (token accuracy against ``loc_ans`` itself, MEMIT's variant).
    """
    if len(pre_locality_predictions) != len(cases):
        raise ValueError(
            f"pre_locality_predictions has {len(pre_locality_predictions)} entries for {len(cases)} cases; "
            "compute it with zsre_locality_predictions on the unedited model and the same cases"
        )
    prompts: list[str] = []
    answers: list[str] = []
    plan = []
    for case in cases:
        start = len(prompts)
        prompts += [case.prompt] + case.rephrase_prompts + case.locality_prompts
        answers += [case.target_new] * (1 + len(case.rephrase_prompts)) + case.locality_answers
        plan.append(start)
    res = _teacher_forced(model, tok, prompts, answers, batch_size, chat_template) if prompts else []

    def acc(r: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
        return float((r[1] == r[2]).float().mean())

    out = []
    for case, start, pre in zip(cases, plan, pre_locality_predictions):
        n_re, n_loc = len(case.rephrase_prompts), len(case.locality_prompts)
        loc_res = res[start + 1 + n_re : start + 1 + n_re + n_loc]
        if len(pre) != n_loc or any(len(p) != len(r[1]) for p, r in zip(pre, loc_res)):
            raise ValueError(
                f"case {case.case_id!r}: pre_locality_predictions do not match its locality answers "
                "(other cases or another tokenizer?); recompute them with zsre_locality_predictions"
            )
        same = sum(int((r[1] == torch.tensor(list(p), dtype=torch.long)).sum()) for p, r in zip(pre, loc_res))
        total = sum(len(r[1]) for r in loc_res)
        out.append({
            "case_id": case.case_id,
            "efficacy": acc(res[start]),
            "generalization": mean_or_none([acc(r) for r in res[start + 1 : start + 1 + n_re]]),
            "specificity": same / total if total else None,
            "fluency": None,
            "consistency": None,
            "locality_answer_accuracy": mean_or_none([acc(r) for r in loc_res]),
        })
    return out
