"""Does a trained memory read tell old questions from new ones? For an adapter-demo memory run: at the position
that predicts the first answer token of each QA probe, compare old people's questions with new people's by the
read's scores (log-sum-exp of each head's best m slots), the memory output's norm, and which slots are read.

    python bench/selectivity.py --run runs/evidence/seed-0/memory/final [--old 0 20] [--new 20 40]

A selective memory would score new questions higher than old ones (a threshold on the score would then separate
them) and read other slots for them. One chapter only (the learned read of the `bench/evidence.py` "memory"
runs; a subject-routed memory needs no such test: questions naming no taught subject read nothing).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from memory_transformer.data.synthetic_facts import SyntheticFacts
from memory_transformer.io import load_model
from memory_transformer.recall import prompt_ids


def read_stats(model, items, layer: int) -> dict:
    block = model.memory.blocks[str(layer)].attn
    bank = model.memory.banks[model.memory.bank_of[layer]]
    captured = {}
    handle = block.register_forward_pre_hook(lambda mod, args: captured.update(h=args[0].detach()))
    K, _ = block.project_kv(bank, [0])  # (1, H, S, h)
    H, m = block.num_heads, block.slot_top_k or K.shape[2]
    lse, norms, slots = [], [], set()
    tok = model.tokenizer
    try:
        for it in items:
            prompt = prompt_ids(tok, it.prompt)  # as recall scores it: a document's start
            ids = torch.tensor([prompt + tok.encode(it.answer, add_special_tokens=False)], device=model.device)
            pos = len(prompt) - 1
            with torch.no_grad():
                model(ids)
                x = block.norm(captured["h"][:, pos])  # (1, d)
                q = block.q(x).view(H, -1)  # (H, h)
                scores = torch.einsum("hd,hsd->hs", q, K[0]) * q.shape[-1] ** -0.5
                top, idx = scores.topk(m, dim=-1)
                out, _ = block(captured["h"][:, pos:pos + 1], bank)
            lse.append(top.logsumexp(-1).mean().item())
            norms.append(out.norm().item())
            slots |= set(idx.flatten().tolist())
    finally:
        handle.remove()
    return {"lse": lse, "norm": norms, "slots": slots}


def best_threshold_accuracy(low: list[float], high: list[float]) -> float:
    """Best accuracy of one threshold t classifying x < t as `low` and x >= t as `high` (0.5 = no separation)."""
    n = len(low) + len(high)
    return max((sum(x < t for x in low) + sum(x >= t for x in high)) / n for t in [*low, *high, float("inf")])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained memory adapter (a run's final/ folder)")
    p.add_argument("--old", type=int, nargs=2, default=[0, 20], metavar=("START", "STOP"))
    p.add_argument("--new", type=int, nargs=2, default=[20, 40], metavar=("START", "STOP"))
    args = p.parse_args()
    model = load_model(args.run)
    model.eval()
    d = model.config.data
    if model.memory is None or model.config.memory.num_chapters != 1:
        raise SystemExit(f"{args.run}: needs a model with memory in one chapter")
    facts = SyntheticFacts(d.num_people, d.seed, d.qa_fraction)
    for layer in model.memory.layer_ids:
        old = read_stats(model, facts.subset(*args.old).recall_items("qa"), layer)
        new = read_stats(model, facts.subset(*args.new).recall_items("qa"), layer)
        print(f"layer {layer}, {len(old['lse'])} old and {len(new['lse'])} new QA probes, first answer position:")
        for key, label in (("lse", "score (lse of the best m slots)"), ("norm", "memory output norm")):
            o, n = old[key], new[key]
            print(f"  {label:<32} old {statistics.mean(o):7.3f} ± {statistics.stdev(o):.3f}   "
                  f"new {statistics.mean(n):7.3f} ± {statistics.stdev(n):.3f}   "
                  f"best threshold separates {best_threshold_accuracy(o, n):.0%}")
        shared = old["slots"] & new["slots"]
        print(f"  slots read: old {len(old['slots'])}, new {len(new['slots'])}, by both {len(shared)}")


if __name__ == "__main__":
    main()
