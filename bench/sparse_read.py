"""Forward + backward time of one memory read: every slot (SDPA) vs each query's best m slots (`slot_top_k`),
measured side by side on the same input.

    python bench/sparse_read.py [--batch 16] [--seq 256] [--hidden 128] [--slots 1024] [--top 8] [--repeats 10]

The top-m read scores all S slots outside autograd to choose, then recomputes only the m kept scores and reads
only their values with autograd, so its backward pass costs m per query instead of S.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank


def median_ms(attn: MemoryAttention, bank: MemoryBank, h: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):  # the first two warm up the allocator
        t0 = time.perf_counter()
        out, _ = attn(h, bank)
        out.sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--slots", type=int, default=1024)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    h = torch.randn(args.batch, args.seq, args.hidden, requires_grad=True)
    ms = {}
    for name, top in (("all slots (SDPA)", None), (f"best {args.top} slots", args.top)):
        attn = MemoryAttention(AttentionArgs(args.hidden, args.hidden, args.heads, wo_init="identity",
                                             learned_kv=True, slot_top_k=top))
        ms[name] = median_ms(attn, MemoryBank(args.slots, 1, args.hidden, learned_kv=True), h, args.repeats)
    print(f"one read, learned K/V: batch {args.batch} x {args.seq}, hidden {args.hidden}, {args.slots} slots, "
          f"{args.heads} heads, forward + backward, median of {args.repeats}, {torch.get_num_threads()} threads")
    for name, t in ms.items():
        print(f"  {name:<20}{t:>9.1f} ms")
    dense, sparse = ms.values()
    print(f"top-{args.top} / all = {sparse / dense:.2f}")


if __name__ == "__main__":
    main()
