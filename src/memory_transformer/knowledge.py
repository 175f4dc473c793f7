"""Probes of what teaching did to a model, in the terms of the knowledge-editing literature (docs SPEC 5b):

- reliability: recall of the taught facts as taught (`recall.recall` on the training questions);
- generalization: recall when a taught person is named by an alias training never used (`alias_recall`), or
  asked with a held-out question (`SyntheticFacts.recall_items(held_out=True)`), and the share of such questions
  answered with a fact of the person asked about, whichever (`person_recall`): whom the answer is about apart
  from what it answers;
- locality: KL(base || model) per token on text that names no taught subject (`kl_to_base` on old
  biographies, `biographies`, and on real prose, `stdlib_prose`), and the share of the base's old-fact recall
  that survives (`kept_share`);
- teaching in rounds: `round_ranges` splits the taught people into rounds, each trained on its own documents;
- scope (`memory.scope: keys`): the share of questions whose answer position the memory reads at all
  (`scope_coverage`), the ceiling of their recall.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F

from memory_transformer.data.prose import stdlib_prose  # noqa: F401  (re-exported: a locality probe)
from memory_transformer.data.synthetic_facts import ALIAS_FORMS, ATTRIBUTES, RecallItem, SyntheticFacts
from memory_transformer.data.tokenizer import left_pad
from memory_transformer.model import eval_mode
from memory_transformer.recall import answered, prompt_ids, recall


def alias_recall(model, tokenizer, facts: SyntheticFacts) -> dict[str, float | None]:
    """QA recall per alias form (ALIAS_FORMS) of `facts`' people; None for a form no person has unambiguously
    (e.g. "no_middle" on a corpus without middle names)."""
    out: dict[str, float | None] = {}
    for form in ALIAS_FORMS:
        items = facts.alias_items(form)
        out[form] = recall(model, tokenizer, items)["recall"] if items else None
    return out


def person_recall(model, tokenizer, facts: SyntheticFacts, items: list[RecallItem]) -> float | None:
    """The share of `items` (questions about `facts`' people) whose greedy answer is exactly one of the asked
    person's values, of any attribute: the answer is about the right person, whether or not about the asked
    attribute. None without items. On held-out phrasings the attribute is where every method fails alike
    (docs/experiments.md, issue 17 tenth pass), so this share is what tells a read that finds the person from one
    that does not. (A value the person shares with someone else, e.g. a city, counts as the person's.)"""
    if not items:
        return None
    people = {p.name: p for p in facts.people}
    asked = [dataclasses.replace(it, answer=" " + getattr(people[it.person], a), attribute=a)
             for it in items for a in ATTRIBUTES]
    hits, n = answered(model, tokenizer, asked), len(ATTRIBUTES)
    return sum(any(hits[i * n:(i + 1) * n]) for i in range(len(items))) / len(items)


@torch.no_grad()
def scope_coverage(model, tokenizer, items: list, batch_size: int = 32) -> float | None:
    """memory.scope keys: the share of `items` whose prompt's last position is in scope (where the first answer
    token is generated: the memory reads there, or adds exactly 0); None without scope keys. Prompts are batched
    left-padded (`recall.prompt_ids`) and prefilled by `generate`, as `recall.recall` scores them."""
    scope = getattr(getattr(model, "memory", None), "scope", None)
    if scope is None or not items:
        return None
    inside = 0
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            prompts = [prompt_ids(tokenizer, it.prompt) for it in items[start:start + batch_size]]
            ids, mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)  # one forward: the prompt's
            inside += int(scope.reads[:, -1].sum())
    return inside / len(items)


def biographies(facts: SyntheticFacts, seed: int = 0) -> list[str]:
    """One biography per person of `facts`, from a stream no training epoch uses: background text about people
    who were not taught (pass the old people)."""
    rng = random.Random(f"{facts.seed}:background:{seed}")
    return [facts.biography(p, rng) for p in facts.people]


@torch.no_grad()
def kl_to_base(model, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 8) -> float:
    """Mean over tokens of KL(base || model) in nats: the frozen base (`model.adapters_disabled()`) against the
    model with its adapters, at every position of `texts` (each cut to `max_tokens` tokens). 0 = unchanged."""
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            ids, mask = _batch(tokenizer, texts[start : start + batch_size], max_tokens, model.device)
            logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (B, T, V)
            with model.adapters_disabled():
                base = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            kl = (base.exp() * (base - logp)).sum(-1)  # (B, T)
            total += (kl * mask).sum().item()
            count += int(mask.sum().item())
    return total / max(count, 1)


def _batch(tokenizer, texts: list[str], max_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] or [tokenizer.eos_token_id] for t in texts]
    width = max(len(s) for s in seqs)  # right-padded: positions are those of the unpadded text
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return ids, mask


def kept_share(after: float, before: float) -> float:
    """Old-fact recall after teaching as a share of the base's own (1.0 = all the base knew is kept)."""
    return after / before if before > 0 else float("nan")


def round_ranges(start: int, stop: int, rounds: int) -> list[list[int]]:
    """people[start:stop] split into `rounds` consecutive [start, stop] ranges of sizes differing by at most 1."""
    n = stop - start
    if not 1 <= rounds <= n:
        raise ValueError(f"cannot split {n} people into {rounds} rounds")
    cuts = [start + (i * n) // rounds for i in range(rounds + 1)]
    return [[a, b] for a, b in zip(cuts, cuts[1:])]
