"""Streaming loader: the module tree on the meta device, then one block at a time read, cast, placed and freed."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from neoxlite.checkpoint import LEGACY_KEY, Checkpoint, block_of
from neoxlite.config import GPTNeoXConfig
from neoxlite.fileio import file_identity
from neoxlite.generation import GenerationMixin
from neoxlite.generation_config import read_generation_config
from neoxlite.hub import resolve

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
HEAD_MODULES = ("embed_out", "lm_head", "score", "classifier", "qa_outputs")
_HEAD_KEY = re.compile(r"^(embed_out|lm_head|score|classifier|qa_outputs)\.")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtype from a dtype or a name ('bf16', 'float16', ...); None or 'auto' keeps the checkpoint's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[name]


def parse_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but this torch has no CUDA device; use device='cpu'")
    return device


def checkpoint_key_to_param(key: str, prefix: str, has_prefix: bool) -> str:
    """Maps a checkpoint key onto the target class's parameter name (adds or drops the 'gpt_neox.' prefix)."""
    if key.startswith("lm_head."):  # newer transformers' name for NeoX's embed_out
        key = "embed_out." + key[len("lm_head."):]
    if has_prefix and not key.startswith(prefix) and not _HEAD_KEY.match(key):
        return prefix + key
    if not has_prefix and key.startswith(prefix):
        return key[len(prefix):]
    return key


def load_pretrained(
    cls: type,
    path_or_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    init_new_heads: bool = False,
    progress: bool = True,
    quant: str | None = None,
    compute_dtype: torch.dtype | str | None = None,
    double_quant: bool = True,
    int8_threshold: float = 6.0,
    skip_modules: list[str] | tuple[str, ...] | None = None,
    gpu_memory: str | int | None = None,
    cpu_memory: str | int | None = None,
    offload_dir: str | os.PathLike | None = None,
    max_batch_size: int = 1,
    max_context: int | None = None,
    on_block: Callable[[str, int, int], None] | None = None,
    **unknown: Any,
) -> nn.Module:
    """Builds `cls` from a checkpoint folder or hub id.

    dtype: weights' dtype (default: as stored). device: where the model runs (default cpu).
    init_new_heads: give a head the checkpoint lacks (e.g. `score` on a base model) random weights to train,
    instead of refusing.
    quant: None | "int8" | "nf4" | "fp4": quantize the linear layers with bitsandbytes while loading (a
    pre-quantized checkpoint loads in its own mode without this); compute_dtype (default float16),
    double_quant, int8_threshold and skip_modules (default: embeddings and heads) as in neoxlite.quant.QuantSpec.
    gpu_memory, cpu_memory ("6GiB", "512MB", bytes; default: free memory less a margin) and offload_dir: as soon as
    one is given, every block gets a home (GPU, RAM or disk) planned within these budgets, with room for the KV
    cache and activations of max_batch_size sequences of max_context tokens (default: min(2048, the model's)).
    on_block: called after each block as on_block(block, blocks done, blocks in all) (the app's progress bar).
    """
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    folder = resolve(path_or_id, revision=revision)
    config = GPTNeoXConfig.from_json_file(folder / "config.json")
    # generate()'s defaults, as transformers reads them for models that generate (read before the weights: a
    # malformed file fails fast); None when the checkpoint has no generation_config.json
    generation_config = read_generation_config(folder) if issubclass(cls, GenerationMixin) else None
    # --- quant: which spec this load uses (the checkpoint's own when pre-quantized) ---
    from neoxlite.quant.model import QuantPlan, resolve_spec

    spec, prequantized = resolve_spec(config.quantization_config, quant=quant, compute_dtype=compute_dtype,
                                      double_quant=double_quant, int8_threshold=int8_threshold,
                                      skip_modules=skip_modules)
    target_dtype = parse_dtype(dtype)
    if device is None and gpu_memory is not None and torch.cuda.is_available():
        device = "cuda"  # a GPU budget asks for the GPU, as transformers' max_memory does
    device = parse_device(device)
    ckpt = Checkpoint(folder)
    read_from = files_identity(ckpt.files.values())  # a shard rewritten during the load is refused at its end
    check_layer_count(ckpt, config, folder)  # before building: the layer count decides the module tree
    if target_dtype is None:
        target_dtype = stored_float_dtype(ckpt)

    with torch.device("meta"):
        model = cls(config)
    prefix = model.base_model_prefix + "."
    has_prefix = any(name.startswith(prefix) for name, _ in model.named_parameters())
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {"embed_out.weight"} if config.tie_word_embeddings and "embed_out.weight" in params else set()
    qplan = QuantPlan(model, spec, prequantized)  # quant: the linear layers built by quant/ instead of copied
    # --- offload: each block's home under the budgets; None when no budget or offload dir is given ---
    from neoxlite.offload.placement import Offloader

    offloader = Offloader.create(model, folder=folder, dtype=target_dtype, device=device, spec=spec,
                                 prequantized=prequantized, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
                                 offload_dir=offload_dir, max_batch_size=max_batch_size, max_length=max_context)
    if offloader is None:
        _check_fits(model, target_dtype, spec, prequantized, device)

    by_param: dict[str, str] = {}
    unexpected: list[str] = []
    for key in ckpt.keys:
        if LEGACY_KEY.search(key):
            continue
        name = checkpoint_key_to_param(key, prefix, has_prefix)
        if name in params or qplan.owner(name):
            by_param[name] = key
        elif not _HEAD_KEY.match(name):  # another class's head: loading a base from a CausalLM file is normal
            unexpected.append(key)
    missing = [n for n in params if n not in by_param and n not in tied]
    new_heads = [n for n in missing if _HEAD_KEY.match(n)]
    if init_new_heads:
        missing = [n for n in missing if n not in new_heads]
    misshaped = [
        f"{key}: checkpoint {tuple(ckpt.shape(key))}, model {tuple(params[name].shape)}"
        for name, key in by_param.items()
        if not qplan.stored_quantized(name) and tuple(ckpt.shape(key)) != tuple(params[name].shape)
    ]
    quant_missing, quant_unexpected = qplan.check(by_param)
    missing += quant_missing
    unexpected += [by_param[name] for name in quant_unexpected]
    if missing or unexpected or misshaped:
        raise ValueError(_mismatch_message(folder, cls.__name__, missing, unexpected, misshaped, new_heads))

    blocks: dict[str, list[str]] = {}
    for name in params:
        if name in by_param or name in new_heads:
            blocks.setdefault(block_of(name), []).append(name)
    bar = tqdm(blocks.items(), desc=f"loading {folder.name}", unit="block", disable=not progress, file=sys.stderr)
    for done, (block, names) in enumerate(bar, 1):
        if offloader is not None and not offloader.needs_loading(block):
            offloader.finish_block(block)  # offload: already intact in the disk store, nothing to read
            if on_block is not None:
                on_block(block, done, len(blocks))
            continue
        block_device = offloader.device_for(block) if offloader is not None else device
        for name in names:
            layer = qplan.owner(name)
            if layer is not None:  # quant: weight and bias (and quant state) read, quantized and placed together
                if name == layer + ".weight":
                    qplan.install(model, layer, lambda n: ckpt.read(by_param[n]) if n in by_param else None,
                                  target_dtype, block_device)
                continue
            if name in by_param:
                tensor = ckpt.read(by_param[name])
            else:
                tensor = torch.empty(params[name].shape).normal_(std=0.02)
            if tensor.is_floating_point():
                tensor = tensor.to(target_dtype)
            _set_param(model, name, tensor.to(block_device))
            del tensor  # the float copy goes before the next block is read
        if offloader is not None:
            offloader.finish_block(block)  # offload: to its home (RAM, pinned RAM or the disk store), rest freed
        if on_block is not None:
            on_block(block, done, len(blocks))
    check_unchanged(folder, read_from)
    if tied:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    model.base_model.compute_device = device
    if generation_config is not None:
        model.generation_config = generation_config
    qplan.finish(model)
    if offloader is not None:
        offloader.install()  # offload: the scheduler takes over the block loop
    model.eval()
    return model


def files_identity(paths: Iterable[Path]) -> dict[Path, tuple[int, ...]]:
    """fileio.file_identity of each file (its stat follows the hub cache's links to the blobs)."""
    return {path: file_identity(path.stat()) for path in paths}


def check_unchanged(folder: Any, before: dict[Path, tuple[int, ...]]) -> None:
    """Refuses a model whose weight files changed while it loaded: its blocks would mix old and new weights. (A shard
    deleted after its read changes nothing read; one deleted before its read failed that read.)"""
    changed = []
    for path, identity in before.items():
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if file_identity(st) != identity:
            changed.append(path.name)
    if changed:
        raise ValueError(f"{folder}: {', '.join(changed)} changed while the model was loading (rewritten or replaced), "
                         "so the weights read may mix old and new; wait until the checkpoint is complete and load again")


def _check_fits(model: nn.Module, dtype: torch.dtype, spec: Any, prequantized: bool, device: torch.device) -> None:
    """Without budgets the whole model goes to `device`: refuse, before allocating, a model that cannot fit."""
    from neoxlite.offload import budget
    from neoxlite.offload.placement import final_block_sizes, quantized_layer_names

    need = sum(final_block_sizes(model, dtype, spec, quantized_layer_names(model, spec, prequantized)).values())
    on_gpu = device.type == "cuda"
    have = budget.free_gpu_memory(device) if on_gpu else budget.free_cpu_memory()
    if need > have:
        flags = "--gpu-memory, --cpu-memory and --offload-dir" if on_gpu else "--cpu-memory and --offload-dir"
        raise ValueError(f"this model needs {need / 2**30:.1f} GiB of {'GPU memory' if on_gpu else 'RAM'}, you have "
                         f"{have / 2**30:.1f} GiB free; pass {flags} (cpu_memory=, offload_dir=) to keep part of it "
                         "on disk, or quantize it (--quant nf4)")


def check_layer_count(ckpt: Checkpoint, config: GPTNeoXConfig, folder: Any) -> None:
    """Refuses a config.json whose num_hidden_layers differs from the layers the weights hold: the model would
    be built with layers that get no weights, or the weights of some layers would have no place."""
    blocks = ckpt.keys_by_block()
    found = max((int(b.removeprefix("layers.")) for b in blocks if b.startswith("layers.")), default=-1) + 1
    if found != config.num_hidden_layers:
        held = f"{found} layers (layers.0 to layers.{found - 1})" if found else "no layers"
        raise ValueError(f"{folder}: config.json says num_hidden_layers={config.num_hidden_layers} but the "
                         f"weights hold {held}; check that config.json belongs to these weights")


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def stored_float_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype a checkpoint loads in by default (`neoxlite plan` uses it too)."""
    # The float dtype holding the most bytes: a pre-quantized checkpoint also has small float32 quant-state
    # tensors (block scales, code books) beside its float16 embeddings, and safetensors lists float32 first.
    by_dtype: dict[torch.dtype, int] = {}
    for key in ckpt.keys:
        if ckpt.dtype(key).is_floating_point:
            by_dtype[ckpt.dtype(key)] = by_dtype.get(ckpt.dtype(key), 0) + ckpt.nbytes(key)
    if by_dtype:
        return max(by_dtype, key=by_dtype.get)
    return torch.float32


def _mismatch_message(folder: Any, cls_name: str, missing: list[str], unexpected: list[str],
                      misshaped: list[str], new_heads: list[str]) -> str:
    lines = [f"the checkpoint in {folder} does not fit {cls_name}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    if new_heads and set(new_heads) & set(missing):
        lines.append(
            f"  the checkpoint has no {', '.join(sorted({n.split('.')[0] for n in new_heads}))} head; load a checkpoint "
            "trained with one, or pass init_new_heads=True to start it from random weights for training"
        )
    elif misshaped:
        lines.append("  check that config.json belongs to these weights")
    return "\n".join(lines)
