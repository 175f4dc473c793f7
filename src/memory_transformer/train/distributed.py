"""Training on several processes beyond what DDP does by itself: variable-length rows gathered from every process
(`gather_rows`), the model sharded with FSDP2 (`training.distributed: fsdp`), and its sharded checkpoints.

The trainer calls torch's `fully_shard` itself rather than accelerate's FSDP plugin, because accelerate enables
FSDP only on accelerators (its CPU processes are always DDP) and cannot leave the banks out. It does so after the
model is built and its hooks are registered, and before the optimizer is made (FSDP2 swaps every sharded
Parameter for a DTensor). `fully_shard` keeps each module object (it changes only its class), so the memory's
hooks on decoder layers survive the wrapping.

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


def gather_rows(acc, x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `x` (N_r, ...), concatenated in process order, where N_r differs between processes
    (token routing on padded data: each process has its own number of real tokens). The sizes are gathered
    first, every process pads to the largest, and the padding is cut out of the gathered rows."""
    if acc.num_processes == 1:
        return x
    sizes = acc.gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    gathered = acc.gather(acc.pad_across_processes(x, dim=0))  # (W * max N_r, ...)
    most = max(sizes)
    return torch.cat([gathered[r * most : r * most + n] for r, n in enumerate(sizes)])


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


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, local: list[nn.Parameter] = ()) -> float:
    """The global L2 norm of all gradients, clipped to `max_norm` like `torch.nn.utils.clip_grad_norm_`; returns
    the norm before clipping. Sharded DTensors and the parameters in `local` (chapters held by one process) add
    up over processes; the other gradients are alike on every process."""
    from torch.distributed.tensor import DTensor

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    local_ids = {id(p) for p in local}
    grads = [p.grad for p in params if p.grad is not None]
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            sharded += g.to_local().double().pow(2).sum().cpu()
        elif id(p) in local_ids:
            sharded += g.double().pow(2).sum().cpu()
        else:
            replicated += g.double().pow(2).sum().cpu()
    if dist.is_initialized():  # each process holds its own shard; replicated tensors are alike everywhere
        on_device = sharded.to(params[0].device if params else "cpu")  # (NCCL reduces GPU tensors only)
        dist.all_reduce(on_device)
        sharded = on_device.cpu()
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


# --------------------------------------------------------------------------- sharded checkpoints
# A checkpoint of a sharded run keeps its tensors in `sharded/`, written by torch.distributed.checkpoint (DCP) in
# safetensors: every process writes the shards it holds (`shard-0000R-model-00001-of-00001.safetensors`, the
# place of each shard in the safetensors header as JSON; a tensor replicated on every process, such as a bank
# chapter, is written once). Keys: `model/<name>` and `optimizer/<parameter name>/<state>`. What is not a tensor
# (the optimizer's parameter groups, the shape of each state) is in optimizer.json. DCP reads it back on any
# number of processes, each taking the slices of its own shards: resuming on another number reshards. No pickle.

def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder) -> dict:
    """Every process writes its shards of the model and optimizer state into `folder` (a collective); returns
    the optimizer's skeleton for optimizer.json."""
    import torch.distributed.checkpoint as dcp

    tensors, skeleton = _optimizer_state(model, optimizer)
    tensors.update({f"model/{k}": v for k, v in model.state_dict().items()})
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True),
             no_dist=not _several())
    return skeleton


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder, skeleton: dict) -> None:
    """Restore what `save_sharded` wrote into `model` and `optimizer`, sharded as they are now (FSDP on any
    number of processes, or a plain model on one)."""
    import torch.distributed.checkpoint as dcp

    names = dict(model.named_parameters())
    missing = [n for g in skeleton["param_groups"] for n in g["params"] if n not in names]
    if missing:
        raise ValueError(f"{folder}: the checkpoint's optimizer has parameters the model lacks: {missing[:3]}")
    model_state = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim_state = {f"optimizer/{n}/{stat}": _empty_like_saved(names[n], info)
                   for n, stats in skeleton["state"].items() for stat, info in stats.items()}
    dcp.load({**model_state, **optim_state}, storage_reader=dcp.HuggingFaceStorageReader(str(folder)),
             no_dist=not _several())
    model.load_state_dict({k[len("model/"):]: v for k, v in model_state.items()})
    optimizer.state.clear()
    for key, value in optim_state.items():
        _, name, stat = key.split("/", 2)
        optimizer.state[names[name]][stat] = value
    name_of = {id(p): n for n, p in names.items()}
    for group, saved in zip(optimizer.param_groups, skeleton["param_groups"], strict=True):
        if [name_of[id(p)] for p in group["params"]] != saved["params"]:
            raise ValueError(f"{folder}: the optimizer's parameter groups differ from the checkpoint's")
        group.update({k: v for k, v in saved.items() if k != "params"})


def _several() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer's tensors keyed by parameter name, and a skeleton: parameter groups (names, not objects)
    and, per state tensor, whether it is shaped (and sharded) like its parameter, else its shape and dtype."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    tensors, shapes = {}, {}
    for p, stats in optimizer.state.items():
        n = name_of[id(p)]
        for stat, v in stats.items():
            tensors[f"optimizer/{n}/{stat}"] = v
            like = v.dim() > 0 and tuple(v.shape) == tuple(p.shape)
            shapes.setdefault(n, {})[stat] = {"like_param": like, "shape": list(v.shape),
                                              "dtype": str(v.dtype).removeprefix("torch.")}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return tensors, {"param_groups": groups, "state": shapes}


def _empty_like_saved(param: torch.Tensor, info: dict) -> torch.Tensor:
    if info["like_param"]:
        return torch.zeros_like(param, dtype=getattr(torch, info["dtype"]))
    return torch.zeros(info["shape"], dtype=getattr(torch, info["dtype"]))
