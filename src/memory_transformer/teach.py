"""`memory-transformer teach`: teach a frozen base the user's facts with a memory adapter and report reliability
(recall of the given question/answer pairs), generalization (recall of optional alias questions) and locality
(KL(base || model) per token on text the facts are not about: samples of the base, and stdlib prose).

The facts file is JSONL: one record per line, either a document `{"text": ...}` or a pair
`{"question": ..., "answer": ...}`, which is taught as the document "QUESTION Answer: ANSWER." and asked back as
"QUESTION Answer:" (greedy exact match of " ANSWER"). The documents are repeated, in shuffled passes, until one
epoch fills at least two batches (`EPOCH_BATCHES`); configs/teach.yaml trains a number of epochs
(`training.num_epochs`), so the steps grow with the facts given: a few facts train 2 x num_epochs steps, many
facts num_epochs passes over them (`--set training.max_steps=N` fixes the steps instead).

Output folder: documents.jsonl (what was trained on), run/ (the run folder; the adapter is run/final) and
result.json (the printed figures).

Teaching in rounds: `--from EARLIER/run/final` starts from an adapter taught before, with its settings (its
config.yaml) and its memory, and adds this round's facts; with `memory.scope: keys` the keys of every round are
kept. A later round keeps the read fixed (`training.freeze: [memory_attention]`) and trains only the slots: the
read the earlier rounds' slots were written for stays the same. With `memory.routing: keys` (configs/teach.yaml)
each round also adds a chapter of the same size that only its own keys open, and only that chapter trains: the
earlier rounds' chapters stay bit for bit as they were written (a later document that matches an earlier round's
key reads that round's chapter but does not change it). docs/experiments.md measures what this keeps.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from memory_transformer.config import Config, ConfigError, load_config
from memory_transformer.data.synthetic_facts import RecallItem, draw_passes

DEFAULT_CONFIG = "configs/teach.yaml"
EPOCH_BATCHES = 2  # an epoch is at least this many batches of documents


def read_facts(path: str | Path, flag: str) -> list[dict]:
    """Records of a JSONL facts file, each with a "text" or with "question" and "answer" (non-empty strings)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(flag, f"file not found: {p}")
    records = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(flag, f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not (_text(record, "text") or
                                                (_text(record, "question") and _text(record, "answer"))):
            raise ConfigError(flag, f'{p}:{n}: needs a non-empty "text" field, or "question" and "answer" fields')
        records.append(record)
    if not records:
        raise ConfigError(flag, f"{p} has no records")
    return records


def _text(record: dict, key: str) -> bool:
    return isinstance(record.get(key), str) and bool(record[key].strip())


def pair_items(records: list[dict]) -> list[RecallItem]:
    """The question/answer records as recall probes: "QUESTION Answer:" -> " ANSWER"."""
    return [RecallItem(f"{r['question'].strip()} Answer:", f" {r['answer'].strip()}", "", "qa", 0.0)
            for r in records if _text(r, "question") and _text(r, "answer")]


def documents(records: list[dict]) -> list[str]:
    """One training document per record: its text, or "QUESTION Answer: ANSWER." for a pair."""
    out = []
    for r in records:
        if _text(r, "text"):
            out.append(r["text"])
        else:
            answer = r["answer"].strip()
            out.append(f"{r['question'].strip()} Answer: {answer}{'' if answer.endswith('.') else '.'}")
    return out


def repeated(docs: list[str], tokenizer, tokens_needed: int, seed: int) -> list[str]:
    """`docs` in whole shuffled passes, enough passes for at least `tokens_needed` tokens (each doc + eos)."""
    per_pass = sum(len(tokenizer.encode(d, add_special_tokens=False)) + 1 for d in docs)
    passes = max(1, math.ceil(tokens_needed / per_pass))
    return draw_passes(docs, passes * len(docs), random.Random(f"{seed}:teach"))


def later_round(earlier: Config) -> list[str]:
    """What a later round (--from) changes in the earlier one's settings: the read stays as it was (frozen), and
    with memory.routing keys the bank gains a chapter of the same size, which this round's keys open."""
    out = ["training.freeze=[memory_attention]"]
    m = earlier.memory
    if m.enabled and m.routing == "keys":
        size = m.num_tokens // m.num_chapters
        out += [f"memory.num_chapters={m.num_chapters + 1}", f"memory.num_tokens={size * (m.num_chapters + 1)}"]
    return out


def teach_config(base: str, out: Path, config: str | None, overrides: list[str], start: Path | None = None) -> Config:
    """The teaching config: --config (default configs/teach.yaml), or with `start` (--from) the settings of the
    adapter taught before, plus `later_round`; then the base, the documents, the run folder and the --set overrides."""
    if start is not None:
        if config is not None:
            raise ConfigError("--config", "--from continues with the settings of the adapter it names; change them "
                              "with --set instead")
        keys = [o.split("=", 1)[0].strip() for o in overrides]
        sized = [k for k in keys if k in ("memory.num_tokens", "memory.num_chapters")]
        if sized:
            raise ConfigError("--set", f"{sized[0]} comes from the adapter --from names (its chapters are kept, and "
                              "keys routing adds one of the same size): leave it out")
        path = start / "config.yaml"
        if not path.is_file():
            raise ConfigError("--from", f"{start} is not a saved adapter (no config.yaml): pass the run/final "
                              "folder of an earlier teach")
        overrides = [*later_round(load_config(path)), *overrides]
    else:
        path = Path(config or DEFAULT_CONFIG)
        if config is None and not path.is_file():  # run from elsewhere than a checkout: the checkout's configs/
            path = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG
            if not path.is_file():
                raise ConfigError("--config", f"the default {DEFAULT_CONFIG} is not here; pass --config FILE")
    return load_config(path, [f"model.pretrained={base}", f"data.source={out / 'documents.jsonl'}", "data.path=",
                              "data.text_field=text", f"training.output_dir={out / 'run'}", *overrides])


def teach(base: str, data: str, out: str, config: str | None = None, overrides: list[str] | None = None,
          eval_aliases: str | None = None, background: int = 16, start: str | None = None) -> dict:
    """Train the adapter (from the one taught before in `start`, if given), evaluate it, print and return the
    figures (also written to OUT/result.json)."""
    from memory_transformer.data.tokenizer import load_tokenizer
    from memory_transformer.io import new_folder
    from memory_transformer.model import tokenizer_source

    if background < 1:
        raise ConfigError("--background", f"must be a positive integer, got {background}")
    root = new_folder(out, "--out")
    records = read_facts(data, "--data")
    aliases = pair_items(read_facts(eval_aliases, "--eval-aliases")) if eval_aliases else None
    start_dir = Path(start) if start is not None else None
    cfg = teach_config(base, root, config, overrides or [], start_dir)
    tokenizer = load_tokenizer(*tokenizer_source(cfg))
    batch_tokens = cfg.training.batch_size * cfg.training.grad_accum_steps * cfg.model.max_seq_len
    docs = repeated(documents(records), tokenizer, EPOCH_BATCHES * batch_tokens, cfg.data.seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "documents.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    summary = train_from(cfg, start_dir)
    result = evaluate_taught(root / "run" / "final", pair_items(records), aliases, background, cfg.data.seed)
    result.update(documents=len(records), steps=summary["steps"], wall_time_s=summary["wall_time_s"],
                  trainable=summary["param_counts"]["trainable"])
    (root / "result.json").write_text(json.dumps(result, indent=2))
    print(format_result(result, root))
    return result


def train_from(cfg: Config, init: str | Path | None = None) -> dict:
    """Train `cfg` starting from the trained weights (memory, LoRA) saved in `init`: teaching in rounds, each round
    on its own documents (with memory.scope keys: the saved keys plus those fitted on this round's documents).
    Without `init`, exactly `train(cfg)`."""
    from memory_transformer.io import load_weights
    from memory_transformer.train.trainer import Trainer

    trainer = Trainer(cfg)
    if init is not None:
        memory = trainer.unwrapped.memory
        scope = memory.scope if memory is not None else None
        fitted = None if scope is None else scope.codebook()  # this round's keys (memory.scope keys)
        keyed = cfg.memory.enabled and cfg.memory.routing == "keys"
        # in place: the optimizer keeps the same tensors; with keys routing this round's chapter is new
        load_weights(trainer.unwrapped, Path(init), new_chapters=keyed)
        if fitted is not None:
            scope.extend(**fitted)  # the earlier rounds' keys and this round's: every taught document stays in scope
        if keyed:  # the earlier rounds' chapters stay as they were written: no gradient, so no optimizer step
            for bank in memory.banks:
                for chapter in bank.chapters[:-1]:
                    chapter.requires_grad_(False)
    return trainer.train()


def evaluate_taught(run: Path, pairs: list[RecallItem], aliases: list[RecallItem] | None, background: int,
                    seed: int) -> dict:
    """New-fact recall (and the base's before), the share of the pairs in scope (memory.scope keys), alias recall,
    KL to the base on `background` samples of the base and on as many stdlib prose paragraphs, and the adapter
    file's size."""
    from memory_transformer.generate import sample_documents
    from memory_transformer.io import load_model
    from memory_transformer.knowledge import kl_to_base, scope_coverage, stdlib_prose
    from memory_transformer.recall import recall

    model = load_model(run)
    tok, T = model.tokenizer, model.config.model.max_seq_len
    out: dict = {"recall": recall(model, tok, pairs)["recall"] if pairs else None, "pairs": len(pairs),
                 "in_scope": scope_coverage(model, tok, pairs)}
    with model.adapters_disabled():
        out["recall_base"] = recall(model, tok, pairs)["recall"] if pairs else None
        samples = sample_documents(model, background, min(T, 128), seed + 1)  # not the replayed ones (seed)
    out["alias_recall"] = recall(model, tok, aliases)["recall"] if aliases else None
    out["kl_base_samples"] = kl_to_base(model, tok, samples, T)
    out["kl_prose"] = kl_to_base(model, tok, stdlib_prose(background, seed), T)
    out["background"] = background
    weights = run / "adapter_model.safetensors"
    out["adapter_bytes"] = weights.stat().st_size if weights.is_file() else None
    return out


def format_result(r: dict, root: Path) -> str:
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [f"taught {r['documents']} records ({r['pairs']} question/answer pairs) in {r['steps']} steps, "
             f"{r['wall_time_s']:.0f} s",
             f"new-fact recall (the given pairs)        {pct(r['recall'])}   (the base before: {pct(r['recall_base'])})"]
    if r.get("in_scope") is not None:
        lines.append(f"pairs in scope (the memory reads there)  {pct(r['in_scope'])}   (a pair out of scope reads "
                     f"nothing: recall's ceiling)")
    if r["alias_recall"] is not None:
        lines.append(f"alias recall (--eval-aliases)            {pct(r['alias_recall'])}")
    lines += [f"locality, KL(base || model) per token    {r['kl_base_samples']:.4f} nats on {r['background']} samples "
              f"of the base, {r['kl_prose']:.4f} on {r['background']} stdlib prose paragraphs",
              f"adapter                                  {r['trainable']:,} trainable parameters, "
              f"{r['adapter_bytes'] or 0:,} bytes ({root / 'run' / 'final'})"]
    return "\n".join(lines)
