"""Chapters sharded over processes (`memory.shard_chapters`) vs the whole bank on every process: bank bytes held by
each process and the training step time, 2 processes, for banks of 131,072 and 1,048,576 slots, in one run.

    python bench/distributed.py [--processes 2] [--slots 131072 1048576] [--chapter-size 1024] [--steps 5]

Starts itself under torchrun once per (slots, sharded) pair; each worker builds the trainer without a run folder,
warms up 2 steps, times `--steps` optimizer steps and reports the median. Bank bytes count the chapter
Parameters a process holds (AdamW keeps two more tensors of that size for every chapter it has updated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(slots: int, chapter_size: int, sharded: bool, steps: int) -> None:
    import torch

    from memory_transformer.config import load_config
    from memory_transformer.memory.bank import MemoryBank
    from memory_transformer.train.trainer import Trainer

    cfg = load_config({
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_seq_len": 64},
        "memory": {"num_tokens": slots, "num_chapters": slots // chapter_size, "top_k": 2, "num_heads": 4,
                   "layers": "last:1", "shard_chapters": sharded},
        "data": {"num_people": 20, "samples_per_epoch": 400},
        "training": {"max_steps": steps + 2, "batch_size": 8, "log_with": ["none"]},
    })
    trainer = Trainer(cfg, progress=False, run_dir=False)
    trainer.model.train()
    banks = {id(m): m for m in trainer.unwrapped.modules() if isinstance(m, MemoryBank)}.values()
    bank_bytes = sum(p.numel() * p.element_size() for b in banks for p in b.parameters())
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        trainer._step()
        times.append(time.perf_counter() - t0)
    if trainer.acc.is_main_process:
        print(json.dumps({"bank_bytes": bank_bytes, "step_s": statistics.median(times[2:]),
                          "threads": torch.get_num_threads()}))


def launch(processes: int, slots: int, chapter_size: int, sharded: bool, steps: int) -> dict:
    # --standalone: the launcher binds a free port itself (one chosen here could be taken before it binds it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           __file__, "--worker", "--slots", str(slots),
           "--chapter-size", str(chapter_size), "--steps", str(steps)] + (["--sharded"] if sharded else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--slots", type=int, nargs="+", default=[131_072, 1_048_576])
    p.add_argument("--chapter-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.slots[0], args.chapter_size, args.sharded, args.steps)
    print(f"{args.processes} processes, chapters of {args.chapter_size} slots, top-2, 1 memory layer, d=64")
    print("| slots | chapters | bank MiB / process, whole | sharded | step s, whole | sharded | sharded / whole |")
    print("|---|---|---|---|---|---|---|")
    for slots in args.slots:
        whole, sharded = (launch(args.processes, slots, args.chapter_size, s, args.steps) for s in (False, True))
        mib = 1 << 20
        print(f"| {slots:,} | {slots // args.chapter_size} | {whole['bank_bytes'] / mib:.1f} | "
              f"{sharded['bank_bytes'] / mib:.1f} | {whole['step_s']:.3f} | {sharded['step_s']:.3f} | "
              f"{sharded['step_s'] / whole['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
