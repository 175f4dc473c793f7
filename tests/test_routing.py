"""Token-level routing (MoE-style dispatch) and the generation routing strategies (sequence, rolling, token, hybrid)."""

import pytest
import torch
import torch.nn.functional as F

from memory_transformer import build_model
from memory_transformer.memory import attention as attention_module, dispatch
from memory_transformer.memory.attention import (AttentionArgs, MemoryAttention, kept_scores, project, projection,
                                                 rms_norm, rows_of)
from memory_transformer.memory.routing import Routing
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.memory.routing import STRATEGIES, top_k, window_means
from conftest import ARCHS, MEMORY_CASES, tiny_config, selected_chapters

GREEDY = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}  # 8 tokens: no early end of sequence


def _ids(b=1, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (b, t), generator=g)


def _layer(C: int, k: int, S: int = 8, d: int = 32, H: int = 4):
    torch.manual_seed(0)
    attn = MemoryAttention(AttentionArgs(d, d, H, C, k, wo_init="normal", routing="token"))
    torch.nn.init.normal_(attn.router.proj.weight, std=0.5)  # decisive, varied choices
    return attn, MemoryBank(C * S, C, d)


def _concatenation_reference(attn: MemoryAttention, bank: MemoryBank, h: torch.Tensor) -> torch.Tensor:
    """Token by token: attend to the concatenation of the token's own k chapters, log(renormalised gate) added
    to the scores of each chapter's slots (the sequence-routing `bias`), then the same g / g.detach() factor."""
    B, T, _ = h.shape
    H, hd = attn.num_heads, attn.width // attn.num_heads
    x = attn.norm(h)
    gates, ids = top_k(attn.router(x), attn.top_k)  # (B, T, k)
    q = attn.q(x)
    rows = []
    for b in range(B):
        for t in range(T):
            slots = bank.read(ids[b, t].tolist())  # (k, S, w)
            K = attn.k(slots).reshape(-1, H, hd).transpose(0, 1)  # (H, k*S, h)
            V = attn.v(slots).reshape(-1, H, hd).transpose(0, 1)
            g = gates[b, t] / gates[b, t].sum()
            bias = g.log().repeat_interleave(slots.shape[1])  # (k*S,)
            rows.append(F.scaled_dot_product_attention(q[b, t].view(H, 1, hd), K, V, attn_mask=bias).reshape(-1))
    out = attn.o(torch.stack(rows).view(B, T, -1))
    g = gates.sum(-1)
    return out * (g / g.detach())[..., None]


@pytest.mark.parametrize("C,k", [(4, 1), (4, 2), (8, 3), (16, 2)])
def test_token_routing_equals_attending_the_concatenation_of_own_chapters(C, k):
    attn, bank = _layer(C, k)
    h = torch.randn(2, 7, 32, requires_grad=True)
    weight = torch.randn(2, 7, 32)  # a loss that weighs every output differently
    out, routing = attn(h, bank)
    assert routing.ids.shape == (2, 7, k) and routing.ids.flatten().unique().numel() > k  # tokens disagree
    ref = _concatenation_reference(attn, bank, h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    names, params = zip(("h", h), *bank.named_parameters(), *attn.named_parameters())
    grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weight).sum(), params, allow_unused=True)
    for name, g, r in zip(names, grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    got = dict(zip(names, grads))
    assert got["h"].abs().sum() > 0 and got["router.proj.weight"].abs().sum() > 0
    unselected = set(range(C)) - set(routing.ids.flatten().tolist())
    assert all(got[f"chapters.{c}"] is None for c in unselected)


@pytest.mark.parametrize("C", [4, 64])
def test_token_routing_cost_does_not_grow_with_chapters(C, monkeypatch):
    k, S, H, B, T = 2, 8, 4, 2, 6
    attn, bank = _layer(C, k, S=S, H=H)
    calls, projected = [], []
    real_read_tokens, real_read = attention_module.read_tokens, bank.read

    def read_tokens(q, K, V, inverse, *args):
        calls.append((q.shape[0], K.shape[0], inverse.max().item()))
        return real_read_tokens(q, K, V, inverse, *args)

    monkeypatch.setattr(attention_module, "read_tokens", read_tokens)
    monkeypatch.setattr(bank, "read", lambda ids: projected.extend(ids) or real_read(ids))
    out, routing = attn(torch.randn(B, T, 32), bank)
    chosen = routing.ids.unique().tolist()
    assert sorted(projected) == chosen  # each selected chapter projected once, no other
    assert len(projected) <= B * T * k  # 24: bounded by the choices, not by C
    assert calls == [(B * T, len(chosen), len(chosen) - 1)]  # one batched read of the selected chapters


def attend_with_lse(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, dropout: float = 0.0,
                    slot_top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (n, H, h) to one chapter's K, V (H, S, h): output (n, H, h) and the log-sum-exp
    of the scores (n, H), which merging partial outputs needs. With `slot_top_k` each query attends to its
    best `slot_top_k` slots only (the others get probability 0 and no gradient).

    Not SDPA: it does not return the LSE. `aten._scaled_dot_product_flash_attention_for_cpu` does, but only on
    CPU and with the LSE outside autograd (torch 2.13: `lse.requires_grad` is False), while the merge weights
    must pass gradients back to the scores. One matmul + logsumexp is exact, differentiable on any device, and
    costs the same n*S scores SDPA would compute. Scores and softmax in float32 (bf16 models too).
    With `slot_top_k` the slots are chosen outside autograd and only the kept ones are scored and read with it
    (`kept_scores`)."""
    n, H, hd = q.shape
    if slot_top_k is not None and slot_top_k < K.shape[1]:  # as one row of one chapter: B = k = 1
        top, rows = kept_scores(q[None], K[None, None], slot_top_k)  # (1, H, n, 1, m), (1, H, n*m, 1)
        scores, values = top[0, :, :, 0], rows_of(V[None, None], rows)[0].view(H, n, slot_top_k, hd)
    else:
        scores = (q.transpose(0, 1) @ K.transpose(1, 2)).float() * hd ** -0.5  # (H, n, S)
        values = None
    lse, probs = scores.logsumexp(dim=-1), scores.softmax(dim=-1)  # (H, n), (H, n, m or S)
    if dropout:
        probs = F.dropout(probs, dropout)
    if values is None:
        out = probs.to(V.dtype) @ V  # (H, n, h)
    else:
        out = (probs.to(V.dtype)[..., None] * values).sum(-2)  # (H, n, h)
    return out.transpose(0, 1), lse.transpose(0, 1)


def _loop_reference(q, K, V, inverse, gates, slot_top_k=None, null_key=None):
    """The per-chapter loop the batched dispatch replaced: pairs sorted by chapter, one `attend_with_lse` call
    per selected chapter, partial outputs merged with softmax_c(lse_c + log gate_c) (and the null slot)."""
    N, H, hd = q.shape
    k = inverse.shape[1]
    choice = inverse.reshape(-1)
    order = torch.argsort(choice, stable=True)
    chapters, counts = torch.unique_consecutive(choice[order], return_counts=True)
    groups = q[order // k].split(counts.tolist())
    parts = [attend_with_lse(g, K[c], V[c], 0.0, slot_top_k) for c, g in zip(chapters, groups)]
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel())
    out = torch.cat([o for o, _ in parts])[unsort].view(N, k, H, hd)
    lse = torch.cat([l for _, l in parts])[unsort].view(N, k, H)
    logits = lse + (gates / gates.sum(1, keepdim=True)).log()[..., None]
    if null_key is not None:
        null = (q * null_key).sum(-1) * hd ** -0.5
        weight = torch.cat([logits, null[:, None]], dim=1).softmax(dim=1)[:, :k]
    else:
        weight = logits.softmax(dim=1)
    return (weight[..., None] * out).sum(dim=1)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("slot_top_k,dense", [(None, True), (4, True), (4, False)])  # kept slots: dense, gathered
@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("skewed", [False, True])  # one chapter takes most pairs: padded in size classes
def test_batched_dispatch_equals_the_per_chapter_loop(k, slot_top_k, dense, null, skewed, monkeypatch):
    monkeypatch.setattr(dispatch, "dense_kept", lambda S, m, hd: dense)
    N, U, H, hd, S = 37, 6, 4, 8, 16
    g = torch.Generator().manual_seed(k * 10 + (slot_top_k or 0) + null)
    q = torch.randn(N, H, hd, generator=g, requires_grad=True)
    bank = torch.randn(U, S, 2 * H * hd, generator=g, requires_grad=True)  # learned [key | value] rows
    K, V = (part.view(U, S, H, hd).transpose(1, 2) for part in bank.split(H * hd, dim=-1))  # views, as read
    logits = torch.randn(N, U, generator=g).mul(3)
    logits[:30, 0] += 10 * skewed
    logits.requires_grad_()
    gates, inverse = top_k(logits, k)  # uneven groups, some chapters unread when k = 1
    assert (len(dispatch.size_classes(inverse.flatten(), U)) > 1) == skewed
    null_key = torch.randn(H, hd, generator=g, requires_grad=True) if null else None
    got = attention_module.read_tokens(q, K, V, inverse, gates, slot_top_k, null_key)
    ref = _loop_reference(q, K, V, inverse, gates, slot_top_k, null_key)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn(N, H, hd, generator=g)
    inputs = [q, bank, logits] + ([null_key] if null else [])
    # k = 1 without the null slot: the renormalised gate is 1, and the read does not use it at all
    grads = torch.autograd.grad((got * weight).sum(), inputs, retain_graph=True, allow_unused=True,
                                materialize_grads=True)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    for name, a, b in zip(["q", "bank", "gates", "null_key"], grads, ref_grads):
        assert b.abs().sum() > 0 or (name == "gates" and k == 1), name  # k = 1: renormalised gate is 1
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("slot_top_k,null", [(None, False), (4, True)])
def test_token_routed_layer_with_padding_equals_the_per_chapter_loop(slot_top_k, null, monkeypatch):
    torch.manual_seed(0)
    attn = MemoryAttention(AttentionArgs(32, 32, 4, 8, 2, wo_init="normal", routing="token", learned_kv=True,
                                         slot_top_k=slot_top_k, null_slot=null))
    torch.nn.init.normal_(attn.router.proj.weight, std=0.5)
    bank = MemoryBank(8 * 16, 8, 32, learned_kv=True)
    h = torch.randn(2, 9, 32, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    params = [h, *bank.parameters(), *attn.parameters()]
    out, routing = attn(h, bank, mask=mask)
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True, retain_graph=True)
    # the reference: the per-chapter loop over a stacked, differentiable bank (no `MemoryBank.kv_rows`)
    monkeypatch.setattr(attention_module, "read_tokens", lambda *a: _loop_reference(*a[:7]))
    monkeypatch.setattr(MemoryAttention, "_reads_rows", lambda self, bank: False)
    ref, ref_routing = attn(h, bank, mask=mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    assert torch.equal(routing.ids, ref_routing.ids) and routing.ids.unique().numel() > 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def _record(model) -> list[dict[int, Routing]]:
    """The routing decisions of every base forward (one per generation step)."""
    log = []
    model.base.register_forward_hook(lambda *_: log.append(dict(model.memory.decisions)))
    return log


def _model(arch="llama", k=2, C=8, window=4, **memory):
    cfg = tiny_config(arch, memory={"num_chapters": C, "top_k": k, **memory}, inference={"rolling_window": window})
    model = build_model(cfg).eval()
    with torch.no_grad():  # a memory loud enough to change greedy tokens, decisive routers
        for block in model.memory.blocks.values():
            if block.attn.router is not None:
                torch.nn.init.normal_(block.attn.router.proj.weight, std=0.5)
            torch.nn.init.normal_(block.attn.o.weight, std=0.1)
        for p in model.memory.banks.parameters():
            p.mul_(25.0)  # std 0.02 -> 0.5
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("C,k", [(8, 1), (8, 2), (1, 1)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_generation_with_kv_cache_equals_without(arch, C, k, strategy):
    model = _model(arch, k, C)
    x = _ids(1, 12)
    cached = model.generate(x, **GREEDY, routing=strategy)
    full = model.generate(x, **GREEDY, routing=strategy, use_cache=False)
    assert cached.shape == (1, 20)
    assert cached.tolist() == full.tolist()


def test_strategies_route_as_specified():
    model = _model(C=8, k=1, window=2)
    log = _record(model)
    tokens = {}
    for strategy in STRATEGIES:
        log.clear()
        tokens[strategy] = model.generate(_ids(1, 12), **GREEDY, routing=strategy).tolist()
        prompt, steps = log[0], log[1:]
        assert len(steps) == 7
        if strategy == "token":
            assert all(r.ids.shape == (1, 12, 1) for r in prompt.values())
            assert all(r.ids.shape == (1, 1, 1) for s in steps for r in s.values())
        else:
            assert all(r.ids.shape == (1, 1) for r in prompt.values())  # one decision for the prompt
        if strategy == "sequence":
            assert all(s[i] is prompt[i] for s in steps for i in s)  # frozen: the very same decision
        if strategy in ("rolling", "hybrid"):  # re-routed while generating: chapters change
            assert any(not torch.equal(s[i].ids.flatten(), prompt[i].ids.flatten()) for s in steps for i in s)
    assert len({str(t) for t in tokens.values()}) == len(STRATEGIES)  # the memory, so the routing, shows in the tokens


def test_rolling_prompt_is_routed_on_its_last_window_and_hybrid_on_all_of_it():
    model = _model(C=8, k=1, window=3, layers=[0])
    attn = model.memory.blocks["0"].attn
    seen = []
    attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # h (B, T, d) of each call
    log = _record(model)
    x = _ids(1, 12)
    for strategy in ("rolling", "hybrid"):
        seen.clear(), log.clear()
        model.generate(x, max_new_tokens=2, do_sample=False, routing=strategy)
        xs = attn.norm(seen[0])  # the prompt, normalised: (1, 12, d)
        pooled = xs[:, -3:].mean(1) if strategy == "rolling" else xs.mean(1)
        assert torch.equal(log[0][0].ids, attn.router(pooled).topk(1).indices)


def test_window_means_count_only_real_positions():
    x = torch.arange(1.0, 7.0).view(1, 6, 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert window_means(x, mask, 3).flatten().tolist() == [3.0, 3.5, 4.0, 5.0]


def _left_pad(prompts, pad):
    width = max(p.shape[1] for p in prompts)
    ids = torch.cat([F.pad(p, (width - p.shape[1], 0), value=pad) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - p.shape[1] for p in prompts]).long()
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batched_left_padded_generation_equals_one_at_a_time(arch, strategy):
    model = _model(arch, k=2)
    prompts = [_ids(1, 12, 1), _ids(1, 7, 2), _ids(1, 3, 3)]
    ids, mask = _left_pad(prompts, model.tokenizer.pad_token_id)
    batch = model.generate(ids, attention_mask=mask, **GREEDY, routing=strategy)
    for row, p in zip(batch, prompts):
        alone = model.generate(p, **GREEDY, routing=strategy)
        assert row[ids.shape[1]:].tolist() == alone[0, p.shape[1]:].tolist()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_memory_kv_is_projected_once_per_generate_not_per_token(strategy, monkeypatch):
    model = _model(k=2, window=2, layers=[0, 2])  # one shared bank read by two layers
    bank = model.memory.banks[0]
    reads, requests = [], {0: [], 2: []}
    real_read = bank.read
    monkeypatch.setattr(bank, "read", lambda ids: reads.extend(ids) or real_read(ids))
    for i in requests:
        attn = model.memory.blocks[str(i)].attn
        real = attn.project_kv
        monkeypatch.setattr(attn, "project_kv", lambda b, ids, real=real, i=i: requests[i].append(list(ids)) or real(b, ids))
    model.memory.clear_cache()
    model.generate(_ids(1, 12), **GREEDY, routing=strategy)
    distinct = sum(len({c for ids in calls for c in ids}) for calls in requests.values())  # per layer: own K/V
    assert all(len(calls) == 8 for calls in requests.values())  # prompt + 7 steps, each asks for its chapters
    assert len(reads) == distinct  # but each (layer, chapter) was projected once
    reads.clear()
    model.generate(_ids(1, 12), **GREEDY, routing=strategy)
    assert reads == []  # unchanged parameters: the same chapters come from the cache


@pytest.mark.parametrize("arch,case", [(a, c) for a in ARCHS for c in MEMORY_CASES])
def test_training_with_token_routing(arch, case):
    model = build_model(tiny_config(arch, memory={**MEMORY_CASES[case], "routing": "token"})).train()
    x = _ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding in row 1: 19 real tokens
    out = model(x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    k = model.config.memory.top_k
    for b, (bank, selected) in enumerate(zip(model.memory.banks, selected_chapters(model))):
        for c, p in enumerate(bank.chapters):
            assert (p.grad is not None) == (c in selected), f"bank {b} chapter {c}"
            assert p.grad is None or torch.isfinite(p.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if model.config.memory.num_chapters > 1:  # router statistics see the 19 real tokens only
        assert all(x.shape == (19, 32) for x in model.memory.router_inputs().values())
        assert all(u.sum() == 19 * k for u in model.memory.usage().values())
        assert all(block.attn.router.proj.weight.grad is not None for block in model.memory.blocks.values())


def test_token_routing_with_gradient_checkpointing_gives_same_gradients():
    cfg = tiny_config(memory={"routing": "token"})
    ref, ckpt = build_model(cfg), build_model(tiny_config(memory={"routing": "token", "gradient_checkpointing": True}))
    ckpt.load_state_dict(ref.state_dict())
    x = _ids(2, 12)
    ref(x, labels=x).loss.backward()
    ckpt(x, labels=x).loss.backward()
    for (n, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_generate_rejects_unknown_routing_and_uses_inference_defaults():
    model = _model()
    with pytest.raises(ValueError, match="routing: got 'sideways'; allowed: sequence | rolling | token | hybrid"):
        model.generate(_ids(), routing="sideways")
    n = model.config.inference.max_new_tokens
    assert model.generate(_ids(1, 5), min_new_tokens=n).shape == (1, 5 + n)


@pytest.mark.parametrize("trained,configured,expected", [("sequence", None, "sequence"), ("token", None, "token"),
                                                          ("token", "sequence", "sequence")])
def test_generation_routes_as_trained_unless_inference_routing_says_otherwise(trained, configured, expected):
    """A token-routed memory read with sequence routing would see chapters it was never trained on."""
    model = _model(C=8, k=1, routing=trained)
    model.config.inference.routing = configured
    log = _record(model)
    default = model.generate(_ids(1, 12), **GREEDY).tolist()
    prompt_shape = {r.ids.shape for r in log[0].values()}
    assert prompt_shape == ({(1, 12, 1)} if expected == "token" else {(1, 1)})
    assert default == model.generate(_ids(1, 12), **GREEDY, routing=expected).tolist()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("skewed", [False, True])  # one chapter takes most tokens: the dispatch's size classes
def test_kept_rows_gathered_from_the_bank_equal_the_stacked_read(k, skewed, monkeypatch):
    """`MemoryBank.kv_rows` (rows gathered from a no-grad read, gradients written per chapter) against the read
    through a stacked, differentiable bank: same outputs and gradients, unread chapters get none. (At these
    shapes the dense read of the kept slots would be chosen: `dense_kept` is made to say no.)"""
    monkeypatch.setattr(attention_module, "dense_kept", lambda S, m, hd: False)
    torch.manual_seed(k)
    attn = MemoryAttention(AttentionArgs(32, 32, 4, 16, k, wo_init="normal", routing="token", learned_kv=True,
                                         slot_top_k=4))
    torch.nn.init.normal_(attn.router.proj.weight, std=0.5)
    bank = MemoryBank(16 * 16, 16, 32, learned_kv=True)
    h = torch.randn(2, 24, 32, requires_grad=True)
    if skewed:
        with torch.no_grad():
            attn.router.proj.weight[3] += 2 * attn.norm(h).mean((0, 1))  # chapter 3 wins most tokens
    params = [h, *bank.parameters(), *attn.parameters()]
    assert attn._reads_rows(bank)
    out, routing = attn(h, bank)
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    monkeypatch.setattr(MemoryAttention, "_reads_rows", lambda self, bank: False)
    ref, _ = attn(h, bank)
    ref_grads = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    _, inverse = routing.chapters()
    assert len(dispatch.size_classes(inverse.flatten(), int(inverse.max()) + 1)) > 1 or not skewed
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    read = set(routing.ids.flatten().tolist())
    assert all((grads[1 + c] is None) == (c not in read) for c in range(16)) and (len(read) < 16 or k > 1)


def test_cached_reads_under_inference_mode_then_no_grad_agree():
    """project_kv stacks cache hits into a buffer it keeps: made under inference_mode, it is not reused (nor
    written) under no_grad, and the reads agree."""
    attn, bank = _layer(8, 2)
    attn.eval()
    h = torch.randn(3, 5, 32)
    with torch.inference_mode():
        a, routing = attn(h, bank)
    assert len(routing.chapters()[0]) > 1
    with torch.no_grad():
        b, _ = attn(h, bank)
        c, _ = attn(h, bank)
    torch.testing.assert_close(a.clone(), b)
    torch.testing.assert_close(b, c)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 4)])
def test_decoding_read_of_one_chapter_equals_the_general_dense_read(B, T):
    """Outside autograd, a decision of one chapter takes `_read_one_chapter` (a decoding step: the cached K/V
    as views, no bookkeeping): bit for bit the general read (here: with autograd on, K/V projected afresh)."""
    torch.manual_seed(0)
    attn = MemoryAttention(AttentionArgs(32, 32, 4, 3, 1, wo_init="normal")).eval()
    bank = MemoryBank(3 * 16, 3, 32)
    h = torch.randn(B, T, 32)
    decide = lambda x, mask: Routing(torch.full((B, 1), 2), torch.ones(B, 1))
    with torch.no_grad():
        fast, _ = attn(h, bank, decide)
        again, _ = attn(h, bank, decide)  # from the K/V cache
    general, _ = attn(h, bank, decide)
    assert torch.equal(fast, general.detach()) and torch.equal(again, fast)


@pytest.mark.filterwarnings("ignore:Mismatch dtype")  # torch's own, for its unfused path
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_rms_norm_is_torchs_rms_norm_bit_for_bit(dtype, weight_dtype):
    """The layer's norm in 6 ops: `nn.RMSNorm`'s output, dtype and gradients exactly, also under autocast."""
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(32, eps=1e-6).to(weight_dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 32).to(dtype)
    ours, theirs = rms_norm(x, norm), norm(x)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    x = torch.randn(3, 5, 32, requires_grad=True)
    g = torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = torch.autograd.grad(rms_norm(x, norm), (x, norm.weight), g)
        theirs = torch.autograd.grad(norm(x), (x, norm.weight), g)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("rank", [None, 4])
def test_decoding_shortcuts_give_what_the_module_calls_give(rank):
    """`project` (a Linear without its module call) and `chapter_params` (a chapter without ParameterList's
    indexing): the same tensors as the calls they replace."""
    torch.manual_seed(0)
    m, x = projection(32, 16, rank), torch.randn(3, 5, 32)
    assert torch.equal(project(m, x), m(x))
    bank = MemoryBank(4 * 8, 4, 32)
    assert all(bank.chapter_params(c)[0] is bank.chapters[c] for c in range(4))


def test_one_choice_gives_the_chapters_of_unique():
    """A decision of one chapter (decoding at batch 1, top-1) skips `unique`, and makes its inverse only when asked
    (after `chapter_list`, as the decoding read asks): the same list and inverse."""
    for ids in (torch.tensor([[5]]), torch.tensor([[[0]]]), torch.tensor([[3, 1], [1, 7]])):
        routing = Routing(ids, torch.ones(ids.shape))
        ref, ref_inverse = torch.unique(ids, return_inverse=True)
        assert routing.chapter_list() == ref.tolist()
        chapters, inverse = routing.chapters()
        assert chapters == ref.tolist()
        assert torch.equal(inverse, ref_inverse) and inverse.dtype == ref_inverse.dtype


def test_sequence_routing_of_one_position_is_the_routing_of_its_mean():
    torch.manual_seed(0)
    attn = MemoryAttention(AttentionArgs(32, 32, 4, 8, 2))
    x = torch.randn(3, 1, 32)
    routing = attn.policy.bind(0, attn.router, 0)(x, None)
    gates, ids = top_k(attn.router(x.mean(dim=1)), 2)
    assert torch.equal(routing.ids, ids) and torch.equal(routing.gates, gates)
    assert torch.equal(routing.pooled, x.mean(dim=1))
