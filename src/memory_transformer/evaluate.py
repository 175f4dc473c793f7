"""Evaluation: perplexity on any example set (sharded across processes when launched on several) and fact
recall on the synthetic facts (exact match of the greedy answer, seen and held-out phrasing)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memory_transformer.data.synthetic_facts import SyntheticFacts
from memory_transformer.model import eval_mode
from memory_transformer.recall import recall

RECALL_PROBES = {  # metric name -> (kind, held_out)
    "recall_qa": ("qa", False),
    "recall_qa_heldout": ("qa", True),
    "recall_bio": ("bio", False),
    "recall_bio_heldout": ("bio", True),
}


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of predicted tokens (labels -100 are skipped)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss, (shift_labels != -100).sum()


@torch.no_grad()
def perplexity(model, examples: dict[str, torch.Tensor], batch_size: int = 16, accelerator=None) -> dict:
    """eval_loss (mean per token) and eval_ppl over `examples`; each process takes every world-th row."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, tokens)
    rows = torch.arange(rank, len(examples["input_ids"]), world)
    most = -(-len(examples["input_ids"]) // world)  # rows of the busiest process
    with eval_mode(model):
        # every process runs as many forwards as the busiest one (a model sharded with FSDP gathers its weights
        # in each forward, a collective); a process out of rows runs a row it has seen and counts nothing
        for start in range(0, most, batch_size):
            idx = rows[start : start + batch_size]
            counted = len(idx) > 0
            batch = {k: v[idx if counted else [0]].to(device) for k, v in examples.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n = token_loss_sums(logits, batch["labels"])
            if counted:
                total += torch.stack([loss.double(), n.double()])
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    mean = (total[0] / total[1].clamp_min(1)).item()
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}


def fact_recall(model, tokenizer, facts: SyntheticFacts, probes: list[str] | None = None,
                people: int | None = None, progress: bool = False) -> dict:
    """Recall metrics (fractions) and knowledge bits recalled, per probe set in RECALL_PROBES; `people` limits
    the probes to the first that many people (knowledge_bits still counts them all)."""
    out, probed = {}, facts if people is None else facts.subset(0, people)
    for name in probes or list(RECALL_PROBES):
        kind, held_out = RECALL_PROBES[name]
        r = recall(model, tokenizer, probed.recall_items(kind, held_out), progress=progress, desc=name)
        out[name] = r["recall"]
        out[f"{name}_bits"] = r["bits"]
    out["knowledge_bits"] = facts.knowledge_bits
    return out


def evaluate(model, tokenizer, bundle, accelerator=None, probes: list[str] | None = None,
             recall_people: int | None = None, progress: bool = False) -> dict:
    """Perplexity on the bundle's eval set, plus recall when the data has facts (of the first `recall_people`
    people, null = all; `progress`: a tqdm bar per probe set). Every process computes the same recall (it is
    deterministic), so decisions taken on it agree across processes."""
    metrics = perplexity(model, bundle.eval_examples, accelerator=accelerator) if len(bundle.eval_examples["input_ids"]) else {}
    if bundle.facts is not None:
        metrics.update(fact_recall(model, tokenizer, bundle.facts, probes, recall_people, progress))
    return metrics
