"""`memory-transformer generate`: prompts in, text out, through `MemoryModel.generate` (KV cache, left padding)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from memory_transformer.config import ConfigError
from memory_transformer.io import load_model
from memory_transformer.data.tokenizer import left_pad
from memory_transformer.model import MemoryModel, eval_mode


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    out = list(prompts)
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise ConfigError("--prompt-file", f"file not found: {path}")
        out += [line for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise ConfigError("--prompt", "give at least one prompt (--prompt TEXT or --prompt-file FILE)")
    if any(not p for p in out):
        raise ConfigError("--prompt", "a prompt is empty: give some text to continue")
    return out


def generation_overrides(args) -> list[str]:
    """CLI flags as `inference.*` overrides, so the config stays the one place for defaults."""
    pairs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "routing": args.routing}
    out = [f"inference.{k}={v}" for k, v in pairs.items() if v is not None]
    if args.greedy:
        out.append("inference.greedy=true")
    elif any(v is not None for v in (args.temperature, args.top_k, args.top_p)):
        out.append("inference.greedy=false")
    return out


def generate_texts(model: MemoryModel, prompts: list[str], batch_size: int = 8, streamer=None) -> list[str]:
    """Completions (new text only) for `prompts`, `batch_size` at a time, left-padded."""
    tok, outs = model.tokenizer, []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts[start : start + batch_size]]
        input_ids, mask = left_pad(ids, tok.pad_token_id, model.device)
        width = input_ids.shape[1]
        out = model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=tok.pad_token_id,
                             streamer=streamer)
        outs += [tok.decode(row[width:], skip_special_tokens=True) for row in out.tolist()]
    return outs


def sample_documents(model: MemoryModel, n: int, max_tokens: int, seed: int, batch_size: int = 16,
                     temperature: float = 1.0) -> list[str]:
    """`n` documents sampled from `model` (no top-k or top-p), `batch_size` at a time. Each starts
    after the end-of-text token, as documents follow each other in packed training data, and ends at the next
    one or after `max_tokens`. Seeded by `seed` without touching the caller's random state or train mode."""
    tok, docs = model.tokenizer, []
    devices = [model.device] if model.device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            ids = torch.full((b, 1), tok.eos_token_id, dtype=torch.long, device=model.device)
            # Neutral settings given explicitly: a base's generation_config may carry e.g. a repetition penalty.
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens - 1,
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None,
                                 repetition_penalty=1.0, no_repeat_ngram_size=0,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            docs += [tok.decode(row[1:], skip_special_tokens=True) for row in out.tolist()]
    return docs


def generate_cli(args) -> int:
    prompts = read_prompts(args.prompt, args.prompt_file)
    model = load_model(args.checkpoint, overrides=[*args.set, *generation_overrides(args)],
                       allow_base_mismatch=args.allow_base_mismatch)
    if len(prompts) == 1:
        from transformers import TextStreamer

        print(prompts[0], end="", flush=True)
        generate_texts(model, prompts, streamer=TextStreamer(model.tokenizer, skip_prompt=True))
        return 0
    for prompt, text in zip(prompts, generate_texts(model, prompts, args.batch_size)):
        sys.stdout.write(f"{prompt}{text}\n")
    return 0
