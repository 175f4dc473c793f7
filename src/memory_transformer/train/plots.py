"""PNG plots of a run folder's metrics.jsonl: loss curves, learning rates, chapter usage."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in rows if not r.get("eval") and not r.get("skipped")]
    return train, [r for r in rows if r.get("eval")]


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    train, evals = read_metrics(run_dir)
    written = [_loss(train, evals, out / "loss.png"), _lr(train, out / "lr.png")]
    usage = _usage_rows(train)
    if usage:
        written.append(_usage(usage, out / "chapter_usage.png"))
    return [p for p in written if p]


def _loss(train: list[dict], evals: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ev = [r for r in evals if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _lr(train: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for group in train[0]["lr"] if train else []:
        ax.plot([r["step"] for r in train], [r["lr"][group] for r in train], label=group)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate per parameter group")
    if train:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _usage_rows(train: list[dict]) -> dict[str, list[int]]:
    """Chapter counts summed over the whole run, per memory layer."""
    total: dict[str, list[int]] = {}
    for r in train:
        for layer, counts in r.get("router_usage", {}).items():
            prev = total.get(layer, [0] * len(counts))
            total[layer] = [a + b for a, b in zip(prev, counts)]
    return {k: v for k, v in total.items() if len(v) > 1}


def _usage(usage: dict[str, list[int]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(usage)
    for n, (layer, counts) in enumerate(sorted(usage.items(), key=lambda kv: int(kv[0]))):
        ax.bar([c + n * width for c in range(len(counts))], counts, width=width, label=f"layer {layer}")
    ax.set(xlabel="chapter", ylabel="sequences routed (logged steps)", title="chapter usage")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
