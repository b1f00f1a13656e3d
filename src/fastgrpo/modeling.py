"""Small facts about the policy model that several stages need."""

from __future__ import annotations

import torch


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (LoRA layers are injected into it, so it holds every parameter),
    or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
