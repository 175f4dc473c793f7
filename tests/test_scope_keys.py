"""memory.scope keys: the codebook's fit on hand-made states, scope from the first match to eos, exact base output
out of scope, KV-cache agreement, saving with the adapter, config errors, training end to end."""

import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_config
from memory_transformer import ConfigError, build_model, load_config
from memory_transformer.config import check_training
from memory_transformer.io import load_model, trained_state
from memory_transformer.memory.scope import ScopeKeys
from memory_transformer.memory.subjects import NO_EVENT
from memory_transformer.model import component_of
from memory_transformer.train.trainer import train

KEYS = {"scope": "keys", "num_chapters": 1, "top_k": 1, "layers": "last:1"}


def test_fit_keeps_the_novel_states_with_hand_computed_thresholds():
    scope = ScopeKeys(2, novelty=0.5, radius=0.5, max_keys=10, eos=None)
    taught = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.6, 0.8]])  # cosines to the background: 0, 1, 0.8
    counts = scope.fit(taught, torch.tensor([[0.0, 1.0]]))
    assert counts == {"taught_states": 3, "background_states": 1, "keys": 1}
    assert torch.equal(scope.keys, torch.tensor([[1.0, 0.0]]))  # unit length
    assert torch.allclose(scope.thresholds, torch.tensor([0.5]))  # 0 + 0.5 * (1 - 0)
    h = torch.tensor([[[1.0, 0.5], [1.0, 2.0], [-1.0, 0.0]]])  # cosines to the key: 0.894, 0.447, -1
    assert scope.matches(h).tolist() == [[0, NO_EVENT, NO_EVENT]]  # unrouted: chapter 0 where a key matches


def test_fit_keeps_a_seeded_subset_of_at_most_max_keys():
    taught = torch.eye(6)
    first = ScopeKeys(6, 0.5, 0.5, max_keys=3, eos=None)
    second = ScopeKeys(6, 0.5, 0.5, max_keys=3, eos=None)
    assert first.fit(taught, -torch.ones(1, 6), seed=1)["keys"] == 3
    second.fit(taught, -torch.ones(1, 6), seed=1)
    assert torch.equal(first.keys, second.keys) and first.keys.shape == (3, 6)
    with pytest.raises(ValueError, match="no background states"):
        first.fit(taught, torch.zeros(0, 6))


def _scope_with_one_key(eos: int | None = 0) -> ScopeKeys:
    scope = ScopeKeys(2, 0.5, 0.5, 10, eos=eos)
    scope.keys, scope.thresholds = torch.tensor([[1.0, 0.0]]), torch.tensor([0.9])
    return scope


def _states(pattern: str) -> torch.Tensor:
    """'m' = a state matching the key, '.' = one that does not; (1, T, 2)."""
    return torch.tensor([[[1.0, 0.0] if c == "m" else [0.0, 1.0] for c in pattern]])


def test_scope_opens_at_the_first_match_and_closes_at_eos():
    scope = _scope_with_one_key(eos=0)
    ids = torch.tensor([[5, 5, 5, 5, 0, 5, 5, 5]])  # eos at position 4
    scope.observe(_states("..m....m"), ids, past=0)
    assert scope.reads.int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 1]]
    scope.observe(_states("..m....m"), None, past=0)  # no ids: nothing closes it
    assert scope.reads.int().tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]


def test_scope_with_a_kv_cache_equals_the_whole_sequence():
    whole, steps = _scope_with_one_key(), _scope_with_one_key()
    pattern, ids = "..m...m..", torch.tensor([[5, 5, 5, 5, 0, 5, 5, 5, 5]])
    whole.observe(_states(pattern), ids, past=0)
    steps.observe(_states(pattern[:3]), ids[:, :3], past=0)
    got = [steps.reads]
    for t in range(3, len(pattern)):
        steps.observe(_states(pattern[t]), ids[:, : t + 1], past=t)
        got.append(steps.reads)
    assert torch.equal(torch.cat(got, dim=1), whole.reads)
    with pytest.raises(ValueError, match="a KV cache of positions this model did not see"):
        _scope_with_one_key().observe(_states("."), ids[:, :1], past=4)


def _model_and_states(memory: dict, seed: int = 0):
    """A tiny model with `memory`, random ids (2, 12), and the base's unit states of row 0 at the first memory
    layer (what the keys are fitted on)."""
    model = build_model(tiny_config("llama", memory={**memory, "wo_init": "normal"}), seed=seed)
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    norm = model.base.model.layers[model.memory.layer_ids[0]].post_attention_layernorm
    found = []
    handle = norm.register_forward_pre_hook(lambda m, args: found.append(args[0]))
    with torch.no_grad(), model.adapters_disabled():
        model(ids)
    handle.remove()
    return model, ids, torch.nn.functional.normalize(found[0][0], dim=-1)


def _model_with_a_key_at(position: int, seed: int = 0):
    """A tiny model with memory in its last layer whose one key is the state of `position` of the returned ids."""
    model, ids, states = _model_and_states(KEYS, seed)
    scope = model.memory.scope
    scope.keys, scope.thresholds = states[position][None], torch.tensor([0.9999])
    return model.eval(), ids


def test_positions_out_of_scope_equal_the_base_bit_for_bit():
    model, ids = _model_with_a_key_at(5)
    with torch.no_grad():
        logits = model(ids).logits
        reads = model.memory.scope.reads
        with model.adapters_disabled():
            base = model(ids).logits
    assert reads[0].tolist() == [False] * 5 + [True] * 7  # row 0 from its match on; row 1 (other tokens) never
    assert not reads[1].any()
    closed = ~reads
    assert torch.equal(logits[closed], base[closed])
    assert not torch.allclose(logits[reads], base[reads])


def test_generation_with_and_without_kv_cache_agree():
    model, ids = _model_with_a_key_at(5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids[:1, :8], use_cache=True, **kw)
        uncached = model.generate(input_ids=ids[:1, :8], use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_keys_are_memory_scope_buffers_not_parameters():
    model = build_model(tiny_config("llama", memory=KEYS))
    names = [n for n, _ in model.state_dict().items() if n.startswith("memory.scope.")]
    assert names == ["memory.scope.keys", "memory.scope.thresholds"]
    assert {component_of(n) for n in names} == {"memory_scope"}
    assert not any(n.startswith("memory.scope.") for n, _ in model.named_parameters())
    assert set(names) <= set(trained_state(model))  # an adapter save holds them


@pytest.mark.parametrize("memory,sections,match", [
    (KEYS, {}, r"memory.scope: keys are fitted against background text: set data.replay_generated"),
    ({**KEYS, "block_variant": "B"}, {}, r"memory.scope: keys needs memory.block_variant A"),
    (KEYS, {"lora": {"enabled": True}, "data": {"replay_generated": 4}, "model": {"pretrained": "x"}},
     r"memory.scope: keys are the frozen base's hidden states: LoRA"),
    (KEYS, {"model": {"pretrained": "x", "freeze_base": False}, "data": {"replay_generated": 4}},
     r"memory.scope: keys are the frozen base's hidden states: a trained base"),
    ({**KEYS, "scope_novelty": 1.0}, {}, r"memory.scope_novelty: must be a cosine in \(-1, 1\)"),
    ({**KEYS, "scope_radius": 1.0}, {}, r"memory.scope_radius: must be in \[0, 1\)"),
    ({**KEYS, "scope_max_keys": 0}, {}, r"memory.scope_max_keys: must be a positive integer"),
])
def test_config_errors_name_the_key(memory, sections, match):
    with pytest.raises(ConfigError, match=match):
        check_training(tiny_config("llama", memory=memory, **sections))


def _keys_run(base, out, people=(3, 6), fraction=0.5, steps=2):
    """A tiny teaching run with keys on the saved base: 4 samples of it as background."""
    return load_config({
        "model": {"pretrained": str(base), "max_seq_len": 64},
        "memory": {**KEYS, "num_tokens": 64, "num_heads": 4},
        "data": {"num_people": 6, "people": list(people), "replay_generated": 4, "replay_fraction": fraction,
                 "samples_per_epoch": 24},
        "training": {"max_steps": steps, "batch_size": 4, "save_steps": 1, "log_with": ["none"],
                     "output_dir": str(out), "save_total_limit": None},
    })


def test_training_fits_keys_saves_them_and_loads_them_back(tmp_path, saved_base):
    from safetensors.torch import load_file

    train(_keys_run(saved_base("llama"), tmp_path / "run"), progress=False)
    loaded = load_model(tmp_path / "run" / "final").memory.scope
    saved = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    K = len(saved["memory.scope.keys"])
    assert K > 0 and saved["memory.scope.keys"].shape == (K, 32) and saved["memory.scope.thresholds"].shape == (K,)
    assert torch.allclose(saved["memory.scope.keys"].norm(dim=-1), torch.ones(K))  # unit length
    assert bool(((saved["memory.scope.thresholds"] > -1) & (saved["memory.scope.thresholds"] < 1)).all())
    assert torch.equal(loaded.keys, saved["memory.scope.keys"])
    assert torch.equal(loaded.thresholds, saved["memory.scope.thresholds"])


def test_teaching_in_rounds_keeps_every_rounds_keys(tmp_path, saved_base):
    from memory_transformer.teach import train_from

    base = saved_base("llama")
    train(_keys_run(base, tmp_path / "round-1", steps=1), progress=False)
    train(_keys_run(base, tmp_path / "alone", (0, 3), steps=1), progress=False)  # round 2's documents alone
    train_from(_keys_run(base, tmp_path / "round-2", (0, 3), steps=1), tmp_path / "round-1" / "final")
    first, alone, second = (load_model(tmp_path / d / "final").memory.scope for d in ("round-1", "alone", "round-2"))
    assert len(first.keys) > 0 and len(alone.keys) > 0
    assert torch.equal(second.keys, torch.cat([first.keys, alone.keys]))
    assert torch.equal(second.thresholds, torch.cat([first.thresholds, alone.thresholds]))


def test_a_resumed_run_keeps_its_keys_and_does_not_fit_again(tmp_path, saved_base, monkeypatch):
    from memory_transformer.train.trainer import Trainer

    cfg = _keys_run(saved_base("llama"), tmp_path / "run", fraction=0.0)
    train(cfg, progress=False)
    saved = load_model(tmp_path / "run" / "final").memory.scope.keys
    monkeypatch.setattr(ScopeKeys, "fit", lambda *a, **k: pytest.fail("a resumed run fitted its keys again"))
    resumed = Trainer(load_config(cfg.to_dict(), ["training.max_steps=3"]), resume=True, progress=False)
    assert torch.equal(resumed.unwrapped.memory.scope.keys, saved)


@pytest.mark.parametrize("pairs", [False, True])
def test_fit_takes_taught_states_only_after_a_rows_first_eos_and_not_a_documents_first_token(monkeypatch, pairs):
    model = build_model(tiny_config("llama", memory={**KEYS, "scope_pairs": pairs}))
    eos = model.tokenizer.eos_token_id
    seen = {}
    monkeypatch.setattr(ScopeKeys, "fit", lambda self, t, b, seed=0, chapter=0, tp=None, bp=None:
                        seen.update(taught=t, background=b, taught_prev=tp, background_prev=bp))
    ids = torch.tensor([[65, 66, eos, 67, 68, 69], [65, 66, 67, 68, 69, 70], [eos, 65, 66, 67, 68, 0]])
    mask = torch.tensor([[1] * 6, [1] * 6, [1] * 5 + [0]])
    replay = torch.tensor([[0] * 6, [0] * 6, [0, 0, 0, 1, 1, 0]])
    model.fit_scope({"input_ids": ids, "attention_mask": mask, "replay": replay},
                    {"input_ids": ids, "attention_mask": mask})
    # row 0: from its eos on, but not the document's first token (3 positions); row 1: none (no document starts in
    # it); row 2: eos and 1 taught token (its first is the document's, the next two replay)
    taught, background = seen["taught"], seen["background"]
    assert taught.shape == (3 + 0 + 2, 32)
    assert background.shape == (6 + 6 + 5, 32)  # every real token
    if not pairs:
        assert seen["taught_prev"] is None and seen["background_prev"] is None
        return
    # each row's previous state, zeros where the previous position is not kept (a row's first, before its eos, a
    # document's first token)
    zero = torch.zeros(32)
    assert torch.equal(seen["taught_prev"], torch.stack([zero, zero, taught[1], zero, zero]))
    assert torch.equal(seen["background_prev"], torch.stack([zero, *background[0:5], zero, *background[6:11], zero,
                                                             *background[12:16]]))


def test_pair_keys_fit_where_each_half_is_known_but_not_together_with_hand_computed_thresholds():
    scope = ScopeKeys(2, novelty=0.9, radius=0.5, max_keys=10, eos=None, pairs=True)
    a, b, c = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]
    # background: the pairs (a, b) and (b, a) [a row of zeros: the first position has no previous state]
    background, background_prev = torch.tensor([a, b, a]), torch.tensor([[0.0, 0.0], a, b])
    # taught: (c, a): c alone is novel (cosine -1 to a), a is not; (b, b): b known, the pair is not -> a pair key;
    # (a, b): the pair is the background's own -> nothing; (0, a): no previous state -> nothing
    taught = torch.tensor([c, a, b, b, a])
    taught_prev = torch.tensor([[0.0, 0.0], c, b, a, [0.0, 0.0]])
    counts = scope.fit(taught, background, taught_prev=taught_prev, background_prev=background_prev)
    assert counts == {"taught_states": 5, "background_states": 3, "keys": 1, "pair_keys": 2}
    assert torch.equal(scope.keys, torch.tensor([c]))
    # (c, a): best over the background pairs of min(cos(prev), cos(state)): (a, b) -> min(-1, 0), (b, a) -> min(0, 1),
    # (0, a) -> min(0, 1): 0 -> threshold 0 + 0.5 * (1 - 0); (b, b): (a, b) -> min(0, 1) = 0, (b, a) -> min(1, 0) = 0
    assert torch.equal(scope.pair_keys, torch.tensor([[c, a], [b, b]]))
    assert torch.allclose(scope.pair_thresholds, torch.tensor([0.5, 0.5]))
    # a position matches a pair key when both halves are above its threshold: (b, b) does, (a, a) does not (cosine
    # -1 to c's half), nor does a at the first position (no previous state); then (c, a)
    h = torch.tensor([[a, b, b, a, a]])
    prev = torch.tensor([[[0.0, 0.0], a, b, b, a]])
    assert scope.matches(h, prev).tolist() == [[NO_EVENT, NO_EVENT, 0, NO_EVENT, NO_EVENT]]
    h, prev = torch.tensor([[a]]), torch.tensor([[c]])
    assert scope.matches(h, prev).tolist() == [[0]]
    with pytest.raises(ValueError, match="needs the previous positions' states"):
        scope.fit(taught, background)


def test_pair_keys_match_across_a_kv_cache_as_in_the_whole_sequence():
    a, b, n = [1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]
    scope = ScopeKeys(2, 0.5, 0.5, 10, eos=0, pairs=True)
    scope.extend(torch.zeros(0, 2), torch.zeros(0), pair_keys=torch.tensor([[a, b]]),
                 pair_thresholds=torch.tensor([0.9]))
    states = torch.tensor([[n, a, b, n, b, a, n, a, b]])  # the pair (a, b) at positions 2 and 8
    ids = torch.tensor([[5, 5, 5, 5, 0, 5, 5, 5, 5]])  # eos at position 4
    scope.observe(states, ids, past=0)
    whole = scope.read
    assert whole.tolist() == [[-1, -1, 0, 0, -1, -1, -1, -1, 0]]
    scope.observe(states[:, :1], ids[:, :1], past=0)
    got = [scope.read]
    for t in range(1, 9):  # one position at a time: the pair's previous half comes from the cache
        scope.observe(states[:, t:t + 1], ids[:, :t + 1], past=t)
        got.append(scope.read)
    assert torch.equal(torch.cat(got, dim=1), whole)
    assert torch.equal(scope.units, F.normalize(states, dim=-1))


# -- memory.routing keys: every key opens its chapter -------------------------------------------------------------
ROUTED = {**KEYS, "routing": "keys", "num_chapters": 2}


def _routed_scope(eos: int | None = 0) -> ScopeKeys:
    """Two keys: [1, 0] opens chapter 0 above 0.9, [0.6, 0.8] opens chapter 1 above 0.5."""
    scope = ScopeKeys(2, 0.5, 0.5, 10, eos=eos, routed=True)
    scope.extend(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([0.9, 0.5]), torch.tensor([0, 1]))
    return scope


def test_a_position_opens_the_chapter_of_the_key_it_matches_by_the_widest_margin():
    scope = _routed_scope()
    # cosines to the two keys: (1, 0.6): margins 0.1, 0.1 - a tie goes to the first key; (0.96, 0.92): margins
    # 0.06 and 0.42 -> chapter 1 although the first key is closer; (0.8, 0.96): only the second matches;
    # (0, 0.8): second; (-1, -0.6): none
    h = torch.tensor([[[1.0, 0.0], [0.96, 0.28], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]])
    assert scope.matches(h).tolist() == [[0, 1, 1, 1, NO_EVENT]]
    taught = torch.tensor([[2.0, 0.0]])
    fitted = ScopeKeys(2, 0.5, 0.5, 10, eos=None, routed=True)
    fitted.fit(taught, torch.tensor([[0.0, 1.0]]), chapter=3)
    assert fitted.chapters.tolist() == [3]


def test_each_position_reads_its_last_matched_chapter_until_eos_with_or_without_a_kv_cache():
    a, b, n = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]  # key 0's state, key 1's, neither
    states = torch.tensor([[n, a, n, b, n, n, a, n]])
    ids = torch.tensor([[5, 5, 5, 5, 0, 5, 5, 5]])  # eos at position 4
    whole = _routed_scope()
    whole.observe(states, ids, past=0)
    assert whole.read.tolist() == [[-1, 0, 0, 1, -1, -1, 0, 0]]
    assert whole.reads.tolist() == [[False, True, True, True, False, False, True, True]]
    steps = _routed_scope()
    steps.observe(states[:, :2], ids[:, :2], past=0)
    got = [steps.read]
    for t in range(2, 8):
        steps.observe(states[:, t:t + 1], ids[:, :t + 1], past=t)
        got.append(steps.read)
    assert torch.equal(torch.cat(got, dim=1), whole.read)


def _keyed_model(**memory):
    """A tiny model with keys routing over 2 chapters (and `memory`): key 0 (chapter 0) is the state of row 0's
    position 3, key 1 (chapter 1) that of row 0's position 8; row 1 holds other tokens."""
    model, ids, states = _model_and_states({**ROUTED, **memory})
    model.memory.scope.extend(states[[3, 8]], torch.tensor([0.9999, 0.9999]), torch.tensor([0, 1]))
    return model, ids


def test_keys_routing_reads_and_trains_only_the_matched_chapters_and_leaves_the_rest_to_the_base():
    model, ids = _keyed_model()
    assert model.memory.blocks[str(model.memory.layer_ids[0])].attn.router is None  # looked up: no router
    out = model(ids).logits
    read = model.memory.scope.read
    assert read[0].tolist() == [-1] * 3 + [0] * 5 + [1] * 4 and read[1].tolist() == [-1] * 12
    with torch.no_grad(), model.adapters_disabled():
        base = model(ids).logits
    closed = read < 0
    assert torch.equal(out[closed], base[closed]) and not torch.allclose(out[~closed], base[~closed])
    # the positions reading chapter 0 only: chapter 1 gets no gradient
    out[0, 3:8].sum().backward()
    bank = model.memory.banks[0]
    assert bank.chapters[0].grad.abs().sum() > 0
    assert bank.chapters[1].grad is None or not bank.chapters[1].grad.any()


def test_keys_routing_generates_alike_with_and_without_kv_cache_and_takes_no_strategy():
    model, ids = _keyed_model()
    model.eval()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids[:1, :10], use_cache=True, **kw)
        uncached = model.generate(input_ids=ids[:1, :10], use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        with pytest.raises(ValueError, match="routing: a memory with keys routing routes by keys; got 'token'"):
            model.generate(input_ids=ids[:1, :10], routing="token", **kw)
        with pytest.raises(ValueError, match="num_beams: memory.scope keys keeps what each row has read so far"):
            model.generate(input_ids=ids[:1, :10], num_beams=2, **kw)


@pytest.mark.parametrize("memory,sections,match", [
    ({**ROUTED, "scope": "none"}, {}, r"memory.routing: keys routes by the keys of memory.scope keys: set "
                                      r"memory.scope keys, got none"),
    ({**ROUTED, "top_k": 2}, {},
     r"memory.top_k: keys routing reads the one chapter of the key a token matched: must be 1, got 2"),
    (ROUTED, {"inference": {"routing": "sequence"}}, r"inference.routing: must be null with memory.routing keys"),
])
def test_keys_routing_config_errors_name_the_key(memory, sections, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("llama", memory=memory, **sections)


def test_the_anchor_is_the_mean_of_the_matched_unit_states_since_the_scope_opened_with_or_without_a_kv_cache():
    a, b, n = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]  # key 0's direction, key 1's, neither
    states = torch.tensor([[n, [2.0, 0.0], n, b, n, n, [3.0, 0.0], [0.0, 5.0]]])  # lengths differ: not unit
    ids = torch.tensor([[5, 5, 5, 5, 0, 5, 5, 5]])  # eos at position 4
    whole = _routed_scope()
    whole.observe(states, ids, past=0, anchor=True)
    assert whole.read.tolist() == [[-1, 0, 0, 1, -1, -1, 0, 1]]
    # opened at 1, position 3 matches too (mean of the two unit states), closed by eos, opened again at 6
    expected = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0],
                              [0.5, 0.5]]])
    assert torch.equal(whole.anchor, expected)
    steps = _routed_scope()
    steps.observe(states[:, :2], ids[:, :2], past=0, anchor=True)
    got = [steps.anchor]
    for t in range(2, 8):
        steps.observe(states[:, t:t + 1], ids[:, :t + 1], past=t, anchor=True)
        got.append(steps.anchor)
    assert torch.equal(torch.cat(got, dim=1), expected)
    assert steps.anchor_count.tolist() == [[0, 1, 1, 2, 0, 0, 1, 2]]


def test_the_anchored_read_starts_as_the_read_without_it_and_learns_only_in_scope():
    model, ids = _keyed_model()
    anchored, _ = _keyed_model(scope_anchor=True)
    assert anchored.load_state_dict(model.state_dict(), strict=False).missing_keys == [
        f"memory.blocks.{anchored.memory.layer_ids[0]}.attn.anchor.weight"]
    attn = anchored.memory.blocks[str(anchored.memory.layer_ids[0])].attn
    assert attn.anchor.weight.shape == (32, 32) and not attn.anchor.weight.any()  # W_a starts at 0
    out = anchored(ids).logits
    assert torch.equal(out, model(ids).logits)  # so the read is the one without an anchor, bit for bit
    out[0, 3:].sum().backward()
    assert attn.anchor.weight.grad.abs().sum() > 0
    attn.anchor.weight.grad = None
    out = anchored(ids).logits
    out[1].sum().backward()  # row 1 never opens its scope: its anchor is 0 and the read adds nothing
    assert attn.anchor.weight.grad is None or not attn.anchor.weight.grad.any()


def test_the_anchored_read_generates_alike_with_and_without_kv_cache():
    model, ids = _keyed_model(scope_anchor=True)
    attn = model.memory.blocks[str(model.memory.layer_ids[0])].attn
    torch.nn.init.normal_(attn.anchor.weight, std=0.5)
    model.eval()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids[:1, :10], use_cache=True, **kw)
        uncached = model.generate(input_ids=ids[:1, :10], use_cache=False, **kw)
        logits = model(ids).logits
        attn.anchor.weight.zero_()
        assert not torch.allclose(model(ids).logits[0, 3:], logits[0, 3:])  # the anchor moves the read
    assert torch.equal(cached, uncached)


def test_the_anchor_needs_scope_keys():
    with pytest.raises(ConfigError, match=r"memory.scope_anchor: the anchor is the mean of the states that matched "
                                          r"a scope key: needs memory.scope keys, got none"):
        check_training(tiny_config("llama", memory={**ROUTED, "routing": "sequence", "scope": "none",
                                                     "scope_anchor": True}))
