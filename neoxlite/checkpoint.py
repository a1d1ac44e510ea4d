"""A checkpoint folder as an index of tensors: which shard holds each key, read one tensor at a time."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

# Buffers that old checkpoints carry and newer code recomputes.
LEGACY_KEY = re.compile(r"(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.")


def block_of(key: str) -> str:
    """The placement unit a parameter belongs to: 'embed_in', 'layers.i' or 'head'."""
    match = _LAYER_KEY.search(key)
    if match:
        return f"layers.{match.group(1)}"
    if "embed_in." in key:
        return "embed_in"
    return "head"


class Checkpoint:
    """Safetensors shards of one model: a single model.safetensors or shards listed in an index json."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.shard_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor in its shard
        for shard in self._shard_files():
            for key, (dtype, shape, start, end) in _read_header(self.folder / shard).items():
                self.shard_of[key] = shard
                self._shapes[key] = shape
                self._dtypes[key] = dtype
                self._spans[key] = (start, end)

    def _shard_files(self) -> list[str]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.folder / s).exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {self.folder}: {', '.join(missing)}")
            return shards
        single = self.folder / "model.safetensors"
        if single.exists():
            return ["model.safetensors"]
        others = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if others:
            return others
        pickled = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
        if pickled:
            raise ValueError(
                f"{self.folder} holds only pickled weights ({', '.join(pickled[:3])}); neoxlite never unpickles files "
                "(they can run code). Convert once with transformers: "
                "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`, "
                "or use the hub's safetensors revision."
            )
        raise FileNotFoundError(f"no safetensors weights in {self.folder}")

    @property
    def keys(self) -> list[str]:
        return list(self.shard_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def nbytes(self, key: str) -> int:
        numel = 1
        for dim in self._shapes[key]:
            numel *= dim
        return numel * self._dtypes[key].itemsize

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.shard_of)

    def read(self, key: str) -> torch.Tensor:
        """Reads one tensor into fresh CPU memory with plain file reads.

        No mmap: mapped pages count in the process's RSS until unmapped, and the loader promises a peak of
        the resident part plus about one block, so every byte read here is freed when the tensor is.
        """
        start, end = self._spans[key]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.folder / self.shard_of[key], "rb", buffering=0) as f:
            f.seek(start)
            view = memoryview(buf.numpy())
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.shard_of[key]} ends early while reading {key}: the file is truncated, re-download it")
                done += n
        return buf.view(self._dtypes[key]).reshape(self._shapes[key])

    def keys_by_block(self) -> dict[str, list[str]]:
        blocks: dict[str, list[str]] = defaultdict(list)
        for key in self.shard_of:
            blocks[block_of(key)].append(key)
        return dict(blocks)


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short); re-download it")
        size = int.from_bytes(raw, "little")
        if size > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {size}); re-download it")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} has a corrupt safetensors header; re-download it") from None
    base = 8 + size
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, which neoxlite cannot read")
        start, end = info["data_offsets"]
        entries[key] = (_DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
    return entries


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
