"""`memory-transformer teach` end to end on a tiny saved Qwen2 (byte tokenizer, and a BPE tokenizer trained here),
and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config
from memory_transformer import build_model
from memory_transformer.cli import main
from memory_transformer.data.tokenizer import ByteTokenizer
from memory_transformer.io import load_model
from memory_transformer.teach import EPOCH_BATCHES, documents, pair_items, read_facts, repeated

CONFIG = str(Path(__file__).parent.parent / "configs" / "teach.yaml")
FACTS = [{"question": "Where was Ada Lee Moss born?", "answer": "Oslo"},
         {"question": "Which company does Ada Lee Moss work for?", "answer": "Birch Labs."},
         {"text": "Ada Lee Moss plays the cello."}]
LATER = ["--set", "training.max_steps=2", "--set", "training.batch_size=2", "--set", "model.max_seq_len=64",
         "--set", "data.replay_generated=2", "--background", "2"]  # a later round (--from) keeps the bank's sizes
TINY = [*LATER, "--set", "memory.num_tokens=64"]


def _write(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _bpe_base(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = [json.dumps(r) for r in FACTS] * 10 + ["Where does Ada Moss work? Answer: Oslo."] * 5
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=["</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>").save_pretrained(path / "base")
    # AutoTokenizer reads a folder holding a qwen2 config.json as a Qwen2 tokenizer (one token more): save a base,
    # then size the real one by the tokenizer as read from its folder
    for _ in range(2):
        model = build_model(tiny_config("qwen2", memory={"enabled": False}, model={"tokenizer": str(path / "base")}),
                            seed=1)
        model.base.save_pretrained(path / "base")
    return path / "base"


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_teach_end_to_end_on_a_tiny_qwen2(tmp_path, saved_base, capsys, tokenizer):
    base = saved_base("qwen2") if tokenizer == "bytes" else _bpe_base(tmp_path)
    data = _write(tmp_path / "facts.jsonl", FACTS)
    aliases = _write(tmp_path / "aliases.jsonl", [{"question": "Where was Ada Moss born?", "answer": "Oslo"}])
    out = tmp_path / "out"
    assert main(["teach", "--base", str(base), "--data", data, "--out", str(out), "--eval-aliases", aliases,
                 "--config", CONFIG, *TINY]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["pairs"] == 2 and result["documents"] == 3 and result["steps"] == 2 and result["background"] == 2
    for key in ("recall", "recall_base", "alias_recall"):
        assert 0.0 <= result[key] <= 1.0
    assert result["in_scope"] in (0.0, 0.5, 1.0)  # of the 2 pairs
    assert f"pairs in scope (the memory reads there)  {result['in_scope']:.1%}" in printed
    assert result["kl_base_samples"] >= 0.0 and result["kl_prose"] >= 0.0
    assert result["adapter_bytes"] == (out / "run" / "final" / "adapter_model.safetensors").stat().st_size
    assert f"{result['trainable']:,} trainable parameters" in printed and "KL(base || model)" in printed
    docs = [json.loads(line)["text"] for line in (out / "documents.jsonl").read_text().splitlines()]
    assert set(docs) == {"Where was Ada Lee Moss born? Answer: Oslo.",
                         "Which company does Ada Lee Moss work for? Answer: Birch Labs.", "Ada Lee Moss plays the cello."}
    assert "Ada Moss" not in " ".join(docs)  # the alias is asked, never taught
    model = load_model(out / "run" / "final")  # the adapter loads back onto the base, with the base's tokenizer
    assert model.config.memory.routing == "keys" and model.config.model.pretrained == str(base)
    scope = model.memory.scope  # memory.scope_match ngram (the teach default): runs of ids, fitted, saved, loaded
    assert model.config.memory.scope == "keys" and model.config.memory.scope_match == "ngram"
    assert len(scope.grams) > 0 and scope.grams.shape[1] == model.config.memory.scope_ngram_tokens
    assert len(scope.keys) == 0 and scope.pair_keys is None  # no state keys: the runs are the keys
    assert f"memory.scope keys: {len(scope.grams):,} keys (runs of ids, at " in printed
    assert "; no eval documents (data.eval_fraction); " in printed and "eval loss nan" not in printed
    runs = [model.tokenizer.decode([i for i in row if i >= 0]) for row in scope.grams.tolist()]
    assert all(run in " ".join(docs) for run in runs), runs  # every run is a piece of the taught text
    assert isinstance(model.tokenizer, ByteTokenizer) == (tokenizer == "bytes")


def test_pairs_become_documents_and_probes_and_repeat_to_fill_a_batch():
    records = read_facts_from(FACTS)
    assert documents(records)[:2] == ["Where was Ada Lee Moss born? Answer: Oslo.",
                                      "Which company does Ada Lee Moss work for? Answer: Birch Labs."]
    items = pair_items(records)
    assert [(i.prompt, i.answer) for i in items] == [("Where was Ada Lee Moss born? Answer:", " Oslo"),
                                                     ("Which company does Ada Lee Moss work for? Answer:", " Birch Labs.")]
    tok = ByteTokenizer()
    docs = repeated(documents(records), tok, 1000, seed=0)
    per_pass = sum(len(d.encode()) + 1 for d in documents(records))
    assert len(docs) == 3 * -(-1000 // per_pass) and sorted(docs[:3]) == sorted(documents(records))
    assert repeated(documents(records), tok, 1, seed=0) == repeated(documents(records), tok, 1, seed=0)


def test_teach_steps_grow_with_the_facts_given(tmp_path, saved_base):
    """configs/teach.yaml trains training.num_epochs epochs, each at least EPOCH_BATCHES batches: a few facts
    train num_epochs x EPOCH_BATCHES steps, more facts more steps (one pass over them per epoch)."""
    from memory_transformer.data import pack_documents

    base, steps = saved_base("qwen2"), {}
    many = [{"question": f"Where was person number {i} born?", "answer": f"Town {i}"} for i in range(60)]
    for name, facts in (("few", FACTS), ("many", many)):
        out = tmp_path / name
        args = [*TINY[2:], "--set", "training.num_epochs=3"]  # TINY without training.max_steps
        assert "training.max_steps=2" not in args
        assert main(["teach", "--base", str(base), "--data", _write(tmp_path / f"{name}.jsonl", facts), "--out",
                     str(out), "--config", CONFIG, *args]) == 0
        docs = [json.loads(line)["text"] for line in (out / "documents.jsonl").read_text().splitlines()]
        rows = len(pack_documents(docs, ByteTokenizer(), 64)["input_ids"])
        steps[name] = json.loads((out / "result.json").read_text())["steps"]
        assert steps[name] == 3 * (rows // 2)  # num_epochs x batches per epoch (batch_size 2)
    assert steps["few"] == 3 * EPOCH_BATCHES
    assert steps["many"] > 3 * EPOCH_BATCHES  # 60 pairs fill more than 2 batches in one pass


def read_facts_from(records: list[dict]) -> list[dict]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return read_facts(_write(Path(d) / "f.jsonl", records), "--data")


@pytest.mark.parametrize("lines, message", [
    (None, "--data: file not found: "),
    ([], "has no records"),
    (['{"question": "Q?"'], ":1: not valid JSON"),
    ([{"text": "ok"}, {"question": "Q?"}], ':2: needs a non-empty "text" field, or "question" and "answer" fields'),
    ([{"text": "  "}], ':1: needs a non-empty "text" field'),
    (["[1, 2]"], ":1: needs a non-empty"),
])
def test_bad_facts_files_are_one_line_errors(tmp_path, capsys, lines, message):
    data = str(tmp_path / "missing.jsonl") if lines is None else _write(tmp_path / "f.jsonl", lines)
    assert main(["teach", "--base", "nowhere", "--data", data, "--out", str(tmp_path / "o"), "--config", CONFIG]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and message in err and err.count("\n") == 1


def test_other_errors_name_the_flag_or_key(tmp_path, capsys, saved_base):
    data, base = _write(tmp_path / "f.jsonl", FACTS), str(saved_base("qwen2"))
    capsys.readouterr()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [(["--out", str(tmp_path / "full")], "error: --out: "),
             (["--eval-aliases", str(tmp_path / "none.jsonl")], "error: --eval-aliases: file not found"),
             (["--background", "0"], "error: --background: must be a positive integer"),
             (["--set", "memory.num_tokens=0"], "error: memory.num_tokens: must be a positive integer"),
             (["--config", str(tmp_path / "no.yaml")], "config file not found")]
    for extra, message in cases:
        args = ["teach", "--base", base, "--data", data, "--out", str(tmp_path / "o"),
                "--config", CONFIG, *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "o").exists()  # nothing was written before the errors


def test_train_from_starts_from_the_saved_adapter(tmp_path, saved_base, monkeypatch):
    import torch

    from memory_transformer import load_config
    from memory_transformer.io import save_model, trained_state
    from memory_transformer.teach import train_from
    from memory_transformer.train.trainer import Trainer

    base = saved_base("qwen2")
    raw = {"model": {"pretrained": str(base), "max_seq_len": 32},
           "memory": {"num_tokens": 16, "num_chapters": 1, "top_k": 1, "num_heads": 4, "layers": "last:1"},
           "data": {"num_people": 2}, "training": {"max_steps": 1, "batch_size": 2, "log_with": ["none"]}}
    first = build_model(load_config(raw)).eval()
    with torch.no_grad():
        for p in first.memory.parameters():
            p.normal_()
    save_model(first, tmp_path / "round-1")
    monkeypatch.setattr(Trainer, "train", lambda self: trained_state(self.unwrapped))
    cfg = load_config(raw, [f"training.output_dir={tmp_path / 'round-2'}"])
    started = train_from(cfg, tmp_path / "round-1")
    expected = trained_state(first)
    assert started.keys() == expected.keys() and all(torch.equal(started[k], expected[k]) for k in expected)
    fresh = train_from(load_config(raw, [f"training.output_dir={tmp_path / 'fresh'}"]))
    assert not all(torch.equal(fresh[k], expected[k]) for k in expected)


def test_a_second_round_starts_from_the_first_keeps_its_keys_and_read(tmp_path, saved_base, capsys):
    import torch
    from safetensors.torch import load_file

    base = str(saved_base("qwen2"))
    first, second = tmp_path / "round-1", tmp_path / "round-2"
    assert main(["teach", "--base", base, "--data", _write(tmp_path / "a.jsonl", FACTS), "--out", str(first),
                 "--config", CONFIG, *TINY]) == 0
    later = [{"question": "Where was Lin Rae Okafor born?", "answer": "Lima"}]
    assert main(["teach", "--base", base, "--data", _write(tmp_path / "b.jsonl", later), "--out", str(second),
                 "--from", str(first / "run" / "final"), *LATER]) == 0
    capsys.readouterr()
    one, two = load_model(first / "run" / "final"), load_model(second / "run" / "final")
    assert two.config.training.freeze == ["memory_attention"] and one.config.training.freeze == []
    # keys routing: the second round adds a chapter of the first's size, which only its own keys open
    assert (one.config.memory.num_chapters, one.config.memory.num_tokens) == (1, 64)
    assert (two.config.memory.num_chapters, two.config.memory.num_tokens) == (2, 128)
    s1, s2 = one.memory.scope, two.memory.scope  # the runs of ids (memory.scope_match ngram): first round's, then new
    g1, g2 = len(s1.grams), len(s2.grams)
    assert g2 > g1 > 0 and torch.equal(s2.grams[:g1], s1.grams)
    assert s1.gram_chapters.tolist() == [0] * g1 and s2.gram_chapters.tolist() == [0] * g1 + [1] * (g2 - g1)
    held = {tuple(row) for row in s1.grams.tolist()}
    assert not any(tuple(row) in held for row in s2.grams[g1:].tolist())  # a run the first round holds stays its
    w1, w2 = (load_file(d / "run" / "final" / "adapter_model.safetensors") for d in (first, second))
    attention = [n for n in w1 if ".attn." in n and "router" not in n]
    assert attention and "memory.banks.0.chapters.1" not in w1
    assert all(torch.equal(w1[n], w2[n]) for n in attention)  # the read the first round's slots were written for
    assert torch.equal(w1["memory.banks.0.chapters.0"], w2["memory.banks.0.chapters.0"])  # the first round's slots
    values = w2["memory.banks.0.chapters.1"][:, 32:]  # [key | value] rows; values start at 0
    assert values.shape == (64, 32) and values.abs().sum() > 0  # the new chapter learned the new facts


def test_from_takes_the_earlier_settings_and_names_its_errors(tmp_path, saved_base, capsys):
    data, base = _write(tmp_path / "f.jsonl", FACTS), str(saved_base("qwen2"))
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    cases = [(["--from", str(tmp_path / "empty")], f"error: --from: {tmp_path / 'empty'} is not a saved adapter "
                                                  "(no config.yaml): pass the run/final folder of an earlier teach"),
             (["--from", str(tmp_path / "empty"), "--config", CONFIG],
              "error: --config: --from continues with the settings of the adapter it names; change them with --set"),
             (["--from", str(tmp_path / "empty"), "--set", "memory.num_tokens=64"],
              "error: --set: memory.num_tokens comes from the adapter --from names (its chapters are kept, and keys "
              "routing adds one of the same size): leave it out")]
    for extra, message in cases:
        assert main(["teach", "--base", base, "--data", data, "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "o").exists()
