"""Model layout: module templates per architecture and orientation-safe weight access.

An edited weight is always handled as a matrix ``W`` of shape ``(d_out, d_in)`` (keys live in
``d_in``, residuals in ``d_out``). ``nn.Linear`` stores exactly that; GPT-2's ``Conv1D`` stores the
transpose. The orientation is decided by the module's class, never by its name.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import BLUEConfigError
from ..hparams import BLUEHyperParams

_LLAMA_LIKE = {
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm",
    "lm_head_module": "lm_head",
}

#: Module templates of known architectures, keyed by ``model.config.model_type``.
KNOWN_TEMPLATES: dict[str, dict[str, str]] = {
    "gpt2": {
        "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
        "layer_module_tmp": "transformer.h.{}",
        "mlp_module_tmp": "transformer.h.{}.mlp",
        "attn_module_tmp": "transformer.h.{}.attn",
        "ln_f_module": "transformer.ln_f",
        "lm_head_module": "lm_head",
    },
    "gptj": {
        "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out",
        "layer_module_tmp": "transformer.h.{}",
        "mlp_module_tmp": "transformer.h.{}.mlp",
        "attn_module_tmp": "transformer.h.{}.attn",
        "ln_f_module": "transformer.ln_f",
        "lm_head_module": "lm_head",
    },
    "gpt_neox": {
        "rewrite_module_tmp": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
        "layer_module_tmp": "gpt_neox.layers.{}",
        "mlp_module_tmp": "gpt_neox.layers.{}.mlp",
        "attn_module_tmp": "gpt_neox.layers.{}.attention",
        "ln_f_module": "gpt_neox.final_layer_norm",
        "lm_head_module": "embed_out",
    },
    # Gemma 3 text models (gemma-3-270m, -1b; model_type "gemma3_text") have Llama's module names.
    **{
        name: dict(_LLAMA_LIKE)
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2")
    },
}

TEMPLATE_KEYS = tuple(KNOWN_TEMPLATES["gpt2"])


def find_module(model: nn.Module, name: str, key: str = "module") -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists close matches."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules()]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise BLUEConfigError(f"{key}: the model has no module named {name!r}.{hint}") from None


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` (weight stored as (d_in, d_out))."""
    if isinstance(module, nn.Linear):
        return False
    if isinstance(module, Conv1D):
        return True
    raise BLUEConfigError(
        f"cannot edit a {type(module).__name__}: the rewrite module must be nn.Linear or transformers' Conv1D."
    )


@dataclass
class ModelLayout:
    """Resolved module names of one model."""

    templates: dict[str, str]
    n_layers: int

    def rewrite(self, layer: int) -> str:
        return self.templates["rewrite_module_tmp"].format(layer)

    def block(self, layer: int) -> str:
        return self.templates["layer_module_tmp"].format(layer)

    def weight_name(self, layer: int) -> str:
        return f"{self.rewrite(layer)}.weight"


def num_layers(model: nn.Module) -> int:
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    raise BLUEConfigError("cannot tell the number of layers from model.config; set it in the config.")


def resolve_layout(model: nn.Module, hparams: BLUEHyperParams) -> ModelLayout:
    """Module templates from the hyperparameters, filling gaps from ``model.config.model_type``.

    Checks that every template resolves in the model for each critical layer and that the layers
    exist. Raises :class:`BLUEConfigError` otherwise.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = KNOWN_TEMPLATES.get(model_type or "", {})
    templates: dict[str, str] = {}
    for key in TEMPLATE_KEYS:
        value = getattr(hparams, key) or known.get(key)
        if value is None:
            raise BLUEConfigError(
                f"'{key}' is not set and model_type {model_type!r} is not one of the known architectures "
                f"({', '.join(sorted(KNOWN_TEMPLATES))}); set it in the YAML."
            )
        templates[key] = value
    n = num_layers(model)
    out_of_range = [layer for layer in hparams.layers if layer >= n]
    if out_of_range:
        raise BLUEConfigError(f"'layers': {out_of_range} outside the model, which has layers 0..{n - 1}.")
    layout = ModelLayout(templates, n)
    for layer in hparams.layers:
        is_transposed(find_module(model, layout.rewrite(layer), "rewrite_module_tmp"))
        find_module(model, layout.block(layer), "layer_module_tmp")
    if hparams.v_loss_layer not in (-1, n - 1):
        raise BLUEConfigError(
            f"'v_loss_layer' must be the last layer ({n - 1}) or -1: the loss is read from the model's logits."
        )
    return layout


def get_weight(model: nn.Module, module_name: str) -> torch.Tensor:
    """The weight parameter of ``module_name`` as stored (no copy)."""
    return find_module(model, module_name).weight


def as_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """View a stored weight (or a same-shaped tensor) as (d_out, d_in)."""
    return weight.T if is_transposed(module) else weight


def from_out_in(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Turn a (d_out, d_in) matrix into the module's storage orientation."""
    return matrix.T if is_transposed(module) else matrix
