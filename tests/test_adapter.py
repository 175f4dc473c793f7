"""Adapters on a frozen pretrained base, the LoRA baseline through peft, export, and the generate command."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from memory_transformer import ConfigError, build_model, load_config, load_model
from memory_transformer.export import export
from memory_transformer.lora import lora_params_per_rank, matching_lora_rank
from memory_transformer.train.trainer import train
from conftest import ARCHS, tiny_config

LORA = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}


def _ids(b=2, t=12):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(0))


def _adapter_cfg(path, tmp_path, memory=True, lora=False, steps=3):
    return tiny_config(
        memory={"enabled": memory}, model={"pretrained": str(path)}, lora={**LORA, "enabled": lora},
        data={"num_people": 4, "samples_per_epoch": 8},
        training={"output_dir": str(tmp_path / "run"), "max_steps": steps, "batch_size": 2, "log_with": ["none"],
                  "logging_steps": 1},
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_training_saves_only_memory_and_reloads_exactly(arch, saved_base, tmp_path):
    base_path = saved_base(arch)
    cfg = _adapter_cfg(base_path, tmp_path)
    model = build_model(cfg)
    report = model.parameter_report()["parameters"]
    assert report["trainable"] == report["total"] - report["base"]
    train(cfg, progress=False)
    final = tmp_path / "run" / "final"
    assert not (final / "model.safetensors").exists()
    weights = load_file(final / "adapter_model.safetensors")
    assert all(k.startswith("memory.") for k in weights)
    assert sum(v.numel() for v in weights.values()) == report["trainable"]
    size = (final / "adapter_model.safetensors").stat().st_size
    assert report["trainable"] * 4 <= size <= report["trainable"] * 4 + 16_384  # fp32 + safetensors header
    base = AutoModelForCausalLM.from_pretrained(base_path)
    base_size = sum(p.numel() for p in base.parameters()) * 4
    assert size < base_size
    loaded = load_model(final)
    x = _ids()
    reloaded = load_model(final)
    assert torch.equal(loaded(x).logits, reloaded(x).logits)
    assert not torch.equal(loaded(x).logits, base(x).logits)  # training moved the memory
    assert torch.equal(loaded.base.state_dict()["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])


def test_adapter_on_a_mismatched_base_is_a_clear_error(saved_base, tmp_path):
    model = build_model(tiny_config("qwen2", model={"pretrained": str(saved_base("qwen2"))}))
    model.save_pretrained(tmp_path / "a")
    other = build_model(tiny_config("llama", memory={"enabled": False}))
    other.base.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError) as e:
        load_model(tmp_path / "a", overrides=[f"model.pretrained={tmp_path / 'other'}"])
    assert str(e.value) == (f"model.pretrained: adapter {tmp_path / 'a'} was trained on a base with model_type=qwen2, "
                            f"but '{tmp_path / 'other'}' has model_type=llama")


@pytest.mark.parametrize("memory,lora", [(True, False), (False, True), (True, True)])
def test_lora_memory_and_both_train_their_own_parameters(memory, lora, saved_base, tmp_path):
    cfg = _adapter_cfg(saved_base("llama"), tmp_path, memory=memory, lora=lora)
    model = build_model(cfg)
    p = model.parameter_report()["parameters"]
    per_rank = 3 * (32 + 32) + 3 * (32 + 16)  # q_proj 32->32 and v_proj 32->16 (2 kv heads) in 3 layers
    assert lora_params_per_rank(model, ["q_proj", "v_proj"]) == per_rank
    assert p["lora"] == (4 * per_rank if lora else 0)
    assert p["trainable"] == p["lora"] + p["memory_bank"] + p["memory_attention"] + p["router"]
    from memory_transformer.train.optim import param_groups

    names = {g["name"] for g in param_groups(model, cfg.training)}
    assert names == ({"lora"} if lora else set()) | ({"memory_bank", "memory_attention", "router"} if memory else set())
    train(cfg, progress=False)
    x = _ids()
    assert torch.isfinite(load_model(tmp_path / "run" / "final")(x).logits).all()


def test_matching_lora_rank_is_the_closest(saved_base):
    model = build_model(tiny_config("llama", model={"pretrained": str(saved_base("llama"))}))
    r, n = matching_lora_rank(model)
    p = model.parameter_report()["parameters"]
    memory = p["trainable"]
    per_rank = lora_params_per_rank(model, model.config.lora.target_modules)
    assert n == r * per_rank
    assert all(abs(r * per_rank - memory) <= abs(k * per_rank - memory) for k in range(1, 4 * r + 2))


def _with_random_lora(model):
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # LoRA starts at zero; make the merge non-trivial
    return model


def test_merge_lora_keeps_logits_and_memory(saved_base, tmp_path):
    cfg = tiny_config("qwen3", model={"pretrained": str(saved_base("qwen3"))}, lora=LORA)
    model = _with_random_lora(build_model(cfg))
    model.save_pretrained(tmp_path / "m")
    x = _ids()
    before = model(x).logits
    export(tmp_path / "m", tmp_path / "merged", merge_lora=True)
    merged = load_model(tmp_path / "merged")
    assert not merged.config.lora.enabled and merged.memory is not None
    torch.testing.assert_close(merged(x).logits, before, atol=1e-5, rtol=1e-5)


def test_export_hf_loads_without_this_package_and_refuses_memory(saved_base, tmp_path):
    cfg = tiny_config("mistral", memory={"enabled": False}, model={"pretrained": str(saved_base("mistral"))},
                      lora=LORA)
    model = _with_random_lora(build_model(cfg))
    model.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "hf", hf=True)
    x = _ids()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(plain(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    build_model(tiny_config("llama")).save_pretrained(tmp_path / "mem")
    with pytest.raises(ConfigError, match="memory.enabled: a model with memory layers cannot be exported"):
        export(tmp_path / "mem", tmp_path / "hf2", hf=True)


def test_export_memory_only_round_trip(saved_base, tmp_path):
    cfg = tiny_config("llama", model={"pretrained": str(saved_base("llama")), "freeze_base": False})
    model = build_model(cfg)
    model.save_pretrained(tmp_path / "full")  # unfrozen base: saved in full
    assert (tmp_path / "full" / "model.safetensors").exists()
    export(tmp_path / "full", tmp_path / "mem", memory_only=True)
    assert all(k.startswith("memory.") for k in load_file(tmp_path / "mem" / "adapter_model.safetensors"))
    x = _ids()
    torch.testing.assert_close(load_model(tmp_path / "mem")(x).logits, model(x).logits)
    build_model(tiny_config("llama")).save_pretrained(tmp_path / "scratch")
    with pytest.raises(ConfigError, match="model.pretrained: --memory-only needs a model whose base is a pretrained"):
        export(tmp_path / "scratch", tmp_path / "mem2", memory_only=True)


def test_generate_command_streams_and_batches(tmp_path):
    model = build_model(tiny_config("llama"))
    model.save_pretrained(tmp_path / "m")
    cmd = [sys.executable, "-m", "memory_transformer", "generate", "--checkpoint", str(tmp_path / "m"),
           "--max-new-tokens", "6", "--greedy"]
    one = subprocess.run([*cmd, "--prompt", "Ada was born in"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    prompts = tmp_path / "p.txt"
    prompts.write_text("Ada was born in\nBo\n")
    many = subprocess.run([*cmd, "--prompt-file", str(prompts), "--batch-size", "2"], capture_output=True, text=True)
    assert many.returncode == 0, many.stderr
    lines = many.stdout.split("\n")
    assert one.stdout.startswith("Ada was born in") and lines[0].startswith("Ada was born in")
    from memory_transformer.generate import generate_texts

    loaded = load_model(tmp_path / "m", overrides=["inference.max_new_tokens=6"])
    expected = generate_texts(loaded, ["Ada was born in"])[0]
    assert lines[0] == "Ada was born in" + expected
    missing = subprocess.run([*cmd[:-3], "--prompt-file", str(tmp_path / "no.txt")], capture_output=True, text=True)
    assert (missing.returncode, missing.stderr) == (2, f"error: --prompt-file: file not found: {tmp_path / 'no.txt'}\n")


def test_sample_documents_is_seeded_and_leaves_the_random_state_alone(saved_base):
    from memory_transformer.generate import sample_documents

    model = build_model(tiny_config(memory={"enabled": False}, model={"pretrained": str(saved_base())}))
    state = torch.random.get_rng_state()
    a = sample_documents(model, 5, 16, seed=1, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(a) == 5 and a == sample_documents(model, 5, 16, seed=1, batch_size=2)
    assert a != sample_documents(model, 5, 16, seed=2, batch_size=2)
    assert all(len(d) <= 15 for d in a) and sum(map(len, a)) > 0  # <= max_tokens - 1 new bytes, specials dropped
    cold = sample_documents(model, 2, 16, seed=1, batch_size=2, temperature=1e-4)  # ~ greedy from end-of-text
    eos = torch.full((1, 1), model.tokenizer.eos_token_id)
    greedy = model.generate(input_ids=eos, attention_mask=torch.ones_like(eos), max_new_tokens=15, do_sample=False)
    assert cold == [model.tokenizer.decode(greedy[0, 1:].tolist())] * 2


def test_generated_replay_samples_the_plain_base_and_a_resumed_run_reads_them_back(saved_base, tmp_path):
    from memory_transformer.generate import sample_documents
    from memory_transformer.train.trainer import REPLAY_FILE, Trainer

    base_path = saved_base()
    cfg = load_config(_adapter_cfg(base_path, tmp_path, lora=True).to_dict(),
                      ["data.replay_generated=4", "data.replay_fraction=0.25", "training.save_steps=1"])
    train(cfg, progress=False)
    saved = [json.loads(line)["text"] for line in (tmp_path / "run" / REPLAY_FILE).read_text().splitlines()]
    plain = build_model(tiny_config(memory={"enabled": False}, model={"pretrained": str(base_path)}))
    assert saved == sample_documents(plain, 4, 64, seed=0, batch_size=2)  # no memory, no LoRA in the sampler
    kept = ["kept one.", "kept two."]
    (tmp_path / "run" / REPLAY_FILE).write_text("".join(json.dumps({"text": t}) + "\n" for t in kept))
    assert Trainer(cfg, resume=True, progress=False).replay_docs == kept


def test_adapters_disabled_gives_the_plain_base_and_restores_the_adapters(saved_base):
    base_path = saved_base()
    model = build_model(tiny_config(model={"pretrained": str(base_path)}, lora=LORA))
    _with_random_lora(model)
    plain = AutoModelForCausalLM.from_pretrained(base_path)
    x = _ids()
    adapted = model(x).logits
    assert not torch.allclose(adapted, plain(x).logits, atol=1e-3)
    with model.adapters_disabled():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=1e-5)
        with model.adapters_disabled():  # nested: the outer one still holds after the inner one ends
            pass
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=1e-5)
    assert torch.equal(model(x).logits, adapted)


def test_distill_loss_is_cross_entropy_on_own_tokens_plus_kl_on_replayed_ones():
    import torch.nn.functional as F

    from memory_transformer.evaluate import token_loss_sums
    from memory_transformer.train.trainer import distill_loss_sum

    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 4] = -100
    replay = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    none = torch.zeros_like(replay)
    assert torch.equal(distill_loss_sum(logits, teacher, labels, none), token_loss_sums(logits, labels)[0])
    own_ce = F.cross_entropy(logits[0, :2], labels[0, 1:3], reduction="sum")  # predictions of tokens 1, 2
    kl = sum(F.kl_div(logits[b, t].log_softmax(-1), teacher[b, t].log_softmax(-1), log_target=True, reduction="sum")
             for b, t in [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2)])  # targets 3, 4 of row 0; 1..3 of row 1
    torch.testing.assert_close(distill_loss_sum(logits, teacher, labels, replay), own_ce + kl)
    assert distill_loss_sum(logits, logits, labels, torch.ones_like(replay)).abs() < 1e-5  # model = teacher


def test_distilled_replay_step_is_own_cross_entropy_plus_kl_to_the_plain_base(saved_base, tmp_path):
    import torch.nn.functional as F

    from memory_transformer.evaluate import token_loss_sums
    from memory_transformer.train.trainer import Trainer

    base_path = saved_base()
    cfg = load_config(_adapter_cfg(base_path, tmp_path, lora=True).to_dict(),
                      ["data.replay_generated=4", "data.replay_fraction=0.5", "data.replay_loss=distill"])
    trainer = Trainer(cfg, progress=False)
    _with_random_lora(trainer.unwrapped)  # memory (W_o normal) and LoRA both change the logits: model != teacher
    micro = next(m for m in iter(trainer._next_batch, None) if 0 < m[0]["replay"].sum() < m[0]["replay"].numel())
    mb = micro[0]  # a batch with own and replayed tokens
    plain = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        logits, teacher = trainer.unwrapped(mb["input_ids"]).logits, plain(mb["input_ids"]).logits
        own_ce = token_loss_sums(logits, mb["labels"].masked_fill(mb["replay"].bool(), -100))[0]
        at = mb["replay"][:, 1:].bool()  # predictions of replayed tokens
        kl = F.kl_div(logits[:, :-1][at].log_softmax(-1), teacher[:, :-1][at].log_softmax(-1), log_target=True,
                      reduction="sum")
        expected = (own_ce + kl) / (mb["labels"][:, 1:] != -100).sum()
    assert kl > 1e-3
    assert trainer._forward_backward(micro)["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert trainer.unwrapped.training and not trainer.unwrapped.memory.is_bypassed


def test_resuming_a_generated_replay_run_without_its_samples_is_an_error(saved_base, tmp_path):
    from memory_transformer.train.trainer import REPLAY_FILE, Trainer

    cfg = load_config(_adapter_cfg(saved_base(), tmp_path).to_dict(),
                      ["data.replay_generated=2", "training.save_steps=1", "training.max_steps=1"])
    train(cfg, progress=False)
    (tmp_path / "run" / REPLAY_FILE).unlink()
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, resume=True, progress=False)
    assert str(e.value) == (f"--resume: {tmp_path / 'run' / REPLAY_FILE} is missing: the replayed samples of this "
                            "run are gone; start a new run (another training.output_dir)")
