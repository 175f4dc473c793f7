"""Memory vs LoRA vs both on the adapter demo, over several seeds: mean ± std of new-fact recall, old-fact
recall kept, trainable parameters and tokens/s, side by side, plus a plot.

    python bench/evidence.py --seeds 0 1 2 [--base-config configs/demo_adapter_base.yaml]
                             [--config configs/demo_adapter.yaml] [--set KEY=VALUE ...] [--out runs/evidence]
                             [--variant NAME KEY=VALUE ... ]...

Each seed changes both the corpus (data.seed: other people) and the initialisation (training.seed). One seed
takes about as long as `make demo-adapter`. `--variant` (repeatable) replaces the default methods (memory,
lora, memory+lora) by named sets of overrides of the teaching config, e.g.
`--variant lora memory.enabled=false lora.enabled=true --variant sparse memory.slot_top_k=32`. The trained base
of each seed is kept in the output folder and reused by later calls with the same --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from memory_transformer import load_config
from memory_transformer.demo import run_adapter_demo

KEYS = [("recall_new", "new QA", "{:.1%}"), ("recall_new_heldout", "new QA held-out", "{:.1%}"),
        ("recall_old", "old QA kept", "{:.1%}"), ("trainable", "trainable", "{:,.0f}"),
        ("bits_per_param", "bits/param", "{:.5f}"), ("tokens_per_s", "tokens/s", "{:,.0f}")]


def mean_std(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def summarise(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    methods = [m for m in runs[0] if m != "base"]
    return {m: {k: [r[m][k] for r in runs] for k, _, _ in KEYS} for m in methods}


def table(summary: dict, base_old: list[float], n: int) -> str:
    width = max(14, *(len(m) + 2 for m in summary))
    lines = [f"{n} seed(s); old-fact QA recall of the base before teaching: {mean_std(base_old, '{:.1%}')}",
             f"{'method':<{width}}" + "".join(f"{label:>22}" for _, label, _ in KEYS)]
    for m, cols in summary.items():
        lines.append(f"{m:<{width}}" + "".join(f"{mean_std(cols[k], fmt):>22}" for k, _, fmt in KEYS))
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, key, label in ((-0.2, "recall_new", "new facts"), (0.2, "recall_old", "old facts kept")):
        vals = [summary[m][key] for m in methods]
        ax.bar([i + offset for i in range(len(methods))], [statistics.mean(v) for v in vals], 0.4,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=4, label=label)
    ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize="small")
    ax.set(ylabel="QA exact-match recall", ylim=(0, 1.15), title="memory vs LoRA (mean ± std over seeds)")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-config", default="configs/demo_adapter_base.yaml")
    p.add_argument("--config", default="configs/demo_adapter.yaml")
    p.add_argument("--set", action="append", default=[], help="override for the teaching config")
    p.add_argument("--out", default="runs/evidence")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="a named method: overrides of the teaching config (repeatable; replaces the defaults)")
    args = p.parse_args()
    methods = {v[0]: v[1:] for v in args.variant} if args.variant else None
    out = Path(args.out)
    runs = []
    for seed in args.seeds:
        seeded = [f"data.seed={seed}", f"training.seed={seed}"]
        base = load_config(args.base_config, seeded)
        teach = load_config(args.config, [*seeded, *args.set])
        runs.append(run_adapter_demo(base, teach, str(out / f"seed-{seed}"), methods))
    summary = summarise(runs)
    print()
    print(table(summary, [r["base"]["recall_old"] for r in runs], len(runs)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    plot(summary, out / "evidence.png")
    print(f"\nwritten: {out / 'evidence.json'}, {out / 'evidence.png'}")


if __name__ == "__main__":
    main()
