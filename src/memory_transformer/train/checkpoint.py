"""Crash-safe checkpoint folders, plus pickle-free RNG and optimizer/scheduler state.

Run-folder layout::

    <run_dir>/checkpoints/step-000100/   one complete checkpoint (has a COMPLETE marker)
    <run_dir>/checkpoints/.tmp-...       being written, or left behind by a crash; never listed
    <run_dir>/best/, <run_dir>/final/    written with the same `atomic_write_dir`

A folder is filled under a temporary name, the `COMPLETE` marker is written last, everything is
fsynced, and only then is it renamed to its final name. A reader that trusts only folders with a
marker therefore never sees a half-written checkpoint, whatever moment the writer dies at.
The marker also records the sha256 of every file (`"sha256": {relative path: hex}`): `verify_folder`
turns a flipped byte or a truncated file into a one-line error naming the file.
One writer per run folder is assumed (the trainer's main process); under FSDP every process first writes
its shards into the temp folder the main process made, and the main process marks and renames it once all
have returned.

No pickle anywhere: tensors go to safetensors, structure goes to JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from memory_transformer.config import ConfigError
from memory_transformer.integrity import COMPLETE, checksums

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"  # in-progress writes and half-deleted folders: removed by clean_stale_temp
OLD_PREFIX = ".old-"  # a folder moved aside while its replacement is renamed in
_STEP_RE = re.compile(r"step-(\d{6,})")


# --------------------------------------------------------------------------- folders


def step_dirname(step: int) -> str:
    return f"step-{step:06d}"


def temp_dir(final: Path) -> Path:
    """A new, empty temp folder beside `final`, to be filled and then renamed to it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():  # stale leftover of an earlier process that had our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def atomic_write_dir(final: Path, write: Callable[[Path], None], marker: dict | None = None,
                     tmp: Path | None = None) -> Path:
    """Fill a temp folder with `write(tmp)`, mark it COMPLETE, fsync, then rename it to `final`.

    An existing `final` is replaced only after the new folder is complete. If `write` raises,
    the temp folder is removed and `final` is untouched. `tmp`: a `temp_dir(final)` that other
    processes have already written their part into (they must all have finished).
    """
    final = Path(final)
    tmp = temp_dir(final) if tmp is None else tmp
    try:
        write(tmp)
        _fsync_tree(tmp)  # data is durable before the marker can claim it is
        _write_marker(tmp / COMPLETE, {**(marker or {}), "sha256": checksums(tmp)})
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, final)
    return final


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / step_dirname(step)


def save_checkpoint(
    run_dir: Path, step: int, write: Callable[[Path], None], keep_last: int | None = None,
    tmp: Path | None = None,
) -> Path:
    """Write `<run_dir>/checkpoints/step-NNNNNN/` atomically, then keep only the newest `keep_last`
    (`tmp`: see `atomic_write_dir`)."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    final = checkpoint_dir(run_dir, step)
    atomic_write_dir(final, write, marker={"step": step}, tmp=tmp)
    if keep_last is not None:
        _apply_retention(run_dir, keep_last, protect=final)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first; temp and unmarked folders are skipped."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / COMPLETE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def clean_stale_temp(run_dir: Path) -> None:
    """Remove what a crashed writer left behind in `run_dir` and its checkpoints folder.

    A folder that was moved aside for a replacement that never arrived is put back instead.
    Call at resume, before any writer of this run is running.
    """
    for parent in (Path(run_dir), Path(run_dir) / CHECKPOINTS_DIR):
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            if entry.name.startswith(OLD_PREFIX):
                original = parent / entry.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
                if not original.exists() and (entry / COMPLETE).is_file():
                    os.replace(entry, original)
                    logger.warning("restored %s from interrupted replace", original)
                    continue
            if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)) and entry.is_dir():
                shutil.rmtree(entry)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`; an existing `final` is moved aside first, deleted after."""
    old = None
    if final.exists():
        old = final.parent / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        _delete_quietly(old)


def _apply_retention(run_dir: Path, keep_last: int, protect: Path) -> None:
    checkpoints = list_checkpoints(run_dir)
    for _, path in checkpoints[: max(len(checkpoints) - keep_last, 0)]:
        if path != protect:
            _delete_quietly(path)


def _delete_quietly(path: Path) -> None:
    """Delete a folder; failure is a warning, never an error (the save that triggered it succeeded).

    The folder is first renamed to a temp name, so a delete that stops halfway cannot leave a
    marked-but-gutted checkpoint that `list_checkpoints` would offer for resume.
    """
    doomed = path.parent / f"{TMP_PREFIX}delete-{path.name}-{os.getpid()}"
    try:
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    except OSError as err:
        logger.warning("could not delete old checkpoint %s: %s", path, err)


def _write_marker(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, torch.Tensor]:
    """Every global RNG state as tensors, ready for `safetensors.torch.save_file`."""
    version, words, gauss_next = random.getstate()  # words: 624 MT words (< 2**32) + position
    state = {
        "python.version": torch.tensor(version, dtype=torch.int64),
        "python.state": torch.tensor(words, dtype=torch.int64),
        # (has_value, value): gauss_next is a float or None
        "python.gauss_next": torch.tensor(
            [gauss_next is not None, gauss_next or 0.0], dtype=torch.float64
        ),
        "torch.cpu": torch.get_rng_state(),
    }
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        assert kind == "MT19937", kind
        state["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
        state["numpy.pos_has_gauss"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
        state["numpy.cached_gaussian"] = torch.tensor(cached, dtype=torch.float64)
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch.cuda.{i}"] = cuda_state.cpu()
    return state


def process_filename(rank: int) -> str:
    """The checkpoint file with the RNG state and data position of process `rank`."""
    return f"process-{rank}.safetensors"


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` captured (sources absent from `state` are left alone)."""
    has_gauss, gauss = state["python.gauss_next"].tolist()
    random.setstate(
        (
            int(state["python.version"]),
            tuple(state["python.state"].tolist()),
            gauss if has_gauss else None,
        )
    )
    torch.set_rng_state(state["torch.cpu"])
    np = _numpy()
    if np is not None and "numpy.keys" in state:
        pos, has_gauss = state["numpy.pos_has_gauss"].tolist()
        keys = state["numpy.keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy.cached_gaussian"])))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch.cuda.{i}" in state:
                torch.cuda.set_rng_state(state[f"torch.cuda.{i}"], i)


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


# --------------------------------------------------------------------------- state-dict trees
# JSON layout: lists and scalars are stored as themselves; every JSON object is a tagged node,
#   {"type": "dict", "items": [[key, value], ...]}   (a list of pairs keeps int keys as ints)
#   {"type": "tuple", "items": [...]}
#   {"type": "tensor", "key": "<safetensors key>"}

_FORMAT_VERSION = 1
_SCALARS = (bool, int, float, str, type(None))


def save_state_dict_tree(obj: dict, path: Path) -> None:
    """Write a nested dict of tensors and plain values as `<path>.safetensors` + `<path>.json`."""
    tensors_path, json_path = _tree_paths(path)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, "", tensors)
    save_file(tensors, str(tensors_path))
    json_path.write_text(json.dumps({"format": _FORMAT_VERSION, "tree": tree}, indent=1))


def load_state_dict_tree(path: Path, device: str = "cpu") -> dict:
    """Inverse of `save_state_dict_tree`; tensors are loaded onto `device`."""
    tensors_path, json_path = _tree_paths(path)
    doc = json.loads(json_path.read_text())
    if doc.get("format") != _FORMAT_VERSION:
        raise ValueError(f"{json_path}: unknown state-dict tree format {doc.get('format')!r}")
    return _decode(doc["tree"], load_file(str(tensors_path), device=device))


def _tree_paths(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _encode(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = where or "root"
        if key in tensors:
            raise ValueError(f"two tensors would share the safetensors key {key!r}")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"type": "tensor", "key": key}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, _SCALARS):
                raise TypeError(f"{where or '<root>'}: dict key {k!r} is not a JSON scalar")
            items.append([k, _encode(v, f"{where}/{k}" if where else str(k), tensors)])
        return {"type": "dict", "items": items}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{where}/{i}" if where else str(i), tensors) for i, v in enumerate(obj)]
        return {"type": "tuple", "items": items} if isinstance(obj, tuple) else items
    if isinstance(obj, _SCALARS):
        return obj
    raise TypeError(f"{where or '<root>'}: cannot store {type(obj).__name__} without pickle")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if node["type"] == "tensor":
        return tensors[node["key"]]
    if node["type"] == "tuple":
        return tuple(_decode(v, tensors) for v in node["items"])
    return {k: _decode(v, tensors) for k, v in node["items"]}
