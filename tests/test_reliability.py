"""No silent wrong results, no tracebacks: bad input is one `error:` line naming the key or file, exit 2, and
nothing written. The fuzz table is generated from the schema, so a new key is covered when it is added."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM

from memory_transformer import ConfigError, build_model, load_config, load_model
from memory_transformer import config as schema
from memory_transformer.cli import main
from memory_transformer.data.tokenizer import ByteTokenizer
from conftest import tiny_config

MODEL_ONLY = {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                        "max_seq_len": 64},
              "memory": {"num_tokens": 64, "num_chapters": 4, "top_k": 1, "num_heads": 4}}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of the CLI, in process (transformers' loading progress bars left out)."""
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 1. An explicit tokenizer wins; a base folder without tokenizer files is an error


def _bare_qwen2(path: Path, vocab: int = 512, seed: int = 0) -> Path:
    """A tiny Qwen2 saved with save_pretrained and no tokenizer files (as many checkpoint folders are)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def test_explicit_byte_tokenizer_wins_over_the_base(tmp_path):
    base = _bare_qwen2(tmp_path / "qwen")
    model = build_model(tiny_config(model={"pretrained": str(base), "tokenizer": "bytes"}))
    assert isinstance(model.tokenizer, ByteTokenizer) and len(model.tokenizer) == 259


def test_base_without_tokenizer_files_is_an_error_naming_the_folder(tmp_path):
    base = _bare_qwen2(tmp_path / "qwen")
    with pytest.raises(ConfigError) as e:
        build_model(tiny_config(model={"pretrained": str(base)}))
    assert str(e.value).startswith(f"model.pretrained: {base} has no tokenizer files (tokenizer.json, vocab.json")


def test_base_with_its_own_tokenizer_is_the_default(saved_base):
    base = saved_base("qwen2")  # saved with the byte tokenizer beside it
    model = build_model(tiny_config(model={"pretrained": str(base)}))
    assert isinstance(model.tokenizer, ByteTokenizer)
    assert load_config({"training": {"max_steps": 1}}).model.tokenizer is None


def test_tokenizer_larger_than_the_base_vocabulary_is_an_error(tmp_path):
    base = _bare_qwen2(tmp_path / "qwen", vocab=200)
    with pytest.raises(ConfigError, match=r"^model.tokenizer: bytes has 259 tokens, more than the base model's "
                                          r"vocabulary \(200\)$"):
        build_model(tiny_config(model={"pretrained": str(base), "tokenizer": "bytes"}))


# ---------------------------------------------------------------------------------------------------------
# 2. Signs and ranges of every numeric key


@pytest.mark.parametrize("override, message", [
    ("training.lr=-0.002", "training.lr: must be > 0, got -0.002"),
    ("training.lr.memory_bank=-1e-3", "training.lr.memory_bank: must be > 0, got -0.001"),
    ("training.warmup_steps=-1", "training.warmup_steps: must be >= 0, got -1"),
    ("training.logging_steps=0", "training.logging_steps: must be a positive integer, got 0"),
    ("training.save_total_limit=0", "training.save_total_limit: must be a positive integer, got 0"),
    ("memory.qkv_rank=0", "memory.qkv_rank: must be a positive integer, got 0"),
    ("memory.bank_rank=-4", "memory.bank_rank: must be a positive integer, got -4"),
    ("model.intermediate_size=0", "model.intermediate_size: must be a positive integer, got 0"),
    ("model.num_kv_heads=0", "model.num_kv_heads: must be a positive integer, got 0"),
    ("training.weight_decay.router=-0.1", "training.weight_decay.router: must be >= 0, got -0.1"),
])
def test_numeric_ranges(override, message):
    with pytest.raises(ConfigError) as e:
        load_config({"training": {"max_steps": 1}}, [override])
    assert str(e.value) == message


def test_a_model_only_config_builds_and_training_checks_its_own_keys(tmp_path, capsys):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(MODEL_ONLY))
    assert _run(["info", "--config", str(path)], capsys)[0] == 0
    code, err = _run(["train", "--config", str(path), "--set", f"training.output_dir={tmp_path / 'run'}"], capsys)
    assert (code, _one_error_line(err)) == (2, "error: training.max_steps: set training.max_steps or "
                                               "training.num_epochs")
    assert not (tmp_path / "run").exists()


def test_a_frozen_base_with_nothing_to_train_is_refused(saved_base, tmp_path):
    from memory_transformer.train.trainer import train

    cfg = tiny_config(memory={"enabled": False}, model={"pretrained": str(saved_base())},
                      training={"output_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"^model.freeze_base: the base is frozen and there is neither memory"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# 3. An adapter refuses another base of the same shape; 4. --set cannot change what saved weights mean


def _adapter(tmp_path, base: Path) -> Path:
    cfg = tiny_config(model={"pretrained": str(base), "tokenizer": "bytes"}, memory={"wo_init": "normal"})
    model = build_model(cfg)
    assert model.memory is not None
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_refuses_another_base_of_the_same_shape(tmp_path, capsys):
    base, other = _bare_qwen2(tmp_path / "base", seed=0), _bare_qwen2(tmp_path / "other", seed=1)
    adapter = _adapter(tmp_path, base)
    assert len(json.loads((adapter / "adapter_config.json").read_text())["base_fingerprint"]) == 32
    code, err = _run(["info", "--checkpoint", str(adapter), "--set", f"model.pretrained={other}"], capsys)
    assert (code, _one_error_line(err)) == (
        2, f"error: model.pretrained: adapter {adapter} was trained on another base than '{other}' (same shape, "
           f"other weights; trained on '{base}'); to load it anyway pass --allow-base-mismatch")
    assert _run(["info", "--checkpoint", str(adapter), "--set", f"model.pretrained={other}",
                 "--allow-base-mismatch"], capsys)[0] == 0
    moved = tmp_path / "moved"
    base.rename(moved)  # the same base in another folder, and in another dtype, is accepted
    model = load_model(adapter, overrides=[f"model.pretrained={moved}", "model.dtype=bfloat16"])
    assert model.base.dtype == torch.bfloat16


@pytest.mark.parametrize("override", ["memory.subjects=[a, b]", "memory.slot_top_k=null", "model.tokenizer=bytes",
                                      "lora.enabled=true", "model.hidden_size=64"])
def test_set_on_a_saved_model_refuses_keys_that_define_the_weights(tmp_path, saved_base, capsys, override):
    adapter = _adapter(tmp_path, saved_base())
    code, err = _run(["info", "--checkpoint", str(adapter), "--set", override], capsys)
    key = override.split("=")[0]
    assert (code, _one_error_line(err)) == (
        2, f"error: {key}: fixed by the saved model {adapter} (it defines what the trained weights mean); --set on "
           "a saved model takes inference.*, data.*, training.*, model.pretrained, model.dtype, "
           "model.attn_implementation")


def test_set_on_a_saved_model_takes_inference_keys(tmp_path, saved_base):
    model = load_model(_adapter(tmp_path, saved_base()), overrides=["inference.max_new_tokens=3"])
    assert model.config.inference.max_new_tokens == 3


# ---------------------------------------------------------------------------------------------------------
# Tracebacks that became one line


def test_damaged_or_missing_weights_are_named(tmp_path, capsys):
    cfg = tiny_config()
    build_model(cfg).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, err = _run(["info", "--checkpoint", str(tmp_path / "m")], capsys)
    assert code == 2 and _one_error_line(err).startswith(f"error: {weights}: not a readable safetensors file (")
    weights.unlink()
    code, err = _run(["info", "--checkpoint", str(tmp_path / "m")], capsys)
    assert (code, _one_error_line(err)) == (
        2, f"error: {tmp_path / 'm'}: no weights (model.safetensors or adapter_model.safetensors); the folder is "
           "incomplete")


def test_empty_prompt_is_refused(tmp_path, capsys):
    build_model(tiny_config()).save_pretrained(tmp_path / "m")
    code, err = _run(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", ""], capsys)
    assert (code, _one_error_line(err)) == (2, "error: --prompt: a prompt is empty: give some text to continue")


def test_output_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({**MODEL_ONLY, "training": {"max_steps": 1, "log_with": ["none"]}}))
    (tmp_path / "file").write_text("not a folder")
    code, err = _run(["train", "--config", str(path), "--set", f"training.output_dir={tmp_path / 'file' / 'run'}",
                      "--set", "data.num_people=2"], capsys)
    assert code == 2 and _one_error_line(err).startswith(f"error: {tmp_path / 'file'}")
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("args, message", [
    (["--start", "0"], "error: --start: needs 0 < --start < --end, got --start 0.0 --end 1.0"),
    (["--steps", "0"], "error: --steps: must be at least 2 (a range of learning rates), got 0"),
])
def test_lr_find_arguments(tmp_path, capsys, args, message):
    code, err = _run(["lr-find", "--config", "configs/demo.yaml", "--out", str(tmp_path / "lr"), *args], capsys)
    assert (code, _one_error_line(err)) == (2, message)
    assert not (tmp_path / "lr").exists()


def test_malformed_jsonl_line_is_named(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({**MODEL_ONLY, "training": {"max_steps": 1, "log_with": ["none"]}}))
    code, err = _run(["train", "--config", str(path), "--set", f"data.source={data}",
                      "--set", f"training.output_dir={tmp_path / 'run'}"], capsys)
    assert (code, _one_error_line(err)) == (
        2, f"error: data.path: {data} line 3: not valid JSON (Expecting value at column 10)")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# Fuzz: malformed configs generated from the schema, through the CLI


def _fields(cls=schema.Config, prefix=""):
    """(dotted key, type) of every leaf key of the schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _wrong_type(tp) -> str | None:
    """A YAML value of the wrong type for `tp`, or None when every scalar is allowed."""
    args = set(typing.get_args(tp)) or {tp}
    if str in args and typing.get_origin(tp) is not typing.Literal:
        return "[1, 2]" if not any(typing.get_origin(a) is list for a in args) else "{a: 1}"
    if typing.get_origin(tp) is typing.Literal:
        return "not-an-option"
    if bool in args:
        return "maybe"
    return "many"


def _fuzz_cases():
    cases = []
    for key, tp in _fields():
        cases.append((f"{key}={_wrong_type(tp)}", key))
    for section, keys in schema._RANGES.items():
        for key, (ok, _) in keys.items():
            bad = next(v for v in (0, -1, -0.5, 1.5) if not ok(v))
            cases.append((f"{section}.{key}={bad}", f"{section}.{key}"))
    for section in ("model", "memory", "lora", "data", "training", "inference"):
        cases.append((f"{section}.no_such_key=1", f"{section}.no_such_key"))
    return cases


FUZZ = _fuzz_cases()


def test_the_fuzz_table_is_large():
    assert len(FUZZ) >= 100


@pytest.mark.parametrize("command", ["info", "train"])
def test_fuzz_malformed_configs_fail_in_one_line(tmp_path, monkeypatch, capsys, command):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({**MODEL_ONLY, "training": {"max_steps": 1}}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for override, key in FUZZ:
        code, err = _run([command, "--config", str(path), "--set", override], capsys)
        line = _one_error_line(err)
        assert code == 2 and line.startswith(f"error: {key}") or f" {key}" in line, (override, line)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "no.yaml"], "error: config file not found: no.yaml"),
    (["train"], "error: --config: a config file is required (e.g. --config configs/demo.yaml)"),
    (["train", "--config", "CFG", "--set", "training.lr"], "error: override 'training.lr' must look like KEY=VALUE"),
    (["eval", "--checkpoint", "nowhere"], "error: nowhere: not a saved model (no config.yaml)"),
    (["generate", "--checkpoint", "nowhere", "--prompt-file", "none.txt"], "error: --prompt-file: file not found"),
    (["train", "--config", "CFG", "--set", "data.source=missing.jsonl"], "error: data.path: file not found"),
    (["train", "--config", "CFG", "--set", "data.source=data.csv"], "error: data.path: unsupported file type"),
    (["train", "--config", "CFG", "--set", "memory.routing=subject", "--set", "memory.subjects=none.txt"],
     "error: memory.subjects: file not found: none.txt"),
])
def test_fuzz_bad_files_and_arguments(tmp_path, monkeypatch, capsys, argv, message):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({**MODEL_ONLY, "training": {"max_steps": 1, "log_with": ["none"]}}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    before = sorted(tmp_path.iterdir())
    code, err = _run([str(path) if a == "CFG" else a for a in argv], capsys)
    assert code == 2 and _one_error_line(err).startswith(message), err
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", [["quantize", "--bits", "8"], ["export", "--memory-only"]])
def test_out_that_holds_something_is_refused(tmp_path, capsys, command):
    build_model(tiny_config()).save_pretrained(tmp_path / "m")
    (tmp_path / "file").write_text("keep me")
    code, err = _run([command[0], "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "file"),
                      *command[1:]], capsys)
    assert (code, _one_error_line(err)) == (2, f"error: --out: {tmp_path / 'file'} exists and is not empty; "
                                               "choose a new folder")
    assert (tmp_path / "file").read_text() == "keep me"
