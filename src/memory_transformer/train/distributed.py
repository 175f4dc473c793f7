"""`training.distributed: fsdp`: the model sharded over processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Why not accelerate's FSDP plugin: accelerate enables FSDP only on accelerators (its CPU processes are always
DDP), so the trainer calls `fully_shard` itself, after the model is built and its hooks are registered, and
before the optimizer is made (FSDP2 swaps every sharded Parameter for a DTensor). `fully_shard` keeps each module
object (it changes only its class), so the memory's hooks on decoder layers survive the wrapping.

Each decoder layer of the base is one FSDP unit (gathered for its forward, resharded after), the rest of the model
(embeddings, head, memory attention and router) is the root unit. The memory banks are left out
(`ignored_params`): top-k routing gives a gradient only to the chapters some sequence read, a different set on
each process, and FSDP's reduce-scatter needs the same tensors on every process. The banks therefore stay
replicated, as under DDP, and `sync_bank_grads` all-reduces the chapters read on any process (the ones read
nowhere keep `.grad = None`, so AdamW skips them exactly as it does under DDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from memory_transformer.inject import decoder_layers
from memory_transformer.memory.bank import MemoryBank


def bank_params(model: nn.Module) -> list[nn.Parameter]:
    """Every Parameter of every memory bank (chapters, and the shared factor of a factorized bank)."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, MemoryBank):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def shard_model(model: nn.Module, precision: str) -> nn.Module:
    """Shard `model` in place with FSDP2 over all processes: one unit per decoder layer, the root for the rest,
    banks replicated. bf16/fp16: parameters gathered in that dtype for compute, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    ignored = set(bank_params(model))
    for layer in decoder_layers(model.base):
        fully_shard(layer, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mp_policy=mp, ignored_params=ignored)
    return model


def sync_bank_grads(params: list[nn.Parameter]) -> None:
    """Average the bank gradients over processes, as DDP would: a chapter read on any process gets the mean of
    every process's gradient (0 where it was not read); a chapter read nowhere keeps `.grad = None`."""
    if not params or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    device = params[0].device
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(used)  # how many processes read each parameter
    grads = []
    for p, n in zip(params, used.tolist()):
        if n and p.grad is None:
            p.grad = torch.zeros_like(p)
        if n:
            grads.append(p.grad)
    if grads:  # one flat all-reduce instead of one per chapter
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The global L2 norm of all gradients (sharded DTensors and replicated bank tensors), clipped to `max_norm`
    like `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().double().pow(2).sum().cpu()
        else:
            replicated += g.double().pow(2).sum().cpu()
    if dist.is_initialized():
        dist.all_reduce(sharded)  # each process holds its own shard; replicated tensors are alike everywhere
    norm = float((sharded + replicated).sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on the CPU of process 0 (the other processes get {}): a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
