"""Per-case scores of a model on the benchmark's cases, and their summaries.

Metrics (:mod:`blue_plugin.evaluation.metrics`, DESIGN.md section 4), mean and 95% bootstrap interval:
CounterFact -- efficacy, generalization, specificity (NLL comparisons), fluency (weighted bi/tri-gram
entropy of greedy generations from the generation prompts), consistency (n/a: no reference
snippets); zsRE -- efficacy, generalization (token accuracy under teacher forcing) and specificity
(agreement with the unedited model's predictions).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from blue_plugin.evaluation import metrics
from blue_plugin.evaluation.metrics import zsre_locality_predictions

from benchmarks.sequential.config import CF_FORMATS


def evaluate_cases(
    model,
    tok,
    fmt: str,
    cases: Sequence[Any],
    pre_locality: Optional[Sequence[Any]] = None,
    fluency_tokens: int = 100,
    batch_size: int = 32,
    gen_batch_size: int = 16,
    chat_template: bool = False,
) -> list[dict[str, Any]]:
    """Per-case scores of ``cases`` on the current ``model``.

    Args:
        fmt: dataset format from :func:`blue_plugin.evaluation.data.load_cases`.
        pre_locality: zsRE only: :func:`blue_plugin.evaluation.metrics.zsre_locality_predictions` of the
            unedited model on the same cases.
        fluency_tokens: CounterFact only: new tokens per greedy generation; 0 skips fluency.
        chat_template: score prompts wrapped in the tokenizer's chat template (``use_chat_template``).

    Returns:
        one dict per case with every metric of :data:`blue_plugin.evaluation.metrics.METRICS` (None where
        not applicable) plus the raw values the metric functions return.
    """
    if fmt in CF_FORMATS:
        scores = metrics.counterfact_case_scores(model, tok, cases, batch_size, chat_template=chat_template)
        if fluency_tokens > 0:
            flu = metrics.case_fluency(model, tok, cases, fluency_tokens, gen_batch_size, chat_template=chat_template)
        else:
            flu = [None] * len(cases)
        for s, f in zip(scores, flu):
            s["fluency"] = f
    elif fmt == "zsre":
        if pre_locality is None:
            raise ValueError("zsRE evaluation needs the unedited model's locality predictions (pre_locality)")
        scores = metrics.zsre_case_scores(model, tok, cases, pre_locality, batch_size, chat_template=chat_template)
    else:
        raise ValueError(f"no evaluation for dataset format {fmt!r}; expected one of {CF_FORMATS + ('zsre',)}")
    for s in scores:
        for key in metrics.METRICS:
            s.setdefault(key, None)
    return scores


def summarize(scores: Sequence[dict], seed: int) -> dict[str, dict[str, Any]]:
    """Mean and 95% bootstrap interval per metric (:func:`blue_plugin.evaluation.metrics.summarize`)."""
    return metrics.summarize(scores, seed=seed)


def pre_locality(model, tok, fmt: str, cases: Sequence[Any], batch_size: int, chat_template: bool = False) -> Optional[list]:
    """zsRE: the unedited model's locality predictions (specificity compares against them); else None."""
    if fmt != "zsre":
        return None
    return zsre_locality_predictions(model, tok, cases, batch_size, chat_template=chat_template)
