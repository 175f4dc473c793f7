"""Several processes beyond DDP: the model sharded with FSDP2 (`training.distributed: fsdp`), its sharded
checkpoints, and token routing with padded data. Every test runs 2 CPU processes under torchrun (gloo)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from memory_transformer import load_config, load_model
from conftest import tiny_config
from test_train import TINY, _launch

# DDP and FSDP compute the same step; they differ only in how gradients are summed over processes (DDP:
# an all-reduce of grad/W in buckets; FSDP: a reduce-scatter), i.e. by float32 rounding (~1e-7 relative) that AdamW
# carries on. Measured over 6 steps: losses equal to 7 digits, weights within 4.4e-7. 1e-5 leaves 20x room.
FSDP_TOL = 1e-5


def _losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]


def _weights(folder) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if (folder / "model.safetensors").is_file() else "adapter_model.safetensors"
    return load_file(folder / name)


def _train_both(tmp_path, cfg, *extra: str) -> None:
    """The same config trained on 2 processes with DDP (run `ddp`) and with FSDP (run `fsdp`), side by side."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg.save(cfg_file)
    runs = {mode: _launch(2, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / mode}",
                          "--set", f"training.distributed={mode}", *extra) for mode in ("ddp", "fsdp")}
    for mode, proc in runs.items():
        assert proc.wait(timeout=300) == 0, f"{mode}: {proc.stderr.read()[-3000:]}"


def _adapter_cfg(base_path):
    return tiny_config(memory={"enabled": True, "dropout": 0.0}, model={"pretrained": str(base_path)},
                       lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]},
                       data={"num_people": 6, "samples_per_epoch": 24},
                       training={"max_steps": 6, "batch_size": 2, "log_with": ["none"], "logging_steps": 1,
                                 "lr": 3e-3, "save_total_limit": None})


# (overrides, loss tolerance, weight tolerance). bf16: FSDP gathers bf16 parameters (its mixed precision policy)
# where DDP keeps float32 weights under autocast, so the two round differently (bf16: 8-bit mantissa, ~4e-3
# relative); measured: losses within 2.1e-4, weights within 8.3e-3. AdamW's step is ~lr whatever the gradient's
# size, so a gradient entry near 0 that rounds to the other sign moves a weight by up to 2 lr (6e-3) apart per
# step: the weights get 2e-2 (about lr x 6 steps), the losses 2e-3.
FSDP_CASES = {
    "scratch": ([], FSDP_TOL, FSDP_TOL),
    "adapter": (None, FSDP_TOL, FSDP_TOL),  # memory + LoRA on a frozen pretrained base
    "bf16-activation-checkpointing": (["training.precision=bf16", "training.gradient_checkpointing=true"], 2e-3, 2e-2),
}


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_trains_like_ddp(tmp_path, saved_base, case):
    """From scratch (every weight sharded), memory + LoRA on a frozen pretrained base (frozen and trained weights
    in one FSDP unit), bf16 with activation checkpointing: FSDP's losses equal DDP's within the case's
    tolerance; the memory hooks, registered before the wrapping, still read the same chapters (router usage);
    final/ is the usual folder that load_model reads on one process."""
    overrides, tol, weight_tol = FSDP_CASES[case]
    if overrides is None:
        cfg = _adapter_cfg(saved_base("llama"))
    else:
        cfg = load_config(TINY, ["memory.dropout=0.0", "training.max_steps=6", "training.batch_size=2", *overrides])
    _train_both(tmp_path, cfg)
    rows = {m: [json.loads(x) for x in (tmp_path / m / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]
            for m in ("ddp", "fsdp")}
    assert len(rows["ddp"]) == len(rows["fsdp"]) == 6
    for a, b in zip(rows["ddp"], rows["fsdp"]):
        assert abs(a["loss"] - b["loss"]) <= tol, (a, b)
        assert a["router_usage"] == b["router_usage"] and sum(map(sum, b["router_usage"].values())) > 0
    wa, wb = _weights(tmp_path / "ddp" / "final"), _weights(tmp_path / "fsdp" / "final")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= weight_tol
    assert case != "adapter" or all(k.startswith("memory.") or "lora_" in k for k in wb)
    x = torch.randint(0, 256, (2, 16))
    ddp, fsdp = load_model(tmp_path / "ddp" / "final").eval(), load_model(tmp_path / "fsdp" / "final").eval()
    assert torch.allclose(ddp(x).logits, fsdp(x).logits, atol=1e-3 if weight_tol <= FSDP_TOL else 1.0)


def test_distributed_key_names_the_allowed_values():
    from memory_transformer import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["training.distributed=zero3"])
    assert str(e.value) == "training.distributed: got 'zero3'; allowed: ddp | fsdp"


def test_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    """An FSDP checkpoint holds each process's shards (sharded/), not whole weights. Resharding: it resumes on 1
    process (DCP reassembles the shards), whose own checkpoint resumes on 2 again; both reach the weights of the
    uninterrupted 2-process run within FSDP_TOL (1 process sums the global batch's gradients in another order).
    `load_model` reads a sharded checkpoint on one process; best/ is gathered like final/."""
    cfg_file = tmp_path / "cfg.yaml"
    load_config(TINY, ["memory.dropout=0.0", "training.max_steps=8", "training.save_steps=4", "training.batch_size=2",
                       "training.distributed=fsdp", "training.eval_steps=4"]).save(cfg_file)
    ref = _launch(2, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'ref'}")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]
    step4 = tmp_path / "ref" / "checkpoints" / "step-000004"
    assert sorted(p.name for p in (step4 / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (step4 / "model.safetensors").exists()
    assert {"process-0.safetensors", "process-1.safetensors", "optimizer.json", "COMPLETE"} <= {
        p.name for p in step4.iterdir()}
    one = _launch(1, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'one'}",
                  "--set", "training.batch_size=4", "--set", "training.save_steps=2", "--resume", str(step4))
    assert one.wait(timeout=300) == 0, one.stderr.read()[-3000:]
    step6 = tmp_path / "one" / "checkpoints" / "step-000006"
    assert [p.name for p in (step6 / "sharded").iterdir()] == ["shard-00001-model-00001-of-00001.safetensors"]
    back = _launch(2, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'back'}",
                   "--resume", str(step6))
    assert back.wait(timeout=300) == 0, back.stderr.read()[-3000:]
    a, b = _losses(tmp_path / "ref")[4:], _losses(tmp_path / "one")
    assert len(b) == 4 and all(abs(x - y) <= FSDP_TOL for x, y in zip(a, b)), (a, b)
    wa = _weights(tmp_path / "ref" / "final")
    for run in ("one", "back"):
        wb = _weights(tmp_path / run / "final")
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= FSDP_TOL, run
    x = torch.randint(0, 256, (2, 16))
    at8, final = load_model(tmp_path / "ref" / "checkpoints" / "step-000008"), load_model(tmp_path / "ref" / "final")
    assert torch.equal(at8.eval()(x).logits, final.eval()(x).logits)
    best = tmp_path / "ref" / "best"  # gathered like final/: the model of the best evaluation (step 4 or 8)
    step = json.loads((best / "COMPLETE").read_text())["step"]
    at = load_model(tmp_path / "ref" / "checkpoints" / f"step-{step:06d}")
    assert torch.equal(load_model(best).eval()(x).logits, at.eval()(x).logits)


def _chats(path, n: int) -> None:
    """`n` chats of 1 to 3 turns: right-padded rows of different lengths (another number of real tokens on each
    process)."""
    import random

    rng, words = random.Random(0), "hi there hello what is 4".split()
    rows = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 4)))},
                      {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 4)))}]
        rows.append(json.dumps({"messages": turns}) + "\n")
    path.write_text("".join(rows))


def test_token_routing_on_padded_data_matches_one_process(tmp_path):
    """Token routing pools the real tokens of every process for the router losses: with padding each process has
    its own count (gather_rows: sizes first, pad, gather, cut). 2 processes equal 1 with the same global batch."""
    from test_data import CHAT_TEMPLATE
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[PAD] [UNK] </s> <user> <assistant> hi there hello what is 4".split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    _chats(tmp_path / "chats.jsonl", 40)
    cfg_file = tmp_path / "cfg.yaml"
    load_config(TINY, ["memory.dropout=0.0", "memory.routing=token", "training.max_steps=4",
                       f"model.tokenizer={tmp_path / 'tok'}", "model.max_seq_len=48",
                       "data.mode=instruction_finetuning", f"data.source={tmp_path / 'chats.jsonl'}",
                       "data.eval_fraction=0.1"]).save(cfg_file)
    one = _launch(1, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'one'}",
                  "--set", "training.batch_size=8")
    two = _launch(2, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / 'two'}",
                  "--set", "training.batch_size=4")
    assert one.wait(timeout=300) == 0, one.stderr.read()[-3000:]
    assert two.wait(timeout=300) == 0, two.stderr.read()[-3000:]
    rows = {run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                  if '"eval"' not in x] for run in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 4
    for a, b in zip(rows["one"], rows["two"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["router_loss"] - b["router_loss"]) <= 1e-5, (a, b)


@pytest.mark.parametrize("overrides", [[], ["memory.routing=token", "training.batch_size=1",
                                            "training.grad_accum_steps=2"]], ids=["sequence", "token-accum2"])
def test_sharded_chapters_train_like_the_whole_bank(tmp_path, overrides):
    """memory.shard_chapters: each of 2 processes holds 4 of the 8 chapters, the chapters read anywhere are fetched
    from their owners and their gradients sent back. Losses and final weights equal those of the same 2-process
    run with the whole bank on each process within 1e-5 (measured 4e-7: the fetched values are exact, the mean of
    2 gradients too; only the clipping norm is summed in another order). Token routing with 2 micro-batches: the
    fetch and the gradient return run once per micro-batch."""
    cfg_file = tmp_path / "cfg.yaml"
    load_config(TINY, ["memory.dropout=0.0", "training.max_steps=6", "training.batch_size=2", "memory.num_chapters=8",
                       "memory.top_k=2", *overrides]).save(cfg_file)
    runs = {sh: _launch(2, "train", "--config", str(cfg_file), "--set", f"training.output_dir={tmp_path / sh}",
                        "--set", f"memory.shard_chapters={sh}") for sh in ("false", "true")}
    for sh, proc in runs.items():
        assert proc.wait(timeout=300) == 0, f"{sh}: {proc.stderr.read()[-3000:]}"
    a, b = _losses(tmp_path / "false"), _losses(tmp_path / "true")
    assert len(a) == len(b) == 6 and all(abs(x - y) <= 1e-5 for x, y in zip(a, b)), (a, b)
    wa, wb = _weights(tmp_path / "false" / "final"), _weights(tmp_path / "true" / "final")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
