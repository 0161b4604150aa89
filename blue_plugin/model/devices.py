"""Where tensors go: the device inputs are sent to, the device of one module's weights, and the
device float64 sums can live on. Layers may sit on different devices (an accelerate
``device_map``), so none of these is "the model's device"."""
from __future__ import annotations

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings: where ``input_ids`` go (and where the target optimisation
    runs); the first parameter's device for a model without usable input embeddings."""
    try:
        emb = model.get_input_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
    except (AttributeError, NotImplementedError):
        pass
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def module_device(model: nn.Module, module: nn.Module) -> torch.device:
    """Device of ``module``'s first parameter (the input device for a module without any)."""
    for p in module.parameters():
        return p.device
    return input_device(model)


def accumulation_device(device: torch.device) -> torch.device:
    """Where float64 sums for tensors on ``device`` live: the device itself, except where float64
    is not supported (Apple MPS: the CPU)."""
    return torch.device("cpu") if device.type == "mps" else device
