"""The CPU demo: the vanilla control and the same model with memory, trained on the same synthetic facts for the
same steps, evaluated alike, compared side by side (table on stdout, plot in the demo folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from memory_transformer.config import Config, load_config
from memory_transformer.train.trainer import train

ROWS = [  # (label, metric key, format)
    ("parameters", "parameters", "{:,}"),
    ("trainable parameters", "trainable", "{:,}"),
    ("final train loss", "final_loss", "{:.4f}"),
    ("eval perplexity", "eval_ppl", "{:.3f}"),
    ("QA recall, seen phrasing", "recall_qa", "{:.1%}"),
    ("QA recall, held-out phrasing", "recall_qa_heldout", "{:.1%}"),
    ("bio recall, seen phrasing", "recall_bio", "{:.1%}"),
    ("bio recall, held-out phrasing", "recall_bio_heldout", "{:.1%}"),
    ("knowledge bits recalled (QA)", "recall_qa_bits", "{:,.0f}"),
    ("bits recalled / trainable param", "bits_per_param", "{:.5f}"),
    ("wall time (s)", "wall_time_s", "{:.0f}"),
]


def run_demo(cfg: Config, out: str | None = None) -> dict[str, dict]:
    root = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    results = {}
    for name, enabled in (("vanilla", False), ("memory", True)):
        run_cfg = load_config(cfg.to_dict(), [f"memory.enabled={str(enabled).lower()}",
                                              f"training.output_dir={root / name}"])
        print(f"== {name}: training {run_cfg.training.max_steps} steps into {root / name}")
        results[name] = _summarise(train(run_cfg), root / name)
    print()
    print(format_table(results, cfg))
    (root / "comparison.json").write_text(json.dumps(results, indent=2))
    plot_comparison(results, root, root / "comparison.png")
    print(f"\ncomparison: {root / 'comparison.json'}, plot: {root / 'comparison.png'}")
    return results


def _summarise(summary: dict, run_dir: Path) -> dict:
    from memory_transformer.train.plots import read_metrics

    train_rows, _ = read_metrics(run_dir)
    counts = summary["param_counts"]
    out = {**summary, "parameters": counts["total"], "trainable": counts["trainable"],
           "final_loss": train_rows[-1]["loss"] if train_rows else float("nan")}
    out["bits_per_param"] = out.get("recall_qa_bits", 0) / max(out["trainable"], 1)
    return out


def format_table(results: dict[str, dict], cfg: Config) -> str:
    d = cfg.data
    head = (f"synthetic facts: {d.num_people} people, {next(iter(results.values()))['knowledge_bits']:,.0f} bits; "
            f"{cfg.training.max_steps} steps of {cfg.training.batch_size} x {cfg.model.max_seq_len} tokens")
    names = list(results)
    lines = [head, f"{'':<34}" + "".join(f"{n:>14}" for n in names)]
    for label, key, fmt in ROWS:
        lines.append(f"{label:<34}" + "".join(f"{fmt.format(results[n].get(key, float('nan'))):>14}" for n in names))
    return "\n".join(lines)


def plot_comparison(results: dict[str, dict], root: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memory_transformer.train.plots import read_metrics

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in results:
        rows, _ = read_metrics(root / name)
        left.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    left.set(xlabel="step", ylabel="train loss", title="training loss")
    left.legend()
    keys = ["recall_qa", "recall_qa_heldout", "recall_bio", "recall_bio_heldout"]
    width = 0.8 / len(results)
    for n, name in enumerate(results):
        right.bar([i + n * width for i in range(len(keys))], [results[name].get(k, 0) for k in keys], width, label=name)
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], ["QA", "QA held-out", "bio", "bio held-out"])
    right.set(ylabel="exact-match recall", title="fact recall", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
