"""Checkpoint folder edge cases (after torchtitan's checkpoint tests) and pickle-free state round trips."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from memory_transformer.train import checkpoint as ckpt
from memory_transformer.train.checkpoint import (
    atomic_write_dir,
    clean_stale_temp,
    latest_checkpoint,
    list_checkpoints,
    load_state_dict_tree,
    rng_state,
    save_checkpoint,
    save_state_dict_tree,
    set_rng_state,
)
from memory_transformer.integrity import verify_folder
from memory_transformer.config import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"


def write_payload(text: str):
    def write(folder: Path) -> None:
        (folder / "payload.txt").write_text(text)

    return write


def steps(run_dir: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run_dir)]


# --------------------------------------------------------------------------- folders


def test_keeps_last_k(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, write_payload(f"s{step}"), keep_last=2)
    assert steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_keep_last_none_keeps_all(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, write_payload("x"), keep_last=None)
    assert steps(tmp_path) == [10, 20, 30]


def test_keep_last_never_deletes_the_new_one(tmp_path):
    # resuming from step 2 and re-saving it while step 3 exists: step 2 is older, but just written
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, write_payload("x"), keep_last=None)
    save_checkpoint(tmp_path, 2, write_payload("again"), keep_last=1)
    assert steps(tmp_path) == [2, 3]


def test_keep_last_rejects_zero(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, write_payload("x"), keep_last=0)


def test_returns_max_valid_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 100, 20):
        save_checkpoint(tmp_path, step, write_payload("x"), keep_last=None)
    (tmp_path / "checkpoints" / "step-000999").mkdir()  # no COMPLETE marker
    (tmp_path / "checkpoints" / "notes.txt").write_text("ignore me")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000100"
    assert steps(tmp_path) == [5, 20, 100]


def test_step_names_are_zero_padded_and_marked(tmp_path):
    path = save_checkpoint(tmp_path, 42, write_payload("x"), keep_last=None)
    assert path == tmp_path / "checkpoints" / "step-000042"
    payload = hashlib.sha256(b"x").hexdigest()
    assert (path / "COMPLETE").read_text() == f'{{"step": 42, "sha256": {{"payload.txt": "{payload}"}}}}'
    assert latest_checkpoint(tmp_path) == path


def test_incomplete_checkpoint_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, write_payload("x"), keep_last=None)
    root = tmp_path / "checkpoints"
    (root / "step-000002").mkdir()  # crashed before its marker (e.g. written by another tool)
    (root / "step-000002" / "payload.txt").write_text("half")
    tmp = root / ".tmp-step-000003-12345"
    tmp.mkdir()
    (tmp / "COMPLETE").write_text('{"step": 3}')  # even a marked temp folder is not a checkpoint
    (root / "step-abc").mkdir()
    (root / "step-abc" / "COMPLETE").write_text("{}")
    assert steps(tmp_path) == [1]
    assert latest_checkpoint(tmp_path) == root / "step-000001"


def test_crash_during_write_keeps_previous(tmp_path):
    save_checkpoint(tmp_path, 1, write_payload("good"), keep_last=1)

    def crashing_write(folder: Path) -> None:
        (folder / "payload.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, crashing_write, keep_last=1)
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step-000001"
    assert (latest / "payload.txt").read_text() == "good"
    assert not (tmp_path / "checkpoints" / "step-000002").exists()
    assert steps(tmp_path) == [1]


def test_parts_written_by_other_processes_are_marked_only_with_the_folder(tmp_path):
    """Under FSDP the other processes write their shards into the main process's temp folder first: those files
    are in the COMPLETE marker's checksums; if the main process's part fails, the temp folder goes with them and
    the previous checkpoint stays the latest."""
    save_checkpoint(tmp_path, 1, write_payload("good"))
    tmp = ckpt.temp_dir(ckpt.checkpoint_dir(tmp_path, 2))
    (tmp / "sharded").mkdir()
    (tmp / "sharded" / "shard-00002.safetensors").write_bytes(b"process 1")
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, lambda d: (_ for _ in ()).throw(RuntimeError("disk full")), tmp=tmp)
    assert steps(tmp_path) == [1] and not tmp.exists()
    tmp = ckpt.temp_dir(ckpt.checkpoint_dir(tmp_path, 2))
    (tmp / "sharded").mkdir()
    (tmp / "sharded" / "shard-00002.safetensors").write_bytes(b"process 1")
    final = save_checkpoint(tmp_path, 2, write_payload("main"), tmp=tmp)
    assert steps(tmp_path) == [1, 2] and (final / "payload.txt").read_text() == "main"
    assert "sharded/shard-00002.safetensors" in json.loads((final / "COMPLETE").read_text())["sha256"]
    verify_folder(final)


def test_survives_failed_delete(tmp_path, monkeypatch, caplog):
    save_checkpoint(tmp_path, 1, write_payload("one"), keep_last=1)
    real_rmtree = shutil.rmtree

    def flaky_rmtree(path, *args, **kwargs):
        if "step-000001" in str(path):
            raise PermissionError(f"busy: {path}")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", flaky_rmtree)
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        path = save_checkpoint(tmp_path, 2, write_payload("two"), keep_last=1)
    assert path == tmp_path / "checkpoints" / "step-000002"
    assert (path / "payload.txt").read_text() == "two"
    assert "could not delete" in caplog.text
    # the half-deleted folder is out of the listing, and clean_stale_temp finishes the job
    assert steps(tmp_path) == [2]
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    clean_stale_temp(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def test_resave_same_step_replaces(tmp_path):
    save_checkpoint(tmp_path, 7, write_payload("first"), keep_last=3)
    (tmp_path / "checkpoints" / "step-000007" / "only_in_first.txt").write_text("x")
    path = save_checkpoint(tmp_path, 7, write_payload("second"), keep_last=3)
    assert (path / "payload.txt").read_text() == "second"
    assert not (path / "only_in_first.txt").exists()
    assert steps(tmp_path) == [7]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000007"]


def test_atomic_write_dir_replaces_only_when_complete(tmp_path):
    best = tmp_path / "best"
    atomic_write_dir(best, write_payload("v1"))
    assert (best / "payload.txt").read_text() == "v1"
    assert (best / "COMPLETE").is_file()

    seen_during_write = []

    def failing_write(folder: Path) -> None:
        (folder / "payload.txt").write_text("v2-partial")
        seen_during_write.append((best / "payload.txt").read_text())
        raise OSError("killed")

    with pytest.raises(OSError, match="killed"):
        atomic_write_dir(best, failing_write)
    assert seen_during_write == ["v1"]
    assert (best / "payload.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # failed temp folder removed

    atomic_write_dir(best, write_payload("v2"))
    assert (best / "payload.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def _flip_byte(path: Path, at: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_folder_names_a_flipped_or_missing_file(tmp_path):
    def write(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)))
        (folder / "state.json").write_text('{"a": 1}')

    path = save_checkpoint(tmp_path, 3, write, keep_last=None)
    verify_folder(path)  # intact
    _flip_byte(path / "sub" / "weights.bin")
    with pytest.raises(ConfigError) as e:
        verify_folder(path)
    assert str(e.value) == (f"{path / 'sub' / 'weights.bin'}: checksum mismatch (sha256 differs from "
                            f"{path / 'COMPLETE'}); the file is corrupt")
    (path / "sub" / "weights.bin").unlink()
    with pytest.raises(ConfigError) as e:
        verify_folder(path)
    assert str(e.value) == f"{path / 'sub' / 'weights.bin'}: missing (listed in {path / 'COMPLETE'}); the checkpoint is damaged"
    old = save_checkpoint(tmp_path, 4, write_payload("x"), keep_last=None)
    (old / "COMPLETE").write_text('{"step": 4}')  # written before checksums were recorded: passes
    verify_folder(old)


def test_stale_temp_of_same_name_is_replaced(tmp_path):
    stale = tmp_path / "checkpoints" / f".tmp-step-000001-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "junk.bin").write_bytes(b"junk")
    path = save_checkpoint(tmp_path, 1, write_payload("x"), keep_last=None)
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "payload.txt"]


def test_clean_stale_temp(tmp_path):
    save_checkpoint(tmp_path, 1, write_payload("x"), keep_last=None)
    (tmp_path / "checkpoints" / ".tmp-step-000002-999").mkdir()
    (tmp_path / ".tmp-final-999").mkdir()
    clean_stale_temp(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    clean_stale_temp(tmp_path / "does-not-exist")  # nothing to do is fine


def test_clean_stale_temp_restores_interrupted_replace(tmp_path):
    # crash between moving the old step-000003 aside and renaming its replacement in
    path = save_checkpoint(tmp_path, 3, write_payload("old"), keep_last=None)
    os.replace(path, tmp_path / "checkpoints" / ".old-step-000003-999")
    assert latest_checkpoint(tmp_path) is None
    clean_stale_temp(tmp_path)
    assert latest_checkpoint(tmp_path) == path
    assert (path / "payload.txt").read_text() == "old"


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from memory_transformer.train.checkpoint import save_checkpoint

    def slow_write(folder):
        with open(folder / "weights.bin", "wb") as f:
            for i in range(1000):
                f.write(os.urandom(64 * 1024))
                f.flush()
                if i == 2:
                    print("writing", flush=True)
                time.sleep(0.01)

    save_checkpoint(Path(sys.argv[1]), 2, slow_write, keep_last=1)
    print("finished", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_write_keeps_previous(tmp_path):
    weights = os.urandom(256 * 1024)
    save_checkpoint(tmp_path, 1, lambda d: (d / "weights.bin").write_bytes(weights), keep_last=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()

    leftover = tmp_path / "checkpoints" / f".tmp-step-000002-{child.pid}"
    assert (leftover / "weights.bin").is_file() and not (leftover / "COMPLETE").exists()
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step-000001"
    assert (latest / "weights.bin").read_bytes() == weights
    assert steps(tmp_path) == [1]
    clean_stale_temp(tmp_path)
    assert not leftover.exists()
    assert steps(tmp_path) == [1]


# --------------------------------------------------------------------------- RNG state


def draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(4).tolist(),
        torch.randn(2).tolist(),
    )


@pytest.mark.parametrize("pending_gauss", [False, True], ids=["plain", "pending_gauss"])
def test_rng_state_round_trip(tmp_path, pending_gauss):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    if pending_gauss:  # leaves a cached second normal in both python and numpy state
        random.gauss(0.0, 1.0)
        np.random.standard_normal()
    state = rng_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, str(tmp_path / "rng.safetensors"))
    expected = draw()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw() != expected
    set_rng_state(load_file(str(tmp_path / "rng.safetensors")))
    assert draw() == expected


def test_python_rng_state_is_exact():
    random.seed(5)
    random.gauss(0.0, 1.0)
    before = random.getstate()
    set_rng_state(rng_state())
    assert random.getstate() == before


# --------------------------------------------------------------------------- optimizer / scheduler


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[3])
    return model, opt, sched


def train_step(model, opt, sched, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    sched.step()


def test_optimizer_and_scheduler_round_trip(tmp_path):
    model, opt, sched = make_training()
    for step in range(5):
        train_step(model, opt, sched, step)
    save_state_dict_tree(opt.state_dict(), tmp_path / "optimizer")
    save_state_dict_tree(sched.state_dict(), tmp_path / "scheduler")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "optimizer.json",
        "optimizer.safetensors",
        "scheduler.json",
        "scheduler.safetensors",
    ]

    loaded_opt = load_state_dict_tree(tmp_path / "optimizer")
    assert sorted(loaded_opt["state"]) == sorted(opt.state_dict()["state"])  # int keys survive
    assert loaded_opt["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples survive
    assert load_state_dict_tree(tmp_path / "scheduler") == sched.state_dict()

    model2, opt2, sched2 = make_training(seed=123)
    model2.load_state_dict(weights)
    opt2.load_state_dict(loaded_opt)
    sched2.load_state_dict(load_state_dict_tree(tmp_path / "scheduler"))
    for step in range(5, 8):
        train_step(model, opt, sched, step)
        train_step(model2, opt2, sched2, step)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_state_dict_tree_exact_values(tmp_path):
    tree = {
        "ints": {0: torch.arange(3), 7: [1, 2.5, None, "s", True]},
        "floats": {"third": 1 / 3, "big": 1e300, "inf": float("inf")},
        "tuple": (1, (2.0, "x")),
        "bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
        "scalar": torch.tensor(4.0),
        "empty": {},
    }
    save_state_dict_tree(tree, tmp_path / "tree.safetensors")  # a suffix given is tolerated
    got = load_state_dict_tree(tmp_path / "tree")
    assert got.keys() == tree.keys()
    assert list(got["ints"]) == [0, 7] and torch.equal(got["ints"][0], tree["ints"][0])
    assert got["ints"][7] == [1, 2.5, None, "s", True]
    assert got["floats"] == tree["floats"] and got["tuple"] == tree["tuple"]
    assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"], tree["bf16"])
    assert got["scalar"].shape == () and got["scalar"].item() == 4.0
    assert got["empty"] == {}


def test_state_dict_tree_rejects_unpicklable_free_types(tmp_path):
    with pytest.raises(TypeError, match="a/b"):
        save_state_dict_tree({"a": {"b": object()}}, tmp_path / "bad")



def test_grad_scaler_round_trip(tmp_path):
    """The fp16 loss scale and its growth tracker survive save_state_dict_tree (accelerate makes no GradScaler on
    a CPU, so the trainer's use of it is tested with a CPU GradScaler in test_train.py)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    for grad in (1.0, float("inf"), 1.0, 1.0):  # an overflow halves the scale, then two good steps count up
        opt.zero_grad()
        scaler.scale((w * grad).sum()).backward()
        scaler.step(opt)
        scaler.update()
    save_state_dict_tree(scaler.state_dict(), tmp_path / "scaler")
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_state_dict_tree(tmp_path / "scaler"))
    assert restored.state_dict() == scaler.state_dict()
    assert (restored.get_scale(), restored.state_dict()["_growth_tracker"]) == (2.0**7, 2)
