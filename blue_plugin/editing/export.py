"""Edits as portable artifacts: a standard PEFT LoRA adapter folder, or a plain Hugging Face model.

An edit changes a few weight matrices, ``W_edited = W_orig + Delta``. :func:`write_adapter` writes
each ``Delta`` as an exact low-rank factorisation ``Delta = B @ A`` (singular value decomposition
in float64; ``A = sqrt(S) V^T``, ``B = U sqrt(S)``) in the files PEFT's ``PeftModel.from_pretrained``
reads, so a colleague reproduces the edits with ``transformers`` + ``peft`` alone:

* ``adapter_config.json``: ``peft_type: LORA``, the edited modules by their full names, one rank
  per module (``rank_pattern``) and ``lora_alpha`` equal to it (``alpha_pattern``), so PEFT's
  scaling ``alpha / r`` is 1; ``fan_in_fan_out`` for GPT-2 ``Conv1D`` modules;
* ``adapter_model.safetensors``: ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r) per module, in
  float32 (PEFT computes the adapter in float32 for half-precision models too);
* ``blue_plugin_export.json``: what was exported (ranks, relative reconstruction errors, the
  session's edit count and hyperparameters); the same JSON sits in the safetensors header's
  metadata under ``blue_plugin``. PEFT ignores both.

Without ``rank`` each module keeps its numerical rank (singular values above
``max(d_out, d_in) * eps * s_max``, eps of float32), so the reconstruction is exact to float
rounding; with ``rank`` the factors are truncated and the relative Frobenius error is reported.

:func:`write_model` saves the edited model and its tokenizer with ``save_pretrained``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import safetensors.torch
import torch

from ..errors import BLUEConfigError
from ..model.layout import ModelLayout, as_out_in, is_transposed

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_INFO = "blue_plugin_export.json"
#: Prefix PEFT gives the base model's module names in an adapter's state dict.
PEFT_PREFIX = "base_model.model."


@dataclass
class Factors:
    """``B @ A`` approximates one module's weight change (d_out, d_in), linear orientation."""

    module: str
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    numerical_rank: int
    relative_error: float
    fan_in_fan_out: bool

    def summary(self) -> dict[str, Any]:
        return {"rank": self.rank, "numerical_rank": self.numerical_rank, "relative_error": self.relative_error}


def factorise(module_name: str, module: torch.nn.Module, delta_stored: torch.Tensor,
              rank: Optional[int] = None) -> Factors:
    """Factorise one module's weight change (given in the module's stored orientation)."""
    delta = as_out_in(module, delta_stored).to(torch.float64)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    s_max = float(S[0]) if S.numel() else 0.0
    tol = max(delta.shape) * torch.finfo(torch.float32).eps * s_max
    numerical = int((S > tol).sum()) if s_max > 0 else 0
    r = numerical if rank is None else min(int(rank), S.numel())
    r = max(r, 1)  # PEFT needs r >= 1; a zero change gives zero factors
    root = S[:r].sqrt()
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root[None, :]
    norm = float(torch.linalg.norm(delta))
    err = float(torch.linalg.norm(delta - B @ A)) / norm if norm > 0 else 0.0
    return Factors(module_name, A.to(torch.float32).contiguous(), B.to(torch.float32).contiguous(), r, numerical,
                   err, is_transposed(module))


def collect_factors(model, layout: ModelLayout, layers: list[int], originals: dict[str, torch.Tensor],
                    rank: Optional[int] = None) -> list[Factors]:
    """Factors of ``weight - originals[name]`` for the rewrite module of every layer in ``layers``."""
    params = dict(model.named_parameters())
    factors = []
    for layer in layers:
        name = layout.weight_name(layer)
        if name not in originals:
            raise BLUEConfigError(
                f"the original value of {name} is unknown (the session adopted edits made before it); start the "
                "session on the unedited model, or load a saved session onto a freshly loaded model, to export"
            )
        delta = params[name].detach().to("cpu", torch.float64) - originals[name].to(torch.float64)
        module = model.get_submodule(layout.rewrite(layer))
        f = factorise(layout.rewrite(layer), module, delta, rank)
        log = logger.warning if rank is not None and f.relative_error > 1e-6 else logger.info
        log("%s: rank %d of %d, relative reconstruction error %.3g", f.module, f.rank, f.numerical_rank, f.relative_error)
        factors.append(f)
    return factors


def _pattern(name: str) -> str:
    # PEFT matches rank/alpha pattern keys as regular expressions anchored at the module name's end
    return "".join("\\" + c if c in ".^$*+?{}[]|()\\" else c for c in name)


def adapter_config(factors: list[Factors], base_model: str) -> dict[str, Any]:
    """The ``adapter_config.json`` content for ``factors``."""
    fan = {f.fan_in_fan_out for f in factors}
    if len(fan) > 1:
        raise BLUEConfigError("cannot export Linear and Conv1D modules into one adapter")
    r0 = factors[0].rank
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": {_pattern(f.module): f.rank for f in factors},
        "alpha_pattern": {_pattern(f.module): f.rank for f in factors},
        "target_modules": [f.module for f in factors],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan.pop(),
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise BLUEConfigError(f"{str(out)!r} exists and is not a folder; choose another output path")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_adapter(path: str | os.PathLike, factors: list[Factors], base_model: str, info: dict[str, Any]) -> Path:
    """Write the adapter folder atomically (a temporary sibling folder renamed into place)."""
    if not factors:
        raise BLUEConfigError("nothing to export: the session has no edited weights yet")
    out = Path(os.path.expanduser(os.fspath(path)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {}
        for f in factors:
            tensors[f"{PEFT_PREFIX}{f.module}.lora_A.weight"] = f.A
            tensors[f"{PEFT_PREFIX}{f.module}.lora_B.weight"] = f.B
        text = json.dumps(info, indent=1, sort_keys=True)
        safetensors.torch.save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "blue_plugin": text})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(factors, base_model), indent=1), encoding="utf-8")
        (tmp / EXPORT_INFO).write_text(text, encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote a LoRA adapter of %d module(s) to %s", len(factors), out)
    return out


def write_model(model, tok, path: str | os.PathLike, info: dict[str, Any]) -> Path:
    """``save_pretrained`` the model and tokenizer into ``path`` (atomically, as above)."""
    out = Path(os.path.expanduser(os.fspath(path)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote the edited model to %s", out)
    return out
