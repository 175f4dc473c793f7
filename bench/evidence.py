"""Named methods x seeds on the two demos, side by side: mean ± std of fact recall, parameters, bits per parameter
and tokens/s, plus a plot.

    python bench/evidence.py --seeds 0 1 2 [--base-config configs/demo_adapter_base.yaml]
                             [--config configs/demo_adapter.yaml] [--set KEY=VALUE ...] [--base-set KEY=VALUE ...]
                             [--out runs/evidence]
                             [--variant NAME KEY=VALUE ... ]...
    python bench/evidence.py --scratch --seeds 0 1 2 [--config configs/demo.yaml] [--out runs/evidence-scratch] ...
    python bench/evidence.py --scope --seeds 0 1 2 [--corpus demo|confirm] [--sizes 20 100] [--old 20] [--rounds 5]
                             [--prose 32] [--out runs/evidence-scope] [--set ...] [--base-set ...]
                             [--methods NAME ...] [--variant NAME KEY=VALUE ...]...

Adapter demo (default): new-fact recall, old-fact recall kept and trainable parameters of memory, LoRA (rank
matched to the memory's trainable parameters) and both, each teaching a frozen base of its seed. `--scratch`:
models trained from scratch on `configs/demo.yaml`'s facts: vanilla, vanilla with the MLP widened to the memory
model's total parameters (the fair control), and memory; QA recall, bits recalled and bits per parameter.

`--scope`: the goal table of issue 17 (bench/scope.py) for the list-free learned read, subject routing, LoRA and
gated LoRA: new-fact recall at two sizes, old facts kept, alias recall per form, held-out phrasing, KL to the base
on old biographies and stdlib prose, teaching in rounds, wall clock vs LoRA; one table, rows = measures.

Each seed changes both the corpus (data.seed: other people) and the initialisation (training.seed). One seed
takes about as long as `make demo-adapter` (or `make demo`). `--variant` (repeatable) replaces the default
methods by named sets of overrides of the config, e.g.
`--variant lora memory.enabled=false lora.enabled=true --variant sparse memory.slot_top_k=32`; with `--scope` a
variant is the list-free read (keys) with its overrides, a column beside `--methods`. A run already in
the output folder with the same resolved config is reused, and so is the trained base of each adapter seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from memory_transformer import load_config
from memory_transformer.demo import matching_intermediate_size, run_adapter_demo, run_demo

ADAPTER_KEYS = [("recall_new", "new QA", "{:.1%}"), ("recall_new_heldout", "new QA held-out", "{:.1%}"),
                ("recall_old", "old QA kept", "{:.1%}"), ("trainable", "trainable", "{:,.0f}"),
                ("bits_per_param", "bits/param", "{:.5f}"), ("tokens_per_s", "tokens/s", "{:,.0f}")]
SCRATCH_KEYS = [("recall_qa", "QA", "{:.1%}"), ("recall_qa_heldout", "QA held-out", "{:.1%}"),
                ("recall_qa_bits", "bits recalled", "{:,.0f}"), ("parameters", "parameters", "{:,.0f}"),
                ("bits_per_param", "bits/param", "{:.5f}"), ("tokens_per_s", "tokens/s", "{:,.0f}")]


def mean_std(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def summarise(runs: list[dict], keys: list) -> dict[str, dict[str, list[float]]]:
    methods = [m for m in runs[0] if m != "base"]
    return {m: {k: [r[m][k] for r in runs] for k, _, _ in keys} for m in methods}


def table(summary: dict, keys: list, head: str) -> str:
    width = max(14, *(len(m) + 2 for m in summary))
    lines = [head, f"{'method':<{width}}" + "".join(f"{label:>22}" for _, label, _ in keys)]
    for m, cols in summary.items():
        lines.append(f"{m:<{width}}" + "".join(f"{mean_std(cols[k], fmt):>22}" for k, _, fmt in keys))
    return "\n".join(lines)


def plot(summary: dict, bars: list[tuple[str, str]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (key, label), offset in zip(bars, (-0.2, 0.2)):
        vals = [summary[m][key] for m in methods]
        ax.bar([i + offset for i in range(len(methods))], [statistics.mean(v) for v in vals], 0.4,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=4, label=label)
    ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize="small")
    ax.set(ylabel="QA exact-match recall", ylim=(0, 1.15), title=f"{title} (mean ± std over seeds)")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_scratch(args, methods: dict | None) -> tuple[list[dict], list, str]:
    runs = []
    for seed in args.seeds:
        cfg = load_config(args.config or "configs/demo.yaml", [f"data.seed={seed}", f"training.seed={seed}", *args.set])
        if methods is None:
            width = matching_intermediate_size(cfg)
            methods = {"vanilla": ["memory.enabled=false"],
                       f"vanilla-mlp{width}": ["memory.enabled=false", f"model.intermediate_size={width}"],
                       "memory": ["memory.enabled=true"]}
        runs.append(run_demo(cfg, str(Path(args.out) / f"seed-{seed}"), methods))
    bits = statistics.mean(next(iter(r.values()))["knowledge_bits"] for r in runs)
    return runs, SCRATCH_KEYS, f"{len(runs)} seed(s), from scratch; {cfg.data.num_people} people, {bits:,.0f} bits"


def run_adapter(args, methods: dict | None) -> tuple[list[dict], list, str]:
    runs = []
    for seed in args.seeds:
        seeded = [f"data.seed={seed}", f"training.seed={seed}"]
        base = load_config(args.base_config, [*seeded, *args.base_set])
        teach = load_config(args.config or "configs/demo_adapter.yaml", [*seeded, *args.set])
        runs.append(run_adapter_demo(base, teach, str(Path(args.out) / f"seed-{seed}"), methods))
    base_old = mean_std([r["base"]["recall_old"] for r in runs], "{:.1%}")
    return runs, ADAPTER_KEYS, f"{len(runs)} seed(s); old-fact QA recall of the base before teaching: {base_old}"


def run_scope(args) -> None:
    from scope import run_seed, table as scope_table  # bench/scope.py, beside this script

    args.out = args.out or "runs/evidence-scope"
    runs = [run_seed(args, seed) for seed in args.seeds]
    text = scope_table(runs, args)
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scope.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    (out / "scope.md").write_text(text + "\n")
    print(f"\nwritten: {out / 'scope.json'}, {out / 'scope.md'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scratch", action="store_true", help="compare models trained from scratch (configs/demo.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-config", default="configs/demo_adapter_base.yaml")
    p.add_argument("--config", help="default: configs/demo_adapter.yaml, with --scratch configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], help="override for the (teaching) config")
    p.add_argument("--base-set", action="append", default=[], help="override for the base config (adapter demo)")
    p.add_argument("--out", help="default: runs/evidence, with --scratch runs/evidence-scratch")
    p.add_argument("--scope", action="store_true", help="issue 17's goal table (bench/scope.py)")
    p.add_argument("--corpus", default="demo", choices=["demo", "confirm"], help="--scope: data.corpus")
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 100], help="--scope: new people (one or two sizes)")
    p.add_argument("--old", type=int, default=20, help="--scope: people the base learns")
    p.add_argument("--rounds", type=int, default=5, help="--scope: sequential rounds (1 = none)")
    p.add_argument("--methods", nargs="+", help="--scope: only these of memory, keys, subject, lora, lora-gated "
                                                 "(default: all; without lora no wall-clock ratio)")
    p.add_argument("--bpe", type=int, metavar="VOCAB",
                   help="--scope: the base reads with a byte-level BPE tokenizer of VOCAB tokens trained on its own "
                        "documents and prose (default: the byte tokenizer)")
    p.add_argument("--prose", type=int, default=32, help="--scope: stdlib prose paragraphs for the KL")
    p.add_argument("--base-prose", type=float, default=0.2,
                   help="--scope: data.prose_fraction of the base's pretraining (real text to be disturbed on)")
    p.add_argument("--base-steps", type=int, default=1000,
                   help="--scope: the base's pretraining steps (with 20%% prose, 500 leave it knowing 45-80%% of "
                        "its people's facts, 1,000 all of them)")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="a named method: overrides of the config (repeatable; replaces the defaults); with "
                        "--scope: the list-free read (keys) with these overrides, beside --methods")
    args = p.parse_args()
    if args.scope:
        return run_scope(args)
    args.out = args.out or ("runs/evidence-scratch" if args.scratch else "runs/evidence")
    methods = {v[0]: v[1:] for v in args.variant} if args.variant else None
    runs, keys, head = (run_scratch if args.scratch else run_adapter)(args, methods)
    summary = summarise(runs, keys)
    print()
    print(table(summary, keys, head))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    bars = [("recall_qa", "QA"), ("recall_qa_heldout", "QA held-out")] if args.scratch else \
        [("recall_new", "new facts"), ("recall_old", "old facts kept")]
    plot(summary, bars, "from scratch" if args.scratch else "memory vs LoRA", out / "evidence.png")
    print(f"\nwritten: {out / 'evidence.json'}, {out / 'evidence.png'}")


if __name__ == "__main__":
    main()
