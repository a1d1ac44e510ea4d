"""Whole-model quantization: which linear layers of a skeleton are quantized, their checkpoint tensors, and sizes.

The loader builds the model on the meta device, then asks a `QuantPlan` which checkpoint tensors belong to a
quantized layer (`owner`), checks them up front (`check`), and lets the plan build each such layer from its
tensors in one go (`install`): quantizing a float weight, or loading a pre-quantized one as it is.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .spec import QuantSpec, _parse_mode, parse_compute_dtype

# Every key a quantized layer may hold in a checkpoint, relative to the layer (both 4-bit types and int8), so a
# stray quant-state tensor is attributed to its layer and reported there rather than as an unknown parameter.
_QUANT_SUFFIXES = (
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
    "weight.nested_quant_map",
    "weight.nested_absmax",
    "weight.quant_map",
    "weight.absmax",
    "weight_format",
    "weight",
    "bias",
    "SCB",
)


def resolve_spec(
    quantization_config: Mapping[str, Any] | None,
    *,
    quant: str | None = None,
    compute_dtype: torch.dtype | str | None = None,
    double_quant: bool = True,
    int8_threshold: float = 6.0,
    skip_modules: Iterable[str] | None = None,
) -> tuple[QuantSpec, bool]:
    """(spec, pre_quantized) for a load: the checkpoint's own quantization when config.json has one, else the
    spec the keywords ask for. A pre-quantized checkpoint keeps its mode (it cannot be re-quantized);
    compute_dtype, which only changes how it computes, may be overridden."""
    if not quantization_config:
        return (
            QuantSpec.from_kwargs(
                quant=quant,
                compute_dtype=compute_dtype,
                double_quant=double_quant,
                int8_threshold=int8_threshold,
                skip_modules=skip_modules,
            ),
            False,
        )
    stored = QuantSpec.from_config(quantization_config)
    asked = _parse_mode(quant)
    if asked not in ("none", stored.mode):
        raise ValueError(
            f"this checkpoint is already quantized as {stored.mode}; load it without quant= (or with "
            f"quant={stored.mode!r}), or quantize the unquantized checkpoint as {asked}"
        )
    if compute_dtype is not None:
        stored = dataclasses.replace(stored, compute_dtype=parse_compute_dtype(compute_dtype))
    return stored, True


class QuantPlan:
    """The nn.Linear layers of a (meta-device) model that `spec` quantizes, and how their tensors load.

    Names are the model's parameter-style names ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight.absmax").
    """

    def __init__(self, model: nn.Module, spec: QuantSpec, prequantized: bool = False) -> None:
        self.spec = spec
        self.prequantized = prequantized
        shared = _shared_parameters(model)
        self.layers: dict[str, nn.Linear] = {
            name: module
            for name, module in model.named_modules()
            if spec.enabled and isinstance(module, nn.Linear) and spec.quantizes(name) and id(module.weight) not in shared
        }

    def __bool__(self) -> bool:
        return bool(self.layers)

    def owner(self, name: str) -> str | None:
        """The quantized layer a parameter-style name belongs to, or None."""
        for suffix in _QUANT_SUFFIXES:
            if name.endswith("." + suffix):
                layer = name[: -len(suffix) - 1]
                if layer in self.layers and (self.prequantized or suffix in ("weight", "bias")):
                    return layer
        return None

    def stored_quantized(self, name: str) -> bool:
        """True for names whose checkpoint tensor is in quantized form (no float shape or dtype to check)."""
        return self.prequantized and self.owner(name) is not None

    def expected(self, layer: str) -> list[str]:
        """The names the checkpoint must hold for one quantized layer."""
        from .layers import serialized_keys

        module = self.layers[layer]
        if not self.prequantized:
            keys = ["weight"] + (["bias"] if module.bias is not None else [])
        else:
            keys = [k for k in serialized_keys(self.spec, bias=module.bias is not None) if k != "weight_format"]
        return [f"{layer}.{k}" for k in keys]

    def check(self, available: Iterable[str]) -> tuple[list[str], list[str]]:
        """(missing, unexpected) names among the quantized layers' tensors, for the loader's one mismatch error."""
        # weight and bias are model parameters: the loader's own check covers them
        available = {n for n in available if self.owner(n) is not None and not n.endswith((".weight", ".bias"))}
        expected = {
            n for layer in self.layers for n in self.expected(layer) if not n.endswith((".weight", ".bias"))
        }
        optional = {f"{layer}.weight_format" for layer in self.layers} if self.spec.mode == "int8" else set()
        return sorted(expected - available), sorted(available - expected - optional)

    def install(
        self,
        model: nn.Module,
        layer: str,
        read: Callable[[str], torch.Tensor | None],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> nn.Module:
        """Builds one quantized layer from `read(name)` (None when the checkpoint lacks that name) and puts it in
        `model` in place of the nn.Linear. A float weight is cast to `dtype` and quantized on `device`, as
        transformers does; a pre-quantized one loads as stored."""
        from .layers import load_quantized_linear, quantize_linear

        module = self.layers[layer]
        if self.prequantized:
            prefix = layer + "."
            names = [n for n in self.expected(layer)]
            if self.spec.mode == "int8":
                names.append(prefix + "weight_format")
            tensors = {n[len(prefix) :]: t for n in names if (t := read(n)) is not None}
            if "bias" in tensors:
                tensors["bias"] = tensors["bias"].to(dtype)
            built = load_quantized_linear(
                tensors, self.spec, device, shape=(module.out_features, module.in_features), name=layer
            )
        else:
            weight = read(layer + ".weight")
            bias = read(layer + ".bias") if module.bias is not None else None
            built = quantize_linear(weight.to(dtype), None if bias is None else bias.to(dtype), self.spec, device)
        model.set_submodule(layer, built)
        _release_freed_memory()
        return built

    def finish(self, model: nn.Module) -> None:
        """Records the spec on the model and, when layers were quantized, in its config (so save_pretrained
        writes transformers' quantization_config)."""
        model.quant_spec = self.spec if self.layers else QuantSpec()
        config = getattr(model, "config", None)
        if self.layers and config is not None:
            config.quantization_config = self.spec.to_config()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only


def _release_freed_memory() -> None:
    """Hands freed heap memory back to the OS. glibc keeps large freed blocks (the float weight just read, the
    quantizer's temporaries) in the process, where they count in its RSS: without this, loading pythia-1.4b as
    nf4 peaked ~0.7 GiB above the quantized footprint instead of about one block above it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _shared_parameters(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def _is_bnb_module(module: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "bitsandbytes" for c in type(module).__mro__)


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a module holds itself (not its children), quant state included."""
    if _is_bnb_module(module):
        from .layers import _module_tensors

        return _module_tensors(module)
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def block_sizes(model: nn.Module, block_of: Callable[[str], str]) -> dict[str, int]:
    """Bytes held per block (block_of(parameter-style name) -> block name), each storage counted once, in the
    order the blocks first appear in the model."""
    seen: set[tuple[str, int]] = set()
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        block = block_of(name + ".")
        for t in module_tensors(module):
            if t.device.type == "meta":
                sizes.setdefault(block, 0)
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            sizes[block] = sizes.get(block, 0) + storage.nbytes()
    return sizes


def format_block_table(sizes: Mapping[str, int]) -> str:
    """A plain-text table of block sizes in bytes (and MiB), with the total."""
    width = max([len("total"), *map(len, sizes)])
    lines = [f"{'block':<{width}}  {'bytes':>14}  {'MiB':>10}"]
    for block, n in sizes.items():
        lines.append(f"{block:<{width}}  {n:>14,}  {n / 2**20:>10.2f}")
    total = sum(sizes.values())
    lines.append(f"{'total':<{width}}  {total:>14,}  {total / 2**20:>10.2f}")
    return "\n".join(lines)
