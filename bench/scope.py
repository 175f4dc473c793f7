"""The goal table of issue 17 (learned scope) for `bench/evidence.py --scope`: per method, new-fact recall at two
sizes, old facts kept, alias recall per alias form, held-out phrasing (recall, and the share answered with a fact of
the person asked, whichever), KL(base || model) on old biographies and on
stdlib prose, sequential teaching in rounds, and the training step time relative to LoRA's, measured side by side.

Each size runs the adapter demo (`demo.run_adapter_demo`: a base learns `old` people, each method teaches it `n`
new ones; runs already in the output folder with the same config are reused), then probes every method's final
model (`memory_transformer.knowledge`). Rounds: the first size's new people in R rounds, each round trained only on
its own documents for 1/R of the steps, starting from the previous round's weights; a round already trained in the
output folder (its final/ exists) is reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from memory_transformer import load_config
from memory_transformer.config import Config
from memory_transformer.demo import KEYS
from memory_transformer.data.synthetic_facts import ALIAS_FORMS, SyntheticFacts
from memory_transformer.teach import later_round

V, L = ["memory.enabled=true", "lora.enabled=false"], ["memory.enabled=false", "lora.enabled=true"]

ROWS = [  # (key, label, format); {n1}/{n2} are the two sizes, {r} the rounds
    ("recall_new", "new-fact QA recall, {n1} new people", "{:.1%}"),
    ("recall_new_2", "new-fact QA recall, {n2} new people", "{:.1%}"),
    ("kept", "old facts kept (share of the base's)", "{:.1%}"),
    *[(f"alias_{f}", f"alias recall: {f}", "{:.1%}") for f in ALIAS_FORMS],
    ("recall_new_heldout", "held-out question phrasing", "{:.1%}"),
    ("heldout_person", "held-out questions answered with a fact of the person asked (any attribute)", "{:.1%}"),
    ("scope_new", "new questions in scope (scope keys: the ceiling of their recall)", "{:.1%}"),
    ("scope_heldout", "held-out questions in scope", "{:.1%}"),
    ("kl_old_bios", "KL(base || model) per token, old bios (nats)", "{:.4f}"),
    ("kl_prose", "KL(base || model) per token, stdlib prose (nats)", "{:.4f}"),
    ("rounds_first", "{r} rounds: recall of round 1's people after the last", "{:.1%}"),
    ("rounds_kept", "{r} rounds: old facts kept (share of the base's)", "{:.1%}"),
    ("time_vs_lora", "training step time vs LoRA's, measured side by side", "{:.2f}x"),
]


def methods(chapters: int, names: list[str] | None = None,
            variants: list[list[str]] | None = None) -> dict[str, list[str]]:
    """The methods compared (`names` of them, in that order; default all): the list-free learned read, the same read
    scoped by keys fitted against 1,024 samples of the base at temperature 0.7 (not trained on: as
    configs/teach.yaml), subject routing (the oracle), LoRA, gated LoRA; then each of `variants` ([name, overrides
    ...], `--variant`): the keys read with those overrides."""
    every = {"memory": [*V, "memory.routing=sequence", "memory.num_chapters=1"],
             "keys": KEYS,
             "subject": [*V, "memory.routing=subject", f"memory.num_chapters={chapters}"],
             "lora": L, "lora-gated": [*L, "lora.gate=subject"]}
    unknown = [name for name in names or [] if name not in every]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(every)}")
    taken = [v[0] for v in variants or [] if v[0] in every]
    if taken:
        raise ValueError(f"--variant: {taken[0]} is the name of a method; name the variant otherwise")
    chosen = {name: every[name] for name in names} if names else every
    return chosen | {v[0]: [*KEYS, *v[1:]] for v in variants or []}


def subject_chapters(n: int, slots: int) -> int:
    """One chapter per person where the bank allows it (power of two, at least 8 slots a chapter)."""
    c = 1
    while c < n and slots // (2 * c) >= 8:
        c *= 2
    return c


def run_seed(args, seed: int) -> dict[str, dict]:
    """Every row of ROWS for every method at one seed: {method: {key: value}}."""
    rows: dict[str, dict] = {}
    from memory_transformer.demo import run_adapter_demo

    for i, n in enumerate(args.sizes):
        base, teach = _configs(args, seed, n)
        root = Path(args.out) / f"seed-{seed}" / f"n{n}"
        if args.bpe:
            tokenizer = bpe_tokenizer(base, args.bpe, root.parent / f"tokenizer-bpe{args.bpe}")
            base = load_config(base.to_dict(), [f"model.tokenizer={tokenizer}"])
        chosen = methods(subject_chapters(n, teach.memory.num_tokens), args.methods, args.variant)
        results = run_adapter_demo(base, teach, str(root), chosen)
        if i == 1:
            for name in chosen:
                rows[name]["recall_new_2"] = results[name]["recall_new"]
            continue
        probes = _probe(root, teach, args, results)
        for name in chosen:
            rows[name] = probes[name]
            if args.rounds > 1:
                rows[name].update(_rounds(root, teach, chosen[name], name, args, results["base"]["recall_old"]))
        rows["base"] = _base_heldout(root, teach, args)
    return rows


def bpe_tokenizer(base: Config, vocab: int, path: Path) -> Path:
    """A byte-level BPE tokenizer of `vocab` tokens (`--bpe`), trained on what the base reads: the standard
    library's prose (its train split) and the base's own people's documents, never the people taught later, so
    their names split into pieces the base knows, as a real base's tokenizer splits names it never saw. Saved in
    `path`, and reused from there."""
    if (path / "tokenizer.json").is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from memory_transformer.data.prose import prose_pool

    d = base.data
    own = SyntheticFacts(d.num_people, d.seed, d.qa_fraction, d.corpus).subset(*d.people)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(prose_pool("train") + own.train_documents(0, 2000),
                             trainers.BpeTrainer(vocab_size=vocab, special_tokens=["</s>", "<pad>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>").save_pretrained(path)
    return path


def _configs(args, seed: int, n: int) -> tuple[Config, Config]:
    seeded = [f"data.seed={seed}", f"training.seed={seed}", f"data.num_people={args.old + n}",
              f"data.corpus={args.corpus}"]
    base = load_config(args.base_config, [*seeded, f"data.people=[0,{args.old}]",
                                          f"data.prose_fraction={args.base_prose}",
                                          f"training.max_steps={args.base_steps}", *args.base_set])
    teach = load_config(args.config or "configs/demo_adapter.yaml",
                        [*seeded, f"data.people=[{args.old},{args.old + n}]", *args.set])
    if n != args.sizes[0]:  # the same steps per person: 200 steps at 20 people, 1,000 at 100 (as docs/experiments.md)
        teach = load_config(teach.to_dict(), [f"training.max_steps={teach.training.max_steps * n // args.sizes[0]}"])
    return base, teach


def _probe(root: Path, teach: Config, args, results: dict) -> dict[str, dict]:
    from memory_transformer.io import load_model
    from memory_transformer.knowledge import (alias_recall, biographies, kept_share, kl_to_base, person_recall,
                                              scope_coverage, stdlib_prose)

    d = teach.data
    corpus = SyntheticFacts(d.num_people, d.seed, d.qa_fraction, d.corpus)
    new, old = corpus.subset(*d.people), corpus.subset(0, args.old)
    bios, prose = biographies(old), stdlib_prose(args.prose, d.seed)
    out = {}
    for name, r in results.items():
        if name == "base":
            continue
        model = load_model(root / name / "final")
        T = model.config.model.max_seq_len
        aliases = alias_recall(model, model.tokenizer, new)
        heldout = new.recall_items("qa", True)
        out[name] = {"recall_new": r["recall_new"], "recall_new_heldout": r["recall_new_heldout"],
                     "heldout_person": person_recall(model, model.tokenizer, new, heldout),
                     "kept": kept_share(r["recall_old"], results["base"]["recall_old"]),
                     **{f"alias_{f}": v for f, v in aliases.items()},
                     "scope_new": scope_coverage(model, model.tokenizer, new.recall_items("qa")),
                     "scope_heldout": scope_coverage(model, model.tokenizer, heldout),
                     "kl_old_bios": kl_to_base(model, model.tokenizer, bios, T),
                     "kl_prose": kl_to_base(model, model.tokenizer, prose, T)}
    steps = step_times(root, [name for name in results if name != "base"], new, teach)
    for name in out:
        out[name]["time_vs_lora"] = steps[name] / steps["lora"] if "lora" in steps else float("nan")
    return out


def step_times(root: Path, names: list[str], facts: SyntheticFacts, teach: Config, repeats: int = 12) -> dict:
    """Seconds per training step (forward + backward + fused AdamW over the adapter's parameters) of each method's
    final model on the same batch of `facts`' teaching documents, the methods interleaved step for step, median
    after 2 warm-up steps: the wall-clock row side by side. (Each run's own tokens/s also counts whatever else the
    machine ran meanwhile.)"""
    import statistics
    import time

    import torch

    from memory_transformer.data import pack_documents
    from memory_transformer.io import load_model
    from memory_transformer.model import component_of

    models = {}
    for name in names:
        model = load_model(root / name / "final").train()
        for n, p in model.named_parameters():
            p.requires_grad_(component_of(n) != "base")  # the adapter trains, the base stays frozen
        adapter = [p for p in model.parameters() if p.requires_grad]
        models[name] = (model, torch.optim.AdamW(adapter, lr=1e-4, fused=True))
    tokenizer = models[names[0]][0].tokenizer
    ex = pack_documents(facts.train_documents(0, 4 * len(facts.people)), tokenizer, teach.model.max_seq_len)
    batch = {k: ex[k][: teach.training.batch_size] for k in ("input_ids", "attention_mask", "labels")}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, (model, opt) in models.items():
            start = time.perf_counter()
            model(**{k: v.to(model.device) for k, v in batch.items()}).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def _base_heldout(root: Path, teach: Config, args) -> dict[str, float]:
    """The base on its own (old) people's facts asked in the held-out phrasings, recall and answers about the person
    asked: how far the base itself carries a fact it knows to a wording it never saw, which a read of its states
    starts from (docs/experiments.md)."""
    from memory_transformer.io import load_model
    from memory_transformer.knowledge import person_recall
    from memory_transformer.recall import recall

    d = teach.data
    old = SyntheticFacts(d.num_people, d.seed, d.qa_fraction, d.corpus).subset(0, args.old)
    model = load_model(root / "base" / "final")
    items = old.recall_items("qa", True)
    return {"recall_new_heldout": recall(model, model.tokenizer, items)["recall"],
            "heldout_person": person_recall(model, model.tokenizer, old, items)}


def _rounds(root: Path, teach: Config, overrides: list[str], name: str, args, base_old: float) -> dict:
    """Teach the new people in `args.rounds` rounds of the teaching config's steps each, each round from the
    previous one's weights with what `teach --from` changes (`later_round`: the read kept, keys routing's new
    chapter); recall of round 1's people after the last, old kept."""
    from memory_transformer.evaluate import fact_recall
    from memory_transformer.io import load_model
    from memory_transformer.knowledge import kept_share, round_ranges
    from memory_transformer.lora import matching_lora_rank
    from memory_transformer.model import build_model
    from memory_transformer.teach import train_from

    d = teach.data
    corpus = SyntheticFacts(d.num_people, d.seed, d.qa_fraction, d.corpus)
    ranges = round_ranges(*d.people, args.rounds)
    paths = [f"model.pretrained={root / 'base_hf'}", f"model.tokenizer={root / 'base_hf'}"]
    rank, _ = matching_lora_rank(build_model(load_config(teach, [*paths, *V])))
    steps = teach.training.max_steps  # a round is a teaching run: 40 steps per round taught no method anything
    previous, cfg = None, None
    for k, (start, stop) in enumerate(ranges):
        run = root / f"{name}-rounds" / f"round-{k + 1}"
        subjects = json.dumps([p.name for p in corpus.people[d.people[0]:stop]])  # chapters stay as assigned
        cfg = load_config(teach, [*paths, f"lora.r={rank}", *overrides, f"data.people=[{start},{stop}]",
                                  f"memory.subjects={subjects}", f"training.max_steps={steps}",
                                  f"training.output_dir={run}", *(later_round(cfg) if k else [])])
        if not (run / "final").is_dir():
            print(f"== {name}: round {k + 1}/{len(ranges)}, people {start}..{stop - 1}, {steps} steps")
            train_from(cfg, previous)
        previous = run / "final"
    model = load_model(previous)
    first = fact_recall(model, model.tokenizer, corpus.subset(*ranges[0]), ["recall_qa"])["recall_qa"]
    old = fact_recall(model, model.tokenizer, corpus.subset(0, args.old), ["recall_qa"])["recall_qa"]
    return {"rounds_first": first, "rounds_kept": kept_share(old, base_old)}


def labels(args) -> list[tuple[str, str, str]]:
    n2 = args.sizes[1] if len(args.sizes) > 1 else None
    return [(k, label.format(n1=args.sizes[0], n2=n2, r=args.rounds), fmt) for k, label, fmt in ROWS
            if (k != "recall_new_2" or n2) and (not k.startswith("rounds") or args.rounds > 1)]


def table(runs: list[dict[str, dict]], args) -> str:
    """Rows = measures, columns = methods, mean ± std over seeds ("-" where a measure does not exist)."""
    import statistics

    names = list(runs[0])
    head = (f"{len(runs)} seed(s), corpus {args.corpus}, {args.old} old people; "
            f"columns: {', '.join(names)}")
    if "base" in names:
        head += "; base: its own (old) people's facts in the held-out phrasings"
    lines = [head, f"| measure | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
    for key, label, fmt in labels(args):
        cells = []
        for name in names:
            values = [run[name].get(key) for run in runs]
            if any(v is None or v != v for v in values):  # absent (e.g. no middle names), or nan (base knew none)
                cells.append("-")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}" if len(values) > 1
                         else fmt.format(values[0]))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)
