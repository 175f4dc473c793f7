"""Training and evaluation examples for both modes, from any source, in one representation.

An example set is a dict of LongTensors `input_ids`, `labels`, `attention_mask`, each (N, model.max_seq_len).
Labels are not shifted (the model shifts them, as `transformers` does); -100 marks tokens without loss.

- pretraining: documents are tokenized, each followed by eos, concatenated and cut into full blocks;
- instruction_finetuning: one chat per row, loss only on assistant tokens, right-padded or truncated.

`train_examples(epoch)` is a pure function of (data.seed, epoch), so a resumed run can index into epoch e's
examples by position and see exactly what the interrupted run would have seen.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable

import torch

from memory_transformer.config import Config, ConfigError
from memory_transformer.data.prose import prose_pool
from memory_transformer.data.sources import load_documents
from memory_transformer.data.synthetic_facts import Person, RecallItem, SyntheticFacts, draw_passes

__all__ = ["DataBundle", "build_data", "SyntheticFacts", "Person", "RecallItem", "pack_documents", "chat_examples"]

Examples = dict[str, torch.Tensor]


@dataclass
class DataBundle:
    train_examples: Callable[[int], Examples]  # epoch -> {input_ids, labels, attention_mask}: (N, T) each
    eval_examples: Examples  # fixed eval set, (M, T) each
    facts: SyntheticFacts | None = None  # people and recall probes (synthetic source only)


def build_data(cfg: Config, tokenizer, replay_docs: list[str] | None = None) -> DataBundle:
    """Read `cfg.data`, tokenize, and return the per-epoch training examples and the fixed eval set.
    `replay_docs` (samples of the pretrained model, `data.replay_generated`) are mixed into the training
    documents as `data.replay_fraction` of them."""
    if cfg.data.source == "synthetic_facts":
        return _synthetic(cfg, tokenizer, replay_docs)
    d, T = cfg.data, cfg.model.max_seq_len
    docs = load_documents(d)
    n_eval = round(len(docs) * d.eval_fraction) if len(docs) > 1 else 0
    train_docs, eval_docs = docs[: len(docs) - n_eval], docs[len(docs) - n_eval :]
    n_own = len(train_docs)
    if replay_docs:  # the replayed share of the documents: f = n_replay / (n_train + n_replay)
        n_replay = round(n_own * d.replay_fraction / (1 - d.replay_fraction))
        train_docs = train_docs + draw_passes(replay_docs, n_replay, random.Random(f"{d.seed}:replay"))
    encode = _encoder(cfg, tokenizer)
    train = encode(train_docs, False, n_own if _marks_replay(cfg) else None)
    if len(train["input_ids"]) == 0:
        raise ConfigError("model.max_seq_len", f"the training documents do not fill one block of {T} tokens")
    return DataBundle(_shuffled(train, d.seed), encode(eval_docs, True))


def _synthetic(cfg: Config, tokenizer, replay_docs: list[str] | None) -> DataBundle:
    d = cfg.data
    corpus = SyntheticFacts(d.num_people, d.seed, d.qa_fraction, d.corpus)
    # e.g. pretrain on one half of the people, teach the other half later
    facts = corpus.subset(*d.people) if d.people is not None else corpus
    n = d.samples_per_epoch or 4 * len(facts.people)
    encode = _encoder(cfg, tokenizer)
    chat = d.mode == "instruction_finetuning"
    docs = facts.train_messages if chat else facts.train_documents
    eval_docs = facts.eval_messages(len(facts.people)) if chat else facts.eval_documents(len(facts.people))
    replay, n_replay = None, 0
    if d.replay_people is not None:  # replay: a share of each epoch's documents is about already known people
        old = corpus.subset(*d.replay_people)
        replay, n_replay = (old.train_messages if chat else old.train_documents), round(n * d.replay_fraction)
    elif replay_docs:  # replay of the pretrained model's own samples: a fresh draw from the pool each epoch
        n_replay = round(n * d.replay_fraction)

        def replay(epoch: int, k: int) -> list[str]:
            return draw_passes(replay_docs, k, random.Random(f"{d.seed}:replay:{epoch}"))

    replay_from = n - n_replay if _marks_replay(cfg) else None  # distillation / memory.scope mark replayed tokens
    n_prose = round(n * d.prose_fraction)  # real prose among the documents (before the replayed ones)
    prose = prose_pool("train") if n_prose else []

    @functools.lru_cache(maxsize=2)  # the trainer may ask for the same epoch repeatedly
    def train(epoch: int) -> Examples:
        own = docs(epoch, n - n_replay - n_prose) + draw_passes(prose, n_prose, random.Random(f"{d.seed}:prose:{epoch}"))
        epoch_docs = own + (replay(epoch, n_replay) if replay else [])
        return _shuffle(encode(epoch_docs, False, replay_from), d.seed, epoch)

    return DataBundle(train, encode(eval_docs, True), facts)


def _marks_replay(cfg: Config) -> bool:
    """Whether the training examples carry a `replay` tensor marking replayed tokens: `data.replay_loss: distill`
    learns them from the base, a `memory.scope: gate` is trained to stay closed on them, `memory.scope: keys`
    leaves them out of the taught states."""
    return cfg.data.replay_loss == "distill" or (cfg.memory.enabled and cfg.memory.scope != "none")


def _encoder(cfg: Config, tokenizer) -> Callable[[list, bool], Examples]:
    T = cfg.model.max_seq_len
    if cfg.data.mode == "instruction_finetuning":  # replay_from: distillation is for pretraining mode only
        return lambda docs, is_eval, replay_from=None: chat_examples(docs, tokenizer, T)
    return lambda docs, is_eval, replay_from=None: pack_documents(docs, tokenizer, T, is_eval, replay_from)


def _shuffle(ex: Examples, seed: int, epoch: int) -> Examples:
    order = list(range(len(ex["input_ids"])))
    random.Random(f"{seed}:shuffle:{epoch}").shuffle(order)
    index = torch.tensor(order, dtype=torch.long)
    return {k: v[index] for k, v in ex.items()}


def _shuffled(ex: Examples, seed: int) -> Callable[[int], Examples]:
    return lambda epoch: _shuffle(ex, seed, epoch)


# ---------------------------------------------------------------------------------------------------------
# Pretraining: pack documents into full blocks


def pack_documents(docs: list[str], tokenizer, T: int, pad_remainder: bool = False,
                   replay_from: int | None = None) -> Examples:
    """Concatenate `doc + eos` token streams and cut into blocks of T. The tail shorter than T is dropped,
    or (for eval, where every token counts) padded with labels -100 and attention_mask 0. With `replay_from`,
    documents from that index on are replayed ones: a `replay` tensor (N, T) marks their tokens with 1."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = [[*tokenizer.encode(doc, add_special_tokens=False), *eos] for doc in docs]
    stream = [t for ids in encoded for t in ids]
    n_full, tail = divmod(len(stream), T)
    ids = torch.tensor(stream[: n_full * T], dtype=torch.long).view(n_full, T)
    ex = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if pad_remainder and tail:
        last = _padded(stream[n_full * T :], stream[n_full * T :], T, tokenizer.pad_token_id)
        ex = {k: torch.cat([ex[k], last[k][None]]) for k in ex}
    if replay_from is not None:
        first = sum(len(x) for x in encoded[:replay_from])  # stream position of the first replayed token
        ex["replay"] = (torch.arange(ex["input_ids"].numel()) >= first).long().view_as(ex["input_ids"])
    return ex


def _padded(ids: list[int], labels: list[int], T: int, pad_id: int) -> Examples:
    ids, labels = ids[:T], labels[:T]
    n_pad = T - len(ids)
    return {
        "input_ids": torch.tensor(ids + [pad_id] * n_pad, dtype=torch.long),
        "labels": torch.tensor(labels + [-100] * n_pad, dtype=torch.long),
        "attention_mask": torch.tensor([1] * len(ids) + [0] * n_pad, dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------------------
# Instruction fine-tuning: chat template, loss on assistant tokens only


def chat_examples(chats: list[list[dict]], tokenizer, T: int) -> Examples:
    rows = [chat_example(m, tokenizer, T) for m in chats]
    if not rows:
        return {k: torch.zeros(0, T, dtype=torch.long) for k in ("input_ids", "labels", "attention_mask")}
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def chat_example(messages: list[dict], tokenizer, T: int) -> Examples:
    """Render with the tokenizer's chat template; a token is trained on iff it starts inside an assistant
    turn. Turns are located by rendering prefixes, which works for any template without `{% generation %}`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = assistant_spans(messages, tokenizer, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(a <= s < b for a, b in spans) else -100 for t, (s, _) in zip(ids, enc["offset_mapping"])]
    return _padded(ids, labels, T, tokenizer.pad_token_id)


def assistant_spans(messages: list[dict], tokenizer, text: str) -> list[tuple[int, int]]:
    """Character ranges of assistant turns in `text` (content plus the template's end-of-turn marker)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ConfigError(
                "model.tokenizer", "the chat template renders prefixes of a chat differently; cannot find assistant turns"
            )
        spans.append((len(before), len(through)))
    return spans
