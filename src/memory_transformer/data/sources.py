"""Documents from local files or Hugging Face datasets, read through `datasets`.

`data.source` chooses: `hf:<name>` streams a hub dataset; anything else other than `synthetic_facts` is a
local file (`data.path` if set, else `data.source` itself). Local formats:

- `.txt`: one document per non-empty line (column `text`), the `datasets` text-builder convention;
- `.jsonl` / `.json`: one record per line, the document in `data.text_field` (or `data.messages_field`);
- `.parquet`: one record per row, same fields.

Every problem a user can fix (missing file, wrong field, empty data, unknown format) is raised as a
`ConfigError` while building the data, before any training step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from memory_transformer.config import ConfigError, DataConfig

FILE_READERS = {".txt": "from_text", ".jsonl": "from_json", ".json": "from_json", ".parquet": "from_parquet"}
RETRY_ERRORS = (ConnectionError, TimeoutError, OSError)


def field_key(data: DataConfig) -> tuple[str, str]:
    """(config key, field name) of the column holding one training example in this mode."""
    if data.mode == "instruction_finetuning":
        return "data.messages_field", data.messages_field
    return "data.text_field", data.text_field


def load_documents(data: DataConfig, **hf_kwargs) -> list[Any]:
    """The chosen field of every record (strings, or message lists in instruction mode), in file order."""
    key, name = field_key(data)
    if data.source.startswith("hf:"):
        records = load_hf_records(data, **hf_kwargs)
        where = data.source
    else:
        where = data.path if data.path is not None else data.source
        records = read_file(where)
    docs = select_field(records, name, key, where)[: data.max_samples]
    if not docs:
        raise ConfigError("data.source" if data.source.startswith("hf:") else "data.path", f"{where} has no documents")
    return docs


def read_file(path: str) -> list[dict]:
    p = Path(path)
    if p.suffix not in FILE_READERS:
        allowed = ", ".join(FILE_READERS)
        raise ConfigError("data.path", f"unsupported file type {p.suffix!r} for {path}; allowed: {allowed}")
    if not p.is_file():
        raise ConfigError("data.path", f"file not found: {path}")
    import datasets

    reader = getattr(datasets.Dataset, FILE_READERS[p.suffix])
    try:
        with _quiet_datasets():  # its own log line and bar would precede our one-line error
            ds = reader(str(p), keep_in_memory=True)
    except Exception as e:  # an empty file has no schema: datasets raises instead of returning 0 rows
        if p.stat().st_size == 0:
            return []
        reason = _bad_json_line(p) if p.suffix == ".jsonl" else None
        raise ConfigError("data.path", reason or f"{path}: cannot read as {p.suffix} ({str(e).splitlines()[0]})") from None
    return ds.to_list()


@contextlib.contextmanager
def _quiet_datasets():
    import datasets
    from datasets.utils import logging as ds_logging

    level, bars = ds_logging.get_verbosity(), not datasets.are_progress_bars_disabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _bad_json_line(path: Path) -> str | None:
    """`<path> line N: <why>` for the first line of a JSONL file that is not one JSON object, else None."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(record, dict):
                return f"{path} line {n}: expected a JSON object, got {type(record).__name__}"
    return None


def select_field(records: list[dict], name: str, key: str, where: str) -> list[Any]:
    """Values of `name`, skipping empty ones; ConfigError listing the fields when it is absent."""
    if records and name not in records[0]:
        raise ConfigError(key, f"field {name!r} not in {where}; fields: {', '.join(records[0])}")
    return [r[name] for r in records if r.get(name)]


# ---------------------------------------------------------------------------------------------------------
# Hugging Face hub: streaming with retry/backoff and an optional JSONL cache


def load_hf_records(
    data: DataConfig,
    loader: Callable | None = None,
    sleep: Callable[[float], None] = time.sleep,
    attempts: int = 5,
    base_delay: float = 1.0,
) -> list[dict]:
    """Stream `data.source` = `hf:<name>`; read/write `data.cache_dir` when set. `loader` defaults to
    `datasets.load_dataset`; `sleep` is injectable so tests do not wait."""
    cache = cache_path(data) if data.cache_dir else None
    if cache is not None and cache.is_file():
        return [json.loads(line) for line in cache.read_text().splitlines() if line]
    if loader is None:
        from datasets import load_dataset as loader
    name = data.source[len("hf:") :]

    def stream() -> list[dict]:
        rows = loader(name, data.hf_config, split=data.hf_split, streaming=True)
        return list(_take(rows, data.max_samples))

    records = with_retry(stream, attempts, base_delay, sleep, what=data.source)
    if cache is not None:
        write_jsonl_atomic(cache, records)
    return records


def _take(rows: Iterable[dict], n: int | None) -> Iterable[dict]:
    for i, row in enumerate(rows):
        if n is not None and i >= n:
            return
        yield dict(row)


def with_retry(fn: Callable, attempts: int, base_delay: float, sleep: Callable, what: str):
    """Call `fn`; on a network error wait base_delay * 2**i and try again, `attempts` calls in all."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:  # a wrong dataset name: waiting will not make it appear
            raise ConfigError("data.source", f"dataset not found: {what}") from None
        except RETRY_ERRORS as e:
            if i == attempts - 1:
                raise ConnectionError(f"{what}: still failing after {attempts} attempts: {e}") from e
            sleep(base_delay * 2**i)


def cache_path(data: DataConfig) -> Path:
    """One file per (dataset, config, split, max_samples), so a cache never stands in for other data."""
    parts = [data.source[len("hf:") :], data.hf_config or "default", data.hf_split]
    if data.max_samples is not None:
        parts.append(f"n{data.max_samples}")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", "--".join(parts))
    return Path(data.cache_dir) / f"{stem}.jsonl"


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    # Write beside the target then rename: an interrupted run never leaves a truncated cache behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    os.replace(f.name, path)
