"""save_pretrained: hub layout (config.json + safetensors, sharded with an index when large), saved in place with
one switching rename (old weights or new, never a mix) and every other file in the folder kept."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from neoxlite.fileio import umask
from neoxlite.generation_config import FILE_NAME as GENERATION_CONFIG


def shard_limit(max_shard_size: int | str) -> int:
    """Bytes per shard from 123, '2GiB', '500MB' (the one size grammar: offload.budget.parse_size), > 0."""
    from neoxlite.offload.budget import parse_size

    try:
        limit = parse_size(max_shard_size, name="max_shard_size")
    except ValueError as err:
        raise ValueError(f"{err} (--max-shard-size)") from None
    if not limit:
        raise ValueError(f"max_shard_size={max_shard_size!r} is not a positive size; write it like 2GiB or 500MB "
                         "(--max-shard-size)")
    return limit


@dataclasses.dataclass(frozen=True)
class _Saved:
    """One tensor to save: its size up front, its bytes only when its shard is written."""

    key: str
    nbytes: int
    get: Callable[[], torch.Tensor]


def _shards(items: list[_Saved], limit: int) -> list[list[_Saved]]:
    shards: list[list[_Saved]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _saved_tensors(model: nn.Module) -> list[_Saved]:
    """The tensors save_pretrained writes, in state_dict order; tied weights once. Layers an offloaded model streams
    are read from their RAM copy or the disk store one layer at a time, in the form they were loaded in (cast or
    quantized), so saving never holds more than one shard plus one layer."""
    base = model.base_model
    scheduler = getattr(base, "scheduler", None)
    sources = getattr(scheduler, "sources", {})
    prefix = next(name for name, module in model.named_modules() if module is base)
    prefix = f"{prefix}.layers." if prefix else "layers."
    state_of = functools.lru_cache(maxsize=1)(lambda i: scheduler.layer_state(i))
    items: list[_Saved] = []
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if key.startswith(prefix) and int(key[len(prefix):].split(".")[0]) in sources:
            i = int(key[len(prefix):].split(".")[0])
            if not items or not items[-1].key.startswith(f"{prefix}{i}."):  # the layer's first key: all of it
                items += [_Saved(f"{prefix}{i}.{name}", t.end - t.start,
                                 lambda i=i, name=name: state_of(i)[name].clone())  # own bytes, not a view
                          for name, t in sources[i].layout.tensors.items()]
            continue
        if tensor.device.type == "meta":
            raise ValueError(f"{key} is not loaded (a meta tensor); load the model's weights before saving it")
        if id(tensor) in seen or (key == "embed_out.weight" and model.config.tie_word_embeddings):
            continue
        seen.add(id(tensor))
        items.append(_Saved(key, tensor.numel() * tensor.element_size(),
                            lambda tensor=tensor: tensor.detach().to("cpu").contiguous()))
    embed = base.embed_in
    if hasattr(embed, "read_table"):  # an embedding left in the disk store (read by rows): not in state_dict
        key = f"{prefix.removesuffix('layers.')}embed_in.weight"
        nbytes = embed.num_embeddings * embed.row_bytes
        items.insert(0, _Saved(key, nbytes, embed.read_table))
    return items


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The weight files save_pretrained writes: model.safetensors, or shards (tagged when the plain names were taken).
_SHARD = re.compile(r"model(?:-[0-9a-f]{8})?-\d{5}-of-\d{5}\.safetensors")
# A staged file or folder: `.<final name>.<8 chars>.tmp`, flock'ed by its writer until renamed (_remove_dead_stages).
_STAGED = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def save_pretrained(model: nn.Module, folder: str | os.PathLike, max_shard_size: int | str = "2GiB") -> None:
    """Writes config.json, generation_config.json (when the model has one) and the weights; tied weights are
    stored once, as the hub does. An offloaded model is saved too, one shard at a time.

    Into an existing folder the save is made in place, as transformers does, and every other file stays (a
    tokenizer saved there first, a README). Each file is written under a hidden temporary name and renamed when
    all are complete; the weights switch from the old set to the new one in a single rename (the index, or
    model.safetensors), so a kill at any point leaves the old weights or the new ones, never a mix. The old weight
    files are deleted last.
    """
    limit = shard_limit(max_shard_size)
    items = _saved_tensors(model)
    shards = _shards(items, limit)
    # config.json names the dtype the weights are saved in (a model loaded with dtype="bf16" saves bf16),
    # which is what transformers loads them as.
    config = dataclasses.replace(model.config, torch_dtype=str(model.dtype).removeprefix("torch."))
    generation_config = getattr(model, "generation_config", None)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder; save_pretrained writes a checkpoint folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _save_in_place(folder, config, generation_config, items, shards)
    except BaseException:
        if created:  # a failed save into a new folder leaves no folder (rmdir: only while it is empty)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _save_in_place(folder: Path, config: Any, generation_config: Any, items: list[_Saved],
                   shards: list[list[_Saved]]) -> None:
    _remove_dead_stages(folder)
    present = set(os.listdir(folder))
    names = [SINGLE] if len(shards) == 1 else _shard_names(len(shards), present)
    with _Stage(folder) as stage:
        config.save_pretrained(stage.folder_for("config.json"))
        if generation_config is not None:
            generation_config.save_pretrained(stage.folder_for(GENERATION_CONFIG))
        for name, shard in zip(names, shards, strict=True):
            save_file(_materialize(shard), str(stage.file(name)), metadata={"format": "pt"})
        if len(shards) > 1:
            weight_map = {item.key: name for name, shard in zip(names, shards, strict=True) for item in shard}
            index = {"metadata": {"total_size": sum(item.nbytes for item in items)}, "weight_map": weight_map}
            stage.file(INDEX).write_text(json.dumps(index, indent=2))
        stage.sync()
        # Files nothing selects yet first (new shard names, the config), then the one rename that switches.
        switch = INDEX if len(shards) > 1 else SINGLE
        for name in [n for n in stage.names if n != switch]:
            stage.commit(name)
        stage.commit(switch)
        if switch == SINGLE:
            with contextlib.suppress(FileNotFoundError):  # an old index would still select the old shards
                os.unlink(folder / INDEX)
        _sync_folder(folder)
    for name in sorted(present - set(names)):  # the old weights, unused now
        if _SHARD.fullmatch(name) or (name == SINGLE and switch == INDEX):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(folder / name)


def _shard_names(count: int, present: set[str]) -> list[str]:
    """transformers' shard names, or the same with a random tag where one of them is taken (by the old weights):
    no file of the old checkpoint is overwritten before the switch."""
    tag = ""
    while True:
        names = [f"model{tag}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        if present.isdisjoint(names):
            return names
        tag = f"-{secrets.token_hex(4)}"


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the renames themselves durable
    finally:
        os.close(fd)


class _Stage:
    """Hidden temporary files (or folders) in `folder`, each flock'ed while staged, renamed to their final names
    by commit(); whatever was not committed is deleted when the block ends, on success or error."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.staged: dict[str, tuple[Path, Path, int]] = {}  # final name -> (file to rename, temp entry, lock fd)

    @property
    def names(self) -> list[str]:
        return list(self.staged)

    def file(self, name: str) -> Path:
        """A temporary path to write the file `name` at."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; a saved file reads like any other
        self.staged[name] = (Path(tmp), Path(tmp), fd)
        return Path(tmp)

    def folder_for(self, name: str) -> Path:
        """A temporary folder for an object whose save_pretrained(folder) writes `name` into it."""
        tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp"))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.staged[name] = (tmp / name, tmp, fd)
        return tmp

    def sync(self) -> None:
        for path, _, _ in self.staged.values():
            with open(path, "rb") as f:
                os.fsync(f.fileno())

    def commit(self, name: str) -> None:
        path, entry, fd = self.staged.pop(name)
        try:
            os.replace(path, self.folder / name)
            if entry != path:
                shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        for path, entry, fd in self.staged.values():
            if entry == path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            os.close(fd)


def _remove_dead_stages(folder: Path) -> None:
    """Deletes what a killed save left in `folder`: the hidden names _Stage makes for the files a save writes,
    each only when its lock is free (a live save in another process holds its entries' locks)."""
    for path in folder.iterdir():
        match = _STAGED.fullmatch(path.name)
        target = match.group(1) if match else ""
        if target not in (INDEX, SINGLE, "config.json", GENERATION_CONFIG) and not _SHARD.fullmatch(target):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone, or a link: not something a save made
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mode = os.fstat(fd).st_mode
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                if stat.S_ISREG(mode):
                    os.unlink(path)
                elif stat.S_ISDIR(mode):
                    shutil.rmtree(path, ignore_errors=True)
        except (BlockingIOError, FileNotFoundError):
            pass  # a live save's, or gone already
        finally:
            os.close(fd)


def _materialize(shard: list[_Saved]) -> dict[str, torch.Tensor]:
    return {item.key: item.get() for item in shard}
