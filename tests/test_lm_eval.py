"""The lm-evaluation-harness adapter: its scores equal our forward pass, do not depend on batch or order, and
tasks run end to end (through `simple_evaluate` and the CLI) on a tiny saved model and the local tasks in
tests/lm_eval_task/ (no downloads)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from conftest import MEMORY_CASES, tiny_config
from memory_transformer import build_model, load_model
from memory_transformer.lm_eval_adapter import MemoryTransformerLM, task_manager

TASK_DIR = Path(__file__).parent / "lm_eval_task"
PAIRS = [("The cat sat on", " the mat"), ("Hello", " world!"), ("a", "bcdefghijkl"), ("Question: 2+2=", " 4"),
         ("x" * 40, " y"), ("", "abc")]
# Variants whose routing differs: per-sequence (pools over the row), per-token, one dense chapter, no memory.
CASES = {**{k: MEMORY_CASES[k] for k in ("standard-shared-A", "reduced_dim-shared-B", "dense-1chapter-A")},
         "token-routing": {"routing": "token"}, "vanilla": {"enabled": False}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm_eval") / "tiny"
    build_model(tiny_config("llama"), seed=7).save_pretrained(path)
    return path


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@torch.no_grad()
def direct_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """One unpadded forward of context + continuation; the sum of the continuation tokens' log-probs."""
    tok = model.tokenizer
    ctx = tok.encode(context, add_special_tokens=False) or [tok.eos_token_id]
    cont = tok.encode(continuation, add_special_tokens=False)
    logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1]
    logp = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("memory", CASES.values(), ids=CASES.keys())
def test_loglikelihood_equals_direct_forward(memory):
    model = build_model(tiny_config("llama", memory=memory), seed=1).eval()
    got = MemoryTransformerLM(model, batch_size=4).loglikelihood(requests("loglikelihood", PAIRS))
    for (ctx, cont), (logp, greedy) in zip(PAIRS, got):
        want, want_greedy = direct_loglikelihood(model, ctx, cont)
        assert logp == pytest.approx(want, abs=1e-5)
        assert greedy == want_greedy


@pytest.mark.parametrize("memory", CASES.values(), ids=CASES.keys())
def test_scores_independent_of_order_and_batch(memory):
    model = build_model(tiny_config("llama", memory=memory), seed=1).eval()
    lm = MemoryTransformerLM(model, batch_size=1)
    alone = [s for s, _ in lm.loglikelihood(requests("loglikelihood", PAIRS))]
    shuffled = list(range(len(PAIRS)))
    random.Random(0).shuffle(shuffled)
    lm.batch_size = 4  # rows of different lengths share a right-padded batch
    batched = [s for s, _ in lm.loglikelihood(requests("loglikelihood", [PAIRS[i] for i in shuffled]))]
    for j, i in enumerate(shuffled):
        assert batched[j] == pytest.approx(alone[i], abs=1e-5)
    if model.memory is not None:  # nothing is carried to the next call
        memory = model.memory
        assert memory.decisions == {} and memory.attention_mask is None and memory.policy is memory.default_policy


def test_router_pools_only_real_tokens():
    """The router input of a right-padded row equals that of the row alone."""
    model = build_model(tiny_config("llama"), seed=1).eval()
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        model(input_ids=torch.tensor([short]))
        alone = {i: r.pooled.clone() for i, r in model.memory.decisions.items()}
        mask = torch.tensor([[1] * 3 + [0] * 5, [1] * 8])
        model(input_ids=torch.tensor([short + [pad] * 5, long]), attention_mask=mask)
        padded = {i: r.pooled[:1] for i, r in model.memory.decisions.items()}
    for i in alone:
        torch.testing.assert_close(padded[i], alone[i], atol=1e-6, rtol=1e-5)


def test_context_routing_scores_as_generation_sees_the_continuation(saved):
    """routing=context: chapters chosen on the context alone, as `generate` routes a prompt; equal to the
    prompt run through the model with `generating` (sequence routing), then the continuation through the KV cache."""
    model = load_model(saved)
    context, continuation = "The cat sat on", " the mat"
    (got, _), = MemoryTransformerLM(model, routing="context").loglikelihood(
        requests("loglikelihood", [(context, continuation)]))
    ctx, cont = (model.tokenizer.encode(s, add_special_tokens=False) for s in (context, continuation))
    with torch.no_grad(), model.generating("sequence"):
        prompt = model.base(input_ids=torch.tensor([ctx]), use_cache=True)
        rest = model.base(input_ids=torch.tensor([cont[:-1]]), past_key_values=prompt.past_key_values, use_cache=True)
    logp = F.log_softmax(torch.cat([prompt.logits[0, -1:], rest.logits[0]]).float(), dim=-1)
    assert got == pytest.approx(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-5)


def test_loglikelihood_rolling_is_the_sum_over_the_text(saved):
    model = load_model(saved)
    lm = MemoryTransformerLM(model, batch_size=2)
    text = "memory banks route by chapter"
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(direct_loglikelihood(model, "", text)[0], abs=1e-5)

    seen = []  # a text longer than max_length: windows of at most max_length tokens, each token scored once
    score = lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda reqs, *a: seen.extend(reqs) or score(reqs, *a)
    lm.max_length = 8
    long_text = text * 2
    (windowed,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(long_text,)]))
    assert [t for _, _, cont in seen for t in cont] == lm.tok_encode(long_text)
    assert all(len(ctx + cont) <= 8 for _, ctx, cont in seen)
    assert windowed < 0


def test_generate_until_stops_at_the_stop_string(saved):
    model = load_model(saved)
    lm = MemoryTransformerLM(model, batch_size=1)
    prompt = "Once upon a time"
    (free,) = lm.generate_until(requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 16})]))
    stop = next(c for c in free[2:] if c.isascii())  # a character the model does produce, not at the start
    produced = []
    generate = model.generate
    model.generate = lambda *a, **k: produced.append(out := generate(*a, **k)) or out
    (cut,) = lm.generate_until(requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 16})]))
    assert cut == free[: free.index(stop)] and stop not in cut
    new_tokens = produced[0].shape[1] - len(lm.tok_encode(prompt))
    assert new_tokens < 16  # generation stopped there, not only the text cut afterwards

    model.generate = generate  # several requests in one batch: the same texts
    many = [(p, {"until": [stop], "max_gen_toks": 16}) for p in ("Hi", prompt, "A much longer prompt than the others")]
    singles = lm.generate_until(requests("generate_until", many))
    lm.batch_size = 3
    assert lm.generate_until(requests("generate_until", many)) == singles
    assert singles[1] == cut


def test_simple_evaluate_on_local_tasks(saved):
    tasks = ["memtf_tiny_mc", "memtf_tiny_gen"]
    out = lm_eval.simple_evaluate(model="memory-transformer", model_args=f"pretrained={saved},batch_size=4",
                                  device="cpu", tasks=tasks, task_manager=task_manager(tasks, str(TASK_DIR)))
    acc, em = out["results"]["memtf_tiny_mc"]["acc,none"], out["results"]["memtf_tiny_gen"]["exact_match,none"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= em <= 1.0
    assert out["n-samples"]["memtf_tiny_mc"]["effective"] == 8

    # the accuracy is the share of questions whose right answer scores highest
    lm = MemoryTransformerLM(load_model(saved))
    docs = [json.loads(line) for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    right = 0
    for doc in docs:
        scores = lm.loglikelihood(requests("loglikelihood", [(doc["question"], " " + c) for c in doc["choices"]]))
        right += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["label"]
    assert acc == pytest.approx(right / len(docs))


def test_cli_runs_lm_eval_tasks(saved, tmp_path):
    cmd = [sys.executable, "-m", "memory_transformer", "eval", "--checkpoint", str(saved), "--lm-eval-tasks",
           "memtf_tiny_mc", "--lm-eval-include", str(TASK_DIR), "--limit", "2", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)  # data found from any cwd
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0.0 <= results["memtf_tiny_mc"]["acc,none"] <= 1.0
