"""Token routing step ÷ sequence routing step, one memory layer, measured side by side in one run.

One `MemoryAttention` + `MemoryBank` called as the hooks call them (d=256, 4 heads, batch 8 x 256 tokens), a step
= forward + backward (+ an optimizer step over the layer and the bank, as train/optim.py makes it). Setups: 1,024
slots in 1 chapter and 131,072 slots in 128 chapters (top-1), each with sequence and with token routing, and with
each bank optimizer asked for. The setups run interleaved, repeated; the table gives the median of the
per-repeat ratios token ÷ sequence.

    python bench/token_routing.py [--repeats 10] [--batch 8] [--seq 256] [--hidden 256] [--top-k 1]
                                  [--read default|projected] [--bank-optimizer adamw [lazy_adam] [frozen]]
                                  [--profile]

`--read default`: the library's default read (learned K/V, each query its best 8 slots); `--read projected`:
W_k, W_v and every slot of a chapter. `--bank-optimizer`: fused AdamW over everything (`training.bank_optimizer:
adamw`), and/or row-sparse bank gradients with the lazy AdamW for the bank (`lazy_adam`), and/or the bank frozen
(`frozen`: no bank gradient or update, the floor any bank optimizer can reach); with adamw and lazy_adam, a last
line gives the lazy token step ÷ the AdamW sequence step. `--profile` prints the torch.profiler table of three
token-routed steps at 131,072 slots (per bank optimizer) instead of timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.train.optim import LazyBankAdamW

SIZES = {"1,024 slots / 1 chapter": (1024, 1), "131,072 slots / 128 chapters": (131072, 128)}
READS = {"default": {"learned_kv": True, "slot_top_k": 8, "wo_init": "identity"},
         "projected": {"learned_kv": False, "slot_top_k": None, "wo_init": "normal"}}


def make(slots: int, chapters: int, routing: str, bank_optimizer: str, args) -> tuple:
    torch.manual_seed(0)
    read = READS[args.read]
    attn = MemoryAttention(AttentionArgs(args.hidden, args.hidden, 4, chapters, args.top_k, routing=routing,
                                         **read)).train()
    bank = MemoryBank(slots, chapters, args.hidden, learned_kv=read["learned_kv"])
    if bank_optimizer == "frozen":  # the bank not trained: no bank gradient, no bank update (the floor)
        bank.requires_grad_(False)
        return attn, bank, torch.optim.AdamW(attn.parameters(), lr=1e-4, fused=True)
    if bank_optimizer == "adamw":
        return attn, bank, torch.optim.AdamW([*attn.parameters(), *bank.parameters()], lr=1e-4, fused=True)
    bank.use_sparse_grad()  # as build_model does for lazy_adam; the optimizer as make_optimizer makes it
    groups = [{"params": list(attn.parameters()), "lr": 1e-4, "weight_decay": 0.0, "lazy": False},
              {"params": list(bank.parameters()), "lr": 1e-4, "weight_decay": 0.0, "lazy": True,
               "row_width": args.hidden // 4}]
    return attn, bank, LazyBankAdamW(groups, betas=(0.9, 0.999), eps=1e-8)


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
    for bank_optimizer in args.bank_optimizer:
        setup = make(131072, 128, "token", bank_optimizer, args)
        h = torch.randn(args.batch, args.seq, args.hidden, requires_grad=True)
        for _ in range(4):  # the allocator and the optimizer's state settle
            step(setup, h, True)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(setup, h, True)
        print(f"token routing, 131,072 slots / 128 chapters, bank optimizer {bank_optimizer}, 3 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--read", choices=list(READS), default="default")
    p.add_argument("--bank-optimizer", nargs="+", choices=["adamw", "lazy_adam", "frozen"], default=["adamw"])
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    if args.profile:
        return profile(args)
    setups = {(size, routing, o): make(*SIZES[size], routing, o, args)
              for size in SIZES for o in args.bank_optimizer for routing in ("sequence", "token")}
    h = torch.randn(args.batch, args.seq, args.hidden, requires_grad=True)
    ms = {(key, adamw): [] for key in setups for adamw in (False, True)}
    for i in range(args.repeats + 2):  # interleaved: machine noise hits every setup alike
        for key, setup in setups.items():
            for adamw in (False, True):
                t = step(setup, h, adamw)
                if i >= 2:  # the first two warm up the allocator and the optimizer's state
                    ms[key, adamw].append(t * 1e3)
    print(f"one memory layer, {args.read} read, d={args.hidden}, batch {args.batch} x {args.seq}, top_k "
          f"{args.top_k}, median of {args.repeats} interleaved repeats, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| bank | bank optimizer | step | sequence ms | token ms | token ÷ sequence |\n|---|---|---|---:|---:|---:|")
    for size in SIZES:
        for o in args.bank_optimizer:
            for adamw in (False, True):
                seq, tok = ms[(size, "sequence", o), adamw], ms[(size, "token", o), adamw]
                ratio = statistics.median(t / s for s, t in zip(seq, tok))
                name = "fwd + bwd + optimizer" if adamw else "fwd + bwd"
                print(f"| {size} | {o} | {name} | {statistics.median(seq):.1f} | {statistics.median(tok):.1f} | "
                      f"{ratio:.2f} |")
    if {"adamw", "lazy_adam"} <= set(args.bank_optimizer):
        for size in SIZES:
            seq, tok = ms[(size, "sequence", "adamw"), True], ms[(size, "token", "lazy_adam"), True]
            print(f"{size}, fwd + bwd + optimizer: token with lazy_adam ÷ sequence with adamw = "
                  f"{statistics.median(t / s for s, t in zip(seq, tok)):.2f}")


if __name__ == "__main__":
    main()
