"""Greedy exact-match recall of facts: does the model complete each prompt with exactly the answer?"""

from __future__ import annotations

from collections import defaultdict

import torch

from memory_transformer.data.synthetic_facts import RecallItem
from memory_transformer.data.tokenizer import left_pad
from memory_transformer.model import eval_mode


def recall(model, tokenizer, items: list[RecallItem], batch_size: int = 32, progress: bool = False,
           desc: str = "recall") -> dict:
    """Greedy-decode len(answer tokens) tokens after each prompt; correct iff they equal the answer tokens.
    A batch stops decoding as soon as every row has either left its answer or finished it. `progress` shows
    a tqdm bar of the items scored.

    Returns recall (fraction correct), correct, total, bits (sum of `item.bits` over correct items) and
    by_attribute (recall per attribute name).
    """
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        hits = answered(model, tokenizer, items, batch_size, bar.update)
    per_attr: dict[str, list[bool]] = defaultdict(list)
    for item, hit in zip(items, hits):
        per_attr[item.attribute].append(hit)
    return {
        "recall": sum(hits) / len(items) if items else 0.0,
        "correct": sum(hits),
        "total": len(items),
        "bits": sum(item.bits for item, hit in zip(items, hits) if hit),
        "by_attribute": {a: sum(h) / len(h) for a, h in per_attr.items()},
    }


def answered(model, tokenizer, items: list[RecallItem], batch_size: int = 32, done=None) -> list[bool]:
    """Per item, `recall`'s test: do the greedy tokens after its prompt spell exactly its answer? `done(n)` is
    called after each batch of n items (a progress bar's update)."""
    hits: list[bool] = []
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            hits += _score_batch(model, tokenizer, batch)
            if done is not None:
                done(len(batch))
    return hits


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A probe's prompt as the start of a document: after the end-of-sequence token, as `pack_documents` puts one
    before every training document (and `sample_documents` starts from one). Without it the prompt's first token
    has no context, which training never shows: the taught read then mixes up questions that differ only in their
    first words (docs/experiments.md, issue 17 ninth pass)."""
    start = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return start + tokenizer.encode(prompt, add_special_tokens=False)


@torch.no_grad()
def _score_batch(model, tokenizer, items: list[RecallItem]) -> list[bool]:
    prompts = [prompt_ids(tokenizer, it.prompt) for it in items]
    answers = [tokenizer.encode(it.answer, add_special_tokens=False) for it in items]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, _device(model))
    # Greedy decoding through the model's own generate (KV cache; positions from the attention mask), the same
    # path as inference. Decoding may stop early at eos: the row is then shorter than the answer, and wrong.
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(len(a) for a in answers),
                         do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         stopping_criteria=[_AnswerDecided(answers, ids.shape[1])])
    out = out[:, ids.shape[1]:].tolist()  # (B, <= max answer length)
    return [row[: len(a)] == a for row, a in zip(out, answers)]


class _AnswerDecided:
    """Stopping criterion: a row is done once its greedy tokens left its answer (wrong) or spelled all of it.
    Done rows are padded by `generate`, which stops when all rows are done: the score cannot change after."""

    def __init__(self, answers: list[list[int]], prompt_len: int):
        width = max(len(a) for a in answers)
        self.answers = torch.tensor([a + [-1] * (width - len(a)) for a in answers])  # (B, A), -1 past the end
        self.lengths = torch.tensor([len(a) for a in answers])
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:].cpu()  # (B, t) tokens generated so far
        t = new.shape[1]
        expected = self.answers[:, :t]
        wrong = ((new != expected) & (expected >= 0)).any(dim=1)
        return (wrong | (self.lengths <= t)).to(input_ids.device)


def _device(model) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
