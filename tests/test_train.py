"""The trainer: run folder, checkpoints, exact resume after SIGKILL, NaN skipping, param groups, global batch."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memory_transformer import ConfigError, load_config, load_model
from memory_transformer.train import checkpoint as ckpt
from memory_transformer.train.trainer import Trainer, TrainingError, train

TINY = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "max_seq_len": 64},
    "memory": {"num_tokens": 64, "num_chapters": 4, "top_k": 1, "num_heads": 4, "dropout": 0.1},
    "data": {"num_people": 6, "samples_per_epoch": 24},
    "training": {"max_steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "logging_steps": 1,
                 "log_with": ["none"], "save_total_limit": None},
}


def tiny(tmp_path, *overrides: str):
    return load_config(TINY, [f"training.output_dir={tmp_path / 'run'}", *overrides])


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def test_run_folder_layout_and_final_model(tmp_path):
    cfg = tiny(tmp_path, "training.eval_steps=4", "training.save_steps=4")
    summary = train(cfg, progress=False)
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "best", "final", "plots"} <= {p.name for p in run.iterdir()}
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 8]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"loss", "lr", "tokens_per_s", "router_usage", "grad_norm"} <= steps[0].keys()
    assert set(steps[0]["lr"]) == {"base", "memory_bank", "memory_attention", "router"}
    assert sum(sum(c) for c in steps[0]["router_usage"].values()) == 2 * 4  # 2 layers x 4 sequences x top-1
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in evals] == [4, 8, 8] and "recall_qa" in evals[0]
    assert {p.name for p in (run / "plots").iterdir()} == {"loss.png", "lr.png", "chapter_usage.png"}
    assert summary["steps"] == 8 and summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    model = load_model(run / "final")
    assert load_config(run / "config.yaml") == cfg
    x = torch.randint(0, 256, (2, 16))
    model2 = load_model(run / "checkpoints" / "step-000008")
    assert torch.equal(model.eval()(x).logits, model2.eval()(x).logits)


def test_refuses_to_overwrite_a_run_folder(tmp_path):
    cfg = tiny(tmp_path, "training.max_steps=2")
    train(cfg, progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, progress=False)
    assert str(e.value) == (f"training.output_dir: {tmp_path / 'run'} already holds a run; continue it with "
                            "--resume, or choose another output_dir (nothing was overwritten)")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_bad_data_fails_before_the_run_folder_exists(tmp_path):
    cfg = tiny(tmp_path, f"data.source={tmp_path / 'missing.jsonl'}")
    with pytest.raises(ConfigError, match="data.path: file not found"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_retention_keeps_newest(tmp_path):
    train(tiny(tmp_path, "training.save_steps=2", "training.save_total_limit=2"), progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [6, 8]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, "training.save_steps=2", "training.max_steps=4"), progress=False)
    real = ckpt.save_state_dict_tree
    calls = []

    def flaky(obj, path):
        calls.append(path)
        if len(calls) == 3:  # the optimizer state of the second checkpoint
            raise OSError("disk full")
        real(obj, path)

    monkeypatch.setattr(ckpt, "save_state_dict_tree", flaky)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]
    load_model(ckpt.latest_checkpoint(tmp_path / "run"))  # intact


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, "training.max_bad_steps=2", "training.save_steps=2"), progress=False)
    real = trainer._forward_backward

    def poisoned(micro):
        out = real(micro)
        if trainer.state.step in (2, 4, 5):  # 0-based step about to run: steps 3, 5, 6
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(trainer, "_forward_backward", poisoned)
    before = {}

    def snapshot(step):
        before[step] = [p.detach().clone() for p in trainer.unwrapped.parameters()]

    with pytest.raises(TrainingError) as e:
        real_step = trainer._step

        def step():
            snapshot(trainer.state.step)
            return real_step()

        monkeypatch.setattr(trainer, "_step", step)
        trainer.train()
    assert str(e.value).startswith("2 non-finite steps in a row (training.max_bad_steps=2) at step 6; stopped.")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3, 5, 6]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2, 4]
    after_skip = before[3]  # parameters before step 4 == after step 3 (skipped) == before step 3
    assert all(torch.equal(a, b) for a, b in zip(before[2], after_skip))


def test_param_groups_get_their_learning_rates(tmp_path):
    cfg = tiny(tmp_path, "training.lr={base: 0.001, memory_bank: 0.01, router: 0.0001}",
               "training.weight_decay={base: 0.1, memory_bank: 0.0}", "training.warmup_steps=0",
               "training.schedule=constant")
    trainer = Trainer(cfg, progress=False)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {n: g["lr"] for n, g in groups.items()} == {"base": 0.001, "memory_bank": 0.01, "memory_attention": 0.001,
                                                       "router": 0.0001}
    assert {n: g["weight_decay"] for n, g in groups.items()} == {"base": 0.1, "memory_bank": 0.0,
                                                                 "memory_attention": 0.1, "router": 0.1}
    model = trainer.unwrapped
    assert {id(p) for p in groups["memory_bank"]["params"]} == {id(p) for p in model.memory.banks.parameters()}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_frozen_components_are_not_trained(tmp_path):
    from memory_transformer.model import component_of

    cfg = tiny(tmp_path, "training.freeze=[memory_attention, router]", "training.max_steps=3")
    trainer = Trainer(cfg, progress=False)
    assert {g["name"] for g in trainer.optimizer.param_groups} == {"base", "memory_bank"}
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    trainer.train()
    after = dict(trainer.unwrapped.named_parameters())
    moved = {component_of(n) for n in before if not torch.equal(before[n], after[n])}
    assert moved == {"base", "memory_bank"}


def test_freezing_everything_trainable_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"training.freeze: \['memory_bank', 'memory_attention', 'router'\] "
                                          r"leaves nothing to train \(the base is frozen too\)"):
        Trainer(tiny(tmp_path, "model.freeze_base=true",
                     "training.freeze=[memory_bank, memory_attention, router]"), progress=False)
    with pytest.raises(ConfigError, match=r"training.freeze\[0\]: got 'base'; allowed"):
        tiny(tmp_path, "training.freeze=[base]")
    assert not (tmp_path / "run").exists()


def test_router_losses_see_the_global_batch(tmp_path):
    """batch 8 in one micro-batch == batch 4 x 2 accumulation steps (with per-micro-batch router statistics the
    load-balance term would differ)."""
    common = ["memory.dropout=0.0", "memory.router_loss.load_balance=1.0", "training.max_steps=3"]
    a = train(tiny(tmp_path / "a", *common, "training.batch_size=8"), progress=False)
    b = train(tiny(tmp_path / "b", *common, "training.batch_size=4", "training.grad_accum_steps=2"), progress=False)
    rows = [[json.loads(x) for x in (p / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]
            for p in (tmp_path / "a", tmp_path / "b")]
    for ra, rb in zip(*rows):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["router_loss"] == pytest.approx(rb["router_loss"], abs=1e-6)
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "memory_transformer", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


# Resume configurations (a row: config overrides). The learned sequence routing row reads 4 chapters, 2 per
# sequence: rows sharing a chapter made its gradient depend on the CPU thread schedule (issue 16, item 5).
RESUME_CASES = {
    "tiny": [],
    "sequence-4chapters-top2": ["memory.routing=sequence", "memory.num_chapters=4", "memory.top_k=2",
                                "memory.dropout=0.0", "model.hidden_size=64", "model.intermediate_size=128",
                                "memory.num_tokens=256", "model.max_seq_len=128"],
}


def _launch(processes: int, *args):
    """`memory-transformer` on 1 process, or under torchrun on several."""
    if processes == 1:
        return _cli(*args)
    # --standalone: the launcher binds a free port itself (a port chosen here and bound later by the launcher can
    # be taken in between, e.g. by the other run a test starts at the same time)
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.Popen([sys.executable, *torchrun, "-m", "memory_transformer", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and, at the same moment, all its descendants (torchrun starts each worker in a session
    of its own, so killing the launcher or its process group leaves the workers running)."""
    import psutil

    victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=30)


# (overrides, processes): each RESUME_CASES row on one process, and the tiny one on two (DDP: every process's
# RNG state and data position are in the checkpoint; with dropout each process draws its own masks)
# fsdp: the model and optimizer sharded, the checkpoint written by every process (sharded/); shard-chapters: each
# process holds half the chapters and their optimizer state (optimizer-R); resumed on the same sharding: exact too
RESUME_RUNS = {**{k: (v, 1) for k, v in RESUME_CASES.items()}, "tiny-2-processes": (RESUME_CASES["tiny"], 2),
               "tiny-2-processes-fsdp": ([*RESUME_CASES["tiny"], "training.distributed=fsdp"], 2),
               "tiny-2-processes-shard-chapters": ([*RESUME_CASES["tiny"], "memory.shard_chapters=true"], 2)}


@pytest.mark.parametrize("overrides, processes", RESUME_RUNS.values(), ids=RESUME_RUNS.keys())
def test_resume_after_sigkill_gives_identical_weights(tmp_path, overrides, processes):
    cfg_file = tmp_path / "cfg.yaml"
    load_config(TINY, ["training.max_steps=12", "training.save_steps=2", f"training.batch_size={4 // processes}",
                       *overrides]).save(cfg_file)
    ref = _launch(processes, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'ref'}")
    victim = _launch(processes, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'run'}")
    kill_at = random.Random(os.getpid()).choice([2, 4, 6, 8])
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        done = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")]
        if done and done[-1] >= kill_at:
            break
        time.sleep(0.02)
    assert victim.poll() is None, f"the run stopped before it could be killed: {victim.stderr.read()[-3000:]}"
    _kill_tree(victim.pid)
    victim.wait()
    assert not (tmp_path / "run" / "final").exists(), "the run finished before it could be killed"
    saved = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")]
    assert saved and saved[-1] < 12, f"killed with checkpoints {saved}: nothing or everything left to train"
    resumed = _launch(processes, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'run'}",
                      "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    a, b = weights(tmp_path / "ref" / "final"), weights(tmp_path / "run" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' not in x]
    assert steps == list(range(1, 13))  # rows after the checkpoint were dropped and logged again once


def test_backward_is_bit_exact_with_chapters_shared_by_rows(tmp_path):
    """The same batch twice gives bit-identical gradients (with 2+ CPU threads the chapter read's backward
    used to sum in thread order: runs, and resumed runs, drifted apart by ~1e-7 per step)."""
    cfg = tiny(tmp_path, *RESUME_CASES["sequence-4chapters-top2"], "training.batch_size=16")
    trainer = Trainer(cfg, progress=False, run_dir=False)
    trainer.model.train()
    micro = trainer._next_batch()
    grads = []
    for _ in range(4):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._forward_backward(micro)
        grads.append({n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if p.grad is not None})
    assert all(torch.equal(g[n], grads[0][n]) for g in grads[1:] for n in grads[0])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny(tmp_path)
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, resume=True, progress=False)
    assert str(e.value) == f"--resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}"


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    load_config(TINY, ["memory.dropout=0.0", "training.max_steps=4"]).save(cfg_file)
    one = _cli("train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'one'}",
               "--set", "training.batch_size=8")
    assert one.wait(timeout=300) == 0, one.stderr.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          "-m", "memory_transformer", "train", "--config", str(cfg_file),
                          "--set", f"training.output_dir={tmp_path / 'two'}", "--set", "training.batch_size=4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if '"eval"' not in x]

    a, b = losses("one"), losses("two")
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= 1e-5 for x, y in zip(a, b)), (a, b)


def test_lr_find_suggests_a_rate_and_plots(tmp_path):
    from memory_transformer.train.lr_find import lr_find

    result = lr_find(tiny(tmp_path), tmp_path / "lr", 1e-5, 1.0, steps=20, progress=False)
    assert 1e-5 <= result["suggested_lr"] <= 1.0
    assert len(result["lr"]) == len(result["loss"]) <= 20
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 1000
    assert not (tmp_path / "run").exists()


def test_early_stopping_and_tensorboard(tmp_path):
    cfg = tiny(tmp_path, "training.eval_steps=1", "training.early_stopping_patience=2",
               "training.early_stopping_threshold=100.0", "training.log_with=[tensorboard]")
    summary = train(cfg, progress=False)
    # the first eval sets the best; no later one improves by 100 nats: stop after 2 more evals
    assert summary["steps"] == 3 and summary["stop"].startswith("early stopping")
    assert json.loads((tmp_path / "run" / "best" / "COMPLETE").read_text())["step"] == 1
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_eval_and_quantize_commands(tmp_path):
    train(tiny(tmp_path, "training.max_steps=2"), progress=False)
    final = tmp_path / "run" / "final"
    run = [sys.executable, "-m", "memory_transformer"]
    r = subprocess.run([*run, "eval", "--checkpoint", str(final), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"eval_loss", "eval_ppl", "recall_qa", "recall_qa_heldout", "recall_bio", "knowledge_bits"} <= metrics.keys()
    q = subprocess.run([*run, "quantize", "--checkpoint", str(final), "--bits", "8", "--out", str(tmp_path / "q8")],
                       capture_output=True, text=True)
    assert q.returncode == 0, q.stderr
    assert load_model(tmp_path / "q8").config.memory.quantization == "int8"
    again = subprocess.run([*run, "quantize", "--checkpoint", str(final), "--bits", "8", "--out", str(tmp_path / "q8")],
                           capture_output=True, text=True)
    assert (again.returncode, again.stderr) == (2, f"error: --out: {tmp_path / 'q8'} exists and is not empty; "
                                                   "choose a new folder\n")


def test_resume_with_a_config_that_builds_another_model_is_refused(tmp_path):
    train(tiny(tmp_path, "training.max_steps=2", "training.save_steps=2"), progress=False)
    with pytest.raises(ConfigError) as e:  # e.g. a default changed since the run started
        Trainer(tiny(tmp_path, "training.max_steps=4", "memory.slot_top_k=4"), resume=True, progress=False)
    assert str(e.value) == (f"--resume: the config builds another model than the run in {tmp_path / 'run'} "
                            f"(memory.slot_top_k: 8 -> 4); resume with --config {tmp_path / 'run' / 'config.yaml'}")
    resumed = Trainer(tiny(tmp_path, "training.max_steps=4"), resume=True, progress=False)  # more steps: fine
    assert resumed.state.step == 2


def _flip_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_a_one_line_error_naming_the_file(tmp_path):
    train(tiny(tmp_path, "training.max_steps=2", "training.save_steps=2"), progress=False)
    run = tmp_path / "run"
    step2 = run / "checkpoints" / "step-000002"
    _flip_byte(step2 / "optimizer.safetensors")
    with pytest.raises(ConfigError) as e:
        Trainer(tiny(tmp_path, "training.max_steps=4"), resume=True, progress=False)
    assert str(e.value) == (f"{step2 / 'optimizer.safetensors'}: checksum mismatch (sha256 differs from "
                            f"{step2 / 'COMPLETE'}); the file is corrupt")
    _flip_byte(run / "final" / "model.safetensors")
    r = subprocess.run([sys.executable, "-m", "memory_transformer", "eval", "--checkpoint", str(run / "final")],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (2, f"error: {run / 'final' / 'model.safetensors'}: checksum mismatch "
                                           f"(sha256 differs from {run / 'final' / 'COMPLETE'}); the file is corrupt\n")


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_that_crashed_before_its_first_checkpoint_starts_again_with_resume(tmp_path, monkeypatch, capsys):
    cfg = tiny(tmp_path, "training.max_steps=3", "training.save_steps=3")
    crashing = Trainer(cfg, progress=False)
    real_step = crashing._step

    def step():
        if crashing.state.step == 1:
            raise RuntimeError("killed")
        return real_step()

    monkeypatch.setattr(crashing, "_step", step)
    with pytest.raises(RuntimeError, match="killed"):
        crashing.train()
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, progress=False)
    assert str(e.value) == (f"training.output_dir: {run} already holds a run; it stopped before its first "
                            "checkpoint: start it again from step 0 with --resume, or choose another output_dir "
                            "(nothing was overwritten)")
    capsys.readouterr()
    resumed = Trainer(cfg, resume=True, progress=False)
    assert capsys.readouterr().err == (f"{run} has no checkpoint yet (the run stopped before its first save): "
                                       "starting again from step 0\n")
    assert resumed.state.step == 0 and not (run / "metrics.jsonl").exists()
    resumed.train()
    assert [r["step"] for r in _rows(run) if not r.get("eval")] == [1, 2, 3]


def test_resume_refuses_a_finished_run_without_checkpoints(tmp_path):
    cfg = tiny(tmp_path, "training.max_steps=2")  # save_steps null: only final/
    train(cfg, progress=False)
    with pytest.raises(ConfigError) as e:
        Trainer(tiny(tmp_path, "training.max_steps=4"), resume=True, progress=False)
    run = tmp_path / "run"
    assert str(e.value) == (f"--resume: no complete checkpoint in {run / 'checkpoints'}; {run / 'final'} holds a "
                            "saved model (nothing was overwritten)")


def test_resume_another_runs_checkpoint_into_a_new_run_folder(tmp_path):
    train(tiny(tmp_path, "training.max_steps=2", "training.save_steps=2"), progress=False)
    source = tmp_path / "run" / "checkpoints" / "step-000002"
    new = tmp_path / "new"
    cfg = load_config(TINY, [f"training.output_dir={new}", "training.max_steps=3"])
    summary = Trainer(cfg, resume=str(source), progress=False).train()
    assert summary["steps"] == 3
    assert load_config(new / "config.yaml") == cfg
    assert [(r["step"], bool(r.get("eval"))) for r in _rows(new)] == [(3, False), (3, True)]
    assert (new / "final" / "COMPLETE").is_file()
    with pytest.raises(ConfigError) as e:  # a saved model is no training checkpoint
        Trainer(load_config(TINY, [f"training.output_dir={tmp_path / 'other'}"]), resume=str(tmp_path / "run" / "final"),
                progress=False)
    assert str(e.value) == (f"--resume: {tmp_path / 'run' / 'final'} is a saved model, not a training checkpoint "
                            "(no trainer_state.json); resume from a checkpoints/step-NNNNNN folder")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as e:
        Trainer(load_config(TINY, [f"training.output_dir={tmp_path / 'junk'}"]), resume=str(source), progress=False)
    assert str(e.value) == (f"training.output_dir: {tmp_path / 'junk'} is not empty and holds no run (no config.yaml); "
                            "choose a new output_dir to continue the checkpoint in")


def test_resuming_a_finished_run_logs_its_final_eval_once(tmp_path):
    cfg = tiny(tmp_path, "training.max_steps=2", "training.save_steps=2")
    train(cfg, progress=False)
    Trainer(cfg, resume=True, progress=False).train()
    assert [(r["step"], r.get("final")) for r in _rows(tmp_path / "run") if r.get("eval")] == [(2, True)]


def test_eval_recall_people_limits_the_recall_probes_and_shows_progress(tmp_path, monkeypatch, capsys):
    import memory_transformer.evaluate as ev

    sizes = []
    real = ev.recall

    def counting(model, tokenizer, items, **kw):
        sizes.append((len(items), kw["progress"], kw["desc"]))
        return real(model, tokenizer, items, **kw)

    monkeypatch.setattr(ev, "recall", counting)
    trainer = Trainer(tiny(tmp_path, "training.max_steps=1", "training.eval_recall_people=2"), progress=True)
    metrics = trainer.evaluate(probes=["recall_qa", "recall_bio"])
    n_attr = len(trainer.data.facts.recall_items("qa")) // 6  # TINY has 6 people
    assert sizes == [(2 * n_attr, True, "recall_qa"), (2 * n_attr, True, "recall_bio")]
    assert metrics["knowledge_bits"] == trainer.data.facts.knowledge_bits  # still all 6 people's
    assert "recall_qa" in capsys.readouterr().err  # the tqdm bar
    with pytest.raises(ConfigError, match="training.eval_recall_people: must be a positive integer, got 0"):
        tiny(tmp_path, "training.eval_recall_people=0")


def test_resume_with_more_steps_records_the_change_and_keeps_the_lr_continuous(tmp_path, capsys):
    from memory_transformer.train.optim import continued_factor

    cfg = tiny(tmp_path, "training.max_steps=4", "training.save_steps=4", "training.warmup_steps=2")
    train(cfg, progress=False)
    run = tmp_path / "run"
    more = tiny(tmp_path, "training.max_steps=8", "training.save_steps=4", "training.warmup_steps=2")
    capsys.readouterr()
    Trainer(more, resume=True, progress=False).train()
    assert capsys.readouterr().err.startswith("resumed at step 4 with training.max_steps: 4 -> 8 ")
    assert load_config(run / "config.yaml") == more and load_config(run / "final" / "config.yaml") == more
    assert load_config(run / "config-before-step-000004.yaml") == cfg
    lrs = {r["step"]: r["lr"]["base"] for r in _rows(run) if not r.get("eval")}
    assert lrs[4] == 0.0  # the cosine had ended: warm up again from 0, then decay to 0 at step 8
    assert [lrs[s] for s in (5, 6, 7, 8)] == [3e-3 * continued_factor(s, 4, 0.0, 8, 2, "cosine") for s in (5, 6, 7, 8)]
    assert [round(lrs[s] / 3e-3, 6) for s in (5, 6, 7, 8)] == [0.5, 1.0, 0.5, 0.0]
    state = json.loads((run / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert (state["total_steps"], state["lr_phase"]) == (8, [4, 0.0])


def test_continued_factor_goes_on_from_the_current_rate():
    from memory_transformer.train.optim import continued_factor

    assert continued_factor(10, 10, 0.6, 30, 5, "cosine") == 0.6  # no jump at the change
    assert continued_factor(20, 10, 0.6, 30, 5, "cosine") == pytest.approx(0.3)
    assert continued_factor(30, 10, 0.6, 30, 5, "linear") == 0.0
    assert continued_factor(25, 10, 0.6, 30, 5, "constant") == 0.6


def test_a_kill_after_the_final_eval_row_logs_it_once_after_resume(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "training.max_steps=2", "training.save_steps=2")
    real = ckpt.atomic_write_dir

    def dies_at_final(folder, write, marker=None, tmp=None):
        if folder.name == "final":  # the final eval row is logged, final/ not yet written
            raise RuntimeError("killed")
        return real(folder, write, marker, tmp)

    monkeypatch.setattr(ckpt, "atomic_write_dir", dies_at_final)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, progress=False)
    monkeypatch.undo()
    Trainer(cfg, resume=True, progress=False).train()
    assert [(r["step"], r.get("final")) for r in _rows(tmp_path / "run") if r.get("eval")] == [(2, True)]


def test_resume_restores_the_grad_scaler(tmp_path, monkeypatch):
    """fp16 training's loss scale is in the checkpoint. A CPU has no fp16 autocast (accelerate makes no scaler
    there), so the accelerator gets a CPU GradScaler whose scale doubles every step."""
    import memory_transformer.train.trainer as trainer_module

    real = trainer_module.make_accelerator

    def with_scaler(**kw):
        acc = real(**kw)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
        return acc

    monkeypatch.setattr(trainer_module, "make_accelerator", with_scaler)
    cfg = tiny(tmp_path, "training.max_steps=2", "training.save_steps=2")
    first = Trainer(cfg, progress=False)
    first.train()
    assert first.acc.scaler.get_scale() == 2.0**10
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "scaler.json").is_file()
    resumed = Trainer(tiny(tmp_path, "training.max_steps=4", "training.save_steps=2"), resume=True, progress=False)
    assert resumed.acc.scaler.get_scale() == 2.0**10
    resumed.train()
    assert resumed.acc.scaler.get_scale() == 2.0**12
