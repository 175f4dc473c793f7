"""AdamW with one parameter group per component, each with its own learning rate and weight decay, and the
warmup + decay schedule (from `transformers`)."""

from __future__ import annotations

import math

import torch

from memory_transformer.config import TrainingConfig
from memory_transformer.model import component_of

# Variant B's memory MLP trains with the memory attention settings.
GROUP_OF = {"base": "base", "memory_bank": "memory_bank", "memory_attention": "memory_attention",
            "memory_mlp": "memory_attention", "router": "router", "lora": "lora"}


def setting(value, group: str) -> float:
    """`training.lr` / `training.weight_decay`: a number for all groups, or a mapping (null = base)."""
    if isinstance(value, (int, float)):
        return float(value)
    own = getattr(value, group)
    return value.base if own is None else own


def param_groups(model: torch.nn.Module, cfg: TrainingConfig) -> list[dict]:
    """Trainable parameters grouped by component; each group is named so that its lr can be logged."""
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(GROUP_OF[component_of(name)], []).append(p)
    return [
        {"params": params, "name": g, "lr": setting(cfg.lr, g), "weight_decay": setting(cfg.weight_decay, g)}
        for g, params in groups.items()
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters: enable memory or LoRA, or set model.freeze_base=false")
    # foreach skips parameters whose .grad is None: chapters nobody selected cost nothing.
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def lr_range(start: float, end: float, steps: int) -> list[float]:
    """Exponentially spaced learning rates for the LR range test."""
    return [start * math.exp(math.log(end / start) * i / max(steps - 1, 1)) for i in range(steps)]
