"""Subject routing (`memory.routing: subject`): each token reads the chapter of the last taught subject before it."""

import pytest
import torch

from memory_transformer import ConfigError, build_model, load_config, load_model
from memory_transformer.memory.subjects import SubjectIndex
from memory_transformer.data.tokenizer import load_tokenizer
from memory_transformer.resolve import resolve_config
from conftest import ARCHS, tiny_config

SUBJECTS = ["Ada Abbott", "Bruno Crane", "Ada Abbott Jr", "Cyrus Vance"]
GREEDY = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}


def _encode(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok.encode(text, add_special_tokens=False)])


def test_each_position_reads_the_chapter_of_the_last_subject_mentioned_up_to_it():
    tok = load_tokenizer("bytes")
    index = SubjectIndex(SUBJECTS, tok, num_chapters=2)  # chapters 0, 1, 0, 1
    text = "Who is Bruno Crane? Ask Ada Abbott Jr and Cyrus Vance."
    ids = _encode(tok, text)
    got = index.chapters(ids)[0].tolist()

    def from_end_of(name: str) -> int:  # the position of the mention's last token
        return len(tok.encode(text[: text.index(name) + len(name)], add_special_tokens=False)) - 1

    expected = [-1] * len(got)
    for name, chapter in (("Bruno Crane", 1), ("Ada Abbott", 0), ("Ada Abbott Jr", 0), ("Cyrus Vance", 1)):
        start = from_end_of(name)
        expected[start:] = [chapter] * (len(got) - start)
    assert got == expected
    assert got[: from_end_of("Bruno Crane")] == [-1] * from_end_of("Bruno Crane")  # nothing before any mention


def test_end_of_sequence_resets_and_unknown_subjects_read_nothing():
    tok = load_tokenizer("bytes")
    index = SubjectIndex(SUBJECTS, tok, num_chapters=4)
    first, second = tok.encode("Cyrus Vance works.", add_special_tokens=False), tok.encode("Then Bruno", add_special_tokens=False)
    ids = torch.tensor([first + [tok.eos_token_id] + second])
    got = index.chapters(ids)[0].tolist()
    n = len(first)
    assert got[n - 8: n] == [3] * 8  # " works." reads Cyrus Vance's chapter (index 3)
    assert got[n:] == [-1] * (len(second) + 1)  # eos and after: nothing ("Bruno" alone is not a subject)
    assert index.chapters(_encode(tok, "Zelda Zimmer was born in Oslo.")).eq(-1).all()


def test_looking_up_only_the_new_positions_with_the_carried_chapter_equals_a_full_scan():
    tok = load_tokenizer("bytes")
    index = SubjectIndex(SUBJECTS, tok, num_chapters=4)
    rows = ["Who is Bruno Crane? Ask Ada Abbott Jr and Cyrus Vance.", "Cyrus Vance works. Then Ada Abbott came by"]
    ids = torch.tensor([tok.encode(r, add_special_tokens=False)[:40] for r in rows])
    ids[1, 18] = tok.eos_token_id  # an end of sequence inside the row
    full = index.chapters(ids)
    assert full.eq(-1).any() and full.ge(0).any()
    for start in range(1, ids.shape[1]):  # every split, including ones inside a mention
        assert torch.equal(index.chapters(ids, start=start, carry=full[:, start - 1]), full[:, start:]), start


def test_longer_subject_ending_at_the_same_token_wins_and_batch_rows_are_independent():
    tok = load_tokenizer("bytes")
    index = SubjectIndex(["Vance", "Cyrus Vance"], tok, num_chapters=2)
    a, b = tok.encode("x Cyrus Vance", add_special_tokens=False), tok.encode("y Danny Vance", add_special_tokens=False)
    got = index.chapters(torch.tensor([a, b]))
    assert got[:, -1].tolist() == [1, 0]


def test_a_byte_level_bpe_tokenizer_finds_the_subject_with_and_without_a_leading_space():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = ["Cyrus Vance works in Oslo.", "Where does Cyrus Vance work?", "Bruno Crane met Cyrus Vance."] * 20
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")
    assert tok.encode(" Cyrus Vance")[0] != tok.encode("Cyrus Vance")[0]  # the space changes the tokens
    index = SubjectIndex(["Cyrus Vance"], tok, num_chapters=1)
    for line in ("Cyrus Vance works in Oslo.", "Where does Cyrus Vance work?"):
        ids = _encode(tok, line)
        n = len(tok.encode(line[: line.index("Vance") + len("Vance")]))
        assert index.chapters(ids)[0].tolist() == [-1] * (n - 1) + [0] * (ids.shape[1] - n + 1)
    assert index.chapters(_encode(tok, "Bruno Crane works.")).eq(-1).all()


def _subject_model(arch="llama", chapters=4, **sections):
    cfg = tiny_config(arch, memory={"routing": "subject", "num_chapters": chapters, "top_k": 1,
                                    "wo_init": "identity", "subjects": SUBJECTS}, **sections)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained-looking memory: values far from their zero init
        for p in model.memory.banks.parameters():
            torch.nn.init.normal_(p, std=1.0)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_text_without_a_taught_subject_gets_exactly_the_base_models_logits(arch):
    model = _subject_model(arch)
    tok = model.tokenizer
    unknown = _encode(tok, "What is the birth city of Zelda Zimmer? Answer:")
    known = _encode(tok, "What is the birth city of Bruno Crane? Answer:")
    with torch.no_grad():
        with model.adapters_disabled():
            base_unknown, base_known = model(unknown).logits, model(known).logits
        assert torch.equal(model(unknown).logits, base_unknown)
        n = len(tok.encode("What is the birth city of Bruno Crane", add_special_tokens=False))
        with_memory = model(known).logits
        assert torch.equal(with_memory[:, : n - 1], base_known[:, : n - 1])  # before the mention ends: base
        assert (with_memory[:, n - 1:] - base_known[:, n - 1:]).abs().amax() > 1e-2  # from it on: memory


def test_variant_b_extra_mlp_is_skipped_where_nothing_is_read():
    cfg = tiny_config(memory={"routing": "subject", "num_chapters": 4, "top_k": 1, "wo_init": "identity",
                              "subjects": SUBJECTS, "block_variant": "B"})
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained-looking extra MLP (its down projection starts at 0)
        for block in model.memory.blocks.values():
            for p in block.mlp.parameters():
                torch.nn.init.normal_(p, std=0.5)
    unknown = _encode(model.tokenizer, "Zelda Zimmer was born in")
    known = _encode(model.tokenizer, "Cyrus Vance was born in")
    with torch.no_grad():
        with model.adapters_disabled():
            base_unknown, base_known = model(unknown).logits, model(known).logits
        assert torch.equal(model(unknown).logits, base_unknown)
        assert (model(known).logits - base_known).abs().amax() > 1e-2


def test_mixed_precision_training_step():
    model = _subject_model().train()
    ids = _encode(model.tokenizer, "Cyrus Vance was born in Oslo.")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.memory.banks[0].chapters[3].grad.abs().sum() > 0


def test_usage_counts_only_real_tokens_that_read():
    model = _subject_model()
    tok = model.tokenizer
    a, b = tok.encode("Bruno Crane works", add_special_tokens=False), tok.encode("Hi", add_special_tokens=False)
    ids = torch.tensor([a, b + [tok.pad_token_id] * (len(a) - len(b))])
    mask = torch.tensor([[1] * len(a), [1] * len(b) + [0] * (len(a) - len(b))])
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert model.memory.usage()[0].tolist() == [0, len(" works") + 1, 0, 0]  # from the name's last token on


def test_a_cache_the_model_did_not_fill_is_refused():
    model = _subject_model()
    ids = _encode(model.tokenizer, "Cyrus Vance was")
    with torch.no_grad():
        past = model.base(ids, use_cache=True).past_key_values
        model.subjects.reset()
        with pytest.raises(ValueError, match="subject routing: a KV cache of positions this model did not see"):
            model(ids[:, -1:], past_key_values=past)


def test_training_on_one_subject_changes_only_its_chapter():
    model = _subject_model(chapters=4).train()
    ids = _encode(model.tokenizer, "Cyrus Vance was born in Oslo. Cyrus Vance works in Rome.")
    model(ids, labels=ids).loss.backward()
    bank = model.memory.banks[0]
    grads = [p.grad for p in bank.parameters()]
    assert len(grads) == 4  # one parameter per chapter
    assert [g is not None and bool(g.abs().sum() > 0) for g in grads] == [False, False, False, True]
    assert model.memory.usage()[0].tolist() == [0, 0, 0, ids.shape[1] - len("Cyrus Vance") + 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_with_kv_cache_equals_without_and_batches_like_one_at_a_time(arch):
    model = _subject_model(arch)
    tok = model.tokenizer
    prompts = ["Where does Ada Abbott work?", "Hi", "Bruno Crane and Cyrus Vance met"]
    for p in prompts:
        x = _encode(tok, p)
        assert model.generate(x, **GREEDY).tolist() == model.generate(x, **GREEDY, use_cache=False).tolist()
    rows = [tok.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batch = model.generate(ids, attention_mask=mask, **GREEDY)
    for row, r in zip(batch, rows):
        assert row[width:].tolist() == model.generate(torch.tensor([r]), **GREEDY)[0, len(r):].tolist()


def test_subjects_are_saved_with_the_model(tmp_path):
    model = _subject_model()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config.memory.subjects == SUBJECTS
    ids = _encode(model.tokenizer, "Cyrus Vance was born in")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_synthetic_facts_fill_in_the_taught_people():
    cfg = resolve_config(tiny_config(memory={"routing": "subject", "top_k": 1}, data={"num_people": 10, "people": [6, 10]}))
    from memory_transformer.data.synthetic_facts import SyntheticFacts

    assert cfg.memory.subjects == [p.name for p in SyntheticFacts(10, 0).people[6:10]]


def test_a_resolved_subject_config_runs_with_another_routing():
    cfg = resolve_config(tiny_config(memory={"routing": "subject", "top_k": 1}, data={"num_people": 4}))
    other = load_config(cfg.to_dict(), ["memory.routing=sequence"])
    assert other.memory.subjects == cfg.memory.subjects and build_model(other).subjects is None


def test_subjects_from_a_text_file(tmp_path):
    (tmp_path / "subjects.txt").write_text("Ada Abbott\n\n  Bruno Crane \n")
    cfg = resolve_config(tiny_config(memory={"routing": "subject", "top_k": 1, "subjects": str(tmp_path / "subjects.txt")}))
    assert cfg.memory.subjects == ["Ada Abbott", "Bruno Crane"]


@pytest.mark.parametrize("memory,sections,message", [
    ({"top_k": 2}, {}, "memory.top_k: subject routing reads the one chapter of a token's subject: must be 1, got 2"),
    ({"top_k": 1}, {"data": {"source": "corpus.txt"}},
     "memory.subjects: subject routing needs the taught subjects: a list of names or a text file with one per line "
     "(data.source corpus.txt has no built-in people)"),
    ({"top_k": 1, "subjects": "missing.txt"}, {}, "memory.subjects: file not found: missing.txt"),
    ({"top_k": 1, "subjects": []}, {}, "memory.subjects: subject routing needs at least one subject, got none"),
    ({"top_k": 1, "subjects": ["Ada", " "]}, {}, "memory.subjects: subject 1 (counting from 0) is empty or only spaces"),
    ({"top_k": 1, "subjects": ["Ada", "Bo", " Ada"]}, {},
     "memory.subjects: 'Ada' is listed twice (each subject owns one chapter)"),
    ({"top_k": 1}, {"inference": {"routing": "sequence"}},
     "inference.routing: must be null with memory.routing subject (every position reads its subject's chapter), "
     "got sequence"),
])
def test_subject_routing_config_errors(memory, sections, message):
    with pytest.raises(ConfigError) as e:
        resolve_config(tiny_config(memory={"routing": "subject", **memory}, **sections))
    assert str(e.value) == message


def test_a_subjects_file_that_is_not_utf8_is_a_config_error(tmp_path):
    (tmp_path / "names.txt").write_bytes(b"Ada Abbott\n\xff\xfeBruno\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(tiny_config(memory={"routing": "subject", "top_k": 1, "subjects": str(tmp_path / "names.txt")}))
    assert str(e.value) == f"memory.subjects: {tmp_path / 'names.txt'} is not UTF-8 text (invalid start byte at byte 11)"


def test_two_subjects_the_tokenizer_encodes_alike_are_a_config_error():
    class Lower:  # a tokenizer that normalises case, as some do
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return list(text.lower().encode())

    with pytest.raises(ConfigError) as e:
        SubjectIndex(["Ada Abbott", "Bruno", "ADA ABBOTT"], Lower(), num_chapters=4)
    assert str(e.value) == ("memory.subjects: 'Ada Abbott' and 'ADA ABBOTT' are the same tokens for this tokenizer: "
                            "list each subject once")


def test_eos_resets_the_lookup_in_pretraining_only_a_chat_answer_reads_its_questions_subject():
    from memory_transformer.memory.subjects import subject_index

    tok = load_tokenizer("bytes")
    question = tok.encode("Where was Cyrus Vance born?", add_special_tokens=False)
    answer = tok.encode("Oslo", add_special_tokens=False)
    ids = torch.tensor([question + [tok.eos_token_id] + answer])  # eos ends the user's turn in a chat
    memory = {"routing": "subject", "top_k": 1, "subjects": SUBJECTS}
    cfg = tiny_config(memory=memory)
    documents = subject_index(cfg, tok).chapters(ids)[0]
    cfg.data.mode = "instruction_finetuning"  # (validation would ask for a chat template, which bytes lack)
    chat = subject_index(cfg, tok).chapters(ids)[0]
    assert documents[-len(answer) - 1:].tolist() == [-1] * (len(answer) + 1)
    assert chat[-len(answer) - 1:].tolist() == [3] * (len(answer) + 1)  # Cyrus Vance: subject 3 of 4 chapters


def test_generate_refuses_a_routing_strategy_and_beam_search():
    model = _subject_model()
    with pytest.raises(ValueError, match="routing: a memory with subject routing routes by subject; got 'token'"):
        model.generate(_encode(model.tokenizer, "Hi"), routing="token")
    with pytest.raises(ValueError, match="num_beams: subject routing keeps what each row has read so far"):
        model.generate(_encode(model.tokenizer, "Hi"), num_beams=2)


def _gated_lora(memory_enabled: bool):
    cfg = tiny_config(memory={"enabled": memory_enabled, "routing": "subject", "num_chapters": 4, "top_k": 1,
                              "wo_init": "identity", "subjects": SUBJECTS},
                      lora={"enabled": True, "r": 4, "gate": "subject"}, model={"freeze_base": True})
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained-looking LoRA (B starts at 0) and memory
        for name, p in model.named_parameters():
            if "lora_B" in name or "memory.banks" in name:
                torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("memory_enabled", [False, True])
def test_subject_gated_lora_changes_only_positions_that_read_a_subject(memory_enabled):
    model = _gated_lora(memory_enabled)
    assert (model.memory is not None) == memory_enabled
    tok = model.tokenizer
    unknown, known = _encode(tok, "Zelda Zimmer was born in"), _encode(tok, "Say: Cyrus Vance was born in")
    n = len(tok.encode("Say: Cyrus Vance", add_special_tokens=False))
    with torch.no_grad():
        with model.adapters_disabled():
            base_unknown, base_known = model(unknown).logits, model(known).logits
        assert torch.equal(model(unknown).logits, base_unknown)
        gated = model(known).logits
    assert torch.equal(gated[:, : n - 1], base_known[:, : n - 1])
    assert (gated[:, n - 1:] - base_known[:, n - 1:]).abs().amax() > 1e-2
    x = _encode(tok, "Where does Cyrus Vance work")
    assert model.generate(x, **GREEDY).tolist() == model.generate(x, **GREEDY, use_cache=False).tolist()


def test_subject_gated_lora_trains_and_is_not_merged():
    from memory_transformer.lora import merge_lora

    model = _gated_lora(False).train()
    ids = _encode(model.tokenizer, "Cyrus Vance was born in Oslo.")
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    with pytest.raises(ConfigError, match="lora.gate: a LoRA gated by subject changes only some positions"):
        merge_lora(model)


def test_subject_gated_lora_is_saved_and_refuses_layers_it_cannot_gate(tmp_path):
    model = _gated_lora(False)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    ids = _encode(model.tokenizer, "Bruno Crane and Zelda Zimmer")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        last = model.base(ids, logits_to_keep=1).logits  # lm_head sees the last position only: gated by its mask
    assert last.shape == (1, 1, len(model.tokenizer))
    cfg = tiny_config(memory={"enabled": False, "subjects": SUBJECTS}, model={"freeze_base": True},
                      lora={"enabled": True, "r": 4, "gate": "subject", "target_modules": ["embed_tokens", "q_proj"]})
    with pytest.raises(ConfigError, match=r"lora.target_modules: lora.gate subject gates Linear layers only, not "
                                          r"embed_tokens \(Embedding\)"):
        build_model(cfg)
