"""Training-step time vs bank size, measured side by side in one run on the same tiny base.

(a) memory off, (b) 1,024 slots in 1 chapter, (c) 131,072 slots in 128 chapters with top_k 1,
(d) 131,072 slots dense. A step is forward + backward + AdamW step. Prints the median step time of each
and the ratios c/b (routing should make bank size nearly free: expected <= 1.3) and b/a (the cost of memory).

    python bench/memory_scaling.py [--steps 10] [--batch 8] [--seq 256] [--hidden 128] [--layers 4]
                                   [--read projected|default]

`--read projected` (the default here): projected K/V and every slot of a chapter, the read the numbers in
docs/experiments.md were first measured with. `--read default`: the library's default read (learned K/V, each
query its best 8 slots); (d) is skipped then, since choosing 8 of 131,072 slots materialises every score.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memory_transformer import build_model, load_config

SETUPS = {
    "a: memory off": {"enabled": False},
    "b: 1,024 slots, 1 chapter": {"num_tokens": 1024, "num_chapters": 1, "top_k": 1},
    "c: 131,072 slots, 128 chapters, top_k 1": {"num_tokens": 131072, "num_chapters": 128, "top_k": 1},
    "d: 131,072 slots dense": {"num_tokens": 131072, "num_chapters": 1, "top_k": 1},
}


PROJECTED = {"wo_init": "normal", "kv": "projected", "slot_top_k": None}


def make(memory: dict, args) -> tuple:
    read = PROJECTED if args.read == "projected" else {}
    cfg = load_config({
        "model": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": 4, "max_seq_len": args.seq},
        "memory": {"num_heads": 4, "layers": "all", **read, **memory},
        "training": {"max_steps": 1},
    })
    model = build_model(cfg).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train/optim.py


def memory_flops_ratio(args) -> float:
    """(base + memory) / base multiply-adds per forward for setup b, counted from the shapes."""
    d, T, B, L, S, V = args.hidden, args.seq, args.batch, args.layers, 1024, 259
    base_layer = B * T * (4 * d * d + 3 * d * 4 * d) + 2 * B * T * T * d  # projections, MLP, self-attention
    memory_layer = B * T * 2 * d * d + 2 * S * d * d + 2 * B * T * S * d  # q/o, k/v of the slots, attention
    base = L * base_layer + B * T * d * V
    return (base + L * memory_layer) / base


def step(model, opt, x) -> None:
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--read", choices=["projected", "default"], default="projected")
    args = p.parse_args()
    torch.manual_seed(0)
    setups = SETUPS if args.read == "projected" else {k: v for k, v in SETUPS.items() if not k.startswith("d")}
    models = {name: make(mem, args) for name, mem in setups.items()}
    batches = [torch.randint(0, 256, (args.batch, args.seq)) for _ in range(args.steps + 2)]
    times = {name: [] for name in setups}
    for i, x in enumerate(batches):  # interleave the setups so machine noise hits all of them alike
        for name, (model, opt) in models.items():
            t0 = time.perf_counter()
            step(model, opt, x)
            if i >= 2:  # first steps warm up allocator and kernels
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"tiny llama: hidden {args.hidden}, {args.layers} layers (memory in all, {args.read} read), batch "
          f"{args.batch} x {args.seq} tokens, median of {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'setup':<42}{'step ms':>10}{'params':>14}")
    for name, (model, _) in models.items():
        print(f"{name:<42}{med[name] * 1e3:>10.1f}{sum(p.numel() for p in model.parameters()):>14,}")
    a, b, c = (med[n] for n in list(setups)[:3])
    print(f"c/b = {c / b:.2f}   (routing: 128x the slots at top_k 1 vs 1,024 dense; target <= 1.3)")
    print(f"b/a = {b / a:.2f}   (cost of a 1,024-slot memory in every layer; FLOP ratio of the projected read "
          f"{memory_flops_ratio(args):.2f})")
    if len(setups) == 4:
        print(f"d/b = {med[list(setups)[3]] / b:.2f}   (131,072 slots without routing)")


if __name__ == "__main__":
    main()
