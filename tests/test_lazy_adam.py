"""`training.bank_optimizer: lazy_adam`: row-sparse chapter gradients and a lazy Adam for the rows read."""

import pytest
import torch
from safetensors.torch import load_file

from memory_transformer import ConfigError, build_model
from memory_transformer.memory.attention import AttentionArgs, MemoryAttention
from memory_transformer.memory.bank import MemoryBank
from memory_transformer.train.optim import LazyBankAdamW, clip_grad_norm, make_optimizer
from memory_transformer.train.trainer import Trainer, train
from conftest import tiny_config
from test_train import tiny


def _token_layer(k: int, C: int = 8, S: int = 16):
    torch.manual_seed(k)
    attn = MemoryAttention(AttentionArgs(32, 32, 4, C, k, wo_init="normal", routing="token", learned_kv=True,
                                         slot_top_k=4))
    torch.nn.init.normal_(attn.router.proj.weight, std=0.5)
    return attn, MemoryBank(C * S, C, 32, learned_kv=True)


@pytest.mark.parametrize("k", [1, 2])
def test_row_sparse_chapter_gradients_equal_the_dense_ones(k):
    attn, bank = _token_layer(k)
    h = torch.randn(2, 12, 32)
    out, _ = attn(h, bank)
    dense = torch.autograd.grad(out.square().sum(), list(bank.parameters()), allow_unused=True)
    bank.use_sparse_grad()
    out, _ = attn(h, bank)
    sparse = torch.autograd.grad(out.square().sum(), list(bank.parameters()), allow_unused=True)
    read = [g for g in sparse if g is not None]
    assert [g is None for g in sparse] == [g is None for g in dense] and len(read) > 1
    for d, s in zip(dense, sparse):
        if s is not None:
            assert s.is_sparse and s.is_coalesced() and s.sparse_dim() == 1
            torch.testing.assert_close(s.to_dense(), d, atol=1e-6, rtol=1e-6)
            assert s.indices().numel() == int((d != 0).any(1).sum())  # exactly the slots read
    assert sum(s.indices().numel() for s in read) < 16 * len(read)  # 24 tokens x top-4 slots: not every slot


def _model(routing: str, **memory):
    cfg = tiny_config(memory={"routing": routing, "kv": "learned", "num_tokens": 1024, "slot_top_k": 2, **memory},
                      training={"bank_optimizer": "lazy_adam", "lr": 1e-2})
    return build_model(cfg, for_training=True), cfg


HEAD = 8  # the tiny model's head width (hidden 32, 4 heads): the lazy AdamW's unit of a bank row


def _read(model) -> dict[str, torch.Tensor]:
    """Per bank Parameter with a gradient, which (slot, key|value, head) pieces of HEAD values have a nonzero
    one: (S * row / HEAD,) bool."""
    return {name: (p.grad.to_dense().view(-1, HEAD) != 0).any(1)
            for name, p in model.memory.banks.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_a_lazy_step_moves_exactly_the_rows_read_as_adamw_would(routing):
    """Sequence routing reads through a stacked bank (dense chapter gradients), token routing through `kv_rows`
    (row-sparse from the backward pass). Either way one step moves the pieces read (a head's key or value of a
    slot) as AdamW's first step does, bit for bit, and leaves every other value as it was."""
    model, cfg = _model(routing)
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.square().mean().backward()
    sparse = [p.grad.is_sparse for p in model.memory.banks.parameters() if p.grad is not None]
    assert sparse and all(sparse) == (routing == "token") and any(sparse) == (routing == "token")
    read = _read(model)
    assert 0 < sum(int(r.sum()) for r in read.values()) < sum(r.numel() for r in read.values()) // 4
    before = {n: p.detach().clone() for n, p in model.memory.banks.named_parameters()}
    dense_grads = {n: p.grad.to_dense().clone() for n, p in model.memory.banks.named_parameters() if p.grad is not None}
    optimizer = make_optimizer(model, cfg.training)
    assert isinstance(optimizer, LazyBankAdamW)
    optimizer.step()
    for name, p in model.memory.banks.named_parameters():
        moved = (p.detach() != before[name]).view(-1, HEAD).any(1)
        assert torch.equal(moved, read.get(name, torch.zeros_like(moved))), name
        if name in dense_grads:  # AdamW's first step on the dense gradient: the same values, bit for bit
            reference = before[name].clone().requires_grad_()
            reference.grad = dense_grads[name]
            torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True).step()
            assert torch.equal(p.detach(), reference.detach()), name


def test_lazy_adamw_is_adamw_where_every_row_is_read_and_keeps_the_moments_of_rows_not_read():
    torch.manual_seed(0)
    lazy, dense = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(6, 8))
    with torch.no_grad():
        dense.copy_(lazy)
    group = {"lr": 1e-2, "weight_decay": 0.1, "row_width": 4}
    opt = LazyBankAdamW([{"params": [lazy], "lazy": True, **group}], betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([dense], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for _ in range(3):  # every row read: AdamW, bit for bit
        lazy.grad = torch.randn(6, 8)
        dense.grad = lazy.grad.clone()
        opt.step(), ref.step()
    assert torch.equal(lazy, dense)
    m, v, p = (t.detach().clone() for t in (opt.state[lazy]["exp_avg"], opt.state[lazy]["exp_avg_sq"], lazy))
    values = torch.randn(2, 8)
    values[0, :4] = 0  # row 1: only its second half read
    lazy.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), values, (6, 8), check_invariants=False)
    opt.step()
    moved = (lazy.detach() != p).view(-1, 4).any(1)
    assert moved.nonzero().flatten().tolist() == [3, 8, 9]  # (row 1, second half), both halves of row 4
    for t, old in ((opt.state[lazy]["exp_avg"], m), (opt.state[lazy]["exp_avg_sq"], v)):
        changed = (t != old).view(-1, 4).any(1)
        assert torch.equal(changed, moved)  # the moments of the pieces not read: not decayed


def test_bank_weight_decay_touches_the_rows_read_only():
    model, cfg = _model("token")
    cfg.training.weight_decay = 0.5
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids).logits.square().mean().backward()
    read = _read(model)
    before = {n: p.detach().clone() for n, p in model.memory.banks.named_parameters()}
    make_optimizer(model, cfg.training).step()
    for name, p in model.memory.banks.named_parameters():
        unread = ~read.get(name, torch.zeros(p.numel() // HEAD, dtype=torch.bool))
        assert torch.equal(p.detach().view(-1, HEAD)[unread], before[name].view(-1, HEAD)[unread]), name


def test_clipping_with_sparse_gradients_equals_torch_on_the_dense_ones():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(3))
    rows = torch.tensor([[1, 4, 1]])  # uncoalesced: row 1 twice
    a.grad = torch.sparse_coo_tensor(rows, torch.randn(3, 4), (6, 4), check_invariants=False)
    b.grad = torch.randn(3)
    ref_a, ref_b = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    ref_a.grad, ref_b.grad = a.grad.to_dense(), b.grad.clone()
    norm = clip_grad_norm([a, b], 0.5)
    ref = torch.nn.utils.clip_grad_norm_([ref_a, ref_b], 0.5)
    assert norm == pytest.approx(float(ref), rel=1e-6)
    torch.testing.assert_close(a.grad.to_dense(), ref_a.grad)
    torch.testing.assert_close(b.grad, ref_b.grad)


def test_lazy_run_resumes_exactly_and_refuses_another_bank_optimizer(tmp_path):
    """A checkpoint of a lazy_adam run (one optimizer state over the fused AdamW and SparseAdam groups) continued
    in a new run folder ends with the uninterrupted run's weights, bit for bit."""
    lazy = ("training.bank_optimizer=lazy_adam", "memory.routing=token", "training.weight_decay=0.1")
    train(tiny(tmp_path, "training.max_steps=4", "training.save_steps=2", *lazy), progress=False)
    step2 = tmp_path / "run" / "checkpoints" / "step-000002"
    resumed = Trainer(tiny(tmp_path, "training.max_steps=4", *lazy, f"training.output_dir={tmp_path / 'again'}"),
                      resume=str(step2), progress=False)
    state = resumed.optimizer.state_dict()
    assert any(g["lazy"] for g in state["param_groups"]) and state["state"]
    resumed.train()
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("run", "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError) as e:
        Trainer(tiny(tmp_path, "training.max_steps=4", "memory.routing=token",
                     f"training.output_dir={tmp_path / 'other'}"), resume=str(step2), progress=False)
    assert str(e.value).startswith(f"training.bank_optimizer: {step2} was saved with another bank optimizer")


def test_lazy_adam_refuses_fsdp(tmp_path):
    with pytest.raises(ConfigError) as e:
        Trainer(tiny(tmp_path, "training.bank_optimizer=lazy_adam", "training.distributed=fsdp"), progress=False)
    assert str(e.value).startswith("training.bank_optimizer: lazy_adam runs on one process with "
                                   "training.distributed ddp only")
