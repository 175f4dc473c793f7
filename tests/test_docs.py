"""The generated config reference: docs/configs.md is exactly what the schema renders, and lists every key."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from memory_transformer.config import Config, InferenceConfig, MemoryConfig
from memory_transformer.config_docs import COMMAND, config_reference, field_comments

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _keys(cls: type, prefix: str) -> list[str]:
    """Every dotted key under `prefix`, descending into nested config mappings (also inside unions)."""
    out = []
    for f, tp in ((f, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)):
        key = f"{prefix}.{f.name}" if prefix else f.name
        nested = [o for o in typing.get_args(tp) or (tp,) if dataclasses.is_dataclass(o)]
        if prefix:
            out.append(key)
        for sub in nested:
            out += _keys(sub, key)
    return out


def test_configs_md_is_up_to_date():
    text = (DOCS / "configs.md").read_text()
    assert text == config_reference(), f"docs/configs.md is stale: regenerate it with `{COMMAND}`"


def test_every_key_of_every_section_is_documented():
    text = config_reference()
    keys = _keys(Config, "")
    assert {k.split(".")[0] for k in keys} == {f.name for f in dataclasses.fields(Config)}
    assert "memory.router_loss.z_loss" in keys and "training.lr.router" in keys
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"keys missing from the config reference: {missing}"
    for f in dataclasses.fields(Config):
        assert f"## `{f.name}`" in text


def test_comments_come_from_the_source_line():
    assert field_comments(MemoryConfig)["num_tokens"] == "slots in one bank"
    assert field_comments(InferenceConfig)["routing"].startswith("sequence: route once on the prompt;")  # above


def test_every_table_row_has_four_cells():
    """Pipes inside cells (`a | b` allowed values) are escaped, so no row grows extra columns."""
    rows = [line for line in config_reference().splitlines() if line.startswith("| `")]
    assert rows
    for row in rows:
        assert len(re.split(r"(?<!\\)\|", row)) == 6, row
