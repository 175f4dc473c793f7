"""The training loop, on `accelerate`: one process on a CPU/GPU, or many through `accelerate launch` / `torchrun`.

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` rows on each of the W processes.
The loss of a step is the token-mean cross-entropy over that whole global batch (summed per micro-batch and
divided by the global token count), so W processes give the same step as one process with the same global
batch. The router losses are computed once per step over the pooled router inputs of the global batch.

Run folder (`training.output_dir`): config.yaml, metrics.jsonl, checkpoints/step-NNNNNN/, best/, final/, plots/,
and replay_samples.jsonl with `data.replay_generated`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from memory_transformer.config import Config, ConfigError, check_training, load_config
from memory_transformer.data import build_data, pack_documents
from memory_transformer.evaluate import evaluate, token_loss_sums
from memory_transformer.generate import sample_documents
from memory_transformer.integrity import verify_folder
from memory_transformer.io import save_model
from memory_transformer.model import build_model
from memory_transformer.resolve import resolve_config
from memory_transformer.train import checkpoint as ckpt
from memory_transformer.train import distributed as dist
from memory_transformer.train.optim import make_optimizer, make_scheduler
from memory_transformer.train.placement import Placement


REPLAY_FILE = "replay_samples.jsonl"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the last checkpoint is intact."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0  # data position: epoch and row offset into that epoch's examples
    offset: int = 0
    best: float | None = None
    evals_without_improvement: int = 0
    bad_steps_in_a_row: int = 0
    tokens: int = 0
    total_steps: int | None = None  # the total the lr schedule was made for (None: a checkpoint before this field)
    lr_phase: list[float] | None = None  # [step, lr factor] where the total changed: see optim.continued_factor


def make_accelerator(**kwargs):
    """An Accelerator; without a GPU it runs on the CPU, with gloo across processes under torchrun/launch."""
    from accelerate import Accelerator

    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return Accelerator(cpu=not has_gpu and not torch.backends.mps.is_available(), **kwargs)


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "ppl" in metric


class Trainer:
    def __init__(self, cfg: Config, resume: bool | str | None = None, progress: bool = True, run_dir: bool = True):
        """`run_dir=False` (the LR finder) trains without a run folder: no config, metrics or checkpoints."""
        from accelerate import DistributedDataParallelKwargs

        check_training(resolve_config(cfg))
        self.cfg, self.train_cfg = cfg, cfg.training
        self.run_dir = Path(self.train_cfg.output_dir)
        self.progress = progress
        self.source_run, self.new_run_dir = self.run_dir, False  # resuming another run's checkpoint: its folder
        trackers = [x for x in self.train_cfg.log_with if x != "none"]
        self.acc = make_accelerator(
            mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.train_cfg.precision],
            log_with=trackers or None, project_dir=str(self.run_dir),
            # top-k routing leaves most chapters unused in a step: DDP must not wait for their gradients
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        resume_from = self._check_run_dir(resume) if run_dir else None
        model = build_model(cfg, seed=self.train_cfg.seed, for_training=True)
        if self.train_cfg.gradient_checkpointing:
            model.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.tokenizer = model.tokenizer
        self.replay_docs = self._generated_replay(model, resume_from is not None) if cfg.data.replay_generated else None
        self.data = build_data(cfg, self.tokenizer, self.replay_docs)
        if cfg.memory.enabled and cfg.memory.scope == "keys" and resume_from is None:  # a resumed run has its keys
            self._fit_scope(model)
        self.global_batch = self.train_cfg.batch_size * self.train_cfg.grad_accum_steps * self.acc.num_processes
        self.total_steps = self._total_steps()
        self.placement = Placement(self.acc, cfg)  # ddp, fsdp, chapters split over processes
        self.model, self.optimizer = self.placement.prepare(model, lambda m: make_optimizer(m, self.train_cfg))
        self.scheduler = make_scheduler(self.optimizer.optimizer, self.train_cfg, self.total_steps)
        self.state = TrainState(total_steps=self.total_steps)
        if self.acc.num_processes > 1:  # the model is built alike everywhere; dropout masks now differ per process,
            from accelerate.utils import set_seed  # as one process draws its own mask for every row

            set_seed(self.train_cfg.seed, device_specific=True)  # seed + process index
        if resume_from is not None:
            self._restore(resume_from)
        if run_dir and (resume_from is None or self.new_run_dir):  # only now, with model and data known to be
            self._create_run_dir()  # good, does the run folder appear
        if trackers:
            self.acc.init_trackers("memory-transformer", config=_flat(cfg.to_dict()))

    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    # -- run folder --------------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool | str | None) -> Path | None:
        """The checkpoint to resume from, or None for a new run; refuses to reuse a non-empty folder."""
        d = self.run_dir
        if not resume:
            if d.exists() and any(d.iterdir()):
                raise ConfigError("training.output_dir", f"{d} already holds a run; "
                                  + ("it stopped before its first checkpoint: start it again from step 0 with "
                                     "--resume" if self._restartable(d) else "continue it with --resume")
                                  + ", or choose another output_dir (nothing was overwritten)")
            return None
        if self.acc.is_main_process:  # one process cleans; the others would race it for the same folders
            ckpt.clean_stale_temp(d)
        self.acc.wait_for_everyone()
        path = ckpt.latest_checkpoint(d) if resume is True else Path(resume)
        if path is None:
            return self._restart(d)
        if not (path / "COMPLETE").is_file():
            raise ConfigError("--resume", f"{path} is not a complete checkpoint")
        if not (path / "trainer_state.json").is_file():
            raise ConfigError("--resume", f"{path} is a saved model, not a training checkpoint (no "
                              "trainer_state.json); resume from a checkpoints/step-NNNNNN folder")
        if not (d / "config.yaml").is_file():  # another run's checkpoint continued in a new run folder
            if d.exists() and any(d.iterdir()):
                raise ConfigError("training.output_dir", f"{d} is not empty and holds no run (no config.yaml); "
                                  "choose a new output_dir to continue the checkpoint in")
            self._check_same_model(path / "config.yaml")
            self.source_run, self.new_run_dir = path.parent.parent, True
            return path
        self._check_same_model(d / "config.yaml")
        return path

    @staticmethod
    def _restartable(d: Path) -> bool:
        """A run folder whose run stopped before it saved anything: no checkpoint, no best/ or final/ model."""
        saved = ckpt.latest_checkpoint(d) or any((d / n).exists() for n in ("best", "final"))
        return (d / "config.yaml").is_file() and not saved

    def _restart(self, d: Path) -> None:
        """--resume of a run folder without a checkpoint: start the run again from step 0 if nothing was saved."""
        if not self._restartable(d):
            saved = [n for n in ("final", "best") if (d / n).exists()]
            why = f"; {d / saved[0]} holds a saved model (nothing was overwritten)" if saved else ""
            raise ConfigError("--resume", f"no complete checkpoint in {d / 'checkpoints'}{why}")
        self._check_same_model(d / "config.yaml")
        if self.acc.is_main_process:
            print(f"{d} has no checkpoint yet (the run stopped before its first save): starting again from step 0",
                  file=sys.stderr)
        self.new_run_dir = True
        return None

    def _check_same_model(self, saved_path: Path) -> None:
        """A resumed run must build the model it saved: the model, memory and lora keys of the given config must
        equal the run's config.yaml (a changed default would otherwise switch e.g. the memory read mid-run)."""
        if not saved_path.is_file():
            return
        sections, saved, now = ("model", "memory", "lora"), load_config(saved_path).to_dict(), self.cfg.to_dict()
        saved, now = (_flat({s: d[s] for s in sections}) for d in (saved, now))
        diff = [f"{k.replace('/', '.')}: {saved.get(k)!r} -> {now.get(k)!r}"
                for k in sorted({*saved, *now}) if saved.get(k) != now.get(k)]
        if diff:
            raise ConfigError("--resume", f"the config builds another model than the run in {saved_path.parent} "
                              f"({'; '.join(diff)}); resume with --config {saved_path}")

    def _create_run_dir(self) -> None:
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a restarted run logs from step 0 again
            self.cfg.save(self.run_dir / "config.yaml")
            if self.replay_docs is not None:
                (self.run_dir / REPLAY_FILE).write_text("".join(json.dumps({"text": t}) + "\n" for t in self.replay_docs))
        self.acc.wait_for_everyone()

    def _generated_replay(self, model, resuming: bool) -> list[str]:
        """`data.replay_generated` documents sampled from the frozen pretrained model (the model being trained,
        adapters off) by the main process and shared with the others. A resumed run reads back the ones its run
        folder keeps."""
        from accelerate.utils import broadcast_object_list

        d, path, docs = self.cfg.data, self.source_run / REPLAY_FILE, None
        if resuming and not path.is_file():  # sampling again would not be bit-exact on every device
            raise ConfigError("--resume", f"{path} is missing: the replayed samples of this run are gone; "
                              "start a new run (another training.output_dir)")
        if self.acc.is_main_process:
            if resuming:
                docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
            else:
                with model.to(self.acc.device).adapters_disabled():
                    docs = sample_documents(model, d.replay_generated, self.cfg.model.max_seq_len, d.seed,
                                            self.train_cfg.batch_size, d.replay_temperature)
        return broadcast_object_list([docs])[0]

    def _fit_scope(self, model) -> None:
        """memory.scope keys: the codebook from the first epoch's taught tokens against the base's samples. Every
        process fits the same keys from the same documents."""
        background = pack_documents(self.replay_docs, self.tokenizer, self.cfg.model.max_seq_len, pad_remainder=True)
        counts = model.to(self.acc.device).fit_scope(self.data.train_examples(0), background,
                                                     self.train_cfg.batch_size, self.cfg.data.seed)
        if self.acc.is_main_process:
            pairs = f" and {counts['pair_keys']:,} pair keys" if "pair_keys" in counts else ""
            if "novel_positions" in counts:  # memory.scope_match ngram
                pairs = (f" (runs of ids, at {counts['novel_positions']:,} novel positions; "
                         f"{counts['without_a_run']:,} without one)")
            print(f"memory.scope keys: {counts['keys']:,} keys{pairs} from {counts['taught_states']:,} taught states "
                  f"against {counts['background_states']:,} background states")

    def _total_steps(self) -> int:
        if self.train_cfg.max_steps is not None:
            return self.train_cfg.max_steps
        per_epoch = len(self.data.train_examples(0)["input_ids"]) // self.global_batch
        return max(1, math.ceil(self.train_cfg.num_epochs * per_epoch))

    # -- data ----------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches for the next step; advances the data position."""
        s, G = self.state, self.global_batch
        examples = self.data.train_examples(s.epoch)
        if s.offset + G > len(examples["input_ids"]):
            s.epoch, s.offset = s.epoch + 1, 0
            examples = self.data.train_examples(s.epoch)
            if G > len(examples["input_ids"]):
                raise ConfigError("training.batch_size", f"one global batch ({G} rows) is larger than an epoch "
                                  f"({len(examples['input_ids'])} rows)")
        rows = {k: v[s.offset : s.offset + G] for k, v in examples.items()}
        s.offset += G
        b, W, r = self.train_cfg.batch_size, self.acc.num_processes, self.acc.process_index
        # row layout (micro-batch j, process w, row i) -> this process keeps its slice of each micro-batch
        return [{k: v.view(self.train_cfg.grad_accum_steps, W, b, -1)[j, r].to(self.acc.device) for k, v in rows.items()}
                for j in range(self.train_cfg.grad_accum_steps)]

    # -- one optimizer step ------------------------------------------------------------------------------------
    def _forward_backward(self, micro: list[dict]) -> dict:
        acc, memory = self.acc, self.unwrapped.memory
        local_tokens = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro)
        n_tokens = acc.reduce(local_tokens.float(), reduction="sum")
        ce_total, aux_value, scope_value, pooled, usage = 0.0, 0.0, 0.0, {}, None
        distill = self.cfg.data.replay_loss == "distill"  # (memory.scope gate also marks replayed tokens)
        for j, mb in enumerate(micro):
            last = j == len(micro) - 1
            with self.placement.no_sync(self.model, last), acc.autocast():
                # (fsdp: a forward is a collective, so every process runs the teacher if any might)
                replayed = "replay" in mb and (self.placement.fsdp or bool(mb["replay"].any()))
                teacher = self._teacher_logits(mb) if distill and replayed else None
                out = self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], router_aux=False)
                if teacher is None:
                    ce, _ = token_loss_sums(out.logits, mb["labels"])
                else:
                    ce = distill_loss_sum(out.logits, teacher, mb["labels"], mb["replay"])
                loss = ce * acc.num_processes / n_tokens  # DDP averages gradients over processes
                if memory is not None:
                    for i, x in memory.router_inputs().items():
                        pooled.setdefault(i, []).append(x)
                    usage = _add_usage(usage, memory.usage())
                    if "replay" in mb:  # memory.scope gate: its margin loss, a mean over the micro-batches
                        scope = memory.scope_loss(mb["replay"], mb["attention_mask"])
                        if scope is not None:
                            loss = loss + scope / len(micro)
                            scope_value += scope.item() / len(micro)
                    if last and pooled:  # router losses once, over the global batch
                        aux = memory.aux_loss({i: dist.gather_rows(acc, torch.cat(xs)) for i, xs in pooled.items()})
                        loss = loss + aux
                        aux_value = aux.item()
            acc.backward(loss)
            ce_total += ce.detach()
        self.placement.after_backward()
        lm = (acc.reduce(torch.as_tensor(ce_total, device=acc.device).float(), reduction="sum") / n_tokens).item()
        return {"loss": lm, "router_loss": aux_value, "scope_loss": scope_value, "tokens": int(n_tokens.item()),
                "usage": usage}

    @torch.no_grad()
    def _teacher_logits(self, mb: dict) -> torch.Tensor:
        """`data.replay_loss: distill`: the frozen base's logits (memory and LoRA off, eval mode) for a
        micro-batch."""
        model = self.unwrapped
        model.eval()
        try:
            with model.adapters_disabled():
                return model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], router_aux=False).logits
        finally:
            model.train()

    def loss_and_gradients(self) -> dict:
        """Forward and backward on the next global batch, gradients accumulated, no optimizer step (the LR
        finder's step, and the first half of a training step): loss, router_loss, tokens, usage."""
        return self._forward_backward(self._next_batch())

    def _step(self) -> dict:
        result = self.loss_and_gradients()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip is not None else float("inf")
        norm = self.placement.clip(params, max_norm)
        finite = (math.isfinite(result["loss"]) and math.isfinite(result["router_loss"])
                  and math.isfinite(result["scope_loss"]) and math.isfinite(norm))
        if finite:
            self.optimizer.step()
            self.state.bad_steps_in_a_row = 0
        else:
            self.state.bad_steps_in_a_row += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += result["tokens"]
        result.update(grad_norm=norm, skipped=not finite)
        return result

    # -- the loop --------------------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        t, s = self.train_cfg, self.state
        bar = tqdm(total=self.total_steps, initial=s.step, disable=not (self.progress and self.acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        start, window_tokens, window_t0, usage, last = time.time(), 0, time.time(), None, {}
        stop_reason = f"max steps ({self.total_steps})"
        self.model.train()
        while s.step < self.total_steps:
            r = self._step()
            window_tokens += r["tokens"]
            usage = _add_usage(usage, r["usage"])
            if r["skipped"]:
                self._log({"step": s.step, "skipped": True, "loss": r["loss"], "grad_norm": r["grad_norm"]})
                bar.write(f"step {s.step}: non-finite loss or gradient (loss {r['loss']}, grad norm "
                          f"{r['grad_norm']}); step skipped")
                if s.bad_steps_in_a_row >= t.max_bad_steps:
                    raise TrainingError(
                        f"{s.bad_steps_in_a_row} non-finite steps in a row (training.max_bad_steps="
                        f"{t.max_bad_steps}) at step {s.step}; stopped. Last good checkpoint: "
                        f"{ckpt.latest_checkpoint(self.run_dir) or 'none'}")
            if s.step % t.logging_steps == 0 or s.step == self.total_steps:
                elapsed = time.time() - window_t0
                last = {"step": s.step, "epoch": s.epoch, "loss": r["loss"], "router_loss": r["router_loss"],
                        **({"scope_loss": r["scope_loss"]} if self.cfg.memory.scope == "gate" else {}),
                        "grad_norm": r["grad_norm"], "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups}}
                if usage is not None:
                    last["router_usage"] = {str(i): c.tolist() for i, c in usage.items()}
                self._log(last)
                bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
                window_tokens, window_t0, usage = 0, time.time(), None
            bar.update(1)
            if t.eval_steps and s.step % t.eval_steps == 0 and self._eval_and_keep_best(probes=["recall_qa"]):
                stop_reason = f"early stopping (no {t.best_metric} improvement in {t.early_stopping_patience} evals)"
                break
            if t.save_steps and s.step % t.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        return self._finish(start, stop_reason)

    def _finish(self, start: float, stop_reason: str) -> dict:
        metrics = self.evaluate()
        metrics = {"step": self.state.step, **metrics}
        self._log({**metrics, "eval": True, "final": True})
        self._save_model_folder(self.run_dir / "final")
        if self.acc.is_main_process:
            from memory_transformer.train.plots import plot_run

            plot_run(self.run_dir)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        wall = time.time() - start
        summary = {"run_dir": str(self.run_dir), "steps": self.state.step, "wall_time_s": wall, "stop": stop_reason,
                   "param_counts": self.unwrapped.parameter_report()["parameters"], **metrics}
        if self.acc.is_main_process and self.progress:
            evaluated = (f"eval loss {metrics.get('eval_loss', float('nan')):.4f}"
                         if len(self.data.eval_examples["input_ids"]) else "no eval documents (data.eval_fraction)")
            print(f"done: {self.state.step} steps in {wall:.0f}s ({stop_reason}); {evaluated}; run folder "
                  f"{self.run_dir}")
        return summary

    # -- evaluation, best model, early stopping ------------------------------------------------------------------
    def evaluate(self, probes: list[str] | None = None) -> dict:
        with self.placement.evaluating():
            metrics = evaluate(self.unwrapped, self.tokenizer, self.data, self.acc, probes,
                               self.train_cfg.eval_recall_people, progress=self.progress and self.acc.is_main_process)
        self.model.train()
        return metrics

    def _eval_and_keep_best(self, probes: list[str]) -> bool:
        """Evaluate, log, save best/ when the chosen metric improves; True when early stopping says stop."""
        t, s = self.train_cfg, self.state
        metrics = self.evaluate(probes)
        self._log({"step": s.step, "eval": True, **metrics})
        value = metrics.get(t.best_metric)
        if value is None:
            raise ConfigError("training.best_metric", f"{t.best_metric!r} is not computed here; "
                              f"available: {', '.join(metrics)}")
        sign = -1.0 if lower_is_better(t.best_metric) else 1.0
        if s.best is None or sign * (value - s.best) > t.early_stopping_threshold:
            s.best, s.evals_without_improvement = value, 0
            self._save_model_folder(self.run_dir / "best", marker={"step": s.step, t.best_metric: value})
        else:
            s.evals_without_improvement += 1
        patience = t.early_stopping_patience
        return patience is not None and s.evals_without_improvement >= patience

    def _save_model_folder(self, folder: Path, marker: dict | None = None) -> None:
        """final/ or best/: the usual loadable model folder, written by the main process (under fsdp from the
        weights gathered from every process, so `load_model` reads it on one process)."""
        state = self.placement.model_state(self.model)  # a collective: every process calls it
        with self.placement.whole():
            if self.acc.is_main_process:
                ckpt.atomic_write_dir(folder, lambda d: save_model(self.unwrapped, d, state=state), marker=marker)
            self.acc.wait_for_everyone()

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Every process hands its RNG state and data position to the main process, which writes the folder; under
        fsdp or with chapters split, every process first writes its own part into the temp folder. The COMPLETE
        marker therefore comes after every process's state is in it."""
        processes = self._process_states()  # a collective: every process calls it
        tmp, skeleton = None, None
        if self.placement.every_process_writes:  # each its part, into the main process's temp folder first
            from accelerate.utils import broadcast_object_list

            final = ckpt.checkpoint_dir(self.run_dir, self.state.step)
            tmp = broadcast_object_list([ckpt.temp_dir(final) if self.acc.is_main_process else None])[0]
            skeleton = self.placement.write_own_part(self.model, self.optimizer, tmp)
            self.acc.wait_for_everyone()  # every part is written: only now may the folder be marked COMPLETE
        with self.placement.whole():
            if self.acc.is_main_process:
                ckpt.save_checkpoint(self.run_dir, self.state.step,
                                     lambda d: self._write_checkpoint(d, processes, skeleton),
                                     self.train_cfg.save_total_limit, tmp=tmp)
            self.acc.wait_for_everyone()

    def _process_states(self) -> list[dict[str, torch.Tensor]]:
        """RNG state and data position of every process, indexed by process (gathered to all of them)."""
        s = self.state
        own = {**ckpt.rng_state(), "data.epoch": torch.tensor(s.epoch), "data.offset": torch.tensor(s.offset)}
        if self.acc.num_processes == 1:
            return [own]
        from accelerate.utils import gather_object

        return gather_object([own])  # pickled in transit between live processes only; files stay safetensors

    def _write_checkpoint(self, d: Path, processes: list[dict[str, torch.Tensor]], skeleton: dict | None) -> None:
        """The checkpoint folder's files written by the main process (`skeleton`: see Placement.write_own_part)."""
        self.placement.write_main_part(self.unwrapped, self.optimizer, d, skeleton)
        ckpt.save_state_dict_tree(self.scheduler.state_dict(), d / "scheduler")
        if self.acc.scaler is not None:  # fp16 loss scale and its growth tracker
            ckpt.save_state_dict_tree(self.acc.scaler.state_dict(), d / "scaler")
        for rank, state in enumerate(processes):
            save_file(state, d / ckpt.process_filename(rank))
        (d / "trainer_state.json").write_text(json.dumps({**asdict(self.state), "num_processes": len(processes)}))

    def _restore(self, d: Path) -> None:
        verify_folder(d)
        self.placement.restore(self.unwrapped, self.optimizer, d)
        self.scheduler.load_state_dict(ckpt.load_state_dict_tree(d / "scheduler"))
        if self.acc.scaler is not None and (d / "scaler.json").is_file():
            self.acc.scaler.load_state_dict(ckpt.load_state_dict_tree(d / "scaler"))
        saved = json.loads((d / "trainer_state.json").read_text())
        saved_processes = saved.pop("num_processes", 1)
        self.state = TrainState(**saved)
        self._restore_process_state(d, saved_processes)
        self._continue_schedule()
        if self.acc.is_main_process:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
            if not self.new_run_dir:
                self._record_config_change()

    def _restore_process_state(self, d: Path, saved_processes: int) -> None:
        """This process's RNG state and data position. On another number of processes than the checkpoint's, the
        data goes on from the same global position but the run is no longer bit-exact (process r > 0 without a
        state of its own takes process 0's)."""
        rank, now = self.acc.process_index, self.acc.num_processes
        if saved_processes != now and self.acc.is_main_process:
            print(f"resuming a checkpoint of {saved_processes} process(es) on {now}: the data order goes on, but "
                  "random draws (dropout) differ from an uninterrupted run", file=sys.stderr)
        path = d / ckpt.process_filename(rank)
        if not path.is_file():  # more processes than saved, or a checkpoint from before per-process states
            path = d / ckpt.process_filename(0)
        if not path.is_file():
            path = d / "rng.safetensors"
        state = load_file(path)
        if "data.epoch" in state:
            self.state.epoch, self.state.offset = int(state.pop("data.epoch")), int(state.pop("data.offset"))
        ckpt.set_rng_state(state)

    def _continue_schedule(self) -> None:
        """A resumed run whose total steps changed (e.g. a larger max_steps) keeps its learning rate continuous
        from here (optim.continued_factor) instead of jumping to the new schedule's value at this step."""
        s = self.state
        if s.total_steps not in (None, self.total_steps):
            group = next((g for g in self.optimizer.param_groups if g["initial_lr"] > 0), None)
            s.lr_phase = [s.step, group["lr"] / group["initial_lr"] if group else 1.0]
        s.total_steps = self.total_steps
        if s.lr_phase is not None:
            saved = self.scheduler.state_dict()
            self.scheduler = make_scheduler(self.optimizer.optimizer, self.train_cfg, self.total_steps, s.lr_phase)
            self.scheduler.load_state_dict(saved)

    def _record_config_change(self) -> None:
        """Resumed with other training keys (e.g. max_steps): config.yaml becomes the config in use; the one
        it replaces is kept as config-before-step-NNNNNN.yaml."""
        path = self.run_dir / "config.yaml"
        if not path.is_file():
            return
        old, new = (_flat(c.to_dict()) for c in (load_config(path), self.cfg))
        diff = [f"{k.replace('/', '.')}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new})
                if old.get(k) != new.get(k)]
        if diff:
            kept = path.with_name(f"config-before-{ckpt.step_dirname(self.state.step)}.yaml")
            path.replace(kept)
            self.cfg.save(path)
            print(f"resumed at step {self.state.step} with {'; '.join(diff)} ({path} updated, the previous one "
                  f"kept as {kept.name})", file=sys.stderr)

    # -- logging ----------------------------------------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in _flat(row).items() if isinstance(v, (int, float)) and k != "step"}
        self.acc.log(scalars, step=row["step"])


def distill_loss_sum(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                     replay: torch.Tensor) -> torch.Tensor:
    """Summed loss over the predicted tokens: next-token cross-entropy where the target token belongs to the
    run's own data, KL(teacher || model) over the vocabulary where it belongs to a replayed document."""
    own = labels.masked_fill(replay.bool(), -100)
    ce, _ = token_loss_sums(logits, own)
    mask = replay[:, 1:].bool() & (labels[:, 1:] != -100)  # (B, T-1): predictions of replayed tokens
    student = logits[:, :-1][mask].float().log_softmax(-1)
    target = teacher[:, :-1][mask].float().log_softmax(-1)
    return ce + F.kl_div(student, target, log_target=True, reduction="sum")


def _add_usage(total: dict | None, usage: dict | None) -> dict | None:
    if usage is None:
        return total
    if total is None:
        return {i: c.clone() for i, c in usage.items()}
    return {i: total.get(i, 0) + c for i, c in usage.items()}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}/"))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint and the final eval: those run again."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= step and not json.loads(line).get("final")]
        path.write_text("".join(r + "\n" for r in rows))


def train(cfg: Config, resume: bool | str | None = None, progress: bool = True) -> dict:
    """Train `cfg` (Python API of `memory-transformer train`); returns the final metrics and run folder."""
    return Trainer(cfg, resume, progress).train()
