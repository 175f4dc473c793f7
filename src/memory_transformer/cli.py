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
    from memory_transformer.model import build_model, load_model

    if args.checkpoint:
        model = load_model(args.checkpoint, overrides=args.set)
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
    return 0


COMMANDS = {"info": cmd_info}


def _config(args) -> Config:
    if not args.config:
        raise ConfigError("--config", "a config file is required (e.g. --config configs/demo.yaml)")
    return load_config(args.config, args.set)


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


def _info_args(sp) -> None:
    sp.add_argument("--checkpoint", help="a saved model folder instead of --config")
    sp.add_argument("--json", action="store_true", help="print one JSON object {parameters, bytes}")


ARGUMENTS = {"info": _info_args}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
