"""bench/scope.py's pure helpers: the compared methods, chapters per size and the goal table's layout."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

import scope  # noqa: E402


def test_methods_and_chapters():
    m = scope.methods(32)
    assert list(m) == ["memory", "keys", "subject", "lora", "lora-gated"]
    assert "memory.scope=keys" in m["keys"] and "data.replay_fraction=0.0" in m["keys"]
    assert "memory.routing=sequence" in m["memory"] and "memory.num_chapters=32" in m["subject"]
    assert "lora.gate=subject" in m["lora-gated"]
    assert [scope.subject_chapters(n, 1024) for n in (1, 20, 100, 1000)] == [1, 32, 128, 128]
    assert list(scope.methods(32, ["lora", "keys"])) == ["lora", "keys"]
    with pytest.raises(ValueError, match="--methods: unknown gate; choose from memory, keys, subject, lora, lora-gated"):
        scope.methods(32, ["keys", "gate"])


def test_a_variant_is_the_keys_read_with_its_overrides_beside_the_methods():
    KEYS = scope.KEYS
    m = scope.methods(32, ["keys"], [["wide", "memory.slot_top_k=64"], ["narrow", "memory.slot_top_k=8"]])
    assert m == {"keys": KEYS, "wide": [*KEYS, "memory.slot_top_k=64"], "narrow": [*KEYS, "memory.slot_top_k=8"]}
    with pytest.raises(ValueError, match=r"--variant: subject is the name of a method; name the variant otherwise"):
        scope.methods(32, ["keys"], [["subject", "memory.slot_top_k=64"]])


def test_table_has_every_goal_row_and_dashes_where_a_measure_does_not_exist():
    args = Namespace(sizes=[20, 100], rounds=5, corpus="demo", old=20)
    keys = [k for k, _, _ in scope.labels(args)]
    row = {k: 0.5 for k in keys} | {"alias_no_middle": None}
    text = scope.table([{"memory": row, "lora": row}, {"memory": row, "lora": row}], args)
    lines = text.splitlines()
    assert len(lines) == 3 + len(keys) == 3 + 15
    assert "| new-fact QA recall, 100 new people | 50.0% ± 0.0% | 50.0% ± 0.0% |" in lines
    assert "| alias recall: no_middle | - | - |" in lines and "5 rounds: recall" in text
    short = Namespace(sizes=[20], rounds=1, corpus="confirm", old=20)
    assert [k for k, _, _ in scope.labels(short)] == [k for k in keys if k != "recall_new_2" and "rounds" not in k]


def test_the_second_size_gets_the_same_steps_per_person():
    args = Namespace(sizes=[20, 100], old=20, corpus="demo", base_config="configs/demo_adapter_base.yaml",
                     config="configs/demo_adapter.yaml", base_set=[], set=[], base_prose=0.2, base_steps=1000)
    assert scope._configs(args, 0, 20)[1].training.max_steps == 200
    base, teach = scope._configs(args, 0, 100)
    assert teach.training.max_steps == 1000 and teach.data.people == [20, 120]
    assert base.data.prose_fraction == 0.2 and base.data.people == [0, 20] and base.training.max_steps == 1000


def test_the_base_column_holds_its_own_held_out_figures_only():
    args = Namespace(sizes=[20], rounds=1, corpus="demo", old=20)
    keys = [k for k, _, _ in scope.labels(args)]
    base = {"recall_new_heldout": 0.125, "heldout_person": 0.75}
    text = scope.table([{"keys": {k: 0.5 for k in keys}, "base": base}], args)
    lines = text.splitlines()
    assert lines[0].endswith("columns: keys, base; base: its own (old) people's facts in the held-out phrasings")
    assert "| held-out question phrasing | 50.0% | 12.5% |" in lines
    assert "| held-out questions answered with a fact of the person asked (any attribute) | 50.0% | 75.0% |" in lines
    assert "| old facts kept (share of the base's) | 50.0% | - |" in lines


def test_step_times_measure_every_method_on_the_same_batch(tmp_path, saved_base):
    from conftest import tiny_config
    from memory_transformer import build_model
    from memory_transformer.data.synthetic_facts import SyntheticFacts

    base = str(saved_base("llama"))
    model = {"pretrained": base, "max_seq_len": 64}
    for name, section in (("keys", {"memory": {"routing": "sequence", "num_chapters": 1, "top_k": 1}}),
                          ("lora", {"memory": {"enabled": False}, "lora": {"enabled": True, "r": 2}})):
        cfg = tiny_config("llama", model=model, **section)
        build_model(cfg, seed=0).save_pretrained(tmp_path / name / "final")
    teach = tiny_config("llama", model=model, training={"batch_size": 2})
    times = scope.step_times(tmp_path, ["keys", "lora"], SyntheticFacts(4, 0), teach, repeats=3)
    assert list(times) == ["keys", "lora"] and all(t > 0 for t in times.values())


def test_bpe_tokenizer_is_trained_on_the_bases_people_only_and_reused(tmp_path):
    from transformers import AutoTokenizer

    from memory_transformer import load_config
    from memory_transformer.data.synthetic_facts import SyntheticFacts
    from memory_transformer.data.tokenizer import load_tokenizer

    base = load_config("configs/demo_adapter_base.yaml", ["data.num_people=40", "data.people=[0,20]"])
    path = scope.bpe_tokenizer(base, 512, tmp_path / "tok")
    tok = load_tokenizer(str(path))
    assert len(tok) == 512 and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    facts = SyntheticFacts(40, 0)
    doc = facts.subset(20, 40).train_documents(0, 1)[0]
    assert tok.decode(tok(doc)["input_ids"]) == doc  # byte-level: any text round-trips

    def pieces(people):  # tokens per full name, as the name is written in a document (after a space)
        return sum(len(tok(" " + p.name)["input_ids"]) for p in people) / len(people)

    old, new = pieces(facts.subset(0, 20).people), pieces(facts.subset(20, 40).people)
    assert old < new  # the base's own people's names are whole tokens more often than the untaught people's
    before = (path / "tokenizer.json").stat().st_mtime_ns
    assert scope.bpe_tokenizer(base, 512, path) == path and (path / "tokenizer.json").stat().st_mtime_ns == before
    assert AutoTokenizer.from_pretrained(path).vocab_size == 512
