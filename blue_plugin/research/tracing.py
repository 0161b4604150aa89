"""Causal tracing (the ROME / MEMIT recipe) to locate the layers that store facts.

For a prompt p with subject s and the model's answer token o (by default its top-1 prediction on
the clean prompt):

1. clean run: ``P_clean = P(o | p)``; the outputs of every traced module at the subject's last
   token are recorded;
2. corrupted runs: Gaussian noise ``N(0, (noise_scale * sigma)^2)`` is added to the input
   embeddings of every subject token (``sigma``: the standard deviation of the input embeddings
   of the subjects' tokens, :func:`embedding_noise_std`; ``noise_scale`` = 3 as in ROME), with
   ``samples`` independent draws; ``P_corrupt`` is the mean of ``P(o | corrupted p)`` over draws;
3. restored runs: same noise, and the output of the traced module of layer l (``kind``: ``"mlp"``,
   ``"attn"`` or ``"hidden"`` = the whole block) at the subject's last token is set back to its
   clean value (with ``window > 1``: the layers ``l - window//2 .. l - window//2 + window - 1``
   inside the model, as ROME's windowed MLP traces). ``P_l`` is the mean over draws.

The indirect effect of layer l is ``IE_l = P_l - P_corrupt``; the average indirect effect (AIE) is
its mean over prompts. The noise of draw k for request j is
``torch.randn(samples, n_subject_tokens, d_model, generator=torch.Generator().manual_seed(seed + j))
* noise_scale * sigma`` (made on the CPU in float32, so runs are reproducible across devices).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch

from ..model.layout import find_module, resolve_layout
from ..hparams import BLUEHyperParams
from ..editing.requests import EditRequest, encode_prompt, prepare_requests
from ..model.devices import input_device

logger = logging.getLogger(__name__)

TRACE_KINDS = {"mlp": "mlp_module_tmp", "attn": "attn_module_tmp", "hidden": "layer_module_tmp"}
ANSWERS = ("predicted", "true", "new")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new):
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


def subject_span(tok, req: EditRequest) -> tuple[list[int], int, int]:
    """Token ids of the bare prompt and the positions of the subject's first and last token."""
    ids, last = encode_prompt(tok, "", req, "subject_last")
    _, first = encode_prompt(tok, "", req, "subject_first")
    return ids, first, last


@torch.no_grad()
def embedding_noise_std(model, tok, reqs: Sequence[EditRequest]) -> float:
    """Standard deviation of the input-embedding entries of all subject tokens of ``reqs`` (ROME's
    ``collect_embedding_std``)."""
    emb = model.get_input_embeddings()
    vecs = []
    for r in reqs:
        ids, first, last = subject_span(tok, r)
        vecs.append(emb(torch.tensor(ids[first:last + 1], device=emb.weight.device)).float().reshape(-1))
    return float(torch.cat(vecs).std())


@contextmanager
def _hooks(model, noise_rows: Optional[torch.Tensor], noise_span: tuple[int, int], modules: dict[str, Any], pos: int,
           clean: dict[str, torch.Tensor], restore_rows: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add ``noise_rows`` (rows, n_subj, d) to the embeddings at ``noise_span``; set the output of
    module ``name`` at ``pos`` to ``clean[name]`` for the rows in ``restore_rows[name]``."""
    handles = []

    def noise_hook(module, args, output):
        a, b = noise_span
        out = output.clone()
        out[:, a:b + 1] = out[:, a:b + 1] + noise_rows.to(out.device, out.dtype)
        return out

    def restore_hook(name):
        def hook(module, args, output):
            hidden = _first(output)
            rows = restore_rows[name].to(hidden.device)
            new = hidden.clone()
            new[rows, pos] = clean[name].to(hidden.device, hidden.dtype)
            return _replace_first(output, new)
        return hook

    try:
        if noise_rows is not None:
            handles.append(model.get_input_embeddings().register_forward_hook(noise_hook))
        for name, rows in restore_rows.items():
            if len(rows):
                handles.append(modules[name].register_forward_hook(restore_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def window_of(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers restored together when tracing ``layer`` (centred window, clipped to the model)."""
    start = layer - window // 2
    return [l for l in range(start, start + window) if 0 <= l < n_layers]


@torch.no_grad()
def trace_request(
    model, tok, req: EditRequest, module_names: Sequence[str], *, answer_id: Optional[int] = None, samples: int = 10,
    noise: float = 0.1, window: int = 1, seed: int = 0, max_rows: int = 128,
) -> dict[str, Any]:
    """Trace one request: ``module_names[l]`` is the traced module of layer l; ``noise`` is the
    absolute noise standard deviation. Returns ``{"answer_id", "p_clean", "p_corrupt",
    "p_restored": [n_layers], "indirect_effect": [n_layers]}``."""
    device = input_device(model)
    ids, first, last = subject_span(tok, req)
    modules = {name: find_module(model, name) for name in module_names}
    n_layers = len(module_names)
    x = torch.tensor([ids], device=device)

    clean: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(lambda m, a, o, name=name: clean.__setitem__(name, _first(o)[0, last].detach().clone())))
    try:
        logits = model(input_ids=x, use_cache=False).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    probs = logits.softmax(-1)
    if answer_id is None:
        answer_id = int(probs.argmax())
    p_clean = float(probs[answer_id])

    d = model.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    base_noise = torch.randn(samples, last - first + 1, d, generator=g) * noise

    def run(n_copies: int, restore_rows: dict[str, torch.Tensor]) -> torch.Tensor:
        noise_rows = base_noise.repeat(n_copies, 1, 1)
        with _hooks(model, noise_rows, (first, last), modules, last, clean, restore_rows):
            out = model(input_ids=x.expand(n_copies * samples, -1), use_cache=False).logits[:, -1].float()
        return out.softmax(-1)[:, answer_id].double().view(n_copies, samples).mean(dim=1)

    p_corrupt = float(run(1, {})[0])
    per_chunk = max(1, max_rows // samples)
    p_restored: list[float] = []
    for start in range(0, n_layers, per_chunk):
        traced = list(range(start, min(n_layers, start + per_chunk)))
        restore_rows: dict[str, list[int]] = {name: [] for name in module_names}
        for c, l in enumerate(traced):
            for w in window_of(l, window, n_layers):
                restore_rows[module_names[w]] += range(c * samples, (c + 1) * samples)
        rows_t = {name: torch.tensor(r, dtype=torch.long) for name, r in restore_rows.items()}
        p_restored += run(len(traced), rows_t).tolist()
    return {
        "answer_id": answer_id, "p_clean": p_clean, "p_corrupt": p_corrupt, "p_restored": p_restored,
        "indirect_effect": [p - p_corrupt for p in p_restored],
    }


def causal_trace(
    model, tok, hparams: Any, requests: Sequence[dict], *, kind: str = "mlp", window: int = 1, samples: int = 10,
    noise_scale: float = 3.0, noise_std: Optional[float] = None, seed: int = 0, answer: str = "predicted",
) -> dict[str, Any]:
    """Average indirect effect of restoring ``kind`` outputs at the subject's last token, per layer.

    ``answer``: ``"predicted"`` (the clean run's top-1 token, as ROME), ``"true"`` (first token of
    the request's ``ground_truth``) or ``"new"`` (first token of ``target_new``). Requests are
    validated like edit requests (``prompt``, ``subject``, ``target_new``). ``noise_std``
    overrides ``sigma`` (see the module docstring).

    Returns ``{"kind", "window", "samples", "noise_scale", "sigma", "noise", "layers",
    "indirect_effect": [n_layers] (AIE), "per_request": [[n_layers]], "p_clean": [n],
    "p_corrupt": [n], "answers": [token strings], "known": [bool or None],
    "suggested_layers": {k: layers} for k in 1..5}``.
    """
    if kind not in TRACE_KINDS:
        raise ValueError(f"kind must be one of {tuple(TRACE_KINDS)}, got {kind!r}.")
    if answer not in ANSWERS:
        raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}.")
    for name, value, low in (("window", window, 1), ("samples", samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale!r}.")
    hp = BLUEHyperParams.coerce(hparams)
    layout = resolve_layout(model, hp)
    names = [layout.templates[TRACE_KINDS[kind]].format(l) for l in range(layout.n_layers)]
    reqs = prepare_requests(tok, requests, hp)
    sigma = float(noise_std) if noise_std is not None else embedding_noise_std(model, tok, reqs)
    noise = noise_scale * sigma
    out: dict[str, Any] = {"kind": kind, "window": window, "samples": samples, "noise_scale": noise_scale,
                           "sigma": sigma, "noise": noise, "answer": answer, "layers": list(range(layout.n_layers)),
                           "per_request": [], "p_clean": [], "p_corrupt": [], "answers": [], "known": []}
    was_training = model.training
    model.eval()
    try:
        for j, r in enumerate(reqs):
            answer_id = None
            if answer != "predicted":
                text = r.ground_truth if answer == "true" else r.target_new
                if not text:
                    raise ValueError(f"request {j} has no ground_truth; use answer='predicted' or 'new'.")
                answer_id = tok(" " + text.strip(), add_special_tokens=False)["input_ids"][0]
            res = trace_request(model, tok, r, names, answer_id=answer_id, samples=samples, noise=noise,
                                window=window, seed=seed + j)
            out["per_request"].append(res["indirect_effect"])
            out["p_clean"].append(res["p_clean"])
            out["p_corrupt"].append(res["p_corrupt"])
            out["answers"].append(tok.decode([res["answer_id"]]))
            if r.ground_truth:
                gt_first = tok(" " + r.ground_truth.strip(), add_special_tokens=False)["input_ids"][0]
                out["known"].append(res["answer_id"] == gt_first)
            else:
                out["known"].append(None)
            logger.info("traced %d/%d: %r -> %r (p_clean %.3f, p_corrupt %.3f)", j + 1, len(reqs), r.prompt,
                        out["answers"][-1], res["p_clean"], res["p_corrupt"])
    finally:
        model.train(was_training)
    n = len(reqs)
    out["indirect_effect"] = [sum(row[l] for row in out["per_request"]) / n for l in range(layout.n_layers)]
    out["suggested_layers"] = {k: suggest_critical_layers(out["indirect_effect"], k) for k in range(1, min(5, layout.n_layers) + 1)}
    return out


def suggest_critical_layers(effect: Sequence[float], n: int = 5) -> list[int]:
    """The ``n`` consecutive layers with the largest summed effect (ties: the earliest)."""
    effect = [float(e) for e in effect]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(effect):
        raise ValueError(f"n must be an integer between 1 and {len(effect)}, got {n!r}.")
    sums = [sum(effect[s:s + n]) for s in range(len(effect) - n + 1)]
    best = max(range(len(sums)), key=lambda s: (sums[s], -s))
    return list(range(best, best + n))
