"""Sparse slot access (`memory.slot_top_k`), the null slot (`memory.null_slot`) and learned keys/values
(`memory.kv: learned`): exact against a per-token reference, in both routings, with gradients only where read."""

import pytest
import torch

from memory_transformer import build_model
from memory_transformer.config import ConfigError
from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.memory.routing import top_k
from conftest import tiny_config


def _layer(C, k, m, null, learned, routing, S=8, d=32, H=4):
    torch.manual_seed(0)
    attn = MemoryAttention(AttentionArgs(d, d, H, C, k, wo_init="normal", routing=routing, learned_kv=learned,
                                         slot_top_k=m, null_slot=null))
    if attn.router is not None:
        torch.nn.init.normal_(attn.router.proj.weight, std=0.5)  # decisive, varied choices
    if null:
        torch.nn.init.normal_(attn.null_key, std=1.0)  # a null score that matters
    return attn, MemoryBank(C * S, C, d, learned_kv=learned)


def _reference(attn, bank, h, per_token):
    """Token by token, plain loops: the token's k chapters, each chapter's best m slots by score, log of the
    renormalised gate added, the null slot's score appended, one softmax, weighted sum of the values."""
    B, T, _ = h.shape
    H, hd, m = attn.num_heads, attn.width // attn.num_heads, attn.slot_top_k
    x = attn.norm(h)
    logits = attn.router(x) if per_token else attn.router(x.mean(1))
    gates, ids = top_k(logits, attn.top_k)  # (B, T, k) or (B, k)
    q = attn.q(x).view(B, T, H, hd)
    rows = []
    for b in range(B):
        for t in range(T):
            g, c = (gates[b, t], ids[b, t]) if per_token else (gates[b], ids[b])
            K, V = attn._kv(bank.read(c.tolist()))  # (k, H, S, h)
            scores = torch.einsum("hd,khsd->hks", q[b, t], K) * hd ** -0.5  # (H, k, S)
            scores = scores + (g / g.sum()).log()[None, :, None]
            keep = torch.full_like(scores, float("-inf"))
            idx = scores.topk(m, dim=-1).indices if m else torch.arange(scores.shape[-1]).expand_as(scores)
            keep.scatter_(-1, idx, scores.gather(-1, idx))
            flat = keep.flatten(1)  # (H, k*S)
            if attn.null_key is not None:
                flat = torch.cat([flat, (q[b, t] * attn.null_key).sum(-1, keepdim=True) * hd ** -0.5], dim=1)
            p = flat.softmax(dim=-1)[:, :keep[0].numel()].view_as(scores)
            rows.append(torch.einsum("hks,khsd->hd", p, V).reshape(-1))
    out = attn.o(torch.stack(rows).view(B, T, -1))
    gsum = gates.sum(-1)
    return out * ((gsum / gsum.detach())[..., None] if per_token else (gsum / gsum.detach())[:, None, None])


CASES = [  # C, k, slot_top_k, null, learned kv
    (4, 2, 3, False, False), (4, 2, 3, True, True), (8, 3, 1, True, False), (4, 1, None, True, True),
    (1, 1, 5, True, True),
]


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("C,k,m,null,learned", CASES)
def test_sparse_read_equals_per_token_reference(routing, C, k, m, null, learned):
    attn, bank = _layer(C, k, m, null, learned, routing)
    h = torch.randn(2, 7, 32, requires_grad=True)
    out, _ = attn(h, bank)
    ref = _reference(attn, bank, h, per_token=routing == "token") if C > 1 else None
    if C == 1:  # no router: every token reads chapter 0 with gate 1; token routing falls back to the same
        attn.router = torch.nn.Linear(32, 1, bias=False)
        torch.nn.init.zeros_(attn.router.weight)
        ref = _reference(attn, bank, h, per_token=routing == "token")
        attn.router = None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(out)
    params = [h, *bank.parameters(), *(p for p in attn.parameters() if p.requires_grad)]
    grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weight).sum(), params, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if g is not None and r is not None:
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_slot_top_k_updates_only_the_slots_read():
    attn, bank = _layer(1, 1, 2, False, True, "sequence", S=64)
    h = torch.randn(1, 3, 32)
    out, _ = attn(h, bank)
    out.square().sum().backward()
    touched = (bank.chapters[0].grad.abs().sum(-1) > 0).sum().item()
    assert 1 <= touched <= 3 * 4 * 2  # at most tokens x heads x slot_top_k of 64 slots
    assert touched < 64


def test_null_slot_takes_its_share_and_can_switch_the_memory_off():
    attn, _ = _layer(1, 1, None, True, False, "sequence")
    plain = MemoryAttention(AttentionArgs(32, 32, 4, 1, 1, wo_init="normal"))
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "null_key"})
    bank = MemoryBank(8, 1, 32, init_std=1.0)
    h = torch.randn(1, 1, 32).expand(2, 5, 32)  # one hidden state everywhere: one query per head
    with torch.no_grad():
        attn.null_key.zero_()  # score 0: with all-zero queries every slot and the null slot score 0
        torch.nn.init.zeros_(attn.q.weight)
        torch.nn.init.zeros_(plain.q.weight)
    out, _ = attn(h, bank)
    ref, _ = plain(h, bank)
    torch.testing.assert_close(out, ref * 8 / 9, atol=1e-6, rtol=1e-5)  # the null slot takes 1/(S+1)
    torch.manual_seed(1)
    torch.nn.init.normal_(attn.q.weight, std=0.5)
    on, _ = attn(h, bank)
    with torch.no_grad():  # a null key aligned with the query: its score dominates every slot's
        attn.null_key.copy_(1e4 * attn.q(attn.norm(h[:1, :1])).view(4, 8).sign())
    off, _ = attn(h, bank)
    assert on.abs().max() > 1e-2
    assert off.abs().max() < 1e-6 * on.abs().max()


def test_learned_kv_bank_holds_keys_and_values_and_no_projections():
    cfg = tiny_config(memory={"kv": "learned", "key_init_std": 1.0, "init_std": 0.02})
    model = build_model(cfg)
    bank = model.memory.banks[0]
    assert bank.chapters[0].shape == (16, 64)  # 64 slots / 4 chapters, [key 32 | value 32]
    keys, values = bank.chapters[0][:, :32], bank.chapters[0][:, 32:]
    assert 0.8 < keys.std().item() < 1.2 and 0.01 < values.std().item() < 0.03
    names = [n for n, _ in model.named_parameters()]
    assert not any(".attn.k." in n or ".attn.v." in n for n in names)


def test_slot_top_k_of_a_whole_chapter_reads_every_slot():
    ids = torch.randint(0, 200, (2, 12))
    logits = {}
    for top in (8, 16, 17, None):  # 16 slots per chapter
        torch.manual_seed(0)
        logits[top] = build_model(tiny_config(memory={"slot_top_k": top})).eval()(ids).logits
    torch.testing.assert_close(logits[16], logits[None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[17], logits[None], atol=1e-5, rtol=1e-5)
    assert (logits[8] - logits[None]).abs().max() > 1e-4  # a real top-8 read differs
    with pytest.raises(ConfigError) as err:
        tiny_config(memory={"slot_top_k": 0})
    assert str(err.value) == "memory.slot_top_k: must be null or at least 1, got 0"


@pytest.mark.parametrize("kv", ["learned", "projected"])
def test_identity_wo_adds_nothing_at_init_and_values_learn_from_the_first_step(kv):
    cfg = tiny_config(memory={"kv": kv, "wo_init": "identity", "slot_top_k": 4})
    model = build_model(cfg)
    ids = torch.randint(3, 200, (2, 12))
    with_memory = model(input_ids=ids, labels=ids)
    model.memory.remove()  # the base alone
    without = model.base(input_ids=ids).logits
    torch.testing.assert_close(with_memory.logits, without, atol=0, rtol=0)
    with_memory.loss.backward()
    attn = model.memory.blocks[str(model.memory.layer_ids[0])].attn
    assert torch.equal(attn.o.weight, torch.eye(32))
    if kv == "learned":
        grads = [p.grad for p in model.memory.banks[0].chapters if p.grad is not None]
        assert grads and all(g[:, :32].abs().sum() == 0 for g in grads)  # keys: no gradient while values are 0
        assert any(g[:, 32:].abs().sum() > 0 for g in grads)  # values: gradient at once
    else:
        assert attn.v.weight.grad.abs().sum() > 0


def test_identity_wo_needs_full_width():
    msg = ("memory.wo_init: identity (the default) needs the memory width to equal the model width; "
           "set memory.wo_init to zero or normal with bank reduced_dim")
    with pytest.raises(ConfigError) as err:
        tiny_config(memory={"wo_init": "identity", "bank": "reduced_dim", "bank_rank": 16})
    assert str(err.value) == msg
    assert tiny_config(memory={"wo_init": "zero", "bank": "reduced_dim", "bank_rank": 16}).memory.bank_rank == 16


@pytest.mark.parametrize("B,T", [(1, 1), (2, 5)])
def test_generation_read_of_one_chapter_equals_the_general_sparse_read(B, T):
    """Outside autograd, one chapter, slot top-k: `_read_kept_one_chapter` (few ops per decoded token) gives
    the read of `_read_sequences_sparse` (here: with autograd on)."""
    torch.manual_seed(0)
    attn = MemoryAttention(AttentionArgs(32, 32, 4, 1, 1, wo_init="normal", learned_kv=True, slot_top_k=4)).eval()
    bank = MemoryBank(64, 1, 32, learned_kv=True)
    h = torch.randn(B, T, 32)
    with torch.no_grad():
        fast, _ = attn(h, bank)
    general, _ = attn(h, bank)  # grad enabled: the general path
    torch.testing.assert_close(fast, general.detach(), atol=1e-5, rtol=1e-5)
