"""The CPU demo: the vanilla control and the same model with memory, trained on the same synthetic facts for the
same steps, evaluated alike, compared side by side (table on stdout, plot in the demo folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from memory_transformer.config import Config, ConfigError, load_config
from memory_transformer.resolve import resolve_config
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


SCRATCH_METHODS = {"vanilla": ["memory.enabled=false"], "memory": ["memory.enabled=true"]}  # name -> overrides


def run_demo(cfg: Config, out: str | None = None, methods: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Train `cfg` once per method (name -> overrides, default: vanilla and memory) on the same data and steps.
    A method already run in `out` with the same resolved config is not trained again (see `_train_or_reuse`)."""
    root = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    results = {}
    for name, overrides in (methods or SCRATCH_METHODS).items():
        run_cfg = load_config(cfg.to_dict(), [*overrides, f"training.output_dir={root / name}"])
        results[name] = _train_or_reuse(name, run_cfg, _summarise)
    print()
    print(format_table(results, cfg))
    (root / "comparison.json").write_text(json.dumps(results, indent=2))
    plot_comparison(results, root, root / "comparison.png")
    print(f"\ncomparison: {root / 'comparison.json'}, plot: {root / 'comparison.png'}")
    return results


def _train_or_reuse(name: str, cfg: Config, result_of) -> dict:
    """Train `cfg` and return `result_of(train summary, run folder)`, saved with the resolved config in the run folder's
    result.json; when that file holds the same config, return its result without training (a changed config
    meets the run folder's refusal)."""
    run_dir = Path(cfg.training.output_dir)
    saved, resolved = run_dir / "result.json", json.loads(json.dumps(resolve_config(cfg).to_dict()))
    prior = json.loads(saved.read_text()) if saved.exists() else None
    if prior is not None and _resolved(prior["config"]) == resolved:
        print(f"== {name}: reusing {saved} (same config)")
        return prior["result"]
    print(f"== {name}: training {cfg.training.max_steps} steps into {run_dir}")
    result = result_of(train(cfg), run_dir)
    saved.write_text(json.dumps({"config": resolved, "result": result}, indent=2))
    return result


def _check_same_base(cfg: Config, saved: Path) -> None:
    """A base already trained in the output folder is reused only for the same config (`saved`, its config.yaml;
    where the folder is does not count): another tokenizer, corpus or size would otherwise be taught and probed as
    if it were this one."""
    prior = (_resolved(load_config(str(saved), [f"training.output_dir={cfg.training.output_dir}"]).to_dict())
             if saved.is_file() else None)  # a base folder moved elsewhere is the same base
    resolved = json.loads(json.dumps(resolve_config(cfg).to_dict()))
    if prior == resolved:
        return
    differ = sorted(f"{section}.{key}" for section, values in resolved.items() if isinstance(values, dict)
                    for key, value in values.items() if (prior or {}).get(section, {}).get(key) != value)
    what = ("no config.yaml" if prior is None else
            f"another config: {', '.join(differ[:5]) or 'its keys'} {'differs' if len(differ) == 1 else 'differ'}")
    raise ConfigError("training.output_dir", f"{saved.parent} holds a base trained with {what}; choose another "
                      "output folder or delete that one")


def _resolved(saved: dict) -> dict | None:
    """A saved resolved config as it resolves today: keys added to the schema since take their defaults (which
    keep the old behaviour); None if it no longer loads."""
    try:
        return json.loads(json.dumps(resolve_config(load_config(saved)).to_dict()))
    except ConfigError:
        return None


def matching_intermediate_size(cfg: Config) -> int:
    """The MLP width at which the vanilla model of `cfg` has as many parameters as `cfg` with its memory: the
    fair from-scratch control (memory's parameters spent on a wider MLP instead)."""
    from memory_transformer.model import build_model

    def total(overrides: list[str]) -> int:
        model = build_model(load_config(cfg.to_dict(), overrides), device="meta")  # shapes only
        return sum(p.numel() for p in model.parameters())

    m = cfg.model
    width = m.intermediate_size or 4 * m.hidden_size
    extra = total(["memory.enabled=true"]) - total(["memory.enabled=false"])
    return width + round(extra / (3 * m.hidden_size * m.num_layers))  # gate, up, down: 3 x hidden per unit


def _summarise(summary: dict, run_dir: Path) -> dict:
    from memory_transformer.train.plots import read_metrics

    train_rows, _ = read_metrics(run_dir)
    counts = summary["param_counts"]
    out = {**summary, "parameters": counts["total"], "trainable": counts["trainable"],
           "final_loss": train_rows[-1]["loss"] if train_rows else float("nan")}
    out["bits_per_param"] = out.get("recall_qa_bits", 0) / max(out["trainable"], 1)
    out["tokens_per_s"] = _mean_tokens_per_s(run_dir)
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


# ---------------------------------------------------------------------------------------------------------
# Adapter demo: a vanilla base learns one half of the people; then memory, LoRA (same trainable parameters)
# and both teach it the other half. Recall on the new people, and what is left of the old ones.

METHODS = {  # name -> overrides of the teaching config
    "memory": ["memory.enabled=true", "lora.enabled=false"],
    "lora": ["memory.enabled=false", "lora.enabled=true"],
    "memory+lora": ["memory.enabled=true", "lora.enabled=true"],
}


# The list-free read: one chapter read by every position, scoped by keys fitted against samples of the base
# (configs/teach.yaml's setting; the samples are the keys' background only, not trained on).
KEYS = ["memory.enabled=true", "lora.enabled=false", "memory.routing=keys", "memory.num_chapters=1",
        "memory.num_tokens=960", "memory.slot_top_k=32", "memory.scope=keys", "memory.scope_anchor=true",
        "memory.scope_pairs=true", "memory.scope_match=ngram",
        "memory.scope_radius=0.7", "data.replay_generated=1024",
        "data.replay_fraction=0.0", "data.replay_temperature=0.7",
        "training.lr={base: 2e-3, memory_bank: 1e-1, memory_attention: 1e-2, router: 2e-3, lora: 2e-3}"]


def adapter_methods(teach_cfg: Config) -> dict[str, list[str]]:
    """METHODS, plus, when the memory routes by subject, LoRA gated by the same lookup (the baseline that shares
    subject routing's guarantee on untaught subjects) and the list-free read scoped by keys (what a user without
    a list of names gets)."""
    if teach_cfg.memory.routing != "subject":
        return METHODS
    return {**METHODS, "lora-gated": ["memory.enabled=false", "lora.enabled=true", "lora.gate=subject"],
            "memory-keys": KEYS}


def run_adapter_demo(base_cfg: Config, teach_cfg: Config, out: str | None = None,
                     methods: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Train the base (or reuse the one already in `out`), then teach it with each method: name -> overrides of
    the teaching config (default `adapter_methods`). LoRA's rank is set to match the trainable parameters of the teaching
    config's memory; a method's own `lora.r=...` wins. A method already run in `out` with the same resolved
    config is not trained again: its saved result is reused (a changed config meets the run folder's refusal)."""
    from memory_transformer.data.synthetic_facts import SyntheticFacts
    from memory_transformer.export import export_hf
    from memory_transformer.io import load_model
    from memory_transformer.lora import matching_lora_rank
    from memory_transformer.model import build_model

    root = Path(out or f"runs/demo-adapter-{time.strftime('%Y%m%d-%H%M%S')}")
    old = base_cfg.data.people
    d = teach_cfg.data
    facts = SyntheticFacts(d.num_people, d.seed, d.qa_fraction, d.corpus)
    old_facts = facts.subset(*old)
    base_result = root / "base_result.json"
    base_cfg = load_config(base_cfg.to_dict(), [f"training.output_dir={root / 'base'}"])
    if base_result.exists() and (root / "base_hf" / "config.json").exists():
        _check_same_base(base_cfg, root / "base" / "config.yaml")
        print(f"== base: reusing {root / 'base_hf'}")
        results = {"base": json.loads(base_result.read_text())}
    else:
        print(f"== base: vanilla model learns people {old[0]}..{old[1] - 1} ({base_cfg.training.max_steps} steps)")
        base_run = train(base_cfg)
        export_hf(load_model(root / "base" / "final"), root / "base_hf")
        results = {"base": {"recall_old": base_run["recall_qa"], "wall_time_s": base_run["wall_time_s"]}}
        base_result.write_text(json.dumps(results["base"]))
    teach = [f"model.pretrained={root / 'base_hf'}", f"model.tokenizer={root / 'base_hf'}"]
    probe = build_model(load_config(teach_cfg.to_dict(), [*teach, *METHODS["memory"]]))
    rank, _ = matching_lora_rank(probe)
    for name, overrides in (methods or adapter_methods(teach_cfg)).items():
        cfg = load_config(teach_cfg.to_dict(), [*teach, f"lora.r={rank}", *overrides,
                                                f"training.output_dir={root / name}"])
        results[name] = _train_or_reuse(name, cfg, lambda summary, d: _adapter_result(summary, d, old_facts))
    print()
    print(format_adapter_table(results, rank))
    (root / "comparison.json").write_text(json.dumps(results, indent=2))
    plot_adapter(results, root / "comparison.png")
    print(f"\ncomparison: {root / 'comparison.json'}, plot: {root / 'comparison.png'}")
    return results


def _adapter_result(summary: dict, run_dir: Path, old_facts) -> dict:
    from memory_transformer.evaluate import fact_recall
    from memory_transformer.io import load_model

    model = load_model(run_dir / "final")
    return {"trainable": summary["param_counts"]["trainable"], "recall_new": summary["recall_qa"],
            "recall_new_heldout": summary["recall_qa_heldout"],
            "recall_old": fact_recall(model, model.tokenizer, old_facts, ["recall_qa"])["recall_qa"],
            "bits_per_param": summary["recall_qa_bits"] / summary["param_counts"]["trainable"],
            "tokens_per_s": _mean_tokens_per_s(run_dir), "wall_time_s": summary["wall_time_s"]}


def _mean_tokens_per_s(run_dir: Path) -> float:
    from memory_transformer.train.plots import read_metrics

    rows, _ = read_metrics(run_dir)
    rows = rows[1:] or rows  # the first window includes start-up
    return sum(r["tokens_per_s"] for r in rows) / max(len(rows), 1)


def format_adapter_table(results: dict[str, dict], rank: int) -> str:
    lines = [f"LoRA rank {rank} matches the memory's trainable parameters",
             f"{'method':<14}{'trainable':>12}{'new QA':>9}{'new QA held-out':>17}{'old QA':>9}{'bits/param':>11}"
             f"{'tokens/s':>10}{'time (s)':>10}"]
    for name, r in results.items():
        if name == "base":
            lines.append(f"{'base (before)':<14}{'-':>12}{'-':>9}{'-':>17}{r['recall_old']:>9.1%}{'-':>11}"
                         f"{'-':>10}{r['wall_time_s']:>10.0f}")
            continue
        lines.append(f"{name:<14}{r['trainable']:>12,}{r['recall_new']:>9.1%}{r['recall_new_heldout']:>17.1%}"
                     f"{r['recall_old']:>9.1%}{r['bits_per_param']:>11.5f}{r['tokens_per_s']:>10,.0f}"
                     f"{r['wall_time_s']:>10.0f}")
    return "\n".join(lines)


def plot_adapter(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n != "base"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results[n]["recall_new"] for n in names], 0.4, label="new facts (QA recall)")
    ax.bar([x + 0.2 for x in xs], [results[n]["recall_old"] for n in names], 0.4, label="old facts kept")
    ax.axhline(results["base"]["recall_old"], color="gray", linestyle="--", label="old facts before teaching")
    ax.set_xticks(list(xs), [f"{n}\n{results[n]['trainable']:,} params" for n in names])
    ax.set(ylabel="exact-match recall", ylim=(0, 1), title="teaching new facts to a frozen base")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
