"""Where the weights live across processes, decided once when the trainer starts:

- `training.distributed: ddp`: every process holds the whole model; accelerate wraps it in DDP;
- `training.distributed: fsdp`: FSDP2 shards it over the processes, banks replicated (train/distributed.py);
- `memory.shard_chapters`: each process holds only its own chapters of every bank (train/chapters.py).

The trainer asks its `Placement` how to wrap the model, skip a gradient sync, clip, evaluate, and what goes into a
checkpoint (written by every process or by the main one) and back out of it; it never re-checks the settings.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from pathlib import Path

from memory_transformer.config import Config, ConfigError
from memory_transformer.io import SHARDED_WEIGHTS, load_weights, save_model, save_model_info
from memory_transformer.train import chapters
from memory_transformer.train import checkpoint as ckpt
from memory_transformer.train import distributed as dist
from memory_transformer.train.optim import clip_grad_norm


class Placement:
    def __init__(self, acc, cfg: Config):
        t, several = cfg.training, acc.num_processes > 1
        self.acc, self.precision = acc, t.precision
        self.fsdp = t.distributed == "fsdp" and several
        self.sharded_checkpoints = t.distributed == "fsdp"  # on one process too: it then resumes on several
        self.split_chapters = cfg.memory.shard_chapters and several
        if self.fsdp and t.precision == "fp16":
            raise ConfigError("training.precision", "fp16 with training.distributed=fsdp is not supported (its loss "
                              "scaler would need FSDP's sharded one); use bf16 or fp32, or distributed=ddp")
        if self.split_chapters and t.distributed == "fsdp":
            raise ConfigError("memory.shard_chapters", "works with training.distributed=ddp only")
        if self.split_chapters and cfg.memory.routing == "subject":  # a read is a collective: every process must
            raise ConfigError("memory.shard_chapters", "not with memory.routing=subject (a batch without a subject "
                              "reads nothing, while the other processes wait for it to fetch chapters)")
        self.sparse_bank_grads = t.bank_optimizer == "lazy_adam"  # row-sparse: clipped here, not by torch
        if self.sparse_bank_grads and (several or t.distributed == "fsdp"):
            raise ConfigError("training.bank_optimizer", "lazy_adam runs on one process with training.distributed "
                              "ddp only (row-sparse bank gradients are not synced across processes); use adamw")
        self.bank_params: list = []  # fsdp: the replicated banks, synced by hand
        self.chapter_shards: list[chapters.ChapterShards] = []

    # -- the model --------------------------------------------------------------------------------------------
    def prepare(self, model, make_optimizer):
        """(model as the trainer calls it, accelerate's optimizer): sharded or wrapped, the optimizer made over
        the parameters this process holds."""
        device = self.acc.device
        if self.fsdp:  # sharded here: accelerate offers FSDP on accelerators only, and would wrap it in DDP
            model = dist.shard_model(model.to(device), self.precision)
            self.bank_params = dist.bank_params(model)
            return model, self.acc.prepare(make_optimizer(model))
        if self.split_chapters:  # DDP leaves every chapter alone: they differ between processes
            from torch.nn.parallel import DistributedDataParallel

            self.chapter_shards = chapters.shard_banks(model.to(device))
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, chapters.chapter_names(model))
        return self.acc.prepare(model, make_optimizer(model))

    def no_sync(self, model, last: bool):
        """Within: a micro-batch whose gradients stay local (all but the last of a step)."""
        if self.fsdp:
            model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.acc.no_sync(model)

    def after_backward(self) -> None:
        dist.sync_bank_grads(self.bank_params)  # fsdp: the replicated banks (DDP syncs them itself)

    def clip(self, params: list, max_norm: float) -> float:
        """Clip the gradients to `max_norm` in global L2 norm; the norm before clipping."""
        if self.fsdp or self.chapter_shards:  # gradients held by one process beside replicated ones
            return dist.clip_grad_norm(params, max_norm, local=[p for s in self.chapter_shards for p in s.params()])
        if self.sparse_bank_grads:
            self.acc.unscale_gradients()  # fp16: what accelerate's clip does first
            return clip_grad_norm(params, max_norm)
        norm = self.acc.clip_grad_norm_(params, max_norm)
        return float(norm) if norm is not None else 0.0

    def whole(self):
        """Within: every process holds every chapter (memory.shard_chapters; a collective)."""
        return chapters.whole(self.chapter_shards)

    def evaluating(self):
        """Within: evaluation. prepare() makes a DDP model's forward autocast; a model sharded here needs it said
        (bf16 parameters meet the float32 banks)."""
        stack = ExitStack()
        if self.fsdp:
            stack.enter_context(self.acc.autocast())
        stack.enter_context(self.whole())
        return stack

    def model_state(self, model) -> dict | None:
        """fsdp: the weights gathered on the main process (a collective), for a model folder; else None."""
        return dist.full_state_dict(model) if self.fsdp else None

    # -- checkpoints -------------------------------------------------------------------------------------------
    @property
    def every_process_writes(self) -> bool:
        return self.sharded_checkpoints or bool(self.chapter_shards)

    def write_own_part(self, model, optimizer, tmp: Path) -> dict | None:
        """What this process writes into the checkpoint's temp folder (a collective): its shards (fsdp; returns
        the optimizer's skeleton for the main process) or its chapters' optimizer state."""
        if self.chapter_shards:
            ckpt.save_state_dict_tree(optimizer.state_dict(), tmp / f"optimizer-{self.acc.process_index}")
            return None
        return dist.save_sharded(model, optimizer.optimizer, tmp / SHARDED_WEIGHTS)

    def write_main_part(self, unwrapped, optimizer, d: Path, skeleton: dict | None) -> None:
        """The weights and optimizer files the main process writes (within `whole`)."""
        if self.sharded_checkpoints:  # the tensors are already in d/sharded
            save_model_info(unwrapped, d)
            ckpt.save_state_dict_tree(skeleton, d / "optimizer")
            return
        save_model(unwrapped, d)
        if not self.chapter_shards:
            ckpt.save_state_dict_tree(optimizer.state_dict(), d / "optimizer")

    def restore(self, unwrapped, optimizer, d: Path) -> None:
        """Weights and optimizer state from checkpoint `d`."""
        if (d / SHARDED_WEIGHTS).is_dir():  # saved under fsdp: read on any number of processes (resharded)
            skeleton = ckpt.load_state_dict_tree(d / "optimizer")
            dist.load_sharded(unwrapped, optimizer.optimizer, d / SHARDED_WEIGHTS, skeleton)
            return
        if self.fsdp:
            raise ConfigError("--resume", f"{d} was saved with training.distributed=ddp (whole weights): resume it "
                              "with ddp, or with fsdp on one process")
        with self.whole():
            load_weights(unwrapped, d)
        device = "cpu" if self.acc.device.type == "cpu" else str(self.acc.device)  # safetensors refuses "cpu:0"
        state = ckpt.load_state_dict_tree(self._optimizer_file(d), device=device)
        saved = {g["name"]: g.get("lazy", False) for g in state["param_groups"]}
        if saved != {g["name"]: g["lazy"] for g in optimizer.param_groups}:
            raise ConfigError("training.bank_optimizer", f"{d} was saved with another bank optimizer (lazy groups "
                              f"{[n for n, lazy in saved.items() if lazy]}): resume with the one it was saved with")
        optimizer.load_state_dict(state)

    def _optimizer_file(self, d: Path) -> Path:
        """memory.shard_chapters: each process's optimizer has its own chapters (same number of processes only)."""
        own = d / f"optimizer-{self.acc.process_index}"
        if self.chapter_shards and not own.with_name(own.name + ".json").is_file():
            raise ConfigError("--resume", f"{d} has no optimizer state for process {self.acc.process_index} with "
                              "memory.shard_chapters: resume on the number of processes that saved it")
        if not self.chapter_shards and (d / "optimizer-0.json").is_file() and not (d / "optimizer.json").is_file():
            raise ConfigError("--resume", f"{d} was saved with memory.shard_chapters on several processes: "
                              "resume it on the number of processes that saved it")
        return own if self.chapter_shards else d / "optimizer"
