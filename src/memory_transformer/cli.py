"""Command line: `memory-transformer <command>` / `python -m memory_transformer <command>`.

Each command is a typed function; its docstring is its `--help`. Config problems print one line on stderr
and exit with code 2 before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memory_transformer.config import Config, ConfigError, load_config


def cmd_info(args) -> int:
    """Parameter counts and bytes by component, for a config or a saved model, without training."""
    from memory_transformer.io import load_model
    from memory_transformer.model import build_model

    if args.checkpoint:
        model = load_model(args.checkpoint, overrides=args.set, allow_base_mismatch=args.allow_base_mismatch)
    else:
        model = build_model(_config(args), device="meta")
    report = model.parameter_report()
    if args.json:
        print(json.dumps(report))
        return 0
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    print(f"{'component':<18}{'parameters':>14}{'bytes':>16}   (dtype {dtype})")
    for name, n in report["parameters"].items():
        print(f"{name:<18}{n:>14,}{report['bytes'][name]:>16,}")
    if model.memory is not None:
        from memory_transformer.lora import matching_lora_rank

        r, n = matching_lora_rank(model)
        print(f"LoRA rank with the memory's trainable parameters (targets {','.join(model.config.lora.target_modules)}):"
              f" lora.r={r} ({n:,} parameters)")
    return 0


def cmd_generate(args) -> int:
    """Generate text from prompt(s); a single prompt is streamed as it is produced."""
    from memory_transformer.generate import generate_cli

    return generate_cli(args)


def cmd_export(args) -> int:
    """Export a trained model: --merge-lora (fold LoRA into the base, keep memory), --memory-only (the memory
    weights alone, adapter layout), or --hf (a plain transformers folder; models without memory only)."""
    from memory_transformer.export import export

    export(args.checkpoint, args.out, merge_lora=args.merge_lora, memory_only=args.memory_only, hf=args.hf,
           allow_base_mismatch=args.allow_base_mismatch)
    print(f"exported to {args.out}")
    return 0


def cmd_train(args) -> int:
    """Train a model from a config; --resume continues the newest checkpoint of the run folder (or PATH)."""
    from memory_transformer.train.trainer import TrainingError, train

    cfg = _config(args)
    try:
        train(cfg, resume=args.resume)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    """Perplexity on the configured eval data and, on synthetic facts, recall (seen and held-out phrasing);
    with --lm-eval-tasks, lm-evaluation-harness tasks instead (needs the lm-eval extra)."""
    if args.lm_eval_tasks:
        try:
            from memory_transformer.lm_eval_adapter import eval_cli
        except ModuleNotFoundError as e:
            if e.name != "lm_eval":
                raise
            raise ConfigError("--lm-eval-tasks", "needs lm-eval: pip install 'memory-transformer[lm-eval]'") from None
        return eval_cli(args)
    from memory_transformer.data import build_data
    from memory_transformer.evaluate import evaluate
    from memory_transformer.io import load_model
    from memory_transformer.train.trainer import make_accelerator

    model = load_model(args.checkpoint, overrides=None if args.config else args.set,
                       allow_base_mismatch=args.allow_base_mismatch)
    cfg = load_config(args.config, args.set) if args.config else model.config
    acc = make_accelerator()
    model.to(acc.device)
    metrics = evaluate(model, model.tokenizer, build_data(cfg, model.tokenizer), acc, progress=acc.is_main_process)
    if acc.is_main_process:
        print(json.dumps(metrics) if args.json else "\n".join(f"{k:<26}{v:>14.4f}" for k, v in metrics.items()))
    return 0


def cmd_lr_find(args) -> int:
    """LR range test: prints the suggested learning rate and saves lr_find.png."""
    from memory_transformer.train.lr_find import lr_find

    if not 0 < args.start < args.end:
        raise ConfigError("--start", f"needs 0 < --start < --end, got --start {args.start} --end {args.end}")
    if args.steps < 2:
        raise ConfigError("--steps", f"must be at least 2 (a range of learning rates), got {args.steps}")
    cfg = _config(args)
    out = args.out or f"{cfg.training.output_dir.rstrip('/')}_lr_find"
    result = lr_find(cfg, out, args.start, args.end, args.steps)
    print(f"suggested lr: {result['suggested_lr']:.2e}  (plot: {Path(out) / 'lr_find.png'})")
    return 0


def cmd_quantize(args) -> int:
    """Convert a trained model's memory banks to int8 or int4 storage (for inference)."""
    from memory_transformer.model import quantize_model
    from memory_transformer.io import load_model, new_folder

    out = new_folder(args.out, "--out")
    model = load_model(args.checkpoint, overrides=args.set, allow_base_mismatch=args.allow_base_mismatch)
    model = quantize_model(model, args.bits, args.group_size)
    model.save_pretrained(out)
    bank = model.parameter_report()["bytes"]["memory_bank"]
    print(f"saved int{args.bits} model to {out} (memory bank {bank:,} bytes)")
    return 0


def cmd_demo(args) -> int:
    """Train the vanilla control and the memory model on synthetic facts, evaluate both, compare."""
    from memory_transformer.demo import run_demo

    run_demo(_config(args), args.out)
    return 0


def cmd_demo_adapter(args) -> int:
    """Adapter demo: a vanilla base learns half the people, then memory, LoRA (same trainable parameters) and
    both teach it the other half; prints new-fact recall, old-fact recall kept, parameters and time."""
    from memory_transformer.demo import run_adapter_demo

    run_adapter_demo(load_config(args.base_config, args.set), _config(args), args.out)
    return 0


def cmd_teach(args) -> int:
    """Teach a frozen base the facts in a JSONL file ({"text": ...} documents or {"question": ..., "answer": ...}
    pairs) with a memory adapter (default settings: configs/teach.yaml); prints new-fact recall on the pairs, alias
    recall (--eval-aliases), locality (KL to the base on background text) and the adapter's size."""
    from memory_transformer.teach import teach

    teach(args.base, args.data, args.out, args.config, args.set, args.eval_aliases, args.background, args.start)
    return 0


COMMANDS = {"info": cmd_info, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "lr-find": cmd_lr_find,
            "quantize": cmd_quantize, "export": cmd_export, "demo": cmd_demo,
            "demo-adapter": cmd_demo_adapter, "teach": cmd_teach}


def _config(args) -> Config:
    if not args.config:
        raise ConfigError("--config", "a config file is required (e.g. --config configs/demo.yaml)")
    from memory_transformer.resolve import resolve_config

    return resolve_config(load_config(args.config, args.set))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memory-transformer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        sp = sub.add_parser(name, help=fn.__doc__.splitlines()[0], description=fn.__doc__)
        sp.add_argument("--config", help="experiment YAML file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, YAML-typed value); repeatable")
        ARGUMENTS.get(name, lambda _: None)(sp)
    return p


def _checkpoint_args(sp, required: bool = True, help: str = "a saved model folder") -> None:
    sp.add_argument("--checkpoint", required=required, help=help)
    sp.add_argument("--allow-base-mismatch", action="store_true",
                    help="load an adapter onto a base other than the one it was trained on")


def _info_args(sp) -> None:
    _checkpoint_args(sp, required=False, help="a saved model folder instead of --config")
    sp.add_argument("--json", action="store_true", help="print one JSON object {parameters, bytes}")


def _train_args(sp) -> None:
    sp.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                    help="continue the newest checkpoint of training.output_dir, or the checkpoint PATH")


def _eval_args(sp) -> None:
    _checkpoint_args(sp, help="a saved model folder (final/, best/, a checkpoint)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--lm-eval-tasks", metavar="T1,T2", help="run these lm-evaluation-harness tasks instead")
    sp.add_argument("--lm-eval-include", metavar="PATH", help="a folder of extra lm-eval task YAML files")
    sp.add_argument("--limit", type=float, help="lm-eval: documents per task (a fraction if < 1)")
    sp.add_argument("--batch-size", type=int, default=1, help="lm-eval: requests per forward")


def _lr_find_args(sp) -> None:
    sp.add_argument("--start", type=float, default=1e-6)
    sp.add_argument("--end", type=float, default=1.0)
    sp.add_argument("--steps", type=int, default=100)
    sp.add_argument("--out", help="folder for lr_find.png/json (default: <training.output_dir>_lr_find)")


def _quantize_args(sp) -> None:
    _checkpoint_args(sp)
    sp.add_argument("--bits", type=int, choices=[8, 4], required=True)
    sp.add_argument("--group-size", type=int, default=64, help="int4 values per scale")
    sp.add_argument("--out", required=True)


def _generate_args(sp) -> None:
    _checkpoint_args(sp)
    sp.add_argument("--prompt", action="append", default=[], help="repeatable")
    sp.add_argument("--prompt-file", help="one prompt per line")
    sp.add_argument("--max-new-tokens", type=int)
    sp.add_argument("--temperature", type=float)
    sp.add_argument("--top-k", type=int)
    sp.add_argument("--top-p", type=float)
    sp.add_argument("--greedy", action="store_true")
    sp.add_argument("--routing", choices=["sequence", "rolling", "token", "hybrid"])
    sp.add_argument("--batch-size", type=int, default=8)


def _export_args(sp) -> None:
    _checkpoint_args(sp)
    sp.add_argument("--out", required=True)
    kind = sp.add_mutually_exclusive_group(required=True)
    kind.add_argument("--merge-lora", action="store_true")
    kind.add_argument("--memory-only", action="store_true")
    kind.add_argument("--hf", action="store_true")


def _demo_args(sp) -> None:
    sp.add_argument("--out", help="folder for both runs (default: runs/demo-<time>)")


def _demo_adapter_args(sp) -> None:
    sp.add_argument("--base-config", required=True, help="stage 1: the vanilla base (e.g. configs/demo_adapter_base.yaml)")
    sp.add_argument("--out", help="folder for all runs (default: runs/demo-adapter-<time>)")


def _teach_args(sp) -> None:
    sp.add_argument("--base", required=True, help="the frozen base: a transformers folder or hub name")
    sp.add_argument("--data", required=True, help='JSONL facts: {"text": ...} or {"question": ..., "answer": ...}')
    sp.add_argument("--out", required=True, help="a new folder: documents, run folder (adapter in run/final), result")
    sp.add_argument("--eval-aliases", metavar="FILE", help="JSONL question/answer pairs asked with other names")
    sp.add_argument("--background", type=int, default=16, help="base samples and prose paragraphs for the KL")
    sp.add_argument("--from", dest="start", metavar="ADAPTER",
                    help="a round of teaching: start from this adapter (an earlier OUT/run/final) and its settings")


ARGUMENTS = {"info": _info_args, "train": _train_args, "eval": _eval_args, "lr-find": _lr_find_args,
             "quantize": _quantize_args, "demo": _demo_args, "generate": _generate_args, "export": _export_args,
             "demo-adapter": _demo_adapter_args, "teach": _teach_args}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that is a file, a read-only disk, a full disk: the user's to fix, in one line
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
