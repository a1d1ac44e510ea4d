"""A checkpoint folder as an index of tensors: which shard holds each key, read one tensor at a time.

Everything a checkpoint's files say is untrusted: shard names in the index, header lengths, offsets, shapes.
Where a shard may live (`shard_path`):
- a plain relative path from the checkpoint folder, never absolute, no empty or `.` parts;
- resolving (symlinks followed) inside the checkpoint folder, or inside a sibling folder of the same parent
  (`../model/x.safetensors`: the shipped demo heads share the demo model's shards that way), or, for a
  snapshot folder of the Hugging Face cache (`.../snapshots/REV`), inside that cache repository's `blobs`
  folder, where huggingface_hub's own symlinks point;
- a regular file: never a device, FIFO, socket or folder (opened without blocking, checked on the open file).
Metadata files (config.json, the tokenizer files, ...: `read_metadata_file`) are confined the same way but
without the sibling folders: inside the folder that holds them, or the hub-cache repository's `blobs`.
Each safetensors header is checked before any tensor is read (`_read_header`): a JSON object no larger than the
file, known dtypes, shapes of non-negative ints, data_offsets within the data section, each span exactly
numel * itemsize bytes, no two spans overlapping. Any violation is one ValueError naming the file.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import reprlib
import stat
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from neoxlite.config import is_int

# Buffers that old checkpoints carry and newer code recomputes.
LEGACY_KEY = re.compile(r"(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.")
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_INDEX_BYTES = 100_000_000


def block_of(key: str) -> str:
    """The placement unit a parameter belongs to: 'embed_in', 'layers.i' or 'head'."""
    match = _LAYER_KEY.search(key)
    if match:
        return f"layers.{match.group(1)}"
    if "embed_in." in key:
        return "embed_in"
    return "head"


def open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of `path`, refused (ValueError) unless it is a regular file.

    O_NONBLOCK keeps a FIFO from blocking the open; the type is checked on the opened file, not on a
    name that could change in between."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be opened ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{what} {path} is not a regular file; a checkpoint holds plain files only")
    os.set_blocking(fd, True)
    return fd


# config and tokenizer files are kilobytes to a few megabytes; anything near this is not one.
MAX_METADATA_BYTES = 256 * 2**20


def read_metadata_file(path: Path, what: str) -> bytes:
    """The bytes of a small metadata file (config.json and the like), read only when it resolves inside its
    folder (as the module docstring says) and is a regular file of at most MAX_METADATA_BYTES; ValueError
    naming the file otherwise."""
    try:
        base, target = path.parent.resolve(), path.resolve()
    except (OSError, RuntimeError, UnicodeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ValueError(f"{what} {path} cannot be resolved ({err}); replace it with a plain file") from None
    if not any(_within(target, root) for root in _own_roots(base)):
        raise ValueError(f"{what} {path} links to {target}, outside the checkpoint folder {base}; metadata "
                         "files may not be read from there, copy the file into the folder instead")
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"{what} {path} is {size:,} bytes, more than any real one "
                             f"({MAX_METADATA_BYTES:,}); re-download or fix the file")
        return file.read(MAX_METADATA_BYTES + 1)


def read_metadata_json(path: Path, what: str) -> Any:
    """The JSON value of a metadata file read by read_metadata_file; ValueError naming the file when it is not
    UTF-8 JSON (too deep or with a number too long to parse included)."""
    raw = read_metadata_file(path, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not valid JSON ({reason}); re-download or fix the file") from None


def shard_path(folder: Path, name: Any, source: Path) -> Path:
    """The file a shard name from `source` (the index, or the folder listing) refers to, confined as the module
    docstring says; ValueError naming `source` otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise ValueError(f"{source} names a shard {name!r} that is not a plain relative path")
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".") for p in parts):
        raise ValueError(f"{source} names the shard {name!r}: shards must be plain relative paths "
                         "inside the checkpoint folder or a sibling folder")
    base = folder.resolve()
    lexical = Path(posixpath.normpath(posixpath.join(str(base), name)))
    try:
        target = lexical.resolve()
        target.exists()  # only probes the name: a name too long for the filesystem fails here, not later
    except (OSError, RuntimeError, UnicodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ValueError(f"{source} names the shard {reprlib.repr(name)}, which cannot be a file name here "
                         f"({reason}); re-download the index") from None
    roots = _shard_roots(base)
    if not any(_within(target, root) for root in roots) or not any(_within(lexical, root) for root in roots[:2]):
        raise ValueError(f"{source} names the shard {name!r}, which lies outside the checkpoint folder {base} and "
                         "its sibling folders; shards may not be read from there")
    return target


def _own_roots(base: Path) -> list[tuple[Path, int]]:
    """(folder, parts needed below it): the checkpoint folder itself and a hub-cache snapshot's blobs."""
    roots = [(base, 1)]
    if base.parent.name == "snapshots":
        roots.append((base.parent.parent / "blobs", 1))
    return roots


def _shard_roots(base: Path) -> list[tuple[Path, int]]:
    """_own_roots plus, second, any folder beside the checkpoint folder (one part for the sibling's name, one
    for the file) unless that would be the whole filesystem."""
    roots = _own_roots(base)
    if base.parent != Path(base.anchor):
        roots.insert(1, (base.parent, 2))
    return roots


def _within(path: Path, root: tuple[Path, int]) -> bool:
    folder, depth = root
    try:
        return len(path.relative_to(folder).parts) >= depth
    except ValueError:
        return False


class Checkpoint:
    """Safetensors shards of one model: a single model.safetensors or shards listed in an index json."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.shard_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor in its shard
        self.files: dict[str, Path] = weight_files(self.folder)  # shard name -> the confined file
        for shard, path in self.files.items():
            for key, (dtype, shape, start, end) in _read_header(path).items():
                if key in self.shard_of:
                    raise ValueError(f"{path}: tensor {key} is also in {self.files[self.shard_of[key]]}; "
                                     "a checkpoint holds each tensor once")
                self.shard_of[key] = shard
                self._shapes[key] = shape
                self._dtypes[key] = dtype
                self._spans[key] = (start, end)

    @property
    def keys(self) -> list[str]:
        return list(self.shard_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def span(self, key: str) -> tuple[int, int]:
        """The tensor's byte range [start, end) in its shard file (self.files[self.shard_of[key]])."""
        return self._spans[key]

    def nbytes(self, key: str) -> int:
        start, end = self._spans[key]
        return end - start  # the header check made it numel * itemsize

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.shard_of)

    def read(self, key: str) -> torch.Tensor:
        """Reads one tensor into fresh CPU memory with plain file reads.

        No mmap: mapped pages count in the process's RSS until unmapped, and the loader promises a peak of
        the resident part plus about one block, so every byte read here is freed when the tensor is.
        """
        start, end = self._spans[key]
        path = self.files[self.shard_of[key]]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(open_regular(path, "shard"), "rb", buffering=0) as f:
            f.seek(start)
            view = memoryview(buf.numpy())
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{path} ends early while reading {key}: the file is truncated, re-download it")
                done += n
        return buf.view(self._dtypes[key]).reshape(self._shapes[key])

    def keys_by_block(self) -> dict[str, list[str]]:
        blocks: dict[str, list[str]] = defaultdict(list)
        for key in self.shard_of:
            blocks[block_of(key)].append(key)
        return dict(blocks)


def weight_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Shard name -> confined file, for every safetensors file the weights of `folder` come from.

    The index's shards when there is one, else model.safetensors, else every *.safetensors in the folder.
    Pickled weights are refused: neoxlite never unpickles files."""
    folder = Path(folder)
    index = folder / INDEX
    if index.exists():
        names = sorted(set(_read_index(index).values()))
        files: dict[str, Path] = {}
        for name in names:
            path = shard_path(folder, name, index)
            if path not in files.values():  # one file named two ways ('b.safetensors', '../ckpt/b...') is read once
                files[name] = path
        missing = [name for name, path in files.items() if not path.exists()]
        if missing:
            raise ValueError(f"{index} lists shards that are missing: {', '.join(missing)}; re-download them")
        return files
    if (folder / "model.safetensors").exists():
        return {"model.safetensors": shard_path(folder, "model.safetensors", folder)}
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        return {name: shard_path(folder, name, folder) for name in others}
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickled:
        raise ValueError(
            f"{folder} holds only pickled weights ({', '.join(pickled[:3])}); neoxlite never unpickles files "
            "(they can run code). Convert once with transformers: "
            "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`, "
            "or use the hub's safetensors revision."
        )
    raise FileNotFoundError(f"no safetensors weights in {folder}")


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard name), checked to be an object of strings."""
    with open(open_regular(index, "shard index"), "rb") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise ValueError(f"{index} is larger than {MAX_INDEX_BYTES:,} bytes; it is not a shard index")
    data = _parse_json(raw, index, "is not valid JSON")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no \"weight_map\" object naming each tensor's shard; re-download it")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ValueError(f"{index}: weight_map[{key!r}] is {shard!r}, not a shard file name; re-download it")
    return weight_map


def _parse_json(raw: bytes, path: Path, problem: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("duplicate key")
        return out

    try:
        return json.loads(raw, object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} {problem}; re-download it") from None


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """(dtype, shape, absolute start, absolute end) per tensor of the safetensors file at `path`, checked."""
    with open(open_regular(path, "shard"), "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short); re-download it")
        size = int.from_bytes(raw, "little")
        # The length is not echoed: for a file that is not safetensors, it would print the file's first bytes.
        if size < 2 or size > min(MAX_HEADER_BYTES, file_size - 8):
            raise ValueError(f"{path} is not a safetensors file (its header length does not fit the file); "
                             "re-download it")
        header = _parse_json(f.read(size), path, "has a corrupt safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (not a JSON object); re-download it")
    base = 8 + size
    data_size = file_size - base
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict):
                raise ValueError(f"{path}: __metadata__ is not a JSON object; re-download it")
            continue
        dtype, shape, start, end = _check_entry(path, key, info, data_size)
        entries[key] = (dtype, shape, base + start, base + end)
    spans = sorted((start, end, key) for key, (_, _, start, end) in entries.items())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ValueError(f"{path}: tensors {first} and {second} overlap in the file; re-download it")
    return entries


def _check_entry(path: Path, key: str, info: Any, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(info, dict):
        raise ValueError(f"{path}: the header entry of {key} is not a JSON object; re-download it")
    name = info.get("dtype")
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"{path}: tensor {key} has dtype {name!r}, which neoxlite cannot read")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(is_int(d) and 0 <= d < 2**63 for d in shape):
        raise ValueError(f"{path}: tensor {key} has shape {reprlib.repr(shape)}, not a list of sizes "
                         "(integers from 0 to 2**63 - 1); re-download it")
    extent = 1  # the product of the nonzero dims: torch's sizes and strides are int64, even when empty
    for dim in shape:
        extent *= max(dim, 1)
    if extent >= 2**63:
        raise ValueError(f"{path}: tensor {key} has shape {shape}, too large for any tensor; re-download it")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise ValueError(f"{path}: tensor {key} has no valid data_offsets [start, end]; re-download it")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise ValueError(f"{path}: tensor {key} has data_offsets [{start}, {end}] outside the file's "
                         f"{data_size:,} data bytes; the file is truncated or corrupt, re-download it")
    numel = 1
    for dim in shape:
        numel *= dim
    dtype = _DTYPES[name]
    if end - start != numel * dtype.itemsize:
        raise ValueError(f"{path}: tensor {key} spans {end - start:,} bytes but its shape {shape} of {name} needs "
                         f"{numel * dtype.itemsize:,}; re-download it")
    return dtype, tuple(shape), start, end


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
