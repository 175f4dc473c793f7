"""AdamW with one parameter group per component, each with its own learning rate and weight decay (the bank's
optionally a lazy Adam, `training.bank_optimizer`), and the warmup + decay schedule (from `transformers`)."""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw

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
    """Trainable parameters grouped by component; each group is named so that its lr can be logged, and marked
    `lazy` when a lazy AdamW steps it (checked on resume: the moments of one optimizer do not fit the other)."""
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(GROUP_OF[component_of(name)], []).append(p)
    out = [{"params": params, "name": g, "lr": setting(cfg.lr, g), "weight_decay": setting(cfg.weight_decay, g),
            "lazy": g == "memory_bank" and cfg.bank_optimizer == "lazy_adam"} for g, params in groups.items()]
    for group in out:
        if group["lazy"]:  # the unit read: one head's key or value in a slot's row
            group["row_width"] = model.memory.banks[0].width // model.memory.cfg.num_heads
    return out


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters: enable memory or LoRA, or set model.freeze_base=false")
    # Parameters whose .grad is None are skipped: chapters nobody selected cost nothing. Fused: one kernel per
    # tensor with no temporaries; on a CPU 5x faster than foreach over a 67M-value bank (46 vs 246 ms).
    if any(g["lazy"] for g in groups):
        return LazyBankAdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=True)


class LazyBankAdamW(torch.optim.Optimizer):
    """Fused AdamW for the groups not marked `lazy`, a lazy AdamW for the `lazy` ones (the bank's), as one
    optimizer: one list of param groups for the scheduler, one state dict for checkpoints (the two share it).

    Lazy AdamW: a Parameter is seen as rows of `row_width` values (the group's; one head's key or value of a
    slot for a bank; whole rows where it does not divide them), and the rows read, those with a nonzero gradient,
    get AdamW's update: the same fused kernel with the same state (moments, a step count per Parameter counting
    the steps it had a gradient). The other rows are not touched: not moved, no weight decay, their moments not
    decayed. `torch.optim.SparseAdam` has this lazy semantics but no weight decay and on a CPU was slower than
    fused AdamW over the whole bank (docs/design.md)."""

    def __init__(self, groups: list[dict], betas: tuple[float, float], eps: float):
        dense = [g for g in groups if not g["lazy"]]
        self.adamw = torch.optim.AdamW(dense, betas=betas, eps=eps, fused=True) if dense else None
        # the same group dicts: a scheduler's lr reaches both
        super().__init__([*dense, *(g for g in groups if g["lazy"])], {"betas": betas, "eps": eps})
        self._link()

    def _link(self) -> None:
        if self.adamw is not None:
            n = len(self.adamw.param_groups)
            self.adamw.param_groups, self.adamw.state = self.param_groups[:n], self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and state: linked again
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        if self.adamw is not None:
            self.adamw.step()
        for group in self.param_groups:
            for p in group["params"] if group["lazy"] else []:
                if p.grad is not None:
                    width = group["row_width"] if p.shape[-1] % group["row_width"] == 0 else p.shape[-1]
                    lazy_adamw(p, *rows_read(p.grad, width), self.state[p], group)


def rows_read(grad: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A gradient seen as rows of `width` values: the rows with a nonzero value (n,) and their values (n, width).
    A sparse COO gradient (over the first dim) is coalesced first: repeated rows (micro-batches) summed."""
    if grad.is_sparse:
        grad = coalesced(grad)
        parts = grad[0].numel() // width  # rows of `width` in one row of the gradient
        values = grad.values().reshape(-1, width)  # (n * parts, width)
        ids = (grad.indices()[0, :, None] * parts + torch.arange(parts, device=grad.device)).flatten()
    else:
        values, ids = grad.reshape(-1, width), None
    keep = (values.abs().amax(1) != 0).nonzero().flatten()  # (6x faster than `(values != 0).any(1)`)
    return (keep if ids is None else ids.index_select(0, keep)), values.index_select(0, keep)


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """A sparse COO gradient with each row once. `kv_rows` builds them so, but autograd hands them on unmarked
    (`coalesce` would sort them again: 11 ms at 128 chapters); micro-batches accumulated repeat rows."""
    rows = grad._indices()[0]  # (as torch.optim.SparseAdam reads them)
    if grad.is_coalesced() or not bool((rows[1:] > rows[:-1]).all()):
        return grad.coalesce()
    return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                   check_invariants=False)


def lazy_adamw(p: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """AdamW's fused step on the rows `rows` of p seen as rows of grad.shape[1] values, with their gradient rows
    `grad`: the rows of p and of its moments are taken out, stepped, and put back. One Parameter at a time: its
    taken rows are freed before the next one's are taken, so they come back from the heap (all 128 chapters' at
    once: 300 MB page-faulted afresh at every step, 2x slower)."""
    if not state:  # as torch's fused AdamW keeps it
        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    full = [t.view(-1, grad.shape[1]) for t in (p, state["exp_avg"], state["exp_avg_sq"])]
    value, m, v = (t.index_select(0, rows) for t in full)
    beta1, beta2 = group["betas"]
    adamw([value], [grad], [m], [v], [], [state["step"]], fused=True, amsgrad=False, beta1=beta1, beta2=beta2,
          lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
    for t, taken in zip(full, (value, m, v)):
        t.index_copy_(0, rows, taken)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` (which refuses sparse gradients) for gradients of which some are
    row-sparse: their values count once each (coalesced). The norm before clipping."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = coalesced(p.grad)
    grads = [p.grad.values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as torch's
    for g in grads:
        g.mul_(scale)
    return float(norm)


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
