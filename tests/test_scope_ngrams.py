"""memory.scope_match ngram: the key runs' fit on hand-made ids, matching by ids from the first match to eos with
or without a KV cache, the longest run's chapter, rounds, exact base output out of scope, training end to end."""

import pytest
import torch

from conftest import tiny_config
from memory_transformer import ConfigError, build_model, load_config
from memory_transformer.config import check_training
from memory_transformer.io import load_model
from memory_transformer.memory.scope import ScopeKeys, windows_of
from memory_transformer.memory.subjects import NO_EVENT
from memory_transformer.train.trainer import train

NGRAM = {"scope": "keys", "num_chapters": 1, "top_k": 1, "layers": "last:1", "scope_match": "ngram",
         "scope_ngram_tokens": 3, "scope_ngram_chars": 2}


def test_windows_hold_the_ids_ending_at_each_position_and_never_span_an_invalid_one():
    ids = torch.tensor([[7, 8, 9, 10]])
    assert windows_of(ids, 3).tolist() == [[[-1, -1, 7], [-1, 7, 8], [7, 8, 9], [8, 9, 10]]]
    valid = torch.tensor([[True, False, True, True]])
    assert windows_of(ids, 3, valid).tolist() == [[[-1, -1, 7], [-1, -1, -1], [-1, -1, 9], [-1, 9, 10]]]


def test_fit_keeps_the_shortest_run_at_each_novel_position_that_the_background_never_ends_with():
    scope = ScopeKeys(2, novelty=0.5, radius=0.5, max_keys=10, eos=None, ngram=(3, 2))
    taught = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # cosines 0, 0, 1, 0: 3 novel
    windows = torch.tensor([[1, 2, 3], [-1, 4, 5], [6, 7, 8], [-1, -1, 3]])
    background = torch.tensor([[9, 2, 3], [-1, -1, 5]])  # ends with 3, (2, 3), (9, 2, 3); and 5
    chars = torch.ones(10, dtype=torch.long)
    counts = scope.fit(taught, torch.tensor([[0.0, 1.0]]), taught_windows=windows, background_windows=background,
                       chars=chars)
    # (3) and (2, 3) are the background's: (1, 2, 3); (5) is: (4, 5); (6, 7, 8) is not novel; (3) alone is the
    # background's and no longer run fits in its window
    assert counts == {"taught_states": 4, "background_states": 1, "keys": 2, "novel_positions": 3, "without_a_run": 1}
    assert scope.grams.tolist() == [[-1, 4, 5], [1, 2, 3]]
    assert len(scope.keys) == 0 and scope.pair_keys is None  # no state keys
    chars[4] = 0  # (4, 5) is 1 character: too short; (x, 4, 5) does not fit in the window
    scope.fit(taught, torch.tensor([[0.0, 1.0]]), taught_windows=windows, background_windows=background, chars=chars)
    assert scope.grams.tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="memory.scope_match ngram: fitting needs the positions' ids"):
        scope.fit(taught, torch.tensor([[0.0, 1.0]]))


def _scope(grams: list[list[int]], chapters: list[int] | None = None) -> ScopeKeys:
    scope = ScopeKeys(2, 0.5, 0.5, 10, eos=0, routed=chapters is not None, ngram=(3, 2))
    scope.extend(torch.zeros(0, 2), torch.zeros(0), None if chapters is None else torch.zeros(0, dtype=torch.long),
                 grams=torch.tensor(grams), gram_chapters=None if chapters is None else torch.tensor(chapters))
    return scope


def test_the_scope_opens_where_the_ids_end_a_run_and_closes_at_eos_with_or_without_a_kv_cache():
    scope = _scope([[-1, 4, 5]])
    ids = torch.tensor([[4, 5, 7, 0, 4, 6, 5, 4, 5, 1]])  # eos at 3; (4, 6, 5) is not (4, 5)
    h = torch.randn(1, 10, 2)
    scope.observe(h, ids, past=0)
    whole = scope.reads.int().tolist()
    assert whole == [[0, 1, 1, 0, 0, 0, 0, 0, 1, 1]]
    scope.observe(h[:, :4], ids[:, :4], past=0)
    scope.observe(h[:, 4:8], ids[:, 4:8], past=4)
    scope.observe(h[:, 8:], ids[:, 8:], past=8)  # the run (4, 5) straddles the cache's end
    assert (scope.state >= 0).int().tolist() == whole
    with pytest.raises(ValueError, match="memory.scope_match ngram: the scope matches token ids"):
        scope.observe(h, None, past=0)


def test_a_position_opens_the_chapter_of_the_longest_run_it_ends_and_rounds_keep_a_runs_first_chapter():
    scope = _scope([[-1, -1, 5], [-1, 4, 5]], [0, 1])
    windows = windows_of(torch.tensor([[3, 5, 4, 5, 9]]), 3)
    assert scope._gram_matches(windows).tolist() == [[NO_EVENT, 0, NO_EVENT, 1, NO_EVENT]]
    scope.extend(torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                 grams=torch.tensor([[-1, 4, 5], [7, 8, 9]]), gram_chapters=torch.tensor([2, 2]))
    assert scope.grams.tolist() == [[-1, -1, 5], [-1, 4, 5], [7, 8, 9]]  # (4, 5) stays chapter 1's
    assert scope.gram_chapters.tolist() == [0, 1, 2]


def test_positions_out_of_scope_equal_the_base_bit_for_bit():
    model = build_model(tiny_config("llama", memory={**NGRAM, "wo_init": "normal"}), seed=0).eval()
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model.memory.scope.grams = torch.cat([torch.tensor([-1]), ids[0, 4:6]])[None]  # the run ending at position 5
    with torch.no_grad():
        logits = model(ids).logits
        reads = model.memory.scope.reads
        with model.adapters_disabled():
            base = model(ids).logits
    assert reads[0].tolist() == [False] * 5 + [True] * 7 and not reads[1].any()
    assert torch.equal(logits[~reads], base[~reads]) and not torch.allclose(logits[reads], base[reads])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids[:1, :8], use_cache=True, **kw)
        uncached = model.generate(input_ids=ids[:1, :8], use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_training_fits_runs_saves_them_and_loads_them_back(tmp_path, saved_base, capsys):
    from safetensors.torch import load_file

    cfg = load_config({
        "model": {"pretrained": str(saved_base("llama")), "max_seq_len": 64},
        "memory": {**NGRAM, "num_tokens": 64, "num_heads": 4, "scope_pairs": True},
        "data": {"num_people": 6, "people": [3, 6], "replay_generated": 4, "replay_fraction": 0.0,
                 "samples_per_epoch": 24},
        "training": {"max_steps": 2, "batch_size": 4, "log_with": ["none"], "output_dir": str(tmp_path / "run")},
    })
    train(cfg, progress=False)
    printed = capsys.readouterr().out
    saved = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    grams = saved["memory.scope.grams"]
    assert len(grams) > 0 and grams.shape[1] == 3 and saved["memory.scope.keys"].shape == (0, 32)
    assert "memory.scope.pair_keys" not in saved
    assert bool((grams[:, -1] >= 0).all())  # every run ends at a real id, and is left-padded
    assert torch.equal(load_model(tmp_path / "run" / "final").memory.scope.grams, grams)
    assert f"memory.scope keys: {len(grams):,} keys (runs of ids, at " in printed


@pytest.mark.parametrize("memory,match", [
    ({"scope_match": "ngram"}, "memory.scope_match: ngram matches scope keys: needs memory.scope keys, got none"),
    ({**NGRAM, "scope_ngram_chars": 0}, "memory.scope_ngram_chars"),
    ({**NGRAM, "scope_match": "words"}, "memory.scope_match"),
])
def test_config_errors_name_the_key(memory, match):
    with pytest.raises(ConfigError, match=match):
        check_training(load_config(tiny_config("llama", memory=memory).to_dict()))


def test_a_keys_run_ends_at_its_words_end():
    from memory_transformer.model import word_ends

    ids = torch.tensor([[0, 1, 2, 3, 0, 2, 2, 1]])
    continues = torch.tensor([False, False, True, True])  # tokens 2 and 3 continue the word before them
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[0, 6] = False  # a run never spans a position that is not taught
    assert word_ends(ids, keep, continues).tolist() == [[0, 3, 3, 3, 5, 5, 6, 7]]
