"""Saving and loading a MemoryModel (safetensors only; nothing is unpickled).

A saved model is a folder:
  config.yaml                    the resolved experiment config
  model.safetensors              every weight (from-scratch or unfrozen base), or, for a frozen pretrained base,
  adapter_config.json +          only what was trained (memory, LoRA) and the name of the base:
  adapter_model.safetensors      `load_model` loads the base from there and the adapter onto it
  tokenizer files
A training checkpoint of a model sharded over processes (`training.distributed: fsdp`) holds `sharded/` (every
process's shards, torch.distributed.checkpoint in safetensors) instead of the weight files; `load_model` reads it
on one process too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memory_transformer.config import ConfigError, load_config
from memory_transformer.data.tokenizer import load_tokenizer
from memory_transformer.integrity import verify_folder
from memory_transformer.memory.subjects import subject_index
from memory_transformer.model import MemoryModel, build_model, component_of

ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "model.safetensors"
SHARDED_WEIGHTS = "sharded"  # a training checkpoint under FSDP: every process's shards (train/distributed.py)


def _is_adapter(model: MemoryModel) -> bool:
    if model.merged:
        return False
    frozen = not any(p.requires_grad for n, p in model.named_parameters() if component_of(n) == "base")
    return model.config.model.pretrained is not None and frozen


def trained_state(model: MemoryModel, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What an adapter save holds: every non-base weight (memory, LoRA), of `state` (default: the model's)."""
    return {k: v for k, v in (model.state_dict() if state is None else state).items() if component_of(k) != "base"}


def save_model(model: MemoryModel, directory: str | Path, adapter: bool | None = None,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Adapter layout (only what was trained) for a frozen pretrained base, else every weight; `adapter`
    forces one or the other. `state`: the full weights to write instead of the model's own (a model sharded
    over processes passes its gathered state dict)."""
    out = save_model_info(model, directory)
    if _is_adapter(model) if adapter is None else adapter:
        save_file({k: v.contiguous() for k, v in trained_state(model, state).items()}, out / ADAPTER_WEIGHTS)
        base_cfg = model.base.config
        info = {"base_model": model.config.model.pretrained, "model_type": base_cfg.model_type,
                "hidden_size": base_cfg.hidden_size, "num_hidden_layers": base_cfg.num_hidden_layers,
                "base_fingerprint": base_fingerprint(model, state)}
        (out / ADAPTER_CONFIG).write_text(json.dumps(info, indent=2))
    elif state is not None:
        save_file(_without_aliases(model, state), out / FULL_WEIGHTS)
    else:
        from safetensors.torch import save_model as st_save_model

        st_save_model(model, str(out / FULL_WEIGHTS))  # handles tied embeddings


def save_model_info(model: MemoryModel, directory: str | Path) -> Path:
    """What a saved model holds besides its weights: config.yaml and the tokenizer files."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / "config.yaml")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
    return out


def _without_aliases(model: MemoryModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with one name per tensor of the model (tied embeddings: the first name); `load_weights` accepts
    either name of a tied pair, as it does for what `st_save_model` writes."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():  # keep_vars: tied names give the same object
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = state[name].contiguous()
    return out


# What `--set` may change on a saved model: how it is run and evaluated, and where its base lives (checked by
# the base fingerprint). Everything else defines what the trained weights mean.
LOAD_TIME_KEYS = ("inference.", "data.", "training.", "model.pretrained", "model.dtype", "model.attn_implementation")


def new_folder(path: str | Path, key: str) -> Path:
    """`path` as a folder to write a model into: absent or empty, never one that holds something (or a file)."""
    out = Path(path)
    if out.is_file() or (out.exists() and any(out.iterdir())):
        raise ConfigError(key, f"{out} exists and is not empty; choose a new folder")
    return out


def load_model(directory: str | Path, device: str | torch.device | None = None, overrides: list[str] | None = None,
               allow_base_mismatch: bool = False) -> MemoryModel:
    """Restore a model saved with `save_pretrained`: same weights, same logits. `overrides` may change only
    `LOAD_TIME_KEYS`; an adapter refuses a base other than the one it was trained on unless `allow_base_mismatch`."""
    src = Path(directory)
    if not (src / "config.yaml").is_file():
        raise ConfigError("", f"{src}: not a saved model (no config.yaml)")
    _check_load_overrides(overrides or [], src)
    verify_folder(src)  # a folder written by the trainer: each file against the sha256 in its COMPLETE marker
    model = build_model(load_config(src / "config.yaml", overrides), device=device)
    load_weights(model, src, allow_base_mismatch)
    if (src / "tokenizer_config.json").is_file() or (src / "byte_tokenizer.json").is_file():
        model.tokenizer = load_tokenizer(str(src))
        if model.subjects is not None:  # subjects as the saved tokenizer encodes them
            model.subjects.index = subject_index(model.config, model.tokenizer)
    return model


def _check_load_overrides(overrides: list[str], src: Path) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in LOAD_TIME_KEYS):
            raise ConfigError(key, f"fixed by the saved model {src} (it defines what the trained weights mean); "
                              "--set on a saved model takes inference.*, data.*, training.*, model.pretrained, "
                              "model.dtype, model.attn_implementation")


def load_weights(model: MemoryModel, src: Path, allow_base_mismatch: bool = False,
                 new_chapters: bool = False) -> None:
    """Load the weights saved in `src` (full model or adapter) into an already built `model`. `new_chapters`: the
    model's banks may have chapters beyond the saved ones (a later round of keys routing); they keep their init."""
    if (src / ADAPTER_WEIGHTS).is_file():
        _check_adapter_base(model, json.loads((src / ADAPTER_CONFIG).read_text()), src, allow_base_mismatch)
        with _readable(src / ADAPTER_WEIGHTS):
            weights = load_file(src / ADAPTER_WEIGHTS, device=str(model.device))
        missing = set(trained_state(model)) - set(weights)
        if new_chapters:
            missing = {k for k in missing if not re.fullmatch(r"memory\.banks\.\d+\.chapters\.\d+", k)}
        if missing:
            raise ConfigError("", f"{src / ADAPTER_WEIGHTS}: missing weights {sorted(missing)[:3]}")
        model.load_state_dict(weights, strict=False)
    elif (src / FULL_WEIGHTS).is_file():
        from safetensors.torch import load_model as st_load_model

        with _readable(src / FULL_WEIGHTS):
            st_load_model(model, str(src / FULL_WEIGHTS), device=str(model.device))
    elif (src / SHARDED_WEIGHTS).is_dir():  # a checkpoint of a model sharded over processes (FSDP)
        _load_sharded_weights(model, src / SHARDED_WEIGHTS)
    else:
        raise ConfigError("", f"{src}: no weights ({FULL_WEIGHTS} or {ADAPTER_WEIGHTS}); the folder is incomplete")


def _load_sharded_weights(model: MemoryModel, folder: Path) -> None:
    """The model's weights from a sharded checkpoint (train/distributed.py writes it: keys `model/<name>`),
    assembled from every process's shards by torch.distributed.checkpoint, here on one process."""
    import torch.distributed.checkpoint as dcp

    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # DCP warns that it assumes one process: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=True)
    model.load_state_dict({k[len("model/"):]: v for k, v in state.items()})


@contextlib.contextmanager
def _readable(path: Path):
    """Within: reading `path` with safetensors; a damaged file is a ConfigError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ConfigError("", f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); the file is "
                          "damaged or truncated") from None


def base_fingerprint(model: MemoryModel, state: dict[str, torch.Tensor] | None = None) -> str:
    """A hash of the base model: its shape and a strided sample of every base weight (rounded to bfloat16, so the
    same base loaded in another dtype matches). Two bases of the same shape trained apart differ in it. `state`:
    the full weights of a model sharded over processes."""
    h = hashlib.sha256()
    base_cfg = model.base.config
    h.update(json.dumps([base_cfg.model_type, base_cfg.vocab_size, base_cfg.hidden_size,
                         base_cfg.num_hidden_layers]).encode())
    for name, p in model.named_parameters():
        p = p if state is None else state[name]
        if component_of(name) == "base":
            flat = p.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 256)][:256]
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.to("cpu", torch.bfloat16).float().numpy().tobytes())
    return h.hexdigest()[:32]


def _check_adapter_base(model: MemoryModel, info: dict, src: Path, allow_mismatch: bool) -> None:
    base_cfg = model.base.config
    pretrained = model.config.model.pretrained
    for key, actual in (("model_type", base_cfg.model_type), ("hidden_size", base_cfg.hidden_size),
                        ("num_hidden_layers", base_cfg.num_hidden_layers)):
        if info.get(key) != actual:
            raise ConfigError("model.pretrained", f"adapter {src} was trained on a base with {key}={info.get(key)}, "
                              f"but {pretrained!r} has {key}={actual}")
    saved = info.get("base_fingerprint")  # absent in adapters saved before it was recorded
    if saved is not None and not allow_mismatch and saved != base_fingerprint(model):
        raise ConfigError("model.pretrained", f"adapter {src} was trained on another base than {pretrained!r} (same "
                          f"shape, other weights; trained on {info.get('base_model')!r}); to load it anyway pass "
                          "--allow-base-mismatch")
