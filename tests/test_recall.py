"""Greedy exact-match recall, scored against a fake model whose knowledge is known exactly."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memory_transformer.data.synthetic_facts import RecallItem, SyntheticFacts
from memory_transformer.data.tokenizer import ByteTokenizer
from memory_transformer.recall import answered, prompt_ids, recall

TOK = ByteTokenizer()


class LookupModel(nn.Module):
    """Continues a known prompt with its answer (one byte per step), anything else with '#'.

    It reads only the tokens where attention_mask is 1 and checks that padding is on the left, so a wrong
    padding or mask shows up as a wrong score or an assertion error.
    """

    def __init__(self, knows: dict[str, str]):
        super().__init__()
        self.knows = knows
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        assert not self.training and not torch.is_grad_enabled()
        self.calls += 1
        B, L = input_ids.shape
        logits = torch.zeros(B, L, len(TOK))
        for b in range(B):
            n_pad = int((attention_mask[b] == 0).sum())
            assert attention_mask[b, n_pad:].all() and (input_ids[b, :n_pad] == TOK.pad_token_id).all()
            logits[b, -1, ord(self._next_char(TOK.decode(input_ids[b, n_pad:])))] = 1.0
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, attention_mask, max_new_tokens, stopping_criteria=(), pad_token_id=0, **kwargs):
        """Greedy decoding by full forward passes, like transformers' generate without a cache: rows a stopping
        criterion marks done get padding, and decoding ends when all are done."""
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        for _ in range(max_new_tokens):
            next_ids = self(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].argmax(-1)
            next_ids = torch.where(done, pad_token_id, next_ids)
            input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)[:, None]], dim=1)
            for criterion in stopping_criteria:
                done |= criterion(input_ids, None)
            if done.all():
                break
        return input_ids

    def _next_char(self, text: str) -> str:
        for prompt, answer in self.knows.items():
            done = text[len(prompt) :]
            if text.startswith(prompt) and answer.startswith(done) and len(done) < len(answer):
                return answer[len(done)]
        return "#"


ITEMS = [
    RecallItem("Where was Ada born? Answer:", " Paris", "Ada", "birth_city", 6.5),
    RecallItem("Who employs Bo?", " Acme", "Bo", "employer", 5.0),
    RecallItem("Q?", " Oslo", "Cy", "birth_city", 6.5),
]


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_two_of_three_correct(batch_size):
    model = LookupModel({ITEMS[0].prompt: " Paris", ITEMS[1].prompt: " Acme", ITEMS[2].prompt: " Osla"})
    out = recall(model, TOK, ITEMS, batch_size=batch_size)
    assert (out["correct"], out["total"]) == (2, 3)
    assert out["recall"] == pytest.approx(2 / 3, abs=1e-12)
    assert out["bits"] == 11.5
    assert out["by_attribute"] == {"birth_city": 0.5, "employer": 1.0}


def test_answered_is_recalls_test_per_item_and_reports_each_batch():
    model = LookupModel({ITEMS[0].prompt: " Paris", ITEMS[1].prompt: " Acme", ITEMS[2].prompt: " Osla"})
    sizes = []
    assert answered(model, TOK, ITEMS, batch_size=2, done=sizes.append) == [True, True, False]
    assert sizes == [2, 1]


def test_decodes_exactly_answer_length_and_restores_mode():
    model = LookupModel({ITEMS[1].prompt: " Acme and more"})  # continues past the answer: still correct
    model.train()
    out = recall(model, TOK, [ITEMS[1]], batch_size=4)
    assert out["correct"] == 1 and model.calls == len(" Acme")
    assert model.training


def test_decoding_stops_once_every_answer_is_decided():
    # Ada's answer is right to its end (6 tokens), Bo's is wrong from the 3rd: 6 forwards, not max length 7
    items = [ITEMS[0], RecallItem("Who employs Bo?", " Acme Co", "Bo", "employer", 5.0)]
    model = LookupModel({ITEMS[0].prompt: " Paris and more", items[1].prompt: " Ac#"})
    out = recall(model, TOK, items, batch_size=2)
    assert (out["correct"], model.calls) == (1, len(" Paris"))
    nobody = LookupModel({})
    assert recall(nobody, TOK, items, batch_size=2)["correct"] == 0 and nobody.calls == 1


def test_a_prompt_is_scored_as_the_start_of_a_document_after_eos():
    assert prompt_ids(TOK, "Q?") == [TOK.eos_token_id, ord("Q"), ord("?")]  # as pack_documents starts documents
    no_eos = SimpleNamespace(eos_token_id=None, encode=TOK.encode)
    assert prompt_ids(no_eos, "Q?") == [ord("Q"), ord("?")]
    seen = []

    class Recording(LookupModel):
        def forward(self, input_ids, attention_mask):
            seen.append([row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)])
            return super().forward(input_ids, attention_mask)

    assert recall(Recording({"Q?": " Oslo"}), TOK, [ITEMS[2]])["correct"] == 1
    assert seen[0] == [[TOK.eos_token_id, *TOK.encode("Q?")]]  # the first forward: the prompt alone


def test_knows_nothing_and_empty():
    assert recall(LookupModel({}), TOK, ITEMS)["correct"] == 0
    assert recall(LookupModel({}), TOK, []) == {"recall": 0.0, "correct": 0, "total": 0, "bits": 0, "by_attribute": {}}


def test_synthetic_items_bits():
    facts = SyntheticFacts(2, seed=0)
    items = facts.recall_items("qa")
    knows = {it.prompt: it.answer for it in items if it.attribute == "birth_city"}
    out = recall(LookupModel(knows), TOK, items, batch_size=5)
    assert (out["correct"], out["total"]) == (2, 12)
    assert out["bits"] == pytest.approx(2 * math.log2(106), abs=1e-9)
    assert out["by_attribute"]["birth_city"] == 1.0 and out["by_attribute"]["major"] == 0.0



class AnswerIdsTokenizer(ByteTokenizer):
    """Bytes, except that answer names like "<0>" encode to stored token ids (any ids, even non-text)."""

    def __init__(self):
        self.answers: dict[str, list[int]] = {}

    def encode(self, text, add_special_tokens=False):
        return self.answers.get(text) or super().encode(text, add_special_tokens)


def test_left_padding_matches_unpadded_greedy_on_a_real_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=TOK.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    tok, items = AnswerIdsTokenizer(), []
    for i, prompt in enumerate(["a", "hello there", "The birthplace of someone is"]):
        ids = torch.tensor([[TOK.eos_token_id, *TOK.encode(prompt)]])  # a document's start, as recall prompts
        for _ in range(4):  # the answer is the model's own greedy continuation without padding
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        tok.answers[f"<{i}>"] = ids[0, -4:].tolist()
        items.append(RecallItem(prompt, f"<{i}>", "x", "a", 1.0))
    assert recall(model, tok, items, batch_size=3)["correct"] == 3  # left-padded batch: same tokens
