"""What the analyses CLI runs: the names of the analyses, argument parsing helpers, the
hyperparameters and the requests the engine accepts."""
from __future__ import annotations

import logging
from typing import Any, Sequence

from blue_plugin.editing.requests import prepare_requests
from blue_plugin.hparams import BLUEHyperParams

from benchmarks.common import DEFAULT_HPARAMS, parse_overrides, resolve_repo_path

logger = logging.getLogger("benchmarks.analysis")

ANALYSES = ("contribution", "cosine", "single_layer", "steps", "deviation", "tracing", "dynamic")
DEFAULT_WHAT = ANALYSES[:-1]
RESULTS_FILE = "analysis.json"
SCHEMA_VERSION = 1


def parse_what(spec: str) -> list[str]:
    """``"cosine,steps"`` / ``"all"`` -> analysis names in canonical order."""
    items = [s.strip().lower().replace("-", "_") for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--what needs at least one of {', '.join(ANALYSES)} (or 'all')")
    if "all" in items:
        return list(ANALYSES)
    unknown = [s for s in items if s not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {unknown}; choose from {', '.join(ANALYSES)} or 'all'")
    return [a for a in ANALYSES if a in items]


def parse_int_list(spec: str, name: str) -> list[int]:
    """``"1,2,5"`` or a range ``"0-8"`` -> a list of ints."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"{name}: expected integers such as '1,2,5' or '0-8', got {spec!r}") from None
    if not out:
        raise ValueError(f"{name}: give at least one integer, got {spec!r}")
    return out


def build_hparams(args) -> Any:
    hp = BLUEHyperParams.from_hparams(args.hparams or DEFAULT_HPARAMS)
    changes: dict[str, Any] = {"seed": args.seed, "mom2_dataset": resolve_repo_path(hp.mom2_dataset)}
    if args.steps is not None:
        changes["v_num_grad_steps"] = args.steps
    if args.mom2_n_samples is not None:
        changes["mom2_n_samples"] = args.mom2_n_samples
    if args.stats_dir is not None:
        changes["stats_dir"] = args.stats_dir
    changes.update(parse_overrides(args.set))
    return hp.replace(**changes)


def valid_requests(tok, hp, cases: Sequence[Any]) -> tuple[list[dict], list[Any]]:
    """The cases whose edit requests the engine accepts (others are logged and skipped)."""
    reqs, kept = [], []
    for c in cases:
        r = c.to_request()
        try:
            prepare_requests(tok, [r], hp)
        except ValueError as exc:
            logger.warning("skipping case %r: %s", c.case_id, exc)
            continue
        reqs.append(r)
        kept.append(c)
    return reqs, kept
