"""The confirmation corpus, alias and held-out probes, locality (KL to the base, stdlib prose) and teaching rounds."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from memory_transformer import build_model
from memory_transformer.data.synthetic_facts import (
    ALIAS_FORMS, ATTRIBUTES, CORPORA, FIRST_NAMES, LAST_NAMES, QUESTIONS, Person, RecallItem, SyntheticFacts,
)
from memory_transformer.knowledge import (
    alias_recall, biographies, kept_share, kl_to_base, person_recall, round_ranges, scope_coverage, stdlib_prose,
)
from memory_transformer.recall import prompt_ids, recall


def test_demo_corpus_is_unchanged_by_the_corpus_option():
    facts = SyntheticFacts(40, seed=0)
    assert facts.people[0] == Person("Vera Pembroke", "22 June 1933", "Paris", "Lakeshore University",
                                     "Electrical Engineering", "Cascade Labs", "Moscow")
    text = repr([facts.train_documents(e, 160) for e in range(2)] + [facts.recall_items("qa", True),
                                                                     facts.recall_items("bio")])
    assert hashlib.md5(text.encode()).hexdigest() == "d7a3e30f383e42b50a49c1ba87453be6"  # as before the option


def test_confirm_corpus_has_other_names_templates_and_values_and_is_deterministic():
    a, b = SyntheticFacts(30, seed=5, corpus="confirm"), SyntheticFacts(30, seed=5, corpus="confirm")
    assert a.people == b.people and a.train_documents(1, 40) == b.train_documents(1, 40)
    assert a.people != SyntheticFacts(30, seed=6, corpus="confirm").people
    demo, confirm = CORPORA["demo"], CORPORA["confirm"]
    for p in a.people:
        first, middle, last = p.name.split()
        assert first not in FIRST_NAMES and last not in LAST_NAMES and middle in confirm.middle
        assert p.birth_city not in CORPORA["demo"].pools["birth_city"] and p.birth_date.count(",") == 1
    assert not set(confirm.questions.values()) & set(demo.questions.values())
    assert not {t for ts in confirm.bio.values() for t in ts} & {t for ts in demo.bio.values() for t in ts}
    held_out = [*confirm.held_out_questions.values(), *confirm.held_out_bio.values()]
    docs = " ".join(a.train_documents(e, 120)[i] for e in range(3) for i in range(120))
    for template in held_out:  # the held-out phrasings are never trained
        assert template.split("{name}")[0] not in docs or template.startswith("{name}")
    qa = a.recall_items("qa")
    assert len(qa) == 30 * 6 and qa[0].prompt == confirm.questions["birth_date"].format(name=a.people[0].name) + " Answer:"
    assert a.bits_per_attribute["university"] == pytest.approx(torch.tensor(24.0).log2().item())
    with pytest.raises(ValueError, match="corpus must be one of"):
        SyntheticFacts(3, corpus="other")


def _facts_with(names: list[str]) -> SyntheticFacts:
    facts = SyntheticFacts(len(names), seed=0, corpus="confirm")
    facts.people = facts.all_people = [dataclasses.replace(p, name=n) for p, n in zip(facts.people, names)]
    return facts


def test_aliases_are_the_three_forms_and_skip_ambiguous_ones():
    facts = _facts_with(["Ada Lee Moss", "Bea Fay Moss", "Ada Kit Moss", "Cal Jay Rook"])
    ada, bea, _, cal = facts.people
    # "A. Moss" and "Ada Moss" are shared by two people, "Moss" by three: Ada Lee Moss has no alias left
    assert facts.aliases(ada) == {}
    assert facts.aliases(bea) == {"initial_last": "B. Moss", "no_middle": "Bea Moss"}
    assert facts.aliases(cal) == {"initial_last": "C. Rook", "last_only": "Rook", "no_middle": "Cal Rook"}
    items = facts.alias_items("last_only")
    assert [i.prompt for i in items][:1] == ["When was Rook born? Answer:"] and len(items) == 6
    assert all(i.person == "Cal Jay Rook" and i.answer == " " + getattr(cal, i.attribute) for i in items)
    subset = facts.subset(3)  # uniqueness is over the whole corpus, not the subset
    assert subset.aliases(cal)["last_only"] == "Rook" and subset.alias_items("initial_last")[0].person == cal.name
    assert [i.prompt for i in facts.alias_items("no_middle", held_out=True)][0] == \
        "What day marks the birth of Bea Moss? Answer:"


def test_alias_questions_never_occur_in_training_documents():
    facts = SyntheticFacts(40, seed=1, corpus="confirm")
    docs = "\n".join(d for e in range(3) for d in facts.train_documents(e, 160))
    for form in ALIAS_FORMS:
        items = facts.alias_items(form)
        assert items, form  # every form occurs on this corpus
        for item in items:
            assert item.prompt.removesuffix(" Answer:") not in docs
    demo = SyntheticFacts(40, seed=1)
    assert demo.alias_items("no_middle") == [] and demo.alias_items("initial_last")
    assert demo.alias_items("initial_last")[0].prompt.startswith(QUESTIONS["birth_date"].split("{")[0])


def test_stdlib_prose_is_deterministic_real_prose():
    a, b = stdlib_prose(12, seed=0), stdlib_prose(12, seed=0)
    assert a == b and len(set(a)) == 12 and a != stdlib_prose(12, seed=1)
    for para in a:
        assert 200 <= len(para) <= 1200 and para.isascii() and ">>>" not in para and "\n" not in para
        assert sum(c.isalpha() or c == " " for c in para) >= 0.85 * len(para)
    with pytest.raises(ValueError, match="prose paragraphs"):
        stdlib_prose(10**6)


def test_biographies_are_about_the_given_people_only():
    old = SyntheticFacts(10, seed=0).subset(0, 4)
    bios = biographies(old)
    assert len(bios) == 4 and all(p.name in bio for p, bio in zip(old.people, bios))
    assert bios == biographies(old) and bios != biographies(old, seed=1)


def test_kl_to_base_is_zero_for_an_unchanged_model_and_matches_the_definition():
    model = build_model(tiny_config(memory={"num_chapters": 1, "top_k": 1, "wo_init": "identity"})).eval()
    tok, texts = model.tokenizer, ["Ada Moss was born in Oslo.", "A short one.", "x"]
    assert kl_to_base(model, tok, texts, max_tokens=16) == 0.0  # values start at 0: the read adds exactly 0
    with torch.no_grad():
        for p in model.memory.banks.parameters():
            torch.nn.init.normal_(p, std=1.0)
    got = kl_to_base(model, tok, texts, max_tokens=16, batch_size=2)
    total, count = 0.0, 0
    for t in texts:  # one text at a time, no padding: the definition
        ids = torch.tensor([tok.encode(t)[:16]])
        with torch.no_grad():
            logq = F.log_softmax(model(ids).logits, -1)
            with model.adapters_disabled():
                logp = F.log_softmax(model(ids).logits, -1)
        total += F.kl_div(logq, logp, log_target=True, reduction="sum").item()
        count += ids.shape[1]
    assert got > 1e-3 and got == pytest.approx(total / count, rel=1e-4)


def test_alias_recall_reports_every_form_and_none_where_a_form_does_not_exist():
    model = build_model(tiny_config(memory={"enabled": False})).eval()
    out = alias_recall(model, model.tokenizer, SyntheticFacts(3, seed=0))
    assert set(out) == set(ALIAS_FORMS) and out["no_middle"] is None and out["initial_last"] == 0.0


def test_round_ranges_and_kept_share():
    assert round_ranges(20, 40, 5) == [[20, 24], [24, 28], [28, 32], [32, 36], [36, 40]]
    assert [b - a for a, b in round_ranges(0, 7, 3)] == [2, 2, 3]
    with pytest.raises(ValueError, match="rounds"):
        round_ranges(0, 3, 4)
    assert kept_share(0.45, 0.9) == pytest.approx(0.5) and kept_share(0.1, 0.0) != kept_share(0.1, 0.0)  # nan


def test_scope_coverage_is_the_share_of_prompts_whose_last_position_is_in_scope():
    memory = {"scope": "keys", "num_chapters": 1, "top_k": 1, "layers": "last:1"}
    model = build_model(tiny_config(memory=memory)).eval()
    tok = model.tokenizer
    norm = model.base.model.layers[model.memory.layer_ids[0]].post_attention_layernorm
    found = []
    handle = norm.register_forward_pre_hook(lambda m, args: found.append(args[0]))
    with torch.no_grad(), model.adapters_disabled():
        model(torch.tensor([prompt_ids(tok, "Ada Moss was")]))  # as scored: after eos
    handle.remove()
    scope = model.memory.scope
    scope.keys, scope.thresholds = F.normalize(found[0][0, 5:6], dim=-1), torch.tensor([0.9999])  # the state at "M"
    items = [RecallItem(p, " x", "Ada", "city", 1.0) for p in ("Ada Moss was", "Bob", "Ada Moss", "Cy")]
    # "Ada Moss was" opens at "M" (position 5: eos comes first) and stays open, so does "Ada Moss" (left-padded in
    # its batch); the others never open
    assert scope_coverage(model, tok, items, batch_size=3) == 0.5
    assert scope_coverage(build_model(tiny_config(memory={"enabled": False})), tok, items) is None


def test_person_recall_counts_answers_that_are_any_fact_of_the_person_asked():
    from test_recall import TOK, LookupModel

    facts = SyntheticFacts(3, seed=0)
    ada, bo = facts.people[0], facts.people[1]
    items = facts.recall_items("qa", held_out=True)[:4]  # Ada's held-out birth date, birth city, university, major
    assert {it.person for it in items} == {ada.name}
    others = {getattr(ada, a) for a in ATTRIBUTES}
    stranger = next(getattr(bo, a) for a in ATTRIBUTES if getattr(bo, a) not in others)
    model = LookupModel({items[0].prompt: " " + ada.birth_date,  # right
                         items[1].prompt: " " + ada.employer,  # her employer, asked her birth city: hers
                         items[2].prompt: " " + stranger})  # someone else's: not hers; items[3]: "#", nobody's
    assert person_recall(model, TOK, facts, items) == 0.5
    assert recall(model, TOK, items)["correct"] == 1
    assert person_recall(model, TOK, facts, []) is None
