"""Greedy generation speed with and without memory, measured side by side in one run on the same base weights.

(a) the base model alone (memory off, the same base weights as the others), (b) base + memory with 131,072 slots
in 128 chapters (top_k 1) in every layer, sequence routing (chapters chosen on the prompt, K/V cached), (c) the
same model with token routing (every token picks its chapter), (d) the same bank with subject routing (128 names,
one chapter each; the prompt names one, and every generated token extends the name lookup). Batch 1, a
32-token prompt, 128 new tokens, KV cache on. Prints tokens/s (median over interleaved repeats), the ratios memory / base, and the ratio of
multiply-adds: a 1,024-slot read costs 2 * 1,024 * d per token and layer, about half of a hidden-256 decoder
layer, so that ratio bounds what (b) can reach at these shapes.

    python bench/generation.py [--repeats 7] [--new 128] [--prompt 32] [--hidden 256] [--layers 4]
                               [--memory-layers N] [--read projected|default]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memory_transformer import build_model, load_config
from memory_transformer.data.synthetic_facts import SyntheticFacts


READS = {  # --read: projected K/V with every slot of a chapter read (the read these numbers were first measured
    # with), or the library's default read (learned K/V, each query's best 8 slots)
    "projected": {"wo_init": "normal", "kv": "projected", "slot_top_k": None},
    "default": {},
}


def make(args, memory: dict):
    cfg = load_config({
        "model": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": 4, "max_seq_len": 512},
        "memory": {"num_heads": 4, **READS[args.read], "layers": f"last:{args.memory_layers}", **memory},
        "training": {"max_steps": 1},
    })
    return build_model(cfg, seed=0).eval()


def flops_ratio(args, top_k: int = 1, slots: int = 1024, vocab: int = 259) -> float:
    """base / (base + memory) multiply-adds per generated token, from the shapes: the speed ratio to expect
    if both run at the same arithmetic rate. Context length taken as its mean over the generation."""
    d, L, ctx = args.hidden, args.layers, args.prompt + args.new / 2
    base_layer = 4 * d * d + 3 * d * 4 * d + 2 * ctx * d  # q/k/v/o, SwiGLU MLP, self-attention
    memory_layer = 2 * d * d + 2 * top_k * slots * d  # q/o projections, scores and values over k*S slots
    base = L * base_layer + d * vocab
    return base / (base + args.memory_layers * memory_layer)


def tokens_per_second(model, prompt: torch.Tensor, new: int, routing: str | None) -> float:
    kwargs = {"routing": routing} if routing else {}
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == prompt.shape[1] + new
    return new / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--memory-layers", type=int, default=None, help="memory in the last N layers (default: all)")
    p.add_argument("--read", choices=sorted(READS), default="projected", help="the memory read (READS)")
    args = p.parse_args()
    args.memory_layers = args.memory_layers or args.layers
    memory = make(args, {"num_tokens": 131072, "num_chapters": 128, "top_k": 1})
    base = make(args, {"enabled": False})
    names = [p.name for p in SyntheticFacts(128, seed=0).people]
    subject = make(args, {"num_tokens": 131072, "num_chapters": 128, "top_k": 1, "routing": "subject",
                          "subjects": names})
    for model in (base, subject):  # same base weights: only the memory differs
        model.base.load_state_dict(memory.base.state_dict())
    subject.memory.load_state_dict(memory.memory.state_dict(), strict=False)  # no router under subject routing
    setups = {"a: base alone": (base, None), "b: memory, sequence routing": (memory, "sequence"),
              "c: memory, token routing": (memory, "token"), "d: memory, subject routing": (subject, None)}
    prompt = torch.randint(3, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    named = subject.tokenizer.encode(f"Q: Where was {names[5]} born?", add_special_tokens=False)
    prompt[0, -len(named):] = torch.tensor(named)  # the prompt ends with a question naming a subject
    speed = {name: [] for name in setups}
    with torch.inference_mode():
        for i in range(args.repeats + 1):  # interleaved, so machine noise hits every setup alike
            for name, (model, routing) in setups.items():
                tps = tokens_per_second(model, prompt, args.new, routing)
                if i:  # the first round warms up kernels, allocator and the memory K/V cache
                    speed[name].append(tps)
    med = {name: statistics.median(v) for name, v in speed.items()}
    print(f"tiny llama: hidden {args.hidden}, {args.layers} layers, memory in the last {args.memory_layers} (131,072 slots, 128 chapters,"
          f" top_k 1, {args.read} read); batch 1, prompt {args.prompt}, {args.new} new tokens greedy, KV cache;"
          f" median of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'setup':<34}{'tokens/s':>10}{'ms/token':>10}")
    for name in setups:
        print(f"{name:<34}{med[name]:>10.1f}{1e3 / med[name]:>10.2f}")
    a, b, c, d = (med[n] for n in setups)
    print(f"b/a = {b / a:.2f}   (sequence routing vs base; goal >= 0.9, issue 18; multiply-add ratio {flops_ratio(args):.2f})")
    print(f"c/a = {c / a:.2f}   (token routing vs base: re-routes and may switch chapter at every token)")
    print(f"d/a = {d / a:.2f}   (subject routing vs base: one name lookup per generated token; d/b = {d / b:.2f})")


if __name__ == "__main__":
    main()
