"""Real English prose offline: paragraphs of the standard library's own docstrings.

A base pretrained on the synthetic facts alone has never seen real text; `data.prose_fraction` mixes the "train"
paragraphs into its documents, and the locality probes (`knowledge.kl_to_base` on `stdlib_prose`) use the "eval"
ones, which no training document contains.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import warnings
import zlib

SPLITS = ("train", "eval")

# Pure-Python standard-library modules with long English docstrings; sorted, so the pool is the same on every run
# of one Python install (docstrings change a little between Python versions).
PROSE_MODULES = sorted("""
argparse asyncio.events asyncio.tasks calendar collections configparser contextlib csv dataclasses datetime decimal
difflib email.message enum fractions functools heapq http.client http.server inspect ipaddress json logging
mailbox multiprocessing.pool optparse pathlib pickle pydoc random shutil socketserver statistics string
subprocess tarfile tempfile textwrap threading turtle typing unittest.case urllib.parse urllib.request uuid
warnings zipfile
""".split())


def stdlib_prose(n: int, seed: int = 0, split: str = "eval", min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """`n` paragraphs of English prose from the standard library's docstrings (offline, deterministic for one
    Python install): paragraphs of `min_chars` to `max_chars` ASCII characters with no code, examples or tables.
    `split`: "train" (about 3/4 of the paragraphs, for pretraining a base: `data.prose_fraction`) or "eval" (the
    others, for locality probes), split by a checksum of the paragraph so the two never share one."""
    pool = prose_pool(split, min_chars, max_chars)
    if n > len(pool):
        raise ValueError(f"asked for {n} {split} prose paragraphs, the standard library gives {len(pool)}")
    return random.Random(f"{seed}:prose").sample(pool, n)


def prose_pool(split: str, min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """Every paragraph of `split` ("train" or "eval"), sorted."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return sorted(p for p in _prose_paragraphs(min_chars, max_chars) if _split_of(p) == split)


@functools.lru_cache(maxsize=4)
def _prose_paragraphs(min_chars: int, max_chars: int) -> frozenset[str]:
    out = set()
    with warnings.catch_warnings():  # reading typing's deprecated aliases warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in PROSE_MODULES:
            out |= _module_prose(name, min_chars, max_chars)
    return frozenset(out)


def _module_prose(name: str, min_chars: int, max_chars: int) -> set[str]:
    try:
        module = importlib.import_module(name)
    except ImportError:  # e.g. turtle without tkinter
        return set()
    own = [v for _, v in sorted(vars(module).items()) if getattr(v, "__module__", None) == name]
    methods = [m for c in own if inspect.isclass(c) for _, m in sorted(vars(c).items()) if inspect.isfunction(m)]
    paragraphs = (" ".join(p.split()) for obj in [module, *own, *methods]
                  for p in (inspect.getdoc(obj) or "").split("\n\n") if _is_prose(p))
    return {p for p in paragraphs if min_chars <= len(p) <= max_chars}


def _is_prose(para: str) -> bool:
    lines = para.splitlines()
    if not lines or not para.isascii() or ">>>" in para or "::" in para:
        return False
    if any(line.startswith((" ", "\t", "-", "*", "+", "|", "=")) for line in lines):  # code, lists, tables
        return False
    letters = sum(c.isalpha() or c == " " for c in para)
    return letters >= 0.85 * len(para) and para.rstrip().endswith(".")




def _split_of(paragraph: str) -> str:
    return "eval" if zlib.crc32(paragraph.encode()) % 4 == 0 else "train"
