"""The block scheduler: hands the model's block loop layer i ready on the compute device, with the next
layers already on their way.

The model asks `layer = scheduler.fetch(i)`, runs it, then calls `scheduler.done(i)`. Resident layers are
returned as they are. A streamed layer lives as raw bytes in its final (cast or quantized) form, either in
RAM or in the disk store, and is brought into one of a few reusable *slots* on the compute device: a flat
byte buffer plus a layer module whose tensors are views into that buffer. Bringing a layer in is therefore
one read or one copy of contiguous bytes, with no allocation and no per-tensor work.

- CPU compute: a worker thread maps the next layer's file from the page cache (store.map_data, every page
  set up at once, in 2 MiB pages) while the current layer computes; done(i) drops the mapping, so at most
  `slots` layers are mapped (and counted in RSS) at any time, which the planner's budget includes. When the
  disk layers do not all fit the page cache, some are dropped from it after each use (uncached_layers), and a
  reader thread brings the next of those back into the page cache ahead of the slots (store.read_ahead).
- CUDA compute: layers in RAM sit in page-locked (pinned) memory and are copied into a GPU slot on a
  separate copy stream; layers on disk are read by the worker thread into one of two pinned staging
  buffers and copied from there. CUDA events order everything: a copy into a slot waits until the compute
  stream has finished with the slot's previous layer, and the compute stream waits for the copy.
- Quantized layers travel quantized: the bytes moved are the packed 4-bit/8-bit weights and their scales;
  the slot's bitsandbytes layers are rebuilt around views of the slot buffer (no copies).

With `slots` slots, up to `slots - 1` layers load while one computes; prefetching wraps around from the last
streamed layer to the first, so the next forward pass (the next token) starts with its first streamed layer
already loaded or loading.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from neoxlite.fileio import file_identity
from neoxlite.offload.budget import cuda_device
from neoxlite.offload.store import (
    BlockEntry,
    TensorEntry,
    drop_cached,
    intact,
    map_data,
    pack_layout,
    read_ahead,
    read_data,
    views,
)

# Tensors of a quantized layer up to this size (quant-state JSON, code books, the int8 weight_format flag)
# are handed to bitsandbytes from host memory: it reads some of them on the CPU, and reading them from the
# GPU would synchronise the device once per layer.
HOST_META_BYTES = 4096


# ----------------------------------------------------------------------------------------- block state
def quantized_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Submodules of `module` that are bitsandbytes layers, by relative name."""
    if "bitsandbytes" not in sys.modules:  # no bitsandbytes layer can exist before it is imported
        return {}
    import neoxlite.quant as quant

    return {name: m for name, m in module.named_modules() if name and quant.is_quantized(m)}


def block_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """A block's tensors in final form (keys relative to `module`) and the names of its quantized layers.

    Plain parameters and persistent buffers as they are; each bitsandbytes layer in transformers' serialized
    form (`quant.quantized_state`), which is what travels and what `quant.load_quantized_linear` rebuilds.
    """
    qmods = quantized_modules(module)
    state: dict[str, torch.Tensor] = {}
    if qmods:
        import neoxlite.quant as quant

        for name, m in qmods.items():
            state.update({f"{name}.{k}": v for k, v in quant.quantized_state(m).items()})
    for name, sub in module.named_modules():
        if any(name == q or name.startswith(q + ".") for q in qmods):
            continue
        prefix = f"{name}." if name else ""
        for leaf, p in sub.named_parameters(recurse=False):
            state[prefix + leaf] = p.detach()
        for leaf, b in sub.named_buffers(recurse=False):
            if leaf not in sub._non_persistent_buffers_set:
                state[prefix + leaf] = b
    return state, tuple(qmods)


@dataclass(frozen=True)
class Layout:
    """How a block's final-form tensors lie in one flat byte buffer (the same layout the disk store uses)."""

    tensors: dict[str, TensorEntry]
    nbytes: int
    quantized: tuple[str, ...] = ()

    @property
    def key(self) -> tuple:
        return tuple((k, t.dtype, t.shape, t.start) for k, t in self.tensors.items()) + (self.quantized,)

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return views(buffer, self.tensors)

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], quantized: tuple[str, ...] = ()) -> Layout:
        tensors, nbytes = pack_layout(state)
        return cls(tensors, nbytes, quantized)

    @classmethod
    def of_entry(cls, entry: BlockEntry) -> Layout:
        return cls(entry.tensors, entry.data_bytes, entry.quantized)


def pack(state: Mapping[str, torch.Tensor], into: torch.Tensor, layout: Layout) -> None:
    """Copies `state` into the flat CPU byte buffer `into` following `layout`."""
    for key, t in layout.tensors.items():
        src = state[key].detach().contiguous().reshape(-1)
        if src.numel():
            into[t.start:t.end].copy_(src.view(torch.uint8), non_blocking=False)


# ----------------------------------------------------------------------------------------- sources
@dataclass
class HostSource:
    """A streamed layer held in RAM (pinned on CUDA machines): a view into the scheduler's arena."""

    layout: Layout
    data: torch.Tensor  # uint8, layout.nbytes long
    host_meta: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DiskSource:
    """A streamed layer in the disk store. `check()` raises a clear OSError when its file has changed since."""

    layout: Layout
    entry: BlockEntry
    host_meta: dict[str, torch.Tensor] = field(default_factory=dict)
    identity: tuple[int, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self.identity = checked_identity(self.entry, None)

    def check(self) -> None:
        self.identity = checked_identity(self.entry, self.identity)


def checked_identity(entry: BlockEntry, known: tuple[int, ...] | None, st: os.stat_result | None = None
                     ) -> tuple[int, ...]:
    """The identity of `entry`'s file (from `st`, else a stat of its path), checked against `known` (None: the
    first look). A file that is gone, of the wrong size, or changed in content raises OSError(ESTALE) naming it
    and the fix; one replaced by the same bytes (another process sharing the store rebuilt it) passes."""
    try:
        st = st or os.stat(entry.path)
    except FileNotFoundError:
        raise store_changed(entry, "was deleted") from None
    now = file_identity(st)
    if now == known:
        return now
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.file_bytes:
        raise store_changed(entry, f"is {st.st_size} bytes instead of {entry.file_bytes} (truncated or replaced)")
    if known is not None and not intact(entry):
        raise store_changed(entry, "was changed (its bytes no longer match their checksum)")
    return now


def store_changed(entry: BlockEntry, what: str) -> OSError:
    return OSError(errno.ESTALE, (
        f"the offload block {entry.path} {what} while the model was using it, so its weights are gone; do not "
        f"edit an offload store in use. Remove it with `neoxlite offload clear --offload-dir "
        f"{entry.path.parent.parent}` and load the model again"))


Source = HostSource | DiskSource


def host_meta(layout: Layout, read: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Small tensors of quantized layers, kept in host memory (see HOST_META_BYTES)."""
    small = [k for k, t in layout.tensors.items()
             if t.end - t.start <= HOST_META_BYTES and any(k.startswith(q + ".") for q in layout.quantized)]
    if not small:
        return {}
    tensors = read()
    return {k: tensors[k].clone() for k in small}


# ----------------------------------------------------------------------------------------- the scheduler
class _Slot:
    def __init__(self, buffer: torch.Tensor | None, module: nn.Module, cuda: bool) -> None:
        self.buffer = buffer  # owned bytes (GPU slots; CPU slots only when layers come from RAM)
        self.data: torch.Tensor | None = None  # the bytes the module's views point into: buffer or a file mapping
        self.module = module
        self.bound: tuple | None = None  # layout key the module's views currently follow (owned buffers)
        self.quantized: tuple[str, ...] = ()  # its bitsandbytes layers, rebuilt at each bind
        self.future: Future | None = None
        self.ready = torch.cuda.Event() if cuda else None      # the copy into this slot finished
        self.released = torch.cuda.Event() if cuda else None   # the compute stream is done with this slot
        self.released_recorded = False


class OffloadScheduler:
    """fetch(i) / done(i) for a model whose layers live on several tiers. See the module docstring."""

    def __init__(
        self,
        layers: nn.ModuleList,
        sources: Mapping[int, Source],
        *,
        make_layer: Callable[[], nn.Module],
        compute_device: torch.device | str,
        slots: int,
        slot_bytes: int,
        staging_bytes: int = 0,
        quant_spec: object | None = None,
        drop_cache: bool = False,
        cache_room: int | None = None,
    ) -> None:
        self.layers = layers
        self.sources = dict(sources)
        self.order = sorted(self.sources)  # streamed layers, in the order the block loop visits them
        self.device = torch.device(compute_device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.device = cuda_device(self.device)  # the worker thread's set_device needs the index
        self.quant_spec = quant_spec
        disk = [i for i in self.order if isinstance(self.sources[i], DiskSource)]
        # Layers on disk whose pages are dropped from the page cache after each use (see uncached_layers).
        self.uncached: set[int] = set(disk) if drop_cache else uncached_layers(
            [(i, self.sources[i].layout.nbytes) for i in disk], cache_room)
        if self.order and slots < 2:
            raise ValueError(f"slots={slots}: streaming needs at least 2 (one computing, one arriving)")
        for i, src in self.sources.items():
            if src.layout.nbytes > slot_bytes:
                raise ValueError(f"layer {i} ({src.layout.nbytes} bytes) does not fit a slot of {slot_bytes} bytes")
            if self.cuda and isinstance(src, HostSource) and not _is_pinned(src.data):
                raise ValueError(f"layer {i} is in RAM but not pinned; CUDA streaming needs pinned host memory")
        if not self.order:
            slots = 0
        with torch.device("meta"):
            templates = [make_layer() for _ in range(slots)]
        # On the CPU, layers from disk are mapped straight from the page cache (store.map_data): no slot buffer
        # to fill, no copy. Owned buffers serve the GPU, and CPU tests of the RAM path.
        owned = self.cuda or any(isinstance(s, HostSource) for s in self.sources.values())
        self._slots = [
            _Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) if owned else None,
                  t.eval().requires_grad_(False), self.cuda)
            for t in templates
        ]
        self._free: list[_Slot] = list(self._slots)
        self._loaded: dict[int, _Slot] = {}   # layers submitted or loaded, not yet done
        self._next = 0                        # position in self.order of the next layer to submit
        self._staging: list[torch.Tensor] = []
        self._staging_done: list[torch.cuda.Event] = []
        self._turn = 0
        if self.cuda and any(isinstance(s, DiskSource) for s in self.sources.values()):
            if staging_bytes < 2 * slot_bytes:
                raise ValueError("CUDA streaming from disk needs two pinned staging buffers of a slot each")
            self._staging_arena = pinned_empty(2 * slot_bytes)  # held: its finalizer unpins the memory
            self._staging = [self._staging_arena[:slot_bytes], self._staging_arena[slot_bytes:]]
            self._staging_done = [torch.cuda.Event(), torch.cuda.Event()]
            self._staging_used = [False, False]
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="neoxlite-offload",
            initializer=torch.cuda.set_device if self.cuda else None, initargs=(self.device,) if self.cuda else (),
        ) if self.order else None
        if self._executor is not None:
            weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        # CPU compute: reads dropped layers from the disk ahead of the slots (see _read_ahead_after), started
        # at the first need; the CUDA path reads them into its staging buffers itself.
        self._reader: ThreadPoolExecutor | None = None
        self._read_ahead_of: int | None = None

    # ---------------------------------------------------------------- the model's two calls
    def fetch(self, i: int) -> nn.Module:
        src = self.sources.get(i)
        if src is None:
            return self.layers[i]
        slot = self._loaded.get(i)
        if slot is None:  # not what prefetching expected (first call, or a forward pass was interrupted)
            self._restart(at=i)
            slot = self._loaded[i]
        assert slot.future is not None
        slot.future.result()  # re-raises a failed read here, in the caller's thread
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self._bind(slot, src)
        return slot.module

    def done(self, i: int) -> None:
        if i not in self.sources:
            return
        slot = self._loaded.pop(i, None)
        if slot is None:
            return
        if self.cuda:
            slot.released.record(torch.cuda.current_stream(self.device))
            slot.released_recorded = True
        elif slot.data is not slot.buffer:  # a file mapping: let it go now, so at most `slots` stay mapped
            self._unbind(slot)
            if i in self.uncached:
                drop_cached(self.sources[i].entry)
        self._free.append(slot)
        src = self.sources[i]
        if isinstance(src, DiskSource) and not self.cuda:
            src.check()  # the layer computed from a mapping of the file: it must not have changed under it
        self._prefetch()

    # ---------------------------------------------------------------- prefetching
    def _prefetch(self) -> None:
        while self._free:
            i = self.order[self._next % len(self.order)]
            if i in self._loaded:  # fewer streamed layers than slots: everything is already in
                return
            self._next += 1
            slot = self._free.pop(0)
            self._loaded[i] = slot
            slot.future = self._executor.submit(self._load, i, slot)
            self._read_ahead_after(i)

    def _read_ahead_after(self, i: int) -> None:
        """Has the reader thread bring the next dropped layer after i into the page cache. Dropped layers come
        from the disk at every step; reading the next one while the slots' layers load and compute keeps the
        disk busy instead of waiting for a slot to free (one layer deep: the page cache room counts it)."""
        if self.cuda or not self.uncached:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neoxlite-readahead")
            weakref.finalize(self, self._reader.shutdown, wait=False, cancel_futures=True)
        position = self.order.index(i)
        ahead = next((j for j in self.order[position + 1:] + self.order[:position] if j in self.uncached), None)
        if ahead is not None and ahead != self._read_ahead_of:
            self._read_ahead_of = ahead
            self._reader.submit(read_ahead, self.sources[ahead].entry)  # advisory: a failure shows in _load

    def _restart(self, at: int) -> None:
        for slot in self._loaded.values():
            if slot.future is not None:
                slot.future.exception()  # wait; a failed read of a layer we no longer want is moot
            if self.cuda:  # a slot never released by done(): the compute stream may still be reading it
                slot.released.record(torch.cuda.current_stream(self.device))
                slot.released_recorded = True
            elif slot.data is not slot.buffer:
                self._unbind(slot)
        self._loaded.clear()
        self._free = list(self._slots)
        self._next = self.order.index(at)
        self._prefetch()

    def _load(self, i: int, slot: _Slot) -> None:
        """Worker thread: bring layer i's bytes into slot's buffer."""
        src = self.sources[i]
        n = src.layout.nbytes
        if isinstance(src, DiskSource):
            src.check()  # gone, truncated or rewritten since: a clear error, not a SIGBUS or wrong numbers
        if not self.cuda:  # (layers in RAM are resident on CPU machines; the copy serves tests of the RAM path)
            if isinstance(src, DiskSource):
                try:
                    slot.data = map_data(src.entry)
                except (OSError, ValueError):
                    src.check()  # changed while being mapped: say so; else the error is the disk's own
                    raise
            else:
                slot.buffer[:n].copy_(src.data)
                slot.data = slot.buffer
            return
        if isinstance(src, DiskSource):
            b = self._turn
            self._turn ^= 1
            if self._staging_used[b]:
                self._staging_done[b].synchronize()  # the previous copy out of this buffer has finished
            try:
                read_data(src.entry, self._staging[b], drop_cache=i in self.uncached)
            finally:
                src.check()  # the bytes read are the file's own only if it did not change meanwhile
            host = self._staging[b][:n]
        else:
            host = src.data
        slot.data = slot.buffer
        stream = self._copy_stream
        if slot.released_recorded:
            stream.wait_event(slot.released)
        with torch.cuda.stream(stream):
            slot.buffer[:n].copy_(host, non_blocking=True)
            slot.ready.record(stream)
            if isinstance(src, DiskSource):
                self._staging_done[b].record(stream)
                self._staging_used[b] = True

    # ---------------------------------------------------------------- binding
    def _bind(self, slot: _Slot, src: Source) -> None:
        """Points the slot's module at the layer now in the slot's bytes."""
        layout = src.layout
        assert slot.data is not None
        if slot.bound != layout.key or slot.data is not slot.buffer:
            quantized = layout.quantized
            for key, view in layout.views(slot.data).items():
                if any(key.startswith(q + ".") for q in quantized):
                    continue
                module_name, _, leaf = key.rpartition(".")
                owner = slot.module.get_submodule(module_name)
                if leaf in owner._buffers:
                    owner._buffers[leaf] = view
                else:
                    owner._parameters[leaf] = nn.Parameter(view, requires_grad=False)
            slot.bound = layout.key
        if layout.quantized:
            import neoxlite.quant as quant

            views = layout.views(slot.data)
            for name in layout.quantized:
                tensors = {k[len(name) + 1:]: src.host_meta.get(k, v) for k, v in views.items()
                           if k.startswith(name + ".")}
                slot.module.set_submodule(name, quant.load_quantized_linear(tensors, self.quant_spec, self.device))
            slot.quantized = layout.quantized

    def _unbind(self, slot: _Slot) -> None:
        """Drops every reference the slot's module holds into the slot's bytes."""
        release = getattr(slot.module, "release_cached_tensors", None)
        if release is not None:
            release()
        for name in slot.quantized:
            slot.module.set_submodule(name, nn.Identity())
        slot.quantized = ()
        for module in slot.module.modules():
            for leaf in module._parameters:
                module._parameters[leaf] = None
            for leaf in module._buffers:
                module._buffers[leaf] = None
        slot.data = None
        slot.bound = None

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Streamed layer i's tensors in final form (keys relative to the layer), in CPU memory: views of its
        RAM copy, or of a fresh buffer read from the store. For saving; the compute path never calls it."""
        src = self.sources[i]
        if isinstance(src, HostSource):
            return src.layout.views(src.data)
        buffer = torch.empty(src.layout.nbytes, dtype=torch.uint8)
        src.check()
        try:
            read_data(src.entry, buffer)
        finally:
            src.check()
        return src.layout.views(buffer)

    def close(self) -> None:
        """Stops the worker thread; the scheduler must not be used afterwards."""
        for pool in (self._executor, self._reader):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> dict[int, str]:
        """Layer index -> "resident" | "ram" | "disk" (for memory panels and tests)."""
        out = {}
        for i in range(len(self.layers)):
            src = self.sources.get(i)
            out[i] = "resident" if src is None else ("ram" if isinstance(src, HostSource) else "disk")
        return out


def uncached_layers(disk_layers: list[tuple[int, int]], cache_room: int | None) -> set[int]:
    """Which layers read from disk to drop from the page cache after each use, given (index, bytes) in the order
    the block loop reads them and the bytes of page cache they may keep (None: no limit known).

    Every step reads the layers in the same cycle. When they do not all fit the page cache, the kernel's LRU
    evicts each layer just before its next use, so every read goes to the disk. Keeping as many layers as fit and
    dropping the rest right after use makes the kept ones hits on every step: the disk then serves only the
    remainder."""
    total = sum(nbytes for _, nbytes in disk_layers)
    if cache_room is None or total <= cache_room:
        return set()
    # Kept layers are spread among the dropped ones, so the disk reads the next dropped layer while the cached
    # ones compute (a run of cached layers would leave it idle, then make the loop wait on a run of reads).
    share = cache_room / total
    kept = 0
    uncached = set()
    for position, (i, nbytes) in enumerate(disk_layers):
        if int((position + 1) * share) > int(position * share) and kept + nbytes <= cache_room:
            kept += nbytes
        else:
            uncached.add(i)
    return uncached


# ----------------------------------------------------------------------------------------- pinned memory
def _is_pinned(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_pinned()


def pinned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of exactly `nbytes`, page-locked for asynchronous copies to the GPU.

    torch's pinned allocator rounds every request up to a power of two (a 2.1 GiB arena would lock 4 GiB), so
    this allocates ordinary memory and registers it with CUDA instead; it is unregistered when this tensor is
    freed, so callers keep this tensor (not only views of it) alive while the memory is in use.
    """
    t = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return t
    ptr = t.data_ptr()
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
    if err != 0:
        raise RuntimeError(f"could not page-lock {nbytes} bytes of RAM for GPU transfers (cudaError {err}); "
                           "lower --cpu-memory or raise the locked-memory limit (ulimit -l)")
    weakref.finalize(t, torch.cuda.cudart().cudaHostUnregister, ptr)
    return t


# ----------------------------------------------------------------------------------------- row-read embedding
class RowReadEmbedding(nn.Module):
    """An embedding table that stays in the disk store: each lookup reads only the rows it needs.

    `weight` is an empty placeholder of the table's dtype on the CPU; it tells the model where lookups happen
    (and the dtype of activations), and holds no memory.
    """

    def __init__(self, entry: BlockEntry, key: str = "weight") -> None:
        super().__init__()
        t = entry.tensors[key]
        if len(t.shape) != 2:
            raise ValueError(f"{entry.path}: {key} is not a 2-D embedding table")
        self.num_embeddings, self.embedding_dim = t.shape
        self.weight = torch.empty((0, self.embedding_dim), dtype=t.dtype)  # placeholder, not a Parameter
        self.entry = entry
        self.path = entry.path
        self.offset = entry.data_offset + t.start
        self.row_bytes = self.embedding_dim * t.dtype.itemsize
        self.identity = checked_identity(entry, None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        ids, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.empty((len(ids), self.embedding_dim), dtype=self.weight.dtype)
        view = memoryview(rows.view(torch.uint8).numpy()).cast("B")
        fd = self._open()
        try:
            for k, token in enumerate(ids.tolist()):
                chunk = view[k * self.row_bytes:(k + 1) * self.row_bytes]
                if os.preadv(fd, [chunk], self.offset + token * self.row_bytes) != self.row_bytes:
                    raise OSError(f"{self.path} ends early; remove the offload store and load again")
            self.identity = checked_identity(self.entry, self.identity, os.fstat(fd))  # not changed while read
        finally:
            os.close(fd)
        return rows[inverse].reshape(*input_ids.shape, self.embedding_dim)

    def _open(self) -> int:
        """A descriptor of the table's file, checked to be the file loaded (or the same bytes)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise store_changed(self.entry, "was deleted") from None
        try:
            self.identity = checked_identity(self.entry, self.identity, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_table(self) -> torch.Tensor:
        """The whole table, read into fresh memory (for saving the model)."""
        table = torch.empty((self.num_embeddings, self.embedding_dim), dtype=self.weight.dtype)
        view = memoryview(table.view(torch.uint8).numpy()).cast("B")
        with open(self._open(), "rb") as f:
            f.seek(self.offset)
            if f.readinto(view) != len(view):
                raise OSError(f"{self.path} ends early; remove the offload store and load again")
            self.identity = checked_identity(self.entry, self.identity, os.fstat(f.fileno()))
        return table

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows read from {self.path}"
