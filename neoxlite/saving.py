"""save_pretrained: hub layout (config.json + safetensors, sharded with an index when large), written atomically."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from neoxlite.fileio import atomic_folder


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


def save_pretrained(model: nn.Module, folder: str | os.PathLike, max_shard_size: int | str = "2GiB") -> None:
    """Writes config.json, generation_config.json (when the model has one) and the weights; tied weights are
    stored once, as the hub does. An offloaded model is saved too, one shard at a time."""
    limit = shard_limit(max_shard_size)
    items = _saved_tensors(model)
    shards = _shards(items, limit)
    # config.json names the dtype the weights are saved in (a model loaded with dtype="bf16" saves bf16),
    # which is what transformers loads them as.
    config = dataclasses.replace(model.config, torch_dtype=str(model.dtype).removeprefix("torch."))
    generation_config = getattr(model, "generation_config", None)
    with atomic_folder(folder, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if len(shards) == 1:
            save_file(_materialize(shards[0]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(_materialize(shard), str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys((item.key for item in shard), name))
        total = sum(item.nbytes for item in items)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (Path(tmp) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _materialize(shard: list[_Saved]) -> dict[str, torch.Tensor]:
    return {item.key: item.get() for item in shard}
