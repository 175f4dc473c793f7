"""Data: synthetic facts, file and hub sources, packing, chat loss masks, and the errors users see."""

import json
import math
import random

import datasets
import pytest
import torch

from memory_transformer.config import ConfigError, DataConfig, load_config
from memory_transformer.data import build_data, chat_example, pack_documents
from memory_transformer.data import sources
from memory_transformer.data.synthetic_facts import (
    BIO_TEMPLATES,
    draw_passes,
    HELD_OUT_BIO,
    HELD_OUT_QUESTIONS,
    SyntheticFacts,
)
from memory_transformer.data.tokenizer import ByteTokenizer

# ---------------------------------------------------------------------------------------------------------
# Synthetic facts


def test_same_seed_same_corpus_other_seed_differs():
    a, b, c = SyntheticFacts(40, seed=3), SyntheticFacts(40, seed=3), SyntheticFacts(40, seed=4)
    assert a.people == b.people
    assert a.train_documents(2, 50) == b.train_documents(2, 50)
    assert a.eval_documents(10) == b.eval_documents(10)
    assert a.people != c.people
    assert a.train_documents(0, 50) != a.train_documents(1, 50)


def test_thousands_of_unique_names():
    facts = SyntheticFacts(4000, seed=0)
    assert len({p.name for p in facts.people}) == 4000
    with pytest.raises(ValueError, match="num_people must be between 1 and 4800, got 4801"):
        SyntheticFacts(4801)


def test_knowledge_bits_exact():
    facts = SyntheticFacts(7, seed=0)
    per_person = math.log2(28 * 12 * 100) + math.log2(106) + math.log2(50) + math.log2(40) + math.log2(60) + math.log2(106)
    assert facts.knowledge_bits == pytest.approx(7 * per_person, abs=1e-9)
    assert facts.bits_per_attribute["major"] == pytest.approx(math.log2(40), abs=1e-12)
    assert facts.attributes == ("birth_date", "birth_city", "university", "major", "employer", "employer_city")


def _fixed_parts(template: str) -> list[str]:
    parts = template.replace("{value}", "{name}").split("{name}")
    return [p.strip(" .?") for p in parts if p.strip(" .?")]


def test_held_out_templates_never_in_training():
    facts = SyntheticFacts(30, seed=1)
    docs = facts.train_documents(0, 400)
    for template in [*HELD_OUT_BIO.values(), *HELD_OUT_QUESTIONS.values()]:
        opening = _fixed_parts(template)[0]  # "The birthplace of", "Where was", ...
        assert not any(opening in d for d in docs), opening
        for p in facts.people:
            cue = template.split(" {value}")[0].format(name=p.name)
            assert not any(cue in d for d in docs), cue
    used = sum(any(_fixed_parts(t)[0] in d for d in docs) for ts in BIO_TEMPLATES.values() for t in ts)
    assert used == 24  # every training paraphrase does appear


def test_qa_fraction_and_balanced_exposures():
    facts = SyntheticFacts(25, seed=0, qa_fraction=0.25)
    docs = facts.train_documents(0, 100)
    assert sum(" Answer: " in d for d in docs) == 25
    for p in facts.people:  # 100 docs = 4 whole passes over 25 people
        assert sum(p.name in d for d in docs) == 4


def test_biography_has_every_fact_and_qa_doc_every_answer():
    facts = SyntheticFacts(3, seed=0)
    p = facts.people[0]
    bio = facts.biography(p, random.Random(0))
    assert bio.count(".") >= 6 and bio.startswith(p.name)
    for a in facts.attributes:
        assert getattr(p, a) in bio
    qa = facts.qa_document(p, random.Random(0)).split("\n")
    assert len(qa) == 6
    assert f"What is the birth city of {p.name}? Answer: {p.birth_city}." in qa


def test_recall_items_prompts_and_answers():
    facts = SyntheticFacts(4, seed=0)
    p = facts.people[1]
    qa = {(i.person, i.attribute): i for i in facts.recall_items("qa")}
    item = qa[(p.name, "birth_city")]
    assert (item.prompt, item.answer) == (f"What is the birth city of {p.name}? Answer:", f" {p.birth_city}")
    bio = {(i.person, i.attribute): i for i in facts.recall_items("bio")}
    assert bio[(p.name, "birth_city")].prompt == f"{p.name} was born in"
    held = {(i.person, i.attribute): i for i in facts.recall_items("bio", held_out=True)}
    assert held[(p.name, "birth_city")].prompt == f"The birthplace of {p.name} is"
    held_qa = {(i.person, i.attribute): i for i in facts.recall_items("qa", held_out=True)}
    assert held_qa[(p.name, "birth_city")].prompt == f"Where was {p.name} born? Answer:"
    assert len(facts.recall_items("qa")) == 24
    assert sum(i.bits for i in facts.recall_items("bio")) == pytest.approx(facts.knowledge_bits, abs=1e-9)
    with pytest.raises(ValueError, match="kind must be 'qa' or 'bio', got 'x'"):
        facts.recall_items("x")


def test_people_split_halves():
    facts = SyntheticFacts(10, seed=0)
    first, second = facts.people_split(0.5)
    assert first.people + second.people == facts.people
    assert len(first.people) == 5 and len(second.people) == 5
    assert first.knowledge_bits + second.knowledge_bits == pytest.approx(facts.knowledge_bits, abs=1e-9)
    names = {p.name for p in second.people}
    assert all(any(n in d for n in names) for d in second.train_documents(0, 20))
    assert not any(p.name in d for p in first.people for d in second.train_documents(0, 20))
    assert len(first.recall_items("qa")) == 30


# ---------------------------------------------------------------------------------------------------------
# Packing and build_data (pretraining)


def test_pack_reproduces_token_stream():
    tok = ByteTokenizer()
    ex = pack_documents(["abc", "de"], tok, 3)
    assert ex["input_ids"].tolist() == [[97, 98, 99], [258, 100, 101]]  # trailing eos dropped
    assert torch.equal(ex["labels"], ex["input_ids"]) and ex["attention_mask"].sum() == 6
    padded = pack_documents(["abc", "de"], tok, 3, pad_remainder=True)
    assert padded["input_ids"][-1].tolist() == [258, 256, 256]
    assert padded["labels"][-1].tolist() == [258, -100, -100]
    assert padded["attention_mask"][-1].tolist() == [1, 0, 0]


def _cfg(**data):
    model = data.pop("model", {})
    return load_config({"data": data, "model": {"max_seq_len": 64, **model}, "training": {"max_steps": 1}})


def test_build_data_synthetic_pretraining_is_packed_and_deterministic():
    tok = ByteTokenizer()
    bundle = build_data(_cfg(num_people=10, seed=5), tok)
    docs = bundle.facts.train_documents(0, 40)  # default: 4 documents per person
    stream = [t for d in docs for t in [*tok.encode(d), tok.eos_token_id]]
    ex = bundle.train_examples(0)
    assert ex["input_ids"].shape == (len(stream) // 64, 64)
    assert ex["labels"].shape == ex["attention_mask"].shape == ex["input_ids"].shape
    unshuffled = torch.tensor(stream[: len(stream) // 64 * 64]).view(-1, 64)
    assert sorted(map(tuple, ex["input_ids"].tolist())) == sorted(map(tuple, unshuffled.tolist()))
    assert not torch.equal(ex["input_ids"], unshuffled)  # shuffled within the epoch
    again = build_data(_cfg(num_people=10, seed=5), tok).train_examples(0)
    assert torch.equal(again["input_ids"], ex["input_ids"])
    assert bundle.train_examples(1)["input_ids"][0].tolist() != ex["input_ids"][0].tolist()  # fresh epoch
    eval_stream = sum(len(d) + 1 for d in bundle.facts.eval_documents(10))
    assert bundle.eval_examples["attention_mask"].sum() == eval_stream


def test_replay_mixes_old_people_into_the_training_documents(monkeypatch):
    import memory_transformer.data as data_module

    packed = []
    real_pack = data_module.pack_documents
    def pack(docs, *args, **kwargs):
        packed.append(docs)
        return real_pack(docs, *args, **kwargs)

    monkeypatch.setattr(data_module, "pack_documents", pack)
    bundle = build_data(_cfg(num_people=20, people=[10, 20], replay_people=[0, 10], replay_fraction=0.25,
                             samples_per_epoch=40), ByteTokenizer())
    bundle.train_examples(0)
    names = [p.name for p in SyntheticFacts(20, 0).people]
    docs = packed[-1]
    old = sum(any(n in d for n in names[:10]) for d in docs)
    new = sum(any(n in d for n in names[10:]) for d in docs)
    assert (len(docs), old, new) == (40, 10, 30)  # 25% of the 40 documents replay people 0..9
    assert {p.name for p in bundle.facts.people} == set(names[10:])  # recall probes: the new people only


@pytest.mark.parametrize("fraction,match", [
    (1.0, r"data.replay_fraction: must be in \[0, 1\), got 1.0"),
    (0.0, r"data.replay_fraction: 0 replays nothing \(only memory.scope keys uses the samples without training"),
])
def test_replay_fraction_must_be_a_share(fraction, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(num_people=20, replay_people=[0, 10], replay_fraction=fraction)


def test_replay_fraction_zero_with_scope_keys_trains_on_taught_documents_only():
    cfg = load_config({"data": {"num_people": 20, "people": [10, 20], "replay_generated": 6, "replay_fraction": 0.0,
                                "samples_per_epoch": 40}, "memory": {"scope": "keys"},
                       "model": {"pretrained": "x", "max_seq_len": 64}, "training": {"max_steps": 1}})
    bundle = build_data(cfg, ByteTokenizer(), [f"sample {i}" for i in range(6)])
    ex = bundle.train_examples(0)
    assert int(ex["replay"].sum()) == 0  # the samples are background for the keys only
    text = ByteTokenizer().decode(ex["input_ids"].flatten().tolist())
    assert "sample" not in text


def test_prose_fraction_mixes_train_split_paragraphs_only():
    from memory_transformer.data.prose import prose_pool

    bundle = build_data(_cfg(num_people=10, prose_fraction=0.25, samples_per_epoch=40, model={"max_seq_len": 256}),
                        ByteTokenizer())
    text = ByteTokenizer().decode(bundle.train_examples(0)["input_ids"].flatten().tolist())
    train, held_out = prose_pool("train"), prose_pool("eval")
    assert not set(train) & set(held_out) and len(held_out) >= 32
    assert sum(p[:60] in text for p in train) >= 5  # ~10 paragraphs drawn, some cut at block borders
    assert not any(p[:60] in text for p in held_out)
    with pytest.raises(ConfigError, match=r"data.prose_fraction: mixes prose into synthetic_facts pretraining"):
        _cfg(num_people=10, prose_fraction=0.2, mode="instruction_finetuning")


def test_samples_per_epoch():
    bundle = build_data(_cfg(num_people=10, samples_per_epoch=7, model={"max_seq_len": 16}), ByteTokenizer())
    tokens = sum(len(d) + 1 for d in bundle.facts.train_documents(0, 7))
    assert bundle.train_examples(0)["input_ids"].shape == (tokens // 16, 16)


def test_text_file_split_and_eval_fraction(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"document number {i:02d} " * 3 + "\n\n" for i in range(20)))
    bundle = build_data(_cfg(source=str(path), eval_fraction=0.1, model={"max_seq_len": 32}), ByteTokenizer())
    assert bundle.facts is None
    eval_text = ByteTokenizer().decode(bundle.eval_examples["input_ids"].flatten())
    assert eval_text == "document number 18 " * 3 + "document number 19 " * 3  # last 10%, pads skipped
    n_train_tokens = 18 * (len("document number 00 " * 3) + 1)
    assert bundle.train_examples(0)["input_ids"].shape == (n_train_tokens // 32, 32)


def test_jsonl_and_parquet_sources(tmp_path):
    rows = [{"id": i, "body": f"text {i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.parquet"):
        data = DataConfig(source=str(tmp_path / name), text_field="body", max_samples=4)
        assert sources.load_documents(data) == ["text 0", "text 1", "text 2", "text 3"]
    data = DataConfig(source="file", path=str(tmp_path / "d.jsonl"), text_field="body")
    assert len(sources.load_documents(data)) == 5


# ---------------------------------------------------------------------------------------------------------
# Errors users see, exactly


def test_error_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError) as e:
        build_data(_cfg(source=str(path)), ByteTokenizer())
    assert str(e.value) == f"data.path: file not found: {path}"


def test_error_unknown_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": "x", "b": 1}\n')
    with pytest.raises(ConfigError) as e:
        build_data(_cfg(source=str(path), text_field="foo"), ByteTokenizer())
    assert str(e.value) == f"data.text_field: field 'foo' not in {path}; fields: a, b"


@pytest.mark.parametrize("content", ["", '{"text": ""}\n'])
def test_error_empty_dataset(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        build_data(_cfg(source=str(path)), ByteTokenizer())
    assert str(e.value) == f"data.path: {path} has no documents"


def test_error_unsupported_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(ConfigError) as e:
        build_data(_cfg(source=str(path)), ByteTokenizer())
    assert str(e.value) == f"data.path: unsupported file type '.csv' for {path}; allowed: .txt, .jsonl, .json, .parquet"


def test_error_documents_shorter_than_one_block(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hi\n")
    with pytest.raises(ConfigError) as e:
        build_data(_cfg(source=str(path), eval_fraction=0.0), ByteTokenizer())
    assert str(e.value) == "model.max_seq_len: the training documents do not fill one block of 64 tokens"


# ---------------------------------------------------------------------------------------------------------
# Hugging Face hub source: retry/backoff and cache (no network: the loader is a fake)

ROWS = [{"text": f"row {i}", "n": i} for i in range(6)]


class FlakyLoader:
    def __init__(self, failures: int):
        self.failures, self.calls = failures, []

    def __call__(self, name, config, split, streaming):
        self.calls.append((name, config, split, streaming))
        if len(self.calls) <= self.failures:
            raise ConnectionError("connection reset")
        return datasets.Dataset.from_list(ROWS).to_iterable_dataset()


def test_hf_retry_with_growing_delays_then_cache(tmp_path):
    data = DataConfig(source="hf:org/set", cache_dir=str(tmp_path / "cache"), max_samples=4)
    loader, sleeps = FlakyLoader(failures=2), []
    records = sources.load_hf_records(data, loader=loader, sleep=sleeps.append)
    assert records == ROWS[:4]
    assert sleeps == [1.0, 2.0]
    assert loader.calls == [("org/set", None, "train", True)] * 3
    cache = tmp_path / "cache" / "org_set--default--train--n4.jsonl"
    assert [json.loads(line) for line in cache.read_text().splitlines()] == ROWS[:4]
    assert list((tmp_path / "cache").iterdir()) == [cache]  # no temporary file left behind
    never = FlakyLoader(failures=99)
    assert sources.load_hf_records(data, loader=never, sleep=sleeps.append) == ROWS[:4]
    assert never.calls == []


def test_hf_gives_up_after_attempts():
    sleeps = []
    with pytest.raises(ConnectionError, match="hf:x: still failing after 3 attempts: connection reset"):
        sources.load_hf_records(DataConfig(source="hf:x"), loader=FlakyLoader(9), sleep=sleeps.append, attempts=3)
    assert sleeps == [1.0, 2.0]


def test_hf_unknown_dataset_is_a_config_error():
    def missing(*args, **kwargs):
        raise FileNotFoundError("no such dataset")

    with pytest.raises(ConfigError) as e:
        sources.load_hf_records(DataConfig(source="hf:nope"), loader=missing, sleep=lambda s: None)
    assert str(e.value) == "data.source: dataset not found: hf:nope"


def test_build_data_from_hf_source(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", FlakyLoader(0))
    bundle = build_data(_cfg(source="hf:org/set", eval_fraction=0.0, model={"max_seq_len": 8}), ByteTokenizer())
    assert bundle.train_examples(0)["input_ids"].shape == (36 // 8, 8)  # 6 docs of 5 bytes + eos


def test_hf_unknown_field(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", FlakyLoader(0))
    with pytest.raises(ConfigError) as e:
        build_data(_cfg(source="hf:org/set", text_field="body"), ByteTokenizer())
    assert str(e.value) == "data.text_field: field 'body' not in hf:org/set; fields: text, n"


# ---------------------------------------------------------------------------------------------------------
# Instruction fine-tuning: loss only on assistant tokens

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = "[PAD] [UNK] </s> <user> <assistant> hi there hello what is 4".split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path, AutoTokenizer.from_pretrained(path)


CHAT = [
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "what is"},
    {"role": "assistant", "content": "4"},
]


def test_chat_loss_mask_exact(chat_tokenizer):
    _, tok = chat_tokenizer
    ex = chat_example(CHAT, tok, 16)
    # <user> hi there </s> <assistant> hello </s> <user> what is </s> <assistant> 4 </s> [PAD] [PAD]
    assert ex["input_ids"].tolist() == [3, 5, 6, 2, 4, 7, 2, 3, 8, 9, 2, 4, 10, 2, 0, 0]
    assert ex["labels"].tolist() == [-100] * 5 + [7, 2] + [-100] * 5 + [10, 2, -100, -100]
    assert ex["attention_mask"].tolist() == [1] * 14 + [0, 0]
    short = chat_example(CHAT, tok, 6)  # truncated
    assert short["input_ids"].tolist() == [3, 5, 6, 2, 4, 7] and short["labels"].tolist()[-1] == 7


def test_build_data_instruction_finetuning(tmp_path, chat_tokenizer):
    path, tok = chat_tokenizer
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(4)))
    cfg = _cfg(source=str(tmp_path / "chats.jsonl"), mode="instruction_finetuning", eval_fraction=0.25,
               model={"tokenizer": str(path), "max_seq_len": 16})
    bundle = build_data(cfg, tok)
    assert bundle.train_examples(0)["labels"].shape == (3, 16)
    assert bundle.eval_examples["input_ids"].shape == (1, 16)
    assert (bundle.train_examples(0)["labels"] != -100).sum() == 3 * 4


def test_synthetic_instruction_finetuning(chat_tokenizer):
    path, tok = chat_tokenizer
    cfg = _cfg(num_people=3, mode="instruction_finetuning", model={"tokenizer": str(path), "max_seq_len": 128})
    bundle = build_data(cfg, tok)
    assert bundle.train_examples(0)["input_ids"].shape == (12, 128)
    assert bundle.eval_examples["input_ids"].shape == (3, 128)


def test_generated_replay_is_the_replay_fraction_of_each_epoch(monkeypatch):
    import memory_transformer.data as data_module

    packed = []
    real_pack = data_module.pack_documents
    monkeypatch.setattr(data_module, "pack_documents", lambda docs, *a, **k: packed.append(docs) or real_pack(docs, *a, **k))
    pool = [f"sample {i}." for i in range(6)]
    cfg = _cfg(num_people=20, people=[10, 20], replay_generated=6, replay_fraction=0.25, samples_per_epoch=40,
               model={"pretrained": "some/base"})
    bundle = build_data(cfg, ByteTokenizer(), pool)
    bundle.train_examples(0)
    epoch0 = [d for d in packed[-1] if d in pool]
    assert (len(packed[-1]), len(epoch0)) == (40, 10)  # 25% of 40 documents
    assert sorted(epoch0.count(d) for d in pool) == [1, 1, 2, 2, 2, 2]  # the pool once, then 4 of a fresh pass
    bundle.train_examples(1)
    assert [d for d in packed[-1] if d in pool] != epoch0  # a fresh draw each epoch


def test_generated_replay_joins_file_documents(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"document {i:02d}\n\n" for i in range(30)))
    cfg = _cfg(source=str(path), eval_fraction=0.0, replay_generated=3, replay_fraction=0.25,
               model={"max_seq_len": 8, "pretrained": "some/base"})
    bundle = build_data(cfg, ByteTokenizer(), ["abc", "def", "ghi"])
    text = ByteTokenizer().decode(bundle.train_examples(0)["input_ids"].flatten(), skip_special_tokens=False)
    counts = [text.count(s) for s in ("abc", "def", "ghi")]
    assert sum(counts) == 10 and max(counts) - min(counts) <= 1  # 30 documents + 10 replayed = 25%


@pytest.mark.parametrize("overrides, message", [
    ({"replay_generated": 0}, "data.replay_generated: must be a positive integer, got 0"),
    ({"replay_generated": 8, "replay_people": [0, 10]},
     "data.replay_generated: replays samples of the model; data.replay_people replays known documents: "
     "set one of them, not both"),
    ({"replay_generated": 8, "model": {"pretrained": None}},
     "data.replay_generated: needs model.pretrained: samples of a randomly initialised model hold no knowledge "
     "to keep"),
    ({"replay_generated": 8, "mode": "instruction_finetuning", "model": {"tokenizer": "some/tokenizer"}},
     "data.replay_generated: supports data.mode pretraining only, got instruction_finetuning"),
    ({"replay_loss": "distill"},
     "data.replay_loss: distill needs replayed documents: set data.replay_people or data.replay_generated"),
    ({"replay_loss": "distill", "replay_people": [0, 10], "model": {"freeze_base": False}},
     "data.replay_loss: distill learns replayed tokens from the frozen pretrained model: needs model.pretrained "
     "with a frozen base (model.freeze_base not false)"),
    ({"replay_loss": "distill", "replay_people": [0, 10], "mode": "instruction_finetuning",
      "model": {"tokenizer": "some/tokenizer"}},
     "data.replay_loss: distill supports data.mode pretraining only, got instruction_finetuning"),
    ({"replay_people": [0, 10], "source": "corpus.txt"},
     "data.replay_people: needs data.source synthetic_facts (the people are its own), got corpus.txt; to replay "
     "without old documents use data.replay_generated"),
    ({"replay_generated": 8, "replay_temperature": 0.0}, "data.replay_temperature: must be > 0, got 0.0"),
    ({"replay_loss": "kl"}, None),
])
def test_replay_errors(overrides, message):
    model = {"pretrained": "some/base", **overrides.pop("model", {})}
    with pytest.raises(ConfigError) as e:
        _cfg(num_people=20, model=model, **overrides)
    assert str(e.value) == (message or "data.replay_loss: got 'kl'; allowed: lm | distill")


def test_pack_documents_marks_replayed_tokens():
    tok = ByteTokenizer()
    ex = pack_documents(["abc", "de", "fgh"], tok, 4, replay_from=2)  # stream: abc|de|fgh| = 10 tokens
    assert ex["replay"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]  # "fgh" starts at stream position 7
    assert "replay" not in pack_documents(["abc"], tok, 2)
    padded = pack_documents(["abc", "de", "fgh"], tok, 4, pad_remainder=True, replay_from=2)
    assert padded["replay"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]]  # the tail "gh|" + a pad


def test_distilled_replay_marks_the_replayed_share():
    pool = [f"sample {i}." for i in range(6)]
    cfg = _cfg(num_people=20, people=[10, 20], replay_generated=6, replay_fraction=0.25, replay_loss="distill",
               samples_per_epoch=40, model={"pretrained": "some/base"})
    bundle = build_data(cfg, ByteTokenizer(), pool)
    ex = bundle.train_examples(0)
    own = sum(len(d) + 1 for d in bundle.facts.train_documents(0, 30))  # 30 own documents come first
    replayed = sum(len(d) + 1 for d in draw_passes(pool, 10, random.Random("0:replay:0")))
    assert ex["replay"].sum() == (own + replayed) // 64 * 64 - own  # every replayed token of the full blocks
    assert ex["replay"].shape == ex["input_ids"].shape
