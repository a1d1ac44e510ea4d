"""The disk tier: one file per block, in its final (cast or quantized) form, written once and reused.

Layout of an offload dir:

    OFFLOAD_DIR/neoxlite-<fingerprint[:16]>/manifest.json
    OFFLOAD_DIR/neoxlite-<fingerprint[:16]>/<block>.safetensors

- Each block file is a valid safetensors file (readable with `safetensors.safe_open` for debugging) whose
  data section starts on a 4 KiB boundary and holds the tensors sorted by element size, each starting on a
  256-byte boundary (the gaps are listed in the header as `__pad__.<tensor>` byte tensors, so the file stays
  valid safetensors): the scheduler reads a whole block with plain reads into a reused buffer and views the
  tensors in place, no parsing and no copies, aligned as CUDA kernels need.
- Writes are atomic (temporary file, fsync, rename); a block counts as stored only once the manifest,
  itself replaced atomically, records its size and CRC32. A crash or a full disk leaves at worst an
  unlisted temporary file, never a listed broken block. Each temporary file is flock'ed by its writer while
  open, so the next store opened on this folder deletes the ones whose writer died (a kill -9) and leaves the
  ones a live process is still writing.
- The fingerprint covers the checkpoint's identity (the names, sizes and modification times of config files
  and of every file the weights come from, sibling-folder shards included) and the settings that change a
  block's final form (dtype, quantization). A store is reused only when both match.
- The manifest carries a SHA-256 of its own content and is checked field by field (block names, offsets
  inside the file, spans matching shapes). A manifest that fails means "rebuild this store": a one-line
  notice on stderr, every block rebuilt from the checkpoint. Block file names are never read from the
  manifest: the store derives them from the block name (`<block>.safetensors`, a plain name), so nothing it
  reads can make it open or delete a file outside its folder.
- Every listed block is checked (size and CRC32) the first time a process asks for it; a mismatch means the
  block is rebuilt from the checkpoint, never used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neoxlite.config import is_int
from neoxlite.offload.budget import format_size

STORE_VERSION = 3  # 2: tensors start on TENSOR_ALIGN boundaries; 3: manifest checksummed, file names derived
STORE_PREFIX = "neoxlite-"
MANIFEST = "manifest.json"
DATA_ALIGN = 4096
# Every tensor of a block starts on this boundary (cudaMalloc's): bitsandbytes' CUDA kernels read packed weights
# and scales with vector loads, which fault on views that start mid-vector ("misaligned address").
TENSOR_ALIGN = 256
_CHUNK = 16 * 2**20
MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python 3.11's mmap module
_LINUX = sys.platform.startswith("linux")  # the madvise values below are Linux's
HUGE_PAGE = 2 * 2**20
READ_AHEAD_WINDOW = 8 * 2**20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
# A block name is also its file's name: a plain name, no path separators, never hidden.
BLOCK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# The temporary files this store writes (tempfile.mkstemp beside the target): `.<target>.<8 chars>.tmp`.
_TEMP_NAME = re.compile(r"\.(manifest\.json|[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.safetensors)\.[a-z0-9_]{8}\.tmp")


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset inside the block's data section
    end: int


@dataclass(frozen=True)
class BlockEntry:
    """Where a stored block's bytes are and how to view them."""

    name: str
    path: Path
    data_offset: int          # where the data section starts in the file (a multiple of DATA_ALIGN)
    data_bytes: int           # length of the data section
    crc32: int                # of the whole file
    tensors: dict[str, TensorEntry]
    quantized: tuple[str, ...] = ()  # submodules stored in quantized (bitsandbytes serialized) form

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.data_bytes

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The block's tensors as views into `buffer` (uint8, at least data_bytes long) holding its data."""
        return views(buffer, self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "data_offset": self.data_offset, "data_bytes": self.data_bytes,
            "crc32": self.crc32, "quantized": list(self.quantized),
            "tensors": {k: [_DTYPE_NAMES[t.dtype], list(t.shape), t.start, t.end] for k, t in self.tensors.items()},
        }

    @classmethod
    def from_json(cls, name: str, root: Path, data: Any) -> BlockEntry:
        """The entry a manifest records for `name`, checked; ValueError saying what is wrong otherwise."""
        if not isinstance(name, str) or not BLOCK_NAME.fullmatch(name):
            raise ValueError(f"block name {name!r} is not a plain name")
        if not isinstance(data, dict) or not isinstance(data.get("tensors"), dict):
            raise ValueError(f"block {name}: not an object with tensors")
        data_offset, data_bytes, crc = data.get("data_offset"), data.get("data_bytes"), data.get("crc32")
        if not (is_int(data_offset) and data_offset > 0 and data_offset % DATA_ALIGN == 0
                and is_int(data_bytes) and data_bytes >= 0 and is_int(crc) and 0 <= crc < 2**32):
            raise ValueError(f"block {name}: bad data_offset, data_bytes or crc32")
        quantized = data.get("quantized", [])
        if not isinstance(quantized, list) or not all(isinstance(q, str) for q in quantized):
            raise ValueError(f"block {name}: quantized is not a list of names")
        tensors = {key: _tensor_entry(name, key, value, data_bytes) for key, value in data["tensors"].items()}
        return cls(name=name, path=root / f"{name}.safetensors", data_offset=data_offset, data_bytes=data_bytes,
                   crc32=crc, tensors=tensors, quantized=tuple(quantized))


def _tensor_entry(block: str, key: str, value: Any, data_bytes: int) -> TensorEntry:
    """One manifest tensor record [dtype, shape, start, end], checked to lie inside the block's data."""
    if not (isinstance(value, list) and len(value) == 4 and value[0] in _DTYPES and isinstance(value[1], list)
            and all(is_int(d) and d >= 0 for d in value[1]) and is_int(value[2]) and is_int(value[3])):
        raise ValueError(f"block {block}: tensor {key} is not [dtype, shape, start, end]")
    dtype, shape, start, end = _DTYPES[value[0]], tuple(value[1]), value[2], value[3]
    numel = 1
    for dim in shape:
        numel *= dim
    if not 0 <= start <= end <= data_bytes or end - start != numel * dtype.itemsize:
        raise ValueError(f"block {block}: tensor {key} spans [{start}, {end}], which does not fit its shape "
                         f"or the block's {data_bytes} bytes")
    return TensorEntry(dtype, shape, start, end)


def views(buffer: torch.Tensor, tensors: Mapping[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """Tensors laid out by `tensors` as views into the flat uint8 `buffer` (CPU or GPU); no copies."""
    out = {}
    for key, t in tensors.items():
        raw = buffer[t.start:t.end]
        out[key] = (raw if t.dtype == torch.uint8 else raw.view(t.dtype)).view(t.shape)
    return out


def pack_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, TensorEntry], int]:
    """Where each tensor goes in one flat buffer: sorted by element size (largest first), then by name, so every
    tensor starts at a multiple of its element size. Returns (layout, total bytes)."""
    layout: dict[str, TensorEntry] = {}
    offset = 0
    for key in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[key]
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {key} has dtype {t.dtype}, which the offload store cannot hold")
        n = t.numel() * t.element_size()
        layout[key] = TensorEntry(t.dtype, tuple(t.shape), offset, offset + n)
        offset = -(-(offset + n) // TENSOR_ALIGN) * TENSOR_ALIGN
    return layout, offset


# ------------------------------------------------------------------------------------------ fingerprint
def fingerprint(checkpoint_dir: str | os.PathLike, settings: Mapping[str, Any]) -> str:
    """Identity of (checkpoint, settings): sha256 over the names, sizes and mtimes of the folder's json files
    and of every file the weights come from (the index's shards, wherever they are: a shard in a sibling
    folder counts too).

    `settings` must be JSON-serialisable and hold everything that changes a block's final form
    (dtype, quantization spec, ...). Editing, replacing or re-downloading a checkpoint file changes its
    size or mtime, so a stale store is never reused.
    """
    from neoxlite.checkpoint import weight_files

    folder = Path(checkpoint_dir)
    sources = {path.name: path for path in folder.iterdir() if path.suffix == ".json" and path.is_file()}
    sources.update(weight_files(folder))  # shard name as the folder refers to it -> the file it resolves to
    files = []
    for name, path in sorted(sources.items()):
        st = path.stat()  # follows the hub cache's symlinks to the blobs
        files.append([name, st.st_size, st.st_mtime_ns])
    payload = json.dumps({"version": STORE_VERSION, "files": files, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ the store
def check_offload_dir(offload_dir: str | os.PathLike) -> Path:
    """The offload dir as an absolute Path, created when missing, after checking that we may write in it."""
    path = Path(os.path.expanduser(os.fspath(offload_dir))).absolute()
    if not path.exists():
        try:
            path.mkdir(parents=True, mode=0o700)  # like a cache folder: the blocks are the user's own weights
        except OSError as err:
            raise ValueError(f"offload dir {path} cannot be created ({err.strerror}); pass another --offload-dir") from None
    if not path.is_dir():
        raise ValueError(f"offload dir {path} is not a directory; pass a folder to --offload-dir")
    try:  # os.access is not enough: root passes it on read-only mounts and immutable folders
        fd, probe = tempfile.mkstemp(dir=path, prefix=".neoxlite-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"offload dir {path} is not writable ({err.strerror}); fix its permissions or pass another --offload-dir"
        ) from None
    return path


class BlockStore:
    """The blocks of one (checkpoint, settings) pair in an offload dir. Not shared between threads for writing."""

    def __init__(self, offload_dir: str | os.PathLike, fingerprint: str, *, describe: Mapping[str, Any] | None = None) -> None:
        self.offload_dir = check_offload_dir(offload_dir)
        self.fingerprint = fingerprint
        self.root = self.offload_dir / f"{STORE_PREFIX}{fingerprint[:16]}"
        self.describe = dict(describe or {})
        self._checked: set[str] = set()  # blocks whose CRC this process has verified
        self._noticed = False  # the "rebuilding" notice is printed once per process
        try:
            self.root.mkdir(exist_ok=True)
        except OSError as err:
            raise _disk_error(err, self.offload_dir, "creating the store folder") from err
        remove_orphans(self.root)
        self._entries = self._read_manifest()

    # ---------------------------------------------------------------- manifest
    def _read_manifest(self) -> dict[str, BlockEntry]:
        path = self.root / MANIFEST
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO in its place must not block
        except FileNotFoundError:
            return {}
        except OSError as err:
            return self._damaged(f"cannot be read ({err.strerror})")
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return self._damaged("is not a regular file")
            raw = f.read()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return self._damaged("is not valid JSON")
        if not isinstance(data, dict) or data.get("sha256") != _manifest_checksum(data):
            return self._damaged("does not match its checksum")
        if data.get("version") != STORE_VERSION or data.get("fingerprint") != self.fingerprint:
            return {}  # another version or a 16-hex-digit prefix collision: start over
        blocks = data.get("blocks")
        if not isinstance(blocks, dict):
            return self._damaged("lists no blocks")
        try:
            return {name: BlockEntry.from_json(name, self.root, e) for name, e in blocks.items()}
        except ValueError as err:
            return self._damaged(f"is inconsistent: {err}")

    def _damaged(self, problem: str) -> dict[str, BlockEntry]:
        """A manifest that cannot be trusted lists nothing: every block is rebuilt (and the manifest rewritten)."""
        if not self._noticed:
            print(f"[offload store {self.root}: the manifest {problem}; rebuilding this store]", file=sys.stderr)
            self._noticed = True
        return {}

    def _write_manifest(self) -> None:
        data: dict[str, Any] = {
            "version": STORE_VERSION, "fingerprint": self.fingerprint, "describe": self.describe,
            "blocks": {name: e.to_json() for name, e in self._entries.items()},
        }
        data["sha256"] = _manifest_checksum(data)
        _atomic_write(self.root / MANIFEST, [json.dumps(data, indent=1).encode()])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialises manifest updates between processes sharing the store; merges what others wrote."""
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                on_disk = self._read_manifest()
                on_disk.update(self._entries)
                self._entries = on_disk
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- queries
    @property
    def blocks(self) -> list[str]:
        return list(self._entries)

    def entry(self, block: str) -> BlockEntry:
        if block not in self._entries:
            raise KeyError(f"block {block} is not in the offload store {self.root}")
        return self._entries[block]

    def has(self, block: str) -> bool:
        """True when `block` is stored intact. Checked against the manifest's size and CRC32 once per process;
        a damaged or missing file is dropped from the manifest so that the caller rebuilds it."""
        entry = self._entries.get(block)
        if entry is None:
            return False
        if block in self._checked:
            return True
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(entry.path).st_mode):  # a folder or link in its place is not ours to delete
                raise ValueError(f"the offload store {self.root} holds {entry.path.name}, which is not a regular file "
                                 "(a folder or a link put there?); move it out of the store and run again")
        if intact(entry):
            self._checked.add(block)
            return True
        with self._locked():
            self._entries.pop(block, None)
            self._write_manifest()
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()
        return False

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, nbytes: int) -> None:
        """Raises a clear OSError(ENOSPC) before writing `nbytes` of blocks that the disk cannot hold."""
        free = self.free_bytes()
        if nbytes > free:
            raise OSError(errno.ENOSPC, (
                f"the offload dir {self.offload_dir} has {format_size(free)} free but the blocks to store need "
                f"{format_size(nbytes)}; free {format_size(nbytes - free)}, pass another --offload-dir, "
                "or raise --cpu-memory / --gpu-memory"))

    # ---------------------------------------------------------------- writing
    def write(self, block: str, tensors: Mapping[str, torch.Tensor], quantized: tuple[str, ...] = ()) -> BlockEntry:
        """Stores `block` (keys relative to the block) atomically and records it in the manifest.

        quantized: names of the block's submodules whose tensors are in bitsandbytes' serialized form.
        """
        if not tensors:
            raise ValueError(f"block {block} has no tensors to store")
        if not BLOCK_NAME.fullmatch(block):
            raise ValueError(f"block name {block!r} is not a plain name (letters, digits, '_', '.', '-')")
        layout, offset = pack_layout(tensors)
        order = list(layout)
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "neoxlite_block": block,
                                                   "neoxlite_quantized": ",".join(quantized)}}
        gaps: dict[str, int] = {}  # alignment padding, named in the header so the file stays valid safetensors
        ends = [t.start for t in layout.values()][1:] + [offset]
        for (key, t), next_start in zip(layout.items(), ends, strict=True):
            header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [t.start, t.end]}
            if next_start > t.end:
                gaps[key] = next_start - t.end
                header[f"__pad__.{key}"] = {"dtype": "U8", "shape": [next_start - t.end],
                                            "data_offsets": [t.end, next_start]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        # Pad the header with spaces (allowed by the format) so the data starts on a DATA_ALIGN boundary.
        padded = -(-(8 + len(raw)) // DATA_ALIGN) * DATA_ALIGN - 8
        head = padded.to_bytes(8, "little") + raw + b" " * (padded - len(raw))

        def chunks() -> Iterator[bytes | memoryview]:
            yield head
            for key in order:
                t = tensors[key].detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                flat = t.contiguous().reshape(-1)
                if flat.numel():
                    yield memoryview(flat.view(torch.uint8).numpy())
                if key in gaps:
                    yield bytes(gaps[key])

        path = self.root / f"{block}.safetensors"
        try:
            crc = _atomic_write(path, chunks())
        except OSError as err:
            raise _disk_error(err, self.offload_dir, f"writing block {block} ({format_size(len(head) + offset)})") from err
        entry = BlockEntry(name=block, path=path, data_offset=len(head), data_bytes=offset, crc32=crc, tensors=layout,
                           quantized=tuple(quantized))
        # The written pages sit in the page cache in the write path's small folios, which map one 4 KiB page at a
        # time. Dropping them (they are on disk now) lets the first map_data read them back as 2 MiB folios.
        drop_cached(entry)
        try:
            with self._locked():
                self._entries[block] = entry
                self._write_manifest()
        except OSError as err:
            self._entries.pop(block, None)
            raise _disk_error(err, self.offload_dir, "updating the store manifest") from err
        self._checked.add(block)
        return entry

    # ---------------------------------------------------------------- reading
    def read_into(self, block: str, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reads `block`'s data into `buffer` (a uint8 CPU tensor, pinned or not) with plain reads; returns views."""
        entry = self.entry(block)
        read_data(entry, buffer)
        return entry.views(buffer)

    def read(self, block: str) -> dict[str, torch.Tensor]:
        """The block's tensors in fresh CPU memory."""
        entry = self.entry(block)
        return self.read_into(block, torch.empty(entry.data_bytes, dtype=torch.uint8))


def read_data(entry: BlockEntry, buffer: torch.Tensor, *, drop_cache: bool = False) -> None:
    """Fills buffer[:entry.data_bytes] with the block's data section using read(2), never mmap.

    Mapped file pages would count in the process's RSS; read(2) copies from the page cache into memory we
    own and budgeted. drop_cache=True also tells the kernel we will not reread these pages soon.
    """
    if buffer.dtype != torch.uint8 or buffer.device.type != "cpu" or buffer.numel() < entry.data_bytes:
        raise ValueError(f"read buffer must be a uint8 CPU tensor of at least {entry.data_bytes} bytes")
    view = memoryview(buffer.numpy())[: entry.data_bytes]
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        done = 0
        while done < entry.data_bytes:
            n = os.preadv(fd, [view[done: done + _CHUNK]], entry.data_offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{entry.path} ends early; remove the offload store and load again")
            done += n
        if drop_cache:
            os.posix_fadvise(fd, entry.data_offset, entry.data_bytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def map_data(entry: BlockEntry) -> torch.Tensor:
    """The block's data section mapped read-only, as a uint8 CPU tensor: zero copies from the page cache.

    Every page is set up at once (MADV_POPULATE_READ), so computing with the block takes no page faults. The
    mapping asks for huge pages first (MADV_HUGEPAGE): pages the kernel reads in for it then arrive as 2 MiB
    folios, and a cached 2 MiB folio maps with one page-table entry instead of 512 (mapping 100 MB of cached
    blocks then takes ~0.2 ms instead of 1.3-2.2 ms). The pages count in the
    process's RSS while mapped, as a slot buffer would; the mapping goes away when the last tensor viewing it
    does. Never written to: the mapping is read-only.
    """
    with open(entry.path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), entry.data_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                            offset=entry.data_offset)
    _populate(mapping, entry.path)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is, on purpose
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8))


def read_ahead(entry: BlockEntry, window: int = READ_AHEAD_WINDOW) -> None:
    """Reads the block's data into the page cache (not into this process's memory) and returns when it is there.

    posix_fadvise(WILLNEED) would not do: Linux reads only the first few MiB of a large range that way, in
    small folios. Instead each `window` of the block is mapped, populated as map_data does (so the pages arrive
    as 2 MiB folios) and unmapped at once: at most one window counts in RSS at any time.
    """
    with open(entry.path, "rb") as f:
        first = entry.data_offset // HUGE_PAGE * HUGE_PAGE  # windows on 2 MiB boundaries of the file
        for offset in range(first, entry.data_offset + entry.data_bytes, window):
            length = min(window, entry.data_offset + entry.data_bytes - offset)
            with mmap.mmap(f.fileno(), length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset) as m:
                _populate(m, entry.path)


def _populate(mapping: mmap.mmap, path: Path) -> None:
    """Sets up every page of `mapping` (of the file at `path`), in huge pages where the kernel allows, reading
    what is not cached.

    Called through ctypes rather than mmap.madvise, which holds the GIL: a populate that waits for the disk
    must not stop the thread that computes. A failed read (a file truncated under the mapping, a disk error)
    is an OSError here rather than a SIGBUS when the computation touches the page.
    """
    address = ctypes.c_void_p(np.frombuffer(mapping, dtype=np.uint8).ctypes.data)
    length = ctypes.c_size_t(len(mapping))
    if _LINUX:
        _libc.madvise(address, length, mmap.MADV_HUGEPAGE)  # refused when THP is off: small pages then
        if _libc.madvise(address, length, MADV_POPULATE_READ) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            raise OSError(err, f"cannot read the offload block {path} ({os.strerror(err)}): it was changed or "
                               "truncated while in use, or the disk failed. Remove the store with `neoxlite "
                               "offload clear --offload-dir DIR` and load the model again")
    np.frombuffer(mapping, dtype=np.uint8)[::mmap.PAGESIZE].max()  # before Linux 5.14: touch every page


def _advise(entry: BlockEntry, advice: int) -> None:
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, entry.data_offset, entry.data_bytes, advice)
    finally:
        os.close(fd)


def drop_cached(entry: BlockEntry) -> None:
    """Tells the kernel the block's cached pages will not be needed soon (posix_fadvise DONTNEED)."""
    _advise(entry, os.POSIX_FADV_DONTNEED)


def intact(entry: BlockEntry) -> bool:
    """Whether the block's file holds what the manifest recorded: its CRC32 over the whole file (which covers the
    file's own safetensors header) and a layout that agrees with that header."""
    return _file_crc32(entry.path, entry.file_bytes) == entry.crc32 and _header_agrees(entry)


def _header_agrees(entry: BlockEntry) -> bool:
    """Whether the block file's own header (checked by the CRC) lays out the tensors as `entry` says."""
    with open(entry.path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if 8 + size != entry.data_offset:
            return False
        try:
            header = json.loads(f.read(size))
        except (ValueError, RecursionError):
            return False
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        return False
    written = {key: info for key, info in header.items() if key != "__metadata__" and not key.startswith("__pad__.")}
    expected = {key: {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [t.start, t.end]}
                for key, t in entry.tensors.items()}
    quantized = header["__metadata__"].get("neoxlite_quantized", "")
    return written == expected and quantized == ",".join(entry.quantized)


def _manifest_checksum(data: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's content (every field but the checksum itself), in a canonical JSON form."""
    body = {k: v for k, v in data.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_crc32(path: Path, expected_size: int) -> int | None:
    """CRC32 of a file, or None when it is missing, not a regular file, or not `expected_size` bytes long."""
    try:
        st = path.lstat()  # a link, a FIFO or a device in a block's place is not a block the store wrote
        if not stat.S_ISREG(st.st_mode) or st.st_size != expected_size:
            return None
        crc = 0
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                crc = zlib.crc32(view[:n], crc)
        return crc
    except FileNotFoundError:
        return None


def _locked_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, flock'ed while its descriptor is open (see remove_orphans)."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        os.close(fd)  # another run took it for an orphan in the instant before the lock: make another


def remove_orphans(root: Path) -> list[str]:
    """Deletes the temporary files a killed writer left in the store folder `root`; returns their names.

    Only names this module generates are looked at, and only regular files whose flock can be taken: a live
    writer holds its file's lock until it has renamed it, and a lock dies with its process, so a file whose
    lock is free has no writer left. Three processes sharing one offload dir never delete each other's files.
    """
    removed = []
    for path in root.iterdir():
        if not _TEMP_NAME.fullmatch(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone already, or a link: not a file this store wrote
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
                    removed.append(path.name)
        finally:
            os.close(fd)
    return removed


def _atomic_write(path: Path, chunks: Iterator[bytes | memoryview] | list[bytes]) -> int:
    """Writes chunks to a temporary file beside `path`, fsyncs, renames over `path`; returns the CRC32.

    The temporary file stays locked until it has its final name, so no other run takes it for an orphan."""
    fd, tmp = _locked_temp(path)
    crc = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                crc = zlib.crc32(chunk, crc)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return crc


def _disk_error(err: OSError, offload_dir: Path, doing: str) -> OSError:
    if err.errno == errno.ENOSPC:
        free = shutil.disk_usage(offload_dir).free
        return OSError(errno.ENOSPC, (
            f"no space left in the offload dir {offload_dir} while {doing} ({format_size(free)} free); "
            "the blocks already stored stay valid. Free some space, pass another --offload-dir, "
            "or raise --cpu-memory / --gpu-memory"))
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OSError(err.errno, f"cannot write in the offload dir {offload_dir} while {doing} ({err.strerror}); "
                                  "fix its permissions or pass another --offload-dir")
    return err


# ------------------------------------------------------------------------------------------ housekeeping
# A store folder's name: the prefix and 16 hex digits of a fingerprint (a user's "neoxlite-notes" is not one).
_STORE_NAME = re.compile(re.escape(STORE_PREFIX) + r"[0-9a-f]{16}")


def _written_by_store(entry: os.DirEntry) -> bool:
    """Whether `entry` of a store folder is a file a BlockStore writes there (manifest, lock, block, temporary)."""
    name = entry.name
    known = (name in (MANIFEST, ".lock") or _TEMP_NAME.fullmatch(name) is not None
             or (name.endswith(".safetensors") and BLOCK_NAME.fullmatch(name.removesuffix(".safetensors")) is not None))
    return known and entry.is_file(follow_symlinks=False)


def list_stores(offload_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """(store folder, bytes on disk) for each neoxlite store in `offload_dir`: the folders named as BlockStore
    names them (`neoxlite-` and 16 hex digits), links excluded."""
    path = Path(os.path.expanduser(os.fspath(offload_dir)))
    if not path.is_dir():
        raise ValueError(f"offload dir {path} does not exist or is not a directory")
    stores = []
    for store in sorted(path.iterdir()):
        if _STORE_NAME.fullmatch(store.name) and store.is_dir() and not store.is_symlink():
            with os.scandir(store) as entries:
                nbytes = sum(e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False))
            stores.append((store, nbytes))
    return stores


@dataclass(frozen=True)
class Removal:
    """What remove() did: the stores deleted, (folder, bytes), and those kept, (folder, the foreign entries)."""

    removed: list[tuple[Path, int]]
    kept: list[tuple[Path, list[str]]]


def remove(offload_dir: str | os.PathLike, fingerprint: str | None = None) -> Removal:
    """Deletes neoxlite's stores in `offload_dir` (only the one for `fingerprint` when given); other files stay.

    Only the files a store writes are deleted, then the emptied folder: a store folder holding anything else
    (a file or folder someone put there) is kept whole and reported, never emptied.
    """
    removed, kept = [], []
    for store, nbytes in list_stores(offload_dir):
        if fingerprint is not None and store.name != f"{STORE_PREFIX}{fingerprint[:16]}":
            continue
        with os.scandir(store) as scan:
            entries = list(scan)
        foreign = sorted(e.name for e in entries if not _written_by_store(e))
        if foreign:
            kept.append((store, foreign))
            continue
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        try:
            store.rmdir()
        except OSError:  # a process still using the store wrote a file meanwhile: the folder stays
            kept.append((store, sorted(os.listdir(store))))
            continue
        removed.append((store, nbytes))
    return Removal(removed, kept)


def measure_read_bandwidth(paths: list[Path], limit: int = 1 << 30, *, cold: bool = True) -> float:
    """Bytes/s of plain sequential reads over `paths` (up to `limit` bytes), the way the scheduler reads.

    cold=True first asks the kernel to drop these files' cached pages (posix_fadvise DONTNEED), so the figure is
    the disk's rather than the page cache's (pages that are dirty or mapped elsewhere may stay cached).
    """
    if cold:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    buf = torch.empty(_CHUNK, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    total = 0
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while total < limit and (n := os.preadv(fd, [view], offset)) > 0:
                offset += n
                total += n
        finally:
            os.close(fd)
    seconds = time.perf_counter() - start
    return total / seconds if seconds > 0 else float("inf")
