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
    # Parameters whose .grad is None are skipped: chapters nobody selected cost nothing. Fused: one kernel per
    # tensor with no temporaries; on a CPU 5x faster than foreach over a 67M-value bank (46 vs 246 ms).
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int,
                   phase: list[float] | None = None):
    """Warmup then `cfg.schedule` over `total_steps`; with `phase` = [s0, f0] (a resumed run whose total steps
    changed at step s0, learning rate f0 x the configured one there), the continuation of `continued_factor`."""
    from transformers import get_scheduler

    if phase is not None:
        s0, f0 = int(phase[0]), float(phase[1])
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: continued_factor(s, s0, f0, total_steps, cfg.warmup_steps, cfg.schedule))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def lr_range(start: float, end: float, steps: int) -> list[float]:
    """Exponentially spaced learning rates for the LR range test."""
    return [start * math.exp(math.log(end / start) * i / max(steps - 1, 1)) for i in range(steps)]


def continued_factor(step: int, s0: int, f0: float, total: int, warmup: int, schedule: str) -> float:
    """The learning rate factor after a change of the total steps at step s0, where the factor was f0: it goes
    on from f0 and decays to 0 at the new total with the same shape (cosine, linear; constant stays). When the
    old schedule had already reached 0 (a finished run resumed for more steps), it warms up again over
    `warmup` steps to the configured rate, then decays: the rate never jumps."""
    def shape(p: float) -> float:
        p = min(max(p, 0.0), 1.0)
        return {"cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p, "constant": 1.0}[schedule]

    t = max(step - s0, 0)
    if f0 > 0.0:
        return f0 * shape(t / max(total - s0, 1))
    if t < warmup:
        return t / warmup
    return shape((t - warmup) / max(total - s0 - warmup, 1))
