"""Tokenizers: a byte-level default that needs no files, or any `transformers` tokenizer.

`ByteTokenizer` speaks the small part of the `transformers` tokenizer API that this package uses
(`encode`, `decode`, `pad_token_id`, `eos_token_id`, `bos_token_id`, `len()`, `save_pretrained`), so the
rest of the code treats both kinds the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memory_transformer.config import ConfigError

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then pad, bos, eos."""

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    chat_template = None

    def __len__(self) -> int:
        return 259

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        data = bytes(i for i in ids if i < 256) if skip_special_tokens else bytes(min(i, 255) for i in ids)
        return data.decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "vocab_size": len(self)}))


# A folder needs one of these to hold a tokenizer (tokenizer_config.json alone names a class, not a vocabulary).
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


def load_tokenizer(name: str, key: str = "model.tokenizer"):
    """`bytes` -> ByteTokenizer; a folder holding a saved ByteTokenizer -> ByteTokenizer; else AutoTokenizer.
    A local folder without tokenizer files is a ConfigError on `key` (AutoTokenizer would build an empty one)."""
    if name == "bytes" or (Path(name) / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    from transformers import AutoTokenizer

    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in VOCABULARY_FILES):
        raise ConfigError(key, f"{name} has no tokenizer files ({', '.join(VOCABULARY_FILES)}); set "
                          "model.tokenizer to a tokenizer folder or name, or to bytes")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, L) left-padded with `pad_id` and the attention mask (B, L), 0 on the padding: the
    layout `generate` continues from (every row ends at the same position)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask
