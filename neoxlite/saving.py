"""save_pretrained: hub layout (config.json + safetensors, sharded with an index when large), written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from neoxlite.fileio import atomic_folder


def parse_size(size: int | str) -> int:
    """Bytes from 123, '2GiB', '500MB', '1.5 GiB'."""
    if isinstance(size, int):
        return size
    text = str(size).strip().replace(" ", "")
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    number = text.rstrip("kmgtibKMGTIB")
    unit = text[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value < 0:
        raise ValueError(f"cannot read size {size!r}; write it like 6GiB, 512MiB, 6GB or a number of bytes")
    return int(value * units[unit])


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_pretrained(model: nn.Module, folder: str | os.PathLike, max_shard_size: int | str = "2GiB") -> None:
    """Writes config.json, generation_config.json (when the model has one) and the weights; tied weights are
    stored once, as the hub does."""
    limit = parse_size(max_shard_size)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            if tensor.device.type == "meta":
                raise ValueError(f"{key} is not loaded (offloaded or meta); save from a fully resident model")
            if id(tensor) in seen or (key == "embed_out.weight" and model.config.tie_word_embeddings):
                continue
            seen.add(id(tensor))
            state[key] = tensor.detach().to("cpu").contiguous()
    shards = _shards(state, limit)
    # config.json names the dtype the weights are saved in (a model loaded with dtype="bf16" saves bf16),
    # which is what transformers loads them as.
    config = dataclasses.replace(model.config, torch_dtype=str(model.dtype).removeprefix("torch."))
    generation_config = getattr(model, "generation_config", None)
    with atomic_folder(folder, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (Path(tmp) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
