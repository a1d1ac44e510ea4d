"""Offloading a whole model: block sizes in final form, its plan, and the loader's hook (`Offloader`).

The loader builds the model skeleton on the meta device and then, block by block:

    offloader = Offloader.create(model, folder=..., dtype=..., device=..., gpu_memory=..., ...)  # None: no budgets
    for block in blocks:
        if offloader and not offloader.needs_loading(block):   # already intact in the disk store
            offloader.finish_block(block)
            continue
        build the block on offloader.device_for(block) (or `device` without an offloader)
        if offloader:
            offloader.finish_block(block)                          # moves it to its home, frees the rest
    if offloader:
        offloader.install()                                        # the scheduler takes over the block loop
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neoxlite.checkpoint import block_of
from neoxlite.offload.budget import free_cpu_memory, resolve_budgets
from neoxlite.offload.planner import CPU, DISK, EMBED, GPU, HEAD, Links, Plan, activation_bytes, plan
from neoxlite.offload.scheduler import (
    DiskSource,
    HostSource,
    Layout,
    OffloadScheduler,
    RowReadEmbedding,
    Source,
    block_state,
    host_meta,
    pack,
    pinned_empty,
)
from neoxlite.offload.store import TENSOR_ALIGN, BlockStore, check_offload_dir, fingerprint

DEFAULT_MAX_LENGTH = 2048  # planning context when the caller gives none (capped by the model's own)
HEAD_MODULES = ("final_layer_norm", "embed_out", "score", "classifier", "qa_outputs")
_QUANT_JSON_BYTES = 256  # upper bound of a 4-bit layer's quant-state JSON
CACHE_MARGIN_BYTES = 256 * 2**20  # page cache left to everything else when choosing which disk layers stay cached


def keep_freed_memory_returnable() -> None:
    """Makes freed weight-sized buffers go back to the OS at once (glibc only; elsewhere a no-op).

    glibc serves big allocations with their own mmap, returned on free, but raises that size threshold to the
    largest chunk freed so far (up to 32 MiB); after the loader frees its first block, later blocks come from the
    heap, whose freed space stays in the process's RSS. A fixed 1 MiB threshold keeps the budget a real bound.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


def wants_offload(gpu_memory: Any = None, cpu_memory: Any = None, offload_dir: Any = None) -> bool:
    """Offloading is on as soon as any budget or an offload dir is given."""
    return gpu_memory is not None or cpu_memory is not None or offload_dir is not None


# ------------------------------------------------------------------------------------------ sizes
def quantized_linear_bytes(out_features: int, in_features: int, spec: Any, bias_bytes: int = 0) -> int:
    """Bytes of one quantized linear layer in serialized form (what is stored and moved), from its shape.

    4-bit: packed weight (2 values a byte), one scale per 64-value block (uint8 with double quant, plus one float
    per 256 scales and a 256-entry code book; float32 without), a 16-entry code book and the quant-state JSON.
    int8: one byte a value plus one float scale per output row.
    """
    n = out_features * in_features
    if spec.is_4bit:
        from neoxlite.quant import BLOCKSIZE_4BIT

        blocks = -(-n // BLOCKSIZE_4BIT)
        scales = [blocks, 4 * -(-blocks // 256), 256 * 4] if spec.double_quant else [4 * blocks]
        tensors = [-(-n // 2), *scales, 16 * 4, _QUANT_JSON_BYTES, bias_bytes]
    else:
        tensors = [n, 4 * out_features, 1, bias_bytes]
    return sum(aligned(t) for t in tensors)


def aligned(nbytes: int) -> int:
    """Bytes a tensor takes in a block's flat buffer, where every tensor starts on a TENSOR_ALIGN boundary."""
    return -(-nbytes // TENSOR_ALIGN) * TENSOR_ALIGN


def quantized_layer_names(model: nn.Module, spec: Any, prequantized: bool = False) -> set[str]:
    if spec is None or not spec.enabled:
        return set()
    from neoxlite.quant.model import QuantPlan

    return set(QuantPlan(model, spec, prequantized).layers)


def final_block_sizes(model: nn.Module, dtype: torch.dtype, spec: Any = None,
                      quantized: Iterable[str] = ()) -> dict[str, int]:
    """Bytes of each block once cast to `dtype` / quantized, in model order (embed_in, layers.0.., head).

    `model` may live on the meta device; `quantized` names its linear layers that `spec` quantizes.
    """
    quantized = set(quantized)
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        block = block_of(name + ".")
        if name in quantized:
            bias = module.bias.numel() * dtype.itemsize if module.bias is not None else 0
            sizes[block] = sizes.get(block, 0) + quantized_linear_bytes(module.out_features, module.in_features, spec, bias)
            continue
        if any(name.startswith(q + ".") for q in quantized):
            continue
        for p in module.parameters(recurse=False):
            itemsize = dtype.itemsize if p.is_floating_point() else p.element_size()
            sizes[block] = sizes.get(block, 0) + aligned(p.numel() * itemsize)
    layers = sorted((b for b in sizes if b.startswith("layers.")), key=lambda b: int(b.split(".")[1]))
    order = [EMBED] + layers + [HEAD]
    return {b: sizes[b] for b in order if b in sizes}


@dataclass(frozen=True)
class Workload:
    """What the plan reserves room for: the KV cache and activations of `max_batch_size` sequences of up to
    `max_length` tokens (prompt + generated), with a prompt as long as the whole context (the worst case)."""

    max_batch_size: int = 1
    max_length: int | None = None

    def __post_init__(self) -> None:
        # (named as the user spells them: from_pretrained's max_batch_size / max_context)
        for name, value in (("max_batch_size", self.max_batch_size), ("max_context", self.max_length)):
            if value is None and name == "max_context":
                continue
            if isinstance(value, bool) or not hasattr(type(value), "__index__"):  # ints, numpy ints; not 1.5, "4"
                raise TypeError(f"{name}={value!r}: expected a whole number of "
                                f"{'sequences' if name == 'max_batch_size' else 'tokens'}, e.g. {name}=4")
            if value < 1:
                raise ValueError(f"{name}={value}: must be at least 1")

    def context(self, config: Any) -> int:
        """Tokens per sequence to reserve room for: never more than the model can hold (generation caps there)."""
        from neoxlite.generation import context_limit

        if self.max_length is not None:
            return min(self.max_length, context_limit(config))
        return min(DEFAULT_MAX_LENGTH, int(config.max_position_embeddings))


def offload_dir_arg(offload_dir: Any) -> str | None:
    """The offload_dir keyword as a path string, or None; refuses what is not a folder path, and "" (which would
    put the store in the current folder)."""
    if offload_dir is None:
        return None
    if not isinstance(offload_dir, str | bytes | os.PathLike):
        raise TypeError(f"offload_dir={offload_dir!r}: expected a folder path (str or Path)")
    path = os.fsdecode(offload_dir)
    if not path.strip():
        raise ValueError("offload_dir is empty; give the offload folder, e.g. "
                         "offload_dir='~/.cache/neoxlite/offload' (--offload-dir)")
    return path


def plan_model(model: nn.Module, *, dtype: torch.dtype, device: torch.device | str, spec: Any = None,
               quantized: Iterable[str] = (), gpu_memory: Any = None, cpu_memory: Any = None,
               offload_dir: str | os.PathLike | None = None, workload: Workload | None = None,
               links: Links | None = None) -> Plan:
    """The placement of `model` (any device, meta included) under the given budgets."""
    config = model.config
    device = torch.device(device)
    workload = workload or Workload()
    context = workload.context(config)
    act_dtype = spec.compute_dtype if spec is not None and spec.enabled else dtype
    from neoxlite.cache import StaticCache

    kv = StaticCache.nbytes(config, workload.max_batch_size, context, act_dtype)
    ws = activation_bytes(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                          num_heads=config.num_attention_heads, vocab_size=config.vocab_size,
                          batch=workload.max_batch_size, tokens=context, context=context,
                          dtype_bytes=act_dtype.itemsize)
    sizes = final_block_sizes(model, dtype, spec, quantized)
    gathered = {EMBED: config.hidden_size * dtype.itemsize}
    if getattr(config, "tie_word_embeddings", False) and EMBED in sizes:
        # The output head reads the embedding matrix whole: it is part of the head, wherever that lives.
        sizes[HEAD] = sizes.get(HEAD, 0) + sizes.pop(EMBED)
        gathered = {}
    budgets = resolve_budgets(gpu_memory, cpu_memory, offload_dir_arg(offload_dir), compute_device=device)
    return plan(sizes, kv_cache_bytes=kv, workspace_bytes=ws, gpu_memory=budgets.gpu, cpu_memory=budgets.cpu,
                offload_dir=budgets.offload_dir, compute=GPU if device.type == "cuda" else CPU,
                gathered=gathered, links=links)


# ------------------------------------------------------------------------------------------ the loader hook
class Offloader:
    """Moves each block of a model being loaded to its planned home and installs the scheduler."""

    workload: tuple[int, int] | None = None  # (sequences, tokens) the plan reserved room for, when known

    def __init__(self, model: nn.Module, plan: Plan, *, folder: str | os.PathLike, dtype: torch.dtype,
                 device: torch.device | str, spec: Any = None, settings: dict[str, Any] | None = None,
                 drop_cache: bool = False) -> None:
        self.model = model
        self.base = model.base_model
        self.config = model.config
        self.plan = plan
        self.dtype = dtype
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.spec = spec
        self.drop_cache = drop_cache
        self.sources: dict[int, Source] = {}
        self.store: BlockStore | None = None
        self._layer_cls = type(self.base.layers[0]) if len(self.base.layers) else None
        on_disk = plan.blocks_on(DISK)
        if on_disk:
            assert plan.offload_dir is not None
            store_settings = {"dtype": str(dtype), "quant": repr(spec) if spec is not None and spec.enabled else None,
                              **(settings or {})}
            self.store = BlockStore(plan.offload_dir, fingerprint(folder, store_settings),
                                    describe={"checkpoint": str(Path(folder).absolute()), **store_settings})
            missing = sum(plan.block_bytes[b] for b in on_disk if not self.store.has(b))
            self.store.check_space(missing)

    @classmethod
    def create(cls, model: nn.Module, *, folder: str | os.PathLike, dtype: torch.dtype, device: torch.device | str,
               spec: Any = None, prequantized: bool = False, gpu_memory: Any = None, cpu_memory: Any = None,
               offload_dir: str | os.PathLike | None = None, max_batch_size: int = 1, max_length: int | None = None,
               links: Links | None = None) -> Offloader | None:
        """An Offloader for `model` (a meta-device skeleton), or None when no budget or offload dir is given."""
        if not wants_offload(gpu_memory, cpu_memory, offload_dir):
            return None
        if offload_dir is not None:
            check_offload_dir(offload_dir_arg(offload_dir))  # a bad dir is reported even when this plan needs no disk
        keep_freed_memory_returnable()
        quantized = quantized_layer_names(model, spec, prequantized)
        p = plan_model(model, dtype=dtype, device=device, spec=spec, quantized=quantized, gpu_memory=gpu_memory,
                       cpu_memory=cpu_memory, offload_dir=offload_dir,
                       workload=Workload(max_batch_size, max_length), links=links)
        offloader = cls(model, p, folder=folder, dtype=dtype, device=device, spec=spec,
                        settings={"prequantized": prequantized})
        offloader.workload = (max_batch_size, Workload(max_batch_size, max_length).context(model.config))
        return offloader

    # ---------------------------------------------------------------- queries for the loader
    def home(self, block: str) -> str:
        if block == EMBED and EMBED not in self.plan.homes:  # tied: lives with the head
            return self.plan.homes[HEAD]
        return self.plan.homes[block]

    def needs_loading(self, block: str) -> bool:
        """False when the block's final form is already intact in the disk store (no checkpoint read needed)."""
        return not (self.home(block) == DISK and self.store is not None and self.store.has(block))

    def device_for(self, block: str) -> torch.device:
        """Where the loader should build `block`: on the compute device when it lives there or holds quantized
        layers (quantizing where it computes gives the same bits whatever the placement), else in RAM."""
        home = self.home(block)
        if home == self.plan.compute or (self.spec is not None and self.spec.enabled and block.startswith("layers.")):
            return self.device
        return torch.device("cpu")

    # ---------------------------------------------------------------- moving blocks home
    def finish_block(self, block: str) -> None:
        home = self.home(block)
        if home == self.plan.compute:
            return
        if block.startswith("layers."):
            self._stream_layer(int(block.split(".")[1]), home)
        elif block == EMBED and home == DISK:
            assert self.store is not None
            if not self.store.has(EMBED):
                self.store.write(EMBED, {"weight": self.base.embed_in.weight.detach()})
            self.base.embed_in = RowReadEmbedding(self.store.entry(EMBED))
        else:  # the embedding or the head in RAM beside a GPU: it computes where it lives
            for module in self._block_modules(block):
                module.to("cpu")

    def _block_modules(self, block: str) -> list[nn.Module]:
        if block == EMBED:
            return [self.base.embed_in]
        owners = [self.base, self.model] if self.model is not self.base else [self.base]
        return [getattr(o, n) for o in owners for n in HEAD_MODULES if isinstance(getattr(o, n, None), nn.Module)]

    def _meta_layer(self) -> nn.Module:
        assert self._layer_cls is not None
        with torch.device("meta"):
            return self._layer_cls(self.config).to(self.dtype).eval()

    def _stream_layer(self, i: int, home: str) -> None:
        block = f"layers.{i}"
        if home == DISK:
            assert self.store is not None
            if not self.store.has(block):
                state, quantized = block_state(self.base.layers[i])
                self.store.write(block, state, quantized)
            entry = self.store.entry(block)
            layout = Layout.of_entry(entry)
            store = self.store
            self.sources[i] = DiskSource(layout, entry, host_meta(layout, lambda: store.read(block)))
        else:
            state, quantized = block_state(self.base.layers[i])
            layout = Layout.of(state, quantized)
            data = pinned_empty(layout.nbytes) if self.cuda else torch.empty(layout.nbytes, dtype=torch.uint8)
            pack(state, data, layout)
            del state
            self.sources[i] = HostSource(layout, data, host_meta(layout, lambda: layout.views(data)))
        self.base.layers[i] = self._meta_layer()  # frees the built copy; the scheduler owns the bytes now

    def install(self) -> None:
        """After the last block: the scheduler takes over the model's block loop."""
        if self.sources:
            slot_bytes = max(max(s.layout.nbytes for s in self.sources.values()), self.plan.slot_bytes)
            layer_cls, config, dtype = self._layer_cls, self.config, self.dtype

            def make_layer() -> nn.Module:
                return layer_cls(config).to(dtype)

            self.base.scheduler = OffloadScheduler(
                self.base.layers, self.sources, make_layer=make_layer, compute_device=self.device,
                slots=max(self.plan.slots, 2), slot_bytes=slot_bytes,
                staging_bytes=2 * slot_bytes if self.cuda and self.plan.reserved.get(CPU, {}).get("staging") else 0,
                quant_spec=self.spec, drop_cache=self.drop_cache, cache_room=self._page_cache_room(slot_bytes))
        self.base.compute_device = self.device
        self.model.offload_plan = self.plan
        self.model.offload_workload = self.workload  # (batch, tokens) the plan reserved; generate() holds to it

    def _page_cache_room(self, slot_bytes: int) -> int:
        """Bytes of page cache the disk layers may keep between steps: the RAM free now (as the process's
        cgroup allows), less what generation will still allocate (KV cache, workspace), the layers mapped (one
        per slot) or read ahead (one) at any moment, and a margin."""
        reserved = self.plan.reserved.get(CPU, {})
        upcoming = reserved.get("kv_cache", 0) + reserved.get("workspace", 0) + (self.plan.slots + 1) * slot_bytes
        free = free_cpu_memory() - upcoming
        return max(0, free - max(CACHE_MARGIN_BYTES, free // 10))

    def apply(self) -> None:
        """Re-homes a model that is already fully built (tests and tools; the loader goes block by block)."""
        for block in self.plan.homes:
            self.finish_block(block)
        self.install()
