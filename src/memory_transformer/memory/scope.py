"""Learned scope (`memory.scope: keys`): which positions the memory may speak at, found without a list of names.

A GRACE-style codebook (Hartvigsen et al. 2023) of the frozen base's own hidden states. Before training, the
hidden state h (scaled to unit length) at the input of the first memory layer is computed for every token of the
teaching documents ("taught" states) and of samples of the frozen base (`data.replay_generated`: "background",
no old data needed). A taught state whose best cosine similarity to any background state, b, is below
`memory.scope_novelty` is something the base does not produce on its own (in practice: the tokens that make a
new name a new name): it becomes a key, with the threshold b + scope_radius * (1 - b). A position matches a key
when the cosine of its state and the key is above the key's threshold: closer to the key than the key's
nearest background state, by the share scope_radius of what is left.

A position is in scope from the first matching position of its document on, until the end-of-sequence token
that ends the document (`data.mode: pretraining`; as subject routing does from a mention on). Out of scope the
memory layers read nothing and add exactly 0: there the model is the base's own, bit for bit. The keys are
computed once from the frozen base, so they hold at any later step; they are saved with the memory
(`memory.scope.keys`, `memory.scope.thresholds`; buffers, not trained). A position's scope depends only on the
positions up to it, so generation with or without a KV cache, and scoring, decide alike.

What it guarantees and what not: text whose states stay farther from every key than the key's threshold is the
base's own. Whether another wording of a taught name (an alias, a held-out question) matches depends on the
base's representation of it (docs/experiments.md measures it), and a document that matches once stays in
scope to its end.

Routing by keys (`memory.routing: keys`): every key also names a chapter, the one it was fitted for (a run's keys
open the bank's last chapter, and `teach --from` adds a chapter per round), and a position in scope reads the
chapter of the best-matching key (the widest margin of cosine over the key's threshold) at the last matching
position of its document, with no router. Rounds of teaching then write to separate chapters, as subject
routing's subjects do: a later round's documents match its own keys and train only its own chapter (the earlier
ones are frozen, teach.py), so what earlier rounds wrote stays as it was; their questions read it as long as they
match their own round's keys better than a later round's (docs/experiments.md measures how often). Keys do not
tell people apart within a round (they sit on parts of names that many share), so one round is one chapter.

Matching by token n-grams (`memory.scope_match: ngram`): the keys are chosen as above (the taught positions whose
state, alone or with the one before, is novel), but each is kept as the shortest run of token ids ending at the
end of its word (at most `scope_ngram_tokens` tokens, at least `scope_ngram_chars` characters other than
whitespace) that never occurs in the base's samples, and a position matches when the ids ending at it are one of
those runs. A name then opens the scope in any sentence around it, where its states (which depend on the words
before) may not match, and only text that contains a taught name's exact spelling does: a common word inside a
name ("True") is not a run the samples lack, so prose using it stays out (docs/experiments.md, issue 17 twelfth
pass).

The anchored query (`memory.scope_anchor`): one key names no one, but the keys a name matches together do. At each
position in scope, the anchor is the mean of the unit states of the positions that matched a key since the scope
opened (in a question: the parts of the name asked about; carried through the KV cache), and the read's query is
q = W_q norm(h) + W_a norm(anchor), with W_a trained from 0. The query then says whom a question is about as well
as what it asks, and many people's facts can share one chapter (docs/experiments.md: 100 new people in one
chapter, 70-80% learned without it, 88.5-93.3% with it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from memory_transformer.memory.routing import Decide, Router, Routing
from memory_transformer.memory.subjects import NO_EVENT, NO_READ, last_event

_CHUNK = 2**26  # similarities per matmul while fitting (256 MB of float32)
_MATCH_ROWS = 512  # positions scored against the keys at a time (a (512, K) margin, not (B, T, K))
_CODEBOOK = ("keys", "thresholds", "chapters", "pair_keys", "pair_thresholds", "pair_chapters", "grams",
             "gram_chapters")
_PRIME, _BASE = 2**31 - 1, 1_000_003  # the n-grams' polynomial hash (exactness is checked after a hash hit)


def _gram_hashes(windows: torch.Tensor, n: int) -> torch.Tensor:
    """Token ids (..., W), -1 before the first id -> (...,): a hash of the last n ids, -1 where fewer than n."""
    h = torch.zeros(windows.shape[:-1], dtype=torch.long, device=windows.device)
    for i in range(windows.shape[-1] - n, windows.shape[-1]):
        h = (h * _BASE + windows[..., i] + 1) % _PRIME
    return torch.where(windows[..., -n] >= 0, h, -1)


def windows_of(ids: torch.Tensor, width: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ids (B, L) -> (B, L, width): at each position the ids of the `width` positions ending there, -1 before the
    row's start and, with `valid` (B, L) bool, before the last invalid position (a run never spans one)."""
    B, L = ids.shape
    padded = F.pad(ids, (width - 1, 0), value=-1).unfold(1, width, 1)  # (B, L, width)
    if valid is None:
        return padded
    positions = torch.arange(L, device=ids.device)
    last_invalid = torch.where(valid, -1, positions).cummax(dim=1).values  # (B, L)
    at = positions[:, None] - width + 1 + torch.arange(width, device=ids.device)  # (L, width) position of each entry
    return torch.where(at[None] > last_invalid[..., None], padded, -1)


def _best_cosine(taught: torch.Tensor, background: torch.Tensor, taught_prev: torch.Tensor | None = None,
                 background_prev: torch.Tensor | None = None) -> torch.Tensor:
    """Unit states (N, d), (M, d) -> (N,): each taught state's best cosine to any background state. With the
    previous positions' states (rows aligned with the states): each taught pair's best, over the background's
    consecutive pairs, of the smaller of its two cosines (a pair is as close as its farther half)."""
    rows = max(1, _CHUNK // max(len(background), 1))
    if taught_prev is None:
        return torch.cat([(part @ background.T).max(-1).values for part in taught.split(rows)])
    return torch.cat([torch.minimum(part @ background.T, prev @ background_prev.T).max(-1).values
                      for part, prev in zip(taught.split(rows), taught_prev.split(rows))])


class ScopeKeys(nn.Module):
    """The codebook (`keys` (K, d), `thresholds` (K,), with `routed` the chapter of each key, `chapters` (K,)) and
    the scope of the current forward: `read` (B, T), the chapter each position reads (0 unrouted), -1 where none."""

    def __init__(self, dim: int, novelty: float, radius: float, max_keys: int, eos: int | None,
                 routed: bool = False, pairs: bool = False, ngram: tuple[int, int] | None = None):
        super().__init__()
        self.novelty, self.radius, self.max_keys, self.eos = novelty, radius, max_keys, eos
        # memory.scope_match ngram: (at most tokens, at least characters) of a key's run of ids; the runs are
        # `grams` (K3, tokens), -1 before a run's first id, with (routed) `gram_chapters`; None matching by states
        self.ngram = ngram
        self.register_buffer("grams", torch.zeros(0, ngram[0], dtype=torch.long) if ngram else None)
        self.register_buffer("gram_chapters", torch.zeros(0, dtype=torch.long) if ngram and routed else None)
        self.ids: torch.Tensor | None = None  # ngram: (B, L) the ids of every position so far
        self.register_buffer("keys", torch.zeros(0, dim))
        self.register_buffer("thresholds", torch.zeros(0))
        # memory.routing keys: the chapter each key opens (None unrouted: an adapter of scope keys alone has none)
        self.register_buffer("chapters", torch.zeros(0, dtype=torch.long) if routed else None)
        # memory.scope_pairs: keys on two consecutive unit states, (K2, 2, d) [previous, current], each with its
        # threshold and (routed) chapter; None without pairs (an adapter fitted without them loads as it was)
        # (with ngram matching, pairs only choose more key positions: the keys are runs of ids, no pair buffers)
        self.pairs = pairs
        pair_buffers = pairs and ngram is None
        self.register_buffer("pair_keys", torch.zeros(0, 2, dim) if pair_buffers else None)
        self.register_buffer("pair_thresholds", torch.zeros(0) if pair_buffers else None)
        self.register_buffer("pair_chapters", torch.zeros(0, dtype=torch.long) if pair_buffers and routed else None)
        self.units: torch.Tensor | None = None  # pairs: (B, L, d) the unit states of every position so far
        self.state: torch.Tensor | None = None  # (B, L): the chapter read, NO_READ where none, every position so far
        self.read: torch.Tensor | None = None  # (B, T), the positions of the current forward
        # memory.scope_anchor: each position's anchor in the current forward (B, T, d), 0 out of scope; and the
        # sum and count behind it at every position so far (B, L, d), (B, L), carried through a KV cache
        self.anchor: torch.Tensor | None = None
        self.anchor_sum: torch.Tensor | None = None
        self.anchor_count: torch.Tensor | None = None

    @property
    def reads(self) -> torch.Tensor:
        """(B, T) bool: the positions of the current forward in scope."""
        return self.read >= 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _CODEBOOK:  # the codebook's size is whatever was fitted
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name) is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device,
                                                     dtype=getattr(self, name).dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(self, taught: torch.Tensor, background: torch.Tensor, seed: int = 0, chapter: int = 0,
            taught_prev: torch.Tensor | None = None, background_prev: torch.Tensor | None = None,
            taught_windows: torch.Tensor | None = None, background_windows: torch.Tensor | None = None,
            chars: torch.Tensor | None = None) -> dict[str, int]:
        """taught (N, d), background (M, d) hidden states -> keys and thresholds (module doc), each key opening
        `chapter` when routed. More than `max_keys` candidates: a seeded random `max_keys` of them are kept.
        With pairs, `taught_prev` and `background_prev` are the states of the positions before (rows aligned; a
        row of zeros where there is none): a taught state that is not novel alone but whose pair with its previous
        state is (no background pair within `novelty` on both halves) becomes a pair key. With ngram matching,
        `taught_windows` (N, W) are the ids a run of each taught position may hold (rows aligned with the states;
        `windows_of`, ending where the run must end), `background_windows` (M, W) the ids ending at each
        background position, and `chars` (vocabulary,) each token's characters other than whitespace: every novel
        position (alone or as a pair) becomes a run of ids instead (`_fit_grams`). Returns counts for the log."""
        if not len(background):
            raise ValueError("memory.scope keys: no background states to fit against (data.replay_generated)")
        taught, background = F.normalize(taught.float(), dim=-1), F.normalize(background.float(), dim=-1)
        best = _best_cosine(taught, background)  # (N,)
        counts = {"taught_states": len(taught), "background_states": len(background)}
        if self.pairs and (taught_prev is None or background_prev is None):
            raise ValueError("memory.scope_pairs: fitting pair keys needs the previous positions' states")
        if self.pairs:
            taught_prev = F.normalize(taught_prev.float(), dim=-1)
            background_prev = F.normalize(background_prev.float(), dim=-1)
            candidates = ((best >= self.novelty) & (taught_prev.abs().sum(-1) > 0)).nonzero().squeeze(-1)
            pair_best = _best_cosine(taught[candidates], background, taught_prev[candidates], background_prev)
            novel_pair = pair_best < self.novelty
            pair_novel, pair_best = candidates[novel_pair], pair_best[novel_pair]
        if self.ngram is not None:
            if taught_windows is None or background_windows is None or chars is None:
                raise ValueError("memory.scope_match ngram: fitting needs the positions' ids and the tokens' lengths")
            novel = (best < self.novelty).nonzero().squeeze(-1)
            if self.pairs:
                novel = torch.cat([novel, pair_novel]).sort().values
            return counts | self._fit_grams(taught_windows[novel], background_windows, chars, seed, chapter)
        novel = self._subset((best < self.novelty).nonzero().squeeze(-1), seed)
        self.keys, self.thresholds = self._with_thresholds(taught[novel], best[novel], self.keys, self.thresholds)
        if self.chapters is not None:
            self.chapters = torch.full((len(novel),), chapter, dtype=torch.long, device=self.chapters.device)
        counts["keys"] = len(novel)
        if not self.pairs:
            return counts
        chosen = self._subset(torch.arange(len(pair_novel)), seed)
        at = pair_novel[chosen]
        pairs = torch.stack([taught_prev[at], taught[at]], dim=1)  # (K2, 2, d)
        self.pair_keys, self.pair_thresholds = self._with_thresholds(
            pairs, pair_best[chosen], self.pair_keys, self.pair_thresholds)
        if self.pair_chapters is not None:
            self.pair_chapters = torch.full((len(chosen),), chapter, dtype=torch.long,
                                            device=self.pair_chapters.device)
        return counts | {"pair_keys": len(chosen)}

    def _fit_grams(self, windows: torch.Tensor, background: torch.Tensor, chars: torch.Tensor, seed: int,
                   chapter: int) -> dict[str, int]:
        """The key runs: at each novel position (its ids `windows` (N, W)), the shortest run of ids ending there
        with at least `ngram[1]` characters that no position of the background (`background` (M, W)) ends with;
        none where even W ids are not such a run. Distinct runs, at most `max_keys` (a seeded random subset)."""
        width, least = self.ngram
        windows, background = windows.to(chars.device), background.to(chars.device)
        lengths = torch.where(windows >= 0, chars[windows.clamp(min=0)], 0).flip(-1).cumsum(-1)  # (N, W): last n
        chosen = torch.zeros(len(windows), dtype=torch.long, device=windows.device)  # the run's length, 0 none yet
        for n in range(1, width + 1):
            seen = _gram_hashes(background, n).unique()
            mine = _gram_hashes(windows, n)
            fresh = (chosen == 0) & (mine >= 0) & ~torch.isin(mine, seen) & (lengths[:, n - 1] >= least)
            chosen[fresh] = n
        kept = chosen > 0
        entry = torch.arange(width, device=windows.device)
        runs = torch.where(entry[None] >= width - chosen[kept, None], windows[kept], -1).unique(dim=0)
        runs = runs[self._subset(torch.arange(len(runs)), seed)]
        self.grams = runs.to(self.grams.device)
        if self.gram_chapters is not None:
            self.gram_chapters = torch.full((len(runs),), chapter, dtype=torch.long, device=self.gram_chapters.device)
        return {"keys": len(runs), "novel_positions": len(windows), "without_a_run": int((~kept).sum())}

    def _subset(self, candidates: torch.Tensor, seed: int) -> torch.Tensor:
        """At most `max_keys` of `candidates` (a seeded random subset, in order)."""
        if len(candidates) <= self.max_keys:
            return candidates
        g = torch.Generator().manual_seed(seed)
        return candidates[torch.randperm(len(candidates), generator=g)[: self.max_keys].sort().values]

    def _with_thresholds(self, keys: torch.Tensor, best: torch.Tensor, like_keys: torch.Tensor,
                  like_thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and their thresholds b + radius * (1 - b), b the key's best cosine to the background."""
        return (keys.to(like_keys.device, like_keys.dtype),
                (best + self.radius * (1 - best)).to(like_thresholds.device, like_thresholds.dtype))

    def codebook(self) -> dict[str, torch.Tensor]:
        """What `extend` takes: keys, thresholds and, when present, chapters and the pair keys'."""
        return {name: getattr(self, name) for name in _CODEBOOK if getattr(self, name) is not None}

    def extend(self, keys: torch.Tensor, thresholds: torch.Tensor, chapters: torch.Tensor | None = None,
               pair_keys: torch.Tensor | None = None, pair_thresholds: torch.Tensor | None = None,
               pair_chapters: torch.Tensor | None = None, grams: torch.Tensor | None = None,
               gram_chapters: torch.Tensor | None = None) -> None:
        """Add keys fitted elsewhere (another round of teaching) to these. A run of ids these already hold is not
        added again: it keeps the chapter it opened first."""
        if grams is not None and self.grams is not None:
            held = {tuple(row) for row in self.grams.tolist()}
            new = torch.tensor([tuple(row) not in held for row in grams.tolist()], dtype=torch.bool)
            grams = grams[new.to(grams.device)]
            gram_chapters = None if gram_chapters is None else gram_chapters[new.to(gram_chapters.device)]
        given = {"keys": keys, "thresholds": thresholds, "chapters": chapters, "pair_keys": pair_keys,
                 "pair_thresholds": pair_thresholds, "pair_chapters": pair_chapters, "grams": grams,
                 "gram_chapters": gram_chapters}
        for name, more in given.items():
            mine = getattr(self, name)
            if mine is not None and more is not None:
                setattr(self, name, torch.cat([mine, more.to(mine.device, mine.dtype)]))

    def matches(self, h: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, d) -> (B, T): the chapter of the best-matching key (the widest margin of cosine over its
        threshold; 0 unrouted; a tie goes to the first key, single keys before pair keys), NO_EVENT where no key
        matches. `prev` (B, T, d): the unit states of the positions before (zeros where none), for the pair keys:
        a pair key's cosine is the smaller of its two halves'. Positions are scored `_MATCH_ROWS` at a time."""
        return self._matches(F.normalize(h.detach().float(), dim=-1), prev)

    def _matches(self, u: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """`matches` of the unit states u (B, T, d)."""
        B, T, d = u.shape
        u = u.reshape(B * T, d)
        keys, thresholds = self.keys.to(u.device, u.dtype).T, self.thresholds.to(u.device, u.dtype)  # (d, K)
        pairs = self.pair_keys is not None and len(self.pair_keys) > 0 and prev is not None
        if not keys.shape[1] and not pairs:
            return torch.full((B, T), NO_EVENT, dtype=torch.long, device=u.device)
        if pairs:
            pk = self.pair_keys.to(u.device, u.dtype)
            before, after, pair_thresholds = pk[:, 0].T, pk[:, 1].T, self.pair_thresholds.to(u.device, u.dtype)
            prev = prev.reshape(B * T, d).to(u.dtype)
        values, indices = [], []
        for start in range(0, B * T, _MATCH_ROWS):
            part = u[start:start + _MATCH_ROWS]
            if keys.shape[1]:
                value, index = (part @ keys - thresholds).max(-1)
            else:
                value, index = part.new_full((len(part),), -torch.inf), part.new_zeros(len(part), dtype=torch.long)
            if pairs:
                margin = torch.minimum(prev[start:start + _MATCH_ROWS] @ before, part @ after) - pair_thresholds
                pair_value, pair_index = margin.max(-1)
                index = torch.where(pair_value > value, pair_index + keys.shape[1], index)
                value = torch.maximum(value, pair_value)
            values.append(value)
            indices.append(index)
        value, index = torch.cat(values).view(B, T), torch.cat(indices).view(B, T)
        if self.chapters is None:
            return torch.where(value > 0, 0, NO_EVENT)
        chapters = torch.cat([self.chapters, self.pair_chapters]) if pairs else self.chapters
        return torch.where(value > 0, chapters.to(u.device)[index], NO_EVENT)

    def _gram_matches(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (B, T, W), the ids ending at each position (`windows_of`) -> (B, T): the chapter of the longest
        key run the position ends (0 unrouted), NO_EVENT where it ends none."""
        event = torch.full(windows.shape[:2], NO_EVENT, dtype=torch.long, device=windows.device)
        grams = self.grams.to(windows.device)
        if not len(grams):
            return event
        chapters = (self.gram_chapters.to(windows.device) if self.gram_chapters is not None
                    else torch.zeros(len(grams), dtype=torch.long, device=windows.device))
        sizes = (grams >= 0).sum(-1)
        for n in sizes.unique().tolist():  # ascending: a longer run ending at the same position wins
            rows = (sizes == n).nonzero().squeeze(-1)
            hashes, order = _gram_hashes(grams[rows], n).sort()
            mine = _gram_hashes(windows, n)  # (B, T)
            at = torch.searchsorted(hashes, mine).clamp(max=len(hashes) - 1)
            row = rows[order[at]]  # (B, T): the candidate run, checked id by id (a hash can collide)
            exact = (mine >= 0) & (hashes[at] == mine) & (grams[row][..., -n:] == windows[..., -n:]).all(-1)
            event = torch.where(exact, chapters[row], event)
        return event

    def observe(self, h: torch.Tensor, ids: torch.Tensor | None, past: int, anchor: bool = False) -> None:
        """The scope of this forward's positions (`reads`), from the states h (B, T, d) at the first memory layer,
        the input ids (end-of-sequence closes it; None: no ids) and `past` positions already in the KV cache.
        `anchor`: also each position's `anchor`, the mean unit state of the positions that matched a key since
        its scope opened (`_anchors`)."""
        if past and (self.state is None or self.state.shape[0] != h.shape[0] or self.state.shape[1] < past):
            raise ValueError("memory.scope keys: a KV cache of positions this model did not see; start the "
                             "sequence without past_key_values")
        u, prev = F.normalize(h.detach().float(), dim=-1), None  # the unit states: matches, pairs, anchors
        if self.pair_keys is not None:  # the previous position of the first one is the cache's last
            first = self.units[:, past - 1:past] if past else torch.zeros_like(u[:, :1])
            prev = torch.cat([first, u[:, :-1]], dim=1)
            self.units = torch.cat([self.units[:, :past], u], dim=1) if past else u
        if self.grams is not None:  # memory.scope_match ngram: the runs of ids ending at each position
            if ids is None:
                raise ValueError("memory.scope_match ngram: the scope matches token ids; call the model with "
                                 "input_ids, not inputs_embeds")
            ids = ids[:, -h.shape[1]:]
            self.ids = torch.cat([self.ids[:, :past], ids], dim=1) if past else ids
            recent = self.ids[:, -(h.shape[1] + self.ngram[0] - 1):]  # this forward's ids and the W - 1 before
            event = self._gram_matches(windows_of(recent, self.ngram[0])[:, -h.shape[1]:])
        else:
            event = self._matches(u, prev)
        if ids is not None and self.eos is not None:
            event = torch.where(ids[:, -h.shape[1]:] == self.eos, NO_READ, event)
        if past:
            before = self.state[:, past - 1]
            new = last_event(event, before)
            self.state = torch.cat([self.state[:, :past], new], dim=1)  # a cropped cache drops the rest
        else:
            before, new = None, last_event(event)
            self.state = new
        self.read = new
        if anchor:
            self.anchor = self._anchors(u, event, new, before, past)

    def _anchors(self, u: torch.Tensor, event: torch.Tensor, read: torch.Tensor, before: torch.Tensor | None,
                 past: int) -> torch.Tensor:
        """(B, T, d): at each position in scope, the mean of the unit states u at the positions that matched a key
        since its scope opened (in practice the parts of a new name: together they tell people apart where one
        part does not), carried from the cache for a scope opened before this forward; 0 out of scope."""
        B, T, d = u.shape
        matched = (event >= 0).float()
        x = u * matched[..., None]
        total, count = x.cumsum(1), matched.cumsum(1)  # (B, T, d), (B, T)
        previous = torch.cat([read.new_full((B, 1), NO_READ) if before is None else before[:, None], read[:, :-1]], 1)
        positions = torch.arange(T, device=u.device).expand(B, -1)
        opened = torch.where((read >= 0) & (previous < 0), positions, -1).cummax(dim=1).values  # (B, T)
        at = opened.clamp(min=0)
        pad_t, pad_c = F.pad(total, (0, 0, 1, 0)), F.pad(count, (1, 0))  # the sums before position 0, ..., T-1
        since_t = total - pad_t.gather(1, at[..., None].expand(-1, -1, d))
        since_c = count - pad_c.gather(1, at)
        if past:  # a scope opened before this forward: add what the cache's last position had
            carry_t, carry_c = self.anchor_sum[:, past - 1, None], self.anchor_count[:, past - 1, None]
        else:
            carry_t, carry_c = torch.zeros_like(total[:, :1]), torch.zeros_like(count[:, :1])
        since_t = torch.where((opened >= 0)[..., None], since_t, carry_t + total)
        since_c = torch.where(opened >= 0, since_c, carry_c + count)
        inside = read >= 0
        since_t, since_c = since_t * inside[..., None], since_c * inside
        self.anchor_sum = since_t if not past else torch.cat([self.anchor_sum[:, :past], since_t], 1)
        self.anchor_count = since_c if not past else torch.cat([self.anchor_count[:, :past], since_c], 1)
        return since_t / since_c.clamp(min=1)[..., None]

    def restrict(self, decide: Decide) -> Decide:
        """`decide`, with every position out of scope reading nothing (chapter -1: the read adds exactly 0)."""
        def scoped(x: torch.Tensor, mask: torch.Tensor | None) -> Routing:
            r = decide(x, mask)
            B, T = x.shape[:2]
            reads = self.reads[:, -T:, None]
            if bool(reads.all()):
                return r
            ids, gates = r.ids, r.gates
            if ids.dim() == 2:  # per sequence (B, k) -> per token (B, T, k)
                ids, gates = ids[:, None].expand(B, T, -1), gates[:, None].expand(B, T, -1)
            return Routing(torch.where(reads, ids, -1), gates, r.logits, r.pooled, r.mask if r.mask is not None
                           else mask)
        return scoped


class KeyRouting:
    """memory.routing keys: every position reads the chapter its scope found (ScopeKeys.read, gate 1), or nothing
    (-1); no router. Read when the layer calls it: the first memory layer observes the scope before its read."""

    def __init__(self, scope: ScopeKeys):
        self.scope = scope

    def bind(self, layer: int, router: Router | None, offset: int) -> Decide:
        def decide(x: torch.Tensor, mask: torch.Tensor | None) -> Routing:
            ids = self.scope.read[:, -x.shape[1]:, None]  # (B, T, 1)
            return Routing(ids, torch.ones(ids.shape, device=ids.device), mask=mask)
        return decide
