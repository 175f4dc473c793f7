"""Subject routing: a token reads the chapter of the last taught subject mentioned at or before it.

`memory.routing: subject` replaces the learned router with a lookup. `memory.subjects` lists the entities the
memory is taught (for the built-in synthetic facts, the taught people, filled in by the config); subject i owns
chapter i mod C. Every forward scans the input ids for the subjects' token sequences (each subject as encoded
alone and after a space): from the last token of a mention on, each token reads that subject's chapter, until
the next mention or an end-of-sequence token. Tokens before any mention, and all tokens of a text that mentions
no taught subject, read nothing: the memory adds exactly 0 there, so what the base model knew about anything
else is untouched by whatever the memory learns.

A position's chapter depends only on the tokens up to it, so evaluation and generation with or without a KV cache
route every position alike (a packed training block that starts inside a document reads nothing until the next
mention). The end-of-sequence token resets the lookup only where it ends a document (`data.mode: pretraining`,
which packs documents each followed by eos); in `instruction_finetuning` a row is one chat, and an instruct
tokenizer's eos ends a turn (`<|im_end|>`, `<|eot_id|>`): the answer reads the subject its question named. `lora.gate: subject` uses the same lookup to switch LoRA
off wherever no taught subject is read (the baseline that shares subject routing's guarantee). Matching is on token ids: a subject written differently
(another spelling, only the last name, a tokenization that merges the name with the next character) is not
found, and a subject whose tokens occur inside a longer word ("Ann" in "Anna" with byte tokens) is found there.
Each subject is indexed as encoded alone and after a space; a SentencePiece tokenizer (Llama 2, Mistral) that
encodes a name at the start of a line differently from both is not found there.
"""

from __future__ import annotations

import torch

from memory_transformer.config import Config, ConfigError, uses_subjects

NO_EVENT, NO_READ = -2, -1


class SubjectIndex:
    """The token sequences of the taught subjects, grouped by length, and the chapter each one reads."""

    def __init__(self, subjects: list[str], tokenizer, num_chapters: int, reset_at_eos: bool = True):
        self.eos = tokenizer.eos_token_id if reset_at_eos else None
        by_length: dict[int, dict[tuple[int, ...], int]] = {}
        owner: dict[tuple[int, ...], str] = {}
        for i, subject in enumerate(subjects):
            for text in (subject, " " + subject):
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                if not ids:
                    continue
                if owner.setdefault(ids, subject) != subject:
                    raise ConfigError("memory.subjects", f"{owner[ids]!r} and {subject!r} are the same tokens for "
                                      "this tokenizer: list each subject once")
                by_length.setdefault(len(ids), {})[ids] = i % num_chapters
        # Each window of L ids is hashed (random int64 weights, wrapping) to find its candidate pattern by binary
        # search; the candidate is then compared id by id, so a hash collision can never route a token wrongly.
        cpu = torch.device("cpu")  # built on the CPU whatever the default device; moved to the ids' device on use
        self.longest = max(by_length, default=1)  # tokens in the longest pattern
        weights = torch.randint(-2**62, 2**62, (self.longest,), device=cpu,
                                generator=torch.Generator(cpu).manual_seed(0))
        self._tables: dict[int, tuple[torch.Tensor, ...]] = {}
        for length in sorted(by_length):  # ascending: a longer mention ending at the same token wins
            patterns = torch.tensor(list(by_length[length]), dtype=torch.long, device=cpu)  # (n, L)
            hashes = (patterns * weights[:length]).sum(-1)
            hashes, order = hashes.sort()
            chapters = torch.tensor(list(by_length[length].values()), dtype=torch.long, device=cpu)
            self._tables[length] = (patterns[order], chapters[order], hashes, weights[:length])
        self._on: dict[torch.device, dict[int, tuple[torch.Tensor, ...]]] = {}

    def chapters(self, ids: torch.Tensor, start: int = 0, carry: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> the chapter each position from `start` on reads (B, T - start), -1 where it reads
        nothing. `carry` (B,) is the chapter position start - 1 reads (needed when start > 0); only the windows
        ending at or after `start` are scanned, so a generation step costs the same at any length."""
        lo = max(0, start - self.longest + 1)  # every window ending at or after `start` lies within ids[:, lo:]
        ids = ids[:, lo:]
        event = torch.full_like(ids, NO_EVENT)  # what happens at a position: a mention ends, or eos
        if self.eos is not None:
            event[ids == self.eos] = NO_READ
        for length, (patterns, chapters, hashes, weights) in self._tables_on(ids.device).items():
            if length > ids.shape[1]:
                break
            windows = ids.unfold(1, length, 1)  # (B, n - L + 1, L), window w ends at position w + L - 1
            j = torch.searchsorted(hashes, (windows * weights).sum(-1)).clamp(max=len(hashes) - 1)
            hit = (patterns[j] == windows).all(-1)
            event[:, length - 1:] = torch.where(hit, chapters[j], event[:, length - 1:])
        return last_event(event[:, start - lo:], carry if start else None)

    def _tables_on(self, device: torch.device) -> dict[int, tuple[torch.Tensor, ...]]:
        if device not in self._on:
            self._on[device] = {n: tuple(t.to(device) for t in table) for n, table in self._tables.items()}
        return self._on[device]


def last_event(event: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
    """event (B, T): NO_EVENT where nothing happens, else the value that position and the ones after it take
    until the next event. `carry` (B,): the value before position 0 (None: NO_READ). -> (B, T)."""
    if carry is not None:
        event = torch.cat([carry[:, None].to(event.dtype), event], dim=1)  # the carried value, never NO_EVENT
    positions = torch.arange(event.shape[1], device=event.device).expand(event.shape[0], -1)
    last = torch.where(event != NO_EVENT, positions, -1).cummax(dim=1).values  # last event at or before
    read = torch.where(last >= 0, event.gather(1, last.clamp(min=0)), NO_READ)
    return read[:, 1:] if carry is not None else read


class SubjectTracker:
    """The chapter each position of the current forward reads: `chapters` (B, T), -1 where nothing is read.
    `hook` is a forward pre-hook (with kwargs) on the base model, so it is up to date before any layer runs;
    with a KV cache a call passes only the new positions, so the ids and chapters of the earlier calls are kept
    (B, L) and only the new positions are looked up."""

    def __init__(self, index: SubjectIndex):
        self.index = index
        self.ids: torch.Tensor | None = None
        self.read: torch.Tensor | None = None  # (B, L): the chapter of every position seen so far
        self.chapters: torch.Tensor | None = None

    def hook(self, module, args, kwargs) -> None:
        self.observe(kwargs.get("input_ids", args[0] if args else None), kwargs.get("past_key_values"))

    def observe(self, ids: torch.Tensor | None, cache) -> None:
        if ids is None:
            raise ValueError("subject routing finds subjects in the input ids: pass input_ids, not inputs_embeds")
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            if self.ids is None or self.ids.shape[0] != ids.shape[0] or self.ids.shape[1] < past:
                raise ValueError("subject routing: a KV cache of positions this model did not see; start the "
                                 "sequence without past_key_values")
            ids = torch.cat([self.ids[:, :past], ids], dim=1)  # a cropped cache drops the ids after it
            self.chapters = self.index.chapters(ids, start=past, carry=self.read[:, past - 1])
            self.read = torch.cat([self.read[:, :past], self.chapters], dim=1)
        else:
            self.chapters = self.read = self.index.chapters(ids)
        self.ids = ids

    def reads(self) -> torch.Tensor:
        """(B, T, 1) bool: whether the position reads a subject's chapter."""
        return (self.chapters >= 0)[..., None]

    def gate(self, t: torch.Tensor) -> torch.Tensor:
        """t (B, T', ...) of the last T' positions, 0 where no subject is read: what variant B's extra MLP and a
        subject-gated LoRA (lora.gate: subject) add only where the memory reads."""
        return torch.where(self.reads()[:, -t.shape[1]:], t, 0)

    def reset(self) -> None:
        self.ids = self.read = self.chapters = None


def subject_index(cfg: Config, tokenizer) -> SubjectIndex:
    """eos ends a document in pretraining mode only; in a chat it ends a turn, and the answer reads its question's
    subject."""
    return SubjectIndex(cfg.memory.subjects, tokenizer, cfg.memory.num_chapters,
                        reset_at_eos=cfg.data.mode == "pretraining")


def track_subjects(cfg: Config, tokenizer, base) -> SubjectTracker | None:
    """The one tracker of a model that uses subjects (subject routing and/or a subject-gated LoRA), looking the
    input ids up before every forward of `base`; None otherwise."""
    if not uses_subjects(cfg):
        return None
    tracker = SubjectTracker(subject_index(cfg, tokenizer))
    base.register_forward_pre_hook(tracker.hook, with_kwargs=True)
    return tracker
