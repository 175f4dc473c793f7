"""The per-token read as one batched computation: every (token, choice) pair attends to its chapter at once.

Shapes: N tokens, k choices per token, P = N*k pairs (pair p is token p // k, choice p % k), U selected chapters,
H heads, h head width, S slots per chapter, m = slot_top_k, n = the largest number of pairs of one chapter.

The pairs are grouped by chapter and padded to n per chapter, (U, n, H, h), so that the scores of every pair
against its own chapter's slots are ONE batched matmul with K (U, H, S, h); no Python loop over chapters.
Each pair's output and log-sum-exp are then merged over the token's k choices (and the null slot) with
softmax_c(lse_c + log gate_c), which is exactly the softmax over the concatenation of the token's k*S slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def take(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """X[idx] along dim 0 for an integer idx of any shape. Not `X[idx]`: with repeated indices its backward
    (index_put_ with accumulate) sums in thread order on a multi-threaded CPU, so two runs, or a resumed run
    and an uninterrupted one, differ in the last bits; index_select's backward (index_add_) is deterministic."""
    return X.index_select(0, idx.reshape(-1)).view(*idx.shape, *X.shape[1:])


def null_scores(q: torch.Tensor, null_key: torch.Tensor) -> torch.Tensor:
    """Scores of the null slot (key `null_key` (H, h), value 0), q (..., H, h) -> (..., H), float32 like the
    other scores."""
    return (q * null_key.to(q.dtype)).sum(-1).float() * q.shape[-1] ** -0.5


def softmax_with_null(scores: torch.Tensor, null: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Softmax of `scores` along `dim`, with the null slot's score `null` (`scores` without `dim`) in the
    denominator when given: the weight the null slot takes reads nothing."""
    if null is None:
        return scores.softmax(dim=dim)
    n = scores.shape[dim]
    return torch.cat([scores, null.unsqueeze(dim)], dim=dim).softmax(dim=dim).narrow(dim, 0, n)


def read_tokens(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, inverse: torch.Tensor, gates: torch.Tensor,
                slot_top_k: int | None = None, null_key: torch.Tensor | None = None,
                dropout: float = 0.0, rows=None) -> torch.Tensor:
    """q (N, H, h) reads K, V (U, H, S, h) of its chapters inverse (N, k) (indices into U) with gates (N, k)
    (renormalised over the k here) -> (N, H, h). `slot_top_k` m < S: each pair keeps its best m slots of its
    chapter (chosen outside autograd; read dense or gathered, `dense_kept`); `null_key` (H, h): a slot of
    value 0 shared by the token's k chapters. Scores, softmax and merge weights in float32.
    `rows` (with `slot_top_k`, gathered): a function (pair_chapter (P,), slot (P, H, m)) -> the kept keys, values
    (P, H, m, h) with autograd (`MemoryBank.kv_rows`); K, V are then only used to choose, outside autograd."""
    N, H, hd = q.shape
    k = inverse.shape[1]
    pair_chapter = inverse.reshape(-1)  # (P,)
    q_pairs = q.repeat_interleave(k, dim=0) if k > 1 else q  # (P, H, h)
    every = slot_top_k is None or slot_top_k >= K.shape[2]
    merge = k > 1 or null_key is not None  # else the one chapter's share of the token's softmax is exactly 1
    if every or (rows is None and dense_kept(K.shape[2], slot_top_k, hd)):
        read = _in_batches(pair_chapter, K, V, q_pairs, _attend_all(dropout, merge, None if every else slot_top_k))
    else:
        read = _attend_kept(q_pairs, K, V, pair_chapter, slot_top_k, dropout, rows, merge)
    if not merge:
        return read
    out, lse = read
    out, lse = out.view(N, k, H, hd), lse.view(N, k, H)
    g = gates.reshape(N, k, 1)
    # Chapter c's share of the token's softmax over all k*S slots: g_c Z_c / sum_c' g_c' Z_c' (+ the null
    # slot's exp(score) in the denominator).
    logits = lse + (g / g.sum(1, keepdim=True)).log()  # (N, k, H)
    weight = softmax_with_null(logits, None if null_key is None else null_scores(q, null_key), dim=1)
    return (weight.unsqueeze(-1).to(out.dtype) * out).sum(dim=1)  # (N, H, h)


def size_classes(pair_chapter: torch.Tensor, U: int) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Batches of chapters to pad together: all U at once (None, None) when padding every group to the largest
    costs at most twice the pairs; otherwise (a skewed router) one batch per power-of-2 group size, so padding
    never more than doubles the work. Each batch: its chapters (U_b,) and the pairs that read them (P_b,)."""
    counts = torch.bincount(pair_chapter, minlength=U)
    if U * int(counts.max()) <= 2 * pair_chapter.numel():
        return [(None, None)]
    size = torch.ceil(torch.log2(counts.clamp_min(1).double())).long()
    size_of_pair = size[pair_chapter]
    return [((size == c).nonzero().flatten(), (size_of_pair == c).nonzero().flatten()) for c in size.unique().tolist()]


def class_order(pair_chapter: torch.Tensor, U: int) -> torch.Tensor:
    """A permutation of the U chapters that puts each batch of `size_classes` in one contiguous range, (U,):
    chapters read in this order are sliced per batch, not copied (`_in_batches`)."""
    counts = torch.bincount(pair_chapter, minlength=U)
    return torch.argsort(torch.ceil(torch.log2(counts.clamp_min(1).double())), stable=True)


def padded_groups(pair_chapter: torch.Tensor, num_chapters: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group the P pairs by chapter, each group padded to n rows: the pair in each of the U*n rows (P for a
    padding row), (U*n,), each pair's row, (P,), and n."""
    P = pair_chapter.numel()
    order = torch.argsort(pair_chapter, stable=True)  # pairs grouped by chapter
    counts = torch.bincount(pair_chapter, minlength=num_chapters)  # (U,)
    n = int(counts.max())
    starts = counts.cumsum(0) - counts
    sorted_chapter = pair_chapter[order]
    row_of_sorted = sorted_chapter * n + torch.arange(P, device=order.device) - starts[sorted_chapter]
    row = torch.empty_like(order)
    row[order] = row_of_sorted  # (P,)
    pair = torch.full((num_chapters * n,), P, dtype=order.dtype, device=order.device)
    pair[row] = torch.arange(P, device=order.device)
    return pair, row, n


def _padded_queries(q_pairs: torch.Tensor, pair: torch.Tensor, U: int, n: int) -> torch.Tensor:
    """The queries (P, H, h) of the U*n padded rows (zeros for padding): (U, H, n, h)."""
    P, H, hd = q_pairs.shape
    return torch.cat([q_pairs, q_pairs.new_zeros(1, H, hd)])[pair].view(U, n, H, hd).transpose(1, 2)


def _in_batches(pair_chapter, K, V, q_pairs, attend):
    """attend(q_pairs (P_b, H, h), chapter of each pair (P_b,), K, V (U_b, H, S, h)) -> per-pair results, run on
    each batch of `size_classes` and put back in pair order."""
    batches = size_classes(pair_chapter, K.shape[0])
    if batches == [(None, None)]:
        return attend(q_pairs, pair_chapter, K, V)
    parts, pairs = [], torch.cat([p for _, p in batches])
    for chapters, p in batches:
        local = torch.empty(K.shape[0], dtype=torch.long, device=K.device)
        local[chapters] = torch.arange(chapters.numel(), device=K.device)
        first, n = int(chapters[0]), chapters.numel()
        if int(chapters[-1]) - first + 1 == n:  # a range of chapters (`class_order`): views, no copy of K, V
            K_b, V_b = K[first:first + n], None if V is None else V[first:first + n]
        else:
            K_b, V_b = K[chapters], None if V is None else V[chapters]
        parts.append(attend(q_pairs[p], local[pair_chapter[p]], K_b, V_b))
    unsort = torch.empty_like(pairs)
    unsort[pairs] = torch.arange(pairs.numel(), device=pairs.device)
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(t)[unsort] for t in zip(*parts))
    return torch.cat(parts)[unsort]


def dense_kept(S: int, m: int, hd: int) -> bool:
    """Whether the read of a pair's best m of S slots (head width hd) runs dense: all S scores with autograd and
    the kept probabilities scattered into an S-wide row (`_attend_all` with m), rather than gathering the m kept
    keys and values per pair (`_attend_kept`). The gather moves 2 m hd numbers a pair and head, the dense read
    S (in matmuls); measured side by side (fwd + bwd, one thread), dense is 2-3x faster at S = m hd and
    about even at S = 2 m hd, the gather 2x faster at S = 8 m hd."""
    return S < 2 * m * hd


def _attend_all(dropout: float, with_lse: bool, m: int | None = None):
    """attend (for `_in_batches`): every slot of the pair's chapter, one (U, H, n, S) score tensor, or (`m`) its best
    m slots, chosen from those scores outside autograd; the kept ones' probabilities are scattered back into S-wide
    rows (0 elsewhere: no gradient reaches the others) for one dense matmul with V.
    -> out (P, H, h), and lse (P, H) when `with_lse`."""
    def attend(q_pairs, pair_chapter, K, V):
        U, H, S, hd = K.shape
        pair, row, n = padded_groups(pair_chapter, U)
        qp = _padded_queries(q_pairs, pair, U, n)  # (U, H, n, h)
        scores = qp @ K.transpose(-1, -2)  # (U, H, n, S)
        if m is None:
            scores = scores.float() * hd ** -0.5
            probs = scores.softmax(dim=-1)  # (U, H, n, S)
        else:
            with torch.no_grad():  # (the scale does not change the order)
                slot = scores.topk(m, dim=-1, sorted=False).indices  # (U, H, n, m)
            scores = scores.gather(-1, slot).float() * hd ** -0.5  # the kept ones, (U, H, n, m)
            probs = scores.softmax(dim=-1)
        if dropout:
            probs = F.dropout(probs, dropout)
        if m is not None:
            probs = torch.zeros(U, H, n, S, dtype=V.dtype, device=V.device).scatter_(-1, slot, probs.to(V.dtype))
        out = (probs.to(V.dtype) @ V).transpose(1, 2).reshape(U * n, H, hd)[row]  # (P, H, h)
        if not with_lse:
            return out
        return out, scores.logsumexp(dim=-1).transpose(1, 2).reshape(U * n, H)[row]

    return attend


def _best_slots(q_pairs, pair_chapter, K, m):
    """Outside autograd: each pair's best m slots of its chapter (P, H, m), from one padded batched matmul."""
    def attend(q_pairs, pair_chapter, K, V):
        U, H, S, hd = K.shape
        pair, row, n = padded_groups(pair_chapter, U)
        qp = _padded_queries(q_pairs, pair, U, n)  # (U, H, n, h)
        # One bmm per head: K[:, i] (U, S, h) has a unit stride in h, so a K read as a view of the bank rows
        # needs no copy (one matmul over (U, H) would make K contiguous first: 269 ms vs 78 ms at 128 chapters).
        idx = torch.stack([torch.bmm(qp[:, i], K[:, i].transpose(1, 2)).topk(m, dim=-1).indices
                           for i in range(H)], dim=1)  # (U, H, n, m)
        return idx.transpose(1, 2).reshape(U * n, H, m)[row]

    with torch.no_grad():  # (a chapter's gate and the scale do not change the order within a chapter)
        return _in_batches(pair_chapter, K, None, q_pairs, attend)


def _rows_of(K: torch.Tensor, V: torch.Tensor):
    """The kept rows taken from K, V (U, H, S, h) themselves: (pair_chapter (P,), slot (P, H, m)) -> keys,
    values (P, H, m, h)."""
    U, H, S, hd = K.shape

    def rows(pair_chapter, slot):
        head = torch.arange(H, device=slot.device)[None, :, None]  # (1, H, 1)
        flat = (pair_chapter[:, None, None] * H + head) * S + slot  # (P, H, m): rows of K, V seen as (U*H*S, h)
        return take(K.reshape(-1, hd), flat), take(V.reshape(-1, hd), flat)

    return rows


def _attend_kept(q_pairs, K, V, pair_chapter, m, dropout, rows, with_lse):
    """Each pair's best m slots of its chapter. All scores are computed to choose, outside autograd (padded,
    batched); the kept keys and values are gathered per pair straight from K, V (no copy of the bank) and
    only their m scores recomputed with autograd, so the backward pass costs m per pair, not S.
    -> out (P, H, h), and lse (P, H) when `with_lse`."""
    hd = K.shape[3]
    slot = _best_slots(q_pairs, pair_chapter, K, m)  # (P, H, m)
    keys, values = (rows or _rows_of(K, V))(pair_chapter, slot)  # (P, H, m, h)
    scores = (q_pairs[:, :, None, :] * keys).sum(-1).float() * hd ** -0.5  # (P, H, m)
    probs = scores.softmax(dim=-1)
    if dropout:
        probs = F.dropout(probs, dropout)
    out = (probs.to(values.dtype)[..., None] * values).sum(-2)  # (P, H, h)
    return (out, scores.logsumexp(dim=-1)) if with_lse else out
