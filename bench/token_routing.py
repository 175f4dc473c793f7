"""Token routing step ÷ sequence routing step, one memory layer, measured side by side in one run.

One `MemoryAttention` + `MemoryBank` called as the hooks call them (d=256, 4 heads, batch 8 x 256 tokens), a step
= forward + backward (+ an AdamW step over the layer and the bank). Setups: 1,024 slots in 1 chapter and
131,072 slots in 128 chapters (top-1), each with sequence and with token routing. The setups run interleaved,
repeated; the table gives the median of the per-repeat ratios token ÷ sequence.

    python bench/token_routing.py [--repeats 10] [--batch 8] [--seq 256] [--hidden 256] [--top-k 1]
                                  [--read default|projected] [--profile]

`--read default`: the library's default read (learned K/V, each query its best 8 slots); `--read projected`:
W_k, W_v and every slot of a chapter. `--profile` prints the torch.profiler table of one token-routed step at
131,072 slots instead of timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank

SIZES = {"1,024 slots / 1 chapter": (1024, 1), "131,072 slots / 128 chapters": (131072, 128)}
READS = {"default": {"learned_kv": True, "slot_top_k": 8, "wo_init": "identity"},
         "projected": {"learned_kv": False, "slot_top_k": None, "wo_init": "normal"}}


def make(slots: int, chapters: int, routing: str, args) -> tuple:
    torch.manual_seed(0)
    read = READS[args.read]
    attn = MemoryAttention(AttentionArgs(args.hidden, args.hidden, 4, chapters, args.top_k, routing=routing,
                                         **read)).train()
    bank = MemoryBank(slots, chapters, args.hidden, learned_kv=read["learned_kv"])
    params = [*attn.parameters(), *bank.parameters()]
    return attn, bank, torch.optim.AdamW(params, lr=1e-4, fused=True)  # as train/optim.py


def step(setup, h: torch.Tensor, adamw: bool) -> float:
    attn, bank, opt = setup
    t0 = time.perf_counter()
    out, _ = attn(h, bank)
    out.square().mean().backward()
    if adamw:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    setup = make(131072, 128, "token", args)
    h = torch.randn(args.batch, args.seq, args.hidden, requires_grad=True)
    for _ in range(2):
        step(setup, h, True)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(setup, h, True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--read", choices=list(READS), default="default")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    if args.profile:
        return profile(args)
    setups = {(size, routing): make(*SIZES[size], routing, args) for size in SIZES for routing in ("sequence", "token")}
    h = torch.randn(args.batch, args.seq, args.hidden, requires_grad=True)
    ms = {(key, adamw): [] for key in setups for adamw in (False, True)}
    for i in range(args.repeats + 2):  # interleaved: machine noise hits every setup alike
        for key, setup in setups.items():
            for adamw in (False, True):
                t = step(setup, h, adamw)
                if i >= 2:  # the first two warm up the allocator and AdamW's state
                    ms[key, adamw].append(t * 1e3)
    print(f"one memory layer, {args.read} read, d={args.hidden}, batch {args.batch} x {args.seq}, top_k "
          f"{args.top_k}, median of {args.repeats} interleaved repeats, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"| bank | step | sequence ms | token ms | token ÷ sequence |\n|---|---|---:|---:|---:|")
    for size in SIZES:
        for adamw in (False, True):
            seq, tok = ms[(size, "sequence"), adamw], ms[(size, "token"), adamw]
            ratio = statistics.median(t / s for s, t in zip(seq, tok))
            name = "fwd + bwd + AdamW" if adamw else "fwd + bwd"
            print(f"| {size} | {name} | {statistics.median(seq):.1f} | {statistics.median(tok):.1f} | "
                  f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
