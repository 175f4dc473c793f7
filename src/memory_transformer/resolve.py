"""The resolve step: what a config leaves to files and data, checked and filled in before a model is built or
trained. The schema (config.py) reads no files or data; `build_model`, the trainer, the commands and the demo
call `resolve_config`."""

from __future__ import annotations

from pathlib import Path

from memory_transformer.config import Config, ConfigError, uses_subjects
from memory_transformer.data.synthetic_facts import CORPORA, SyntheticFacts


def resolve_config(cfg: Config) -> Config:
    """`cfg`, checked against its data and resolved in place (idempotent): the synthetic corpus's size, and
    `memory.subjects` as an explicit list (saved with the run) when subjects are used."""
    limit = CORPORA[cfg.data.corpus].max_people
    if cfg.data.source == "synthetic_facts" and not 1 <= cfg.data.num_people <= limit:
        raise ConfigError("data.num_people", f"the synthetic corpus has 1 to {limit} people, got "
                          f"{cfg.data.num_people}")
    if uses_subjects(cfg):
        _resolve_subjects(cfg)
    return cfg


def _resolve_subjects(cfg: Config) -> None:
    """`memory.subjects` as an explicit list (saved with the run): from a file, or the synthetic corpus's people."""
    mem, d = cfg.memory, cfg.data
    if isinstance(mem.subjects, str):
        path = Path(mem.subjects)
        if not path.is_file():
            raise ConfigError("memory.subjects", f"file not found: {path}")
        try:
            mem.subjects = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError("memory.subjects", f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif mem.subjects is not None:
        mem.subjects = [s.strip() for s in mem.subjects]  # as file lines are: the lookup adds the leading space
    elif d.source == "synthetic_facts":
        facts = SyntheticFacts(d.num_people, d.seed, d.qa_fraction, d.corpus)
        mem.subjects = [p.name for p in (facts.subset(*d.people) if d.people is not None else facts).people]
    else:
        raise ConfigError("memory.subjects", "subject routing needs the taught subjects: a list of names or a "
                          f"text file with one per line (data.source {d.source} has no built-in people)")
    if not mem.subjects:
        raise ConfigError("memory.subjects", "subject routing needs at least one subject, got none")
    blank = [i for i, s in enumerate(mem.subjects) if not s]
    if blank:
        raise ConfigError("memory.subjects", f"subject {blank[0]} (counting from 0) is empty or only spaces")
    seen: set[str] = set()
    for subject in mem.subjects:
        if subject in seen:
            raise ConfigError("memory.subjects", f"{subject!r} is listed twice (each subject owns one chapter)")
        seen.add(subject)
