"""bitsandbytes layers: quantize a float weight, load a pre-quantized one, serialize, move, measure.

The layers are bitsandbytes' own `Linear4bit` / `Linear8bitLt`, built exactly the way transformers builds them
(same block size, storage dtype, compute dtype and quantization kernels, on the same device), so a neoxlite
model computes the same numbers as transformers + bitsandbytes with the same settings. The serialized form
(`quantized_state`) is transformers' checkpoint format: keys relative to the layer,

    4-bit: weight, [bias], weight.absmax, weight.quant_map, [weight.nested_absmax, weight.nested_quant_map],
           weight.quant_state.bitsandbytes__{nf4|fp4}
    8-bit: weight, [bias], SCB, weight_format
"""

from __future__ import annotations

import functools
import reprlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.functional import QuantState
from bitsandbytes.utils import unpack_tensor_to_dict
from torch import nn

from neoxlite import quant_matmul
from neoxlite.config import is_int
from neoxlite.cpu_kernels import QUANT_DTYPES, DecodeCall, QuantKernel, quant_kernel

from .spec import BLOCKSIZE_4BIT, QuantSpec

_NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the 4-bit block scales again in blocks of 256
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise kernels accept
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CPU int8 quantization runs over slices of rows holding about this many weights: bitsandbytes' CPU kernel makes
# float32 temporaries of its whole input, which for a 2048x8192 layer would be ~130 MB on top of the weight.
# Rows are quantized independently, so slicing gives the same bits.
CHUNK_ELEMENTS = 1 << 22


def _kernel_for(layer: nn.Module, x: torch.Tensor) -> QuantKernel | None:
    """neoxlite's quantized CPU kernels where they may compute this layer's call: a CPU input to a layer in RAM,
    in eval mode, without autograd; None otherwise (bitsandbytes' own forward, on the GPU too)."""
    if (x.device.type != "cpu" or layer.training or layer.weight.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    return quant_kernel()


def _kernel_state(layer: nn.Module, key: tuple, prepare: Callable[[], Any]) -> Any:
    """What the kernel reads, prepared once per layer and kept while the tensors it came from are the same (the
    key: their data pointers, compared by value, and objects, by identity; the cache holds both, so neither is
    reused by another tensor meanwhile)."""
    cached = layer.__dict__.get("_kernel_prepared")
    if cached is None or not all(a is b or (type(a) is int and a == b) for a, b in zip(cached[0], key, strict=True)):
        cached = layer.__dict__["_kernel_prepared"] = (key, prepare())
    return cached[1]


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' Linear4bit whose checkpoint form stays exact, computed by neoxlite's kernels on the CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first CPU forward for its fused kernel and
    turns the block scales into bf16; bitsandbytes' own state_dict after that re-quantizes them (lossy, and wrong
    without double quant). This subclass keeps the quant-state tensors as they were before the repacking (about 3%
    of the weight's bytes with double quant, 12% without) and undoes the weight's repacking exactly (it is a bit
    permutation), so `state_dict()` and `quantized_state()` are bit-exact, and a device move starts from the
    original layout.

    On the CPU (eval, no autograd) with neoxlite's kernels available, up to 32 input rows go to the kernel that
    reads the packed weight in place (neoxlite/csrc/linear_quant.c); more rows are dequantized a tile at a time
    and multiplied by torch's matmul (neoxlite.quant_matmul). Both give bitsandbytes' numbers for its generic CPU path, up to the order of fp32 sums, and the
    weight is never repacked. Elsewhere the forward pass is bitsandbytes' own, unchanged.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._canonical: dict[str, torch.Tensor] | None = None  # quant state before CPU repacking
        self._canonical_weight: tuple[torch.Size, torch.dtype] | None = None  # weight shape/dtype before it
        # bitsandbytes' repacking needs out_features % 32 == 0 and whole blocks per row; other shapes would
        # fail an assert in its forward, so they keep the generic kernel.
        self.support_avx512bf16_for_cpu = (
            self.support_avx512bf16_for_cpu and self.out_features % 32 == 0 and self.in_features % BLOCKSIZE_4BIT == 0
        )

    @property
    def cpu_packed(self) -> bool:
        """True once bitsandbytes has repacked the weight for its AVX512-BF16 CPU kernel."""
        return bool(getattr(self.weight.quant_state, "packing_format_for_cpu", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = None if self.cpu_packed else _kernel_for(self, x)
        if kernel is not None:
            return self._forward_cpu(kernel, x, gelu=False)
        return self._forward_bnb(x)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """F.gelu(self(x)), fused into the kernel call where the kernel runs."""
        kernel = None if self.cpu_packed else _kernel_for(self, x)
        if kernel is not None:
            return self._forward_cpu(kernel, x, gelu=True)
        return F.gelu(self._forward_bnb(x))

    def _forward_cpu(self, kernel: QuantKernel, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        if not self.compute_type_is_set:  # as bitsandbytes' forward: a float32/bfloat16 input sets it
            self.set_compute_type(x)
            self.compute_type_is_set = True
        dtype, qs = self.compute_dtype, self.weight.quant_state
        xc = x.to(dtype)
        key = (self.weight.data_ptr(), qs, None if self.bias is None else self.bias.data_ptr(), dtype)
        args, bias = _kernel_state(self, key, lambda: (self._prepare_kernel(), self._bias_as(dtype)))
        if args is not None and x.numel() <= kernel.rows_4bit(dtype) * x.shape[-1] and dtype in QUANT_DTYPES:
            out = kernel.linear_4bit(xc.contiguous(), *args, bias, gelu=gelu and x.dtype is dtype)
            return out.to(x.dtype) if not gelu or x.dtype is dtype else F.gelu(out.to(x.dtype))
        if args is not None and dtype in QUANT_DTYPES:  # many rows: dequantized tile by tile, torch's matmul
            out = quant_matmul.linear_4bit(kernel, xc, *args, bias).to(x.dtype)
            return F.gelu(out) if gelu else out
        # a layout the kernels do not read: bitsandbytes' dequantize-and-matmul path (its CPU repacking is
        # skipped, so the packed weight stays as stored)
        out = bnb.matmul_4bit(xc, self.weight, bias=bias, quant_state=qs).to(x.dtype)
        return F.gelu(out) if gelu else out

    def decode_call(self, dtype: torch.dtype, gelu: bool = False,
                    any_rows: bool = False) -> DecodeCall | None:
        """neoxlite.linear.DecodeLinear.decode_call: the kernel on this layer's packed weight, for inputs already in
        the compute dtype (as a model in that dtype gives them)."""
        kernel = quant_kernel()
        if kernel is None or self.cpu_packed or self.training or self.weight.device.type != "cpu":
            return None
        if not self.compute_type_is_set:  # what the first forward would set (bitsandbytes' rule)
            self.set_compute_type(torch.empty((1, self.in_features), dtype=dtype))
            self.compute_type_is_set = True
        args = self._prepare_kernel()
        if self.compute_dtype is not dtype or dtype not in QUANT_DTYPES or args is None:
            return None
        return kernel.bind_4bit(*args, self._bias_as(dtype), dtype, gelu=gelu, any_rows=any_rows)

    def _prepare_kernel(self) -> tuple | None:
        """(codes, out_features, table, absmax, nested) for QuantKernel.linear_4bit; None for a layout it does not
        read (a partial block per row, another block size)."""
        qs, data = self.weight.quant_state, self.weight.data
        n, k = (tuple(qs.shape) + (0, 0))[:2] if qs is not None else (0, 0)
        if (qs is None or len(qs.shape) != 2 or qs.blocksize != BLOCKSIZE_4BIT or k % BLOCKSIZE_4BIT
                or not data.is_contiguous() or data.numel() * data.element_size() * 2 != n * k
                or qs.code.numel() != 16 or (qs.nested and qs.state2.blocksize != _NESTED_BLOCKSIZE)):
            return None
        codes = data.view(torch.uint8).reshape(-1)
        table = qs.code.float().contiguous()
        if not qs.nested:
            return codes, n, table, qs.absmax.float().contiguous(), None
        nested = (qs.state2.code.float().contiguous(), qs.state2.absmax.float().contiguous(), float(qs.offset))
        return codes, n, table, qs.absmax.contiguous(), nested

    def _bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.data.to(dtype).contiguous()

    def _forward_bnb(self, x: torch.Tensor) -> torch.Tensor:
        # bitsandbytes casts the bias to the compute dtype in place; casting it each call computes the same
        # numbers and keeps the stored bias as loaded.
        bias = None if self.bias is None else self.bias.data
        repacks = (  # bitsandbytes' own condition for repacking on this call
            x.device.type == "cpu" and self.support_avx512bf16_for_cpu and not self.training and not x.requires_grad
        )
        if not repacks or self.cpu_packed:
            out = super().forward(x)
        else:
            before = self.weight.quant_state.as_dict(packed=True)  # references, not copies
            shape, dtype = self.weight.data.shape, self.weight.data.dtype
            out = super().forward(x)
            if self.cpu_packed:
                self._canonical, self._canonical_weight = before, (shape, dtype)
        if bias is not None:
            self.bias.data = bias
        return out

    def canonical(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(packed weight, quant-state tensors) in the checkpoint layout, without changing the layer."""
        if not self.cpu_packed:
            return self.weight.data, self.weight.quant_state.as_dict(packed=True)
        assert self._canonical is not None and self._canonical_weight is not None
        shape, dtype = self._canonical_weight
        return _unpack_cpu_weight(self.weight.data, shape, dtype), dict(self._canonical)

    def restore_canonical(self) -> None:
        """Undo bitsandbytes' CPU repacking (the next CPU forward redoes it)."""
        if not self.cpu_packed:
            return
        weight, qs = self.canonical()
        self.weight = bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=qs, requires_grad=False, device=self.weight.device, module=self
        )
        self._canonical = self._canonical_weight = None

    def _apply(self, fn, recurse=True):  # every .to() / .cuda() / .half() goes through here
        self.restore_canonical()
        self.__dict__.pop("_kernel_prepared", None)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in quantized_state(self).items():
            destination[prefix + key] = value if keep_vars else value.detach()


class Linear8bit(bnb.nn.Linear8bitLt):
    """bitsandbytes' Linear8bitLt (LLM.int8, inference weights), computed by neoxlite's kernel on the CPU.

    On the CPU (eval, no autograd) with neoxlite's kernels available, up to 32 input rows go to the kernel that
    reads the int8 weight in place and does what bitsandbytes' CPU forward does: the inputs quantized per row
    from float16, outlier columns (a value >= threshold) multiplied in the input dtype, the int8 products summed
    exactly (bitsandbytes sums them in fp32 here, which is exact below 2^24); more rows take the same arithmetic a
    tile of int8 weights at a time through torch's matmul (neoxlite.quant_matmul). Elsewhere, bitsandbytes' forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel(x)
        return self._forward_cpu(kernel, x, gelu=False) if kernel is not None else super().forward(x)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """F.gelu(self(x)), fused into the kernel call where the kernel runs."""
        kernel = self._kernel(x)
        return self._forward_cpu(kernel, x, gelu=True) if kernel is not None else F.gelu(super().forward(x))

    def decode_call(self, dtype: torch.dtype, gelu: bool = False,
                    any_rows: bool = False) -> DecodeCall | None:
        """neoxlite.linear.DecodeLinear.decode_call: the kernel on this layer's int8 weight (one engine at every
        batch, so `any_rows` changes nothing)."""
        kernel = quant_kernel()
        if (kernel is None or self.training or self.weight.device.type != "cpu" or dtype not in QUANT_DTYPES
                or self.state.has_fp16_weights or self.weight.dtype != torch.int8):
            return None
        weight, scb, bias = self._kernel_args(dtype)
        return kernel.bind_int8(weight, scb, float(self.state.threshold), bias, dtype, gelu=gelu)

    def _kernel(self, x: torch.Tensor) -> QuantKernel | None:
        kernel = _kernel_for(self, x)
        if (kernel is None or x.dtype not in QUANT_DTYPES or self.state.has_fp16_weights
                or self.weight.dtype != torch.int8):
            return None
        return kernel

    def _kernel_args(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 weight, fp32 SCB, bias in `dtype`), contiguous, as the kernels read them; prepared once per layer
        and dtype."""
        scb = self.weight.SCB if self.weight.SCB is not None else self.state.SCB
        key = (self.weight.data_ptr(), scb, None if self.bias is None else self.bias.data_ptr(), dtype)
        return _kernel_state(self, key, lambda: (
            self.weight.data.contiguous(), scb.float().contiguous(),
            None if self.bias is None else self.bias.data.to(dtype).contiguous()))

    def _forward_cpu(self, kernel: QuantKernel, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        weight, scb, bias = self._kernel_args(x.dtype)
        if x.numel() > kernel.max_rows * x.shape[-1]:  # many rows: int8 tiles through torch's matmul
            out = quant_matmul.linear_int8(x, weight, scb, float(self.state.threshold), bias)
            return F.gelu(out) if gelu else out
        return kernel.linear_int8(x.contiguous(), weight, scb, float(self.state.threshold), bias, gelu=gelu)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_kernel_prepared", None)
        return super()._apply(fn, recurse)


def _unpack_cpu_weight(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype, block_n: int = 32) -> torch.Tensor:
    """Exact inverse of the weight part of bitsandbytes' `_convert_weight_packed_for_cpu` (N, K/2) -> (N*K/2, 1)."""
    n, k_half = packed.shape
    low, high = packed.reshape(-1, block_n) & 0xF, packed.reshape(-1, block_n) >> 4
    nibbles = torch.cat([low, high], dim=-1)  # (N/bn * K/2, 2*bn): element pairs (k, k+1) of bn rows
    nibbles = nibbles.reshape(n // block_n, k_half, block_n, 2).transpose(1, 2).reshape(-1)  # row-major (N*K,)
    flat = (nibbles[0::2] << 4) | nibbles[1::2]
    return flat.view(dtype).reshape(shape)


# Values per step of the CPU 4-bit quantizer: its temporaries stay in cache, and each op stays under torch's
# 32768-element grain, below which it runs on one thread without the cost of waking others.
_FAST_CHUNK = 1 << 14


@functools.cache
def _4bit_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Lookup tables that replace the bucketize of bitsandbytes' CPU quantize_4bit, exactly.

    Indexed by the high 16 bits of a float32 (sign, exponent, 7 mantissa bits), each cell is an interval of
    floats that holds at most one of the 15 decision bounds: the code is `hi` if the value is above the cell's
    bound (+inf when it has none), else `lo`. None when this bitsandbytes lacks the bounds we mirror.
    """
    try:
        from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
    except ImportError:
        return None
    bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    bounds, order = bounds.float(), order.to(torch.uint8)
    cells = torch.arange(1 << 16, dtype=torch.int64) - (1 << 15)  # arithmetic shift: high halves as signed
    first = (cells << 16).to(torch.int32).view(torch.float32)
    last = ((cells << 16) | 0xFFFF).to(torch.int32).view(torch.float32)
    low, high = torch.minimum(first, last), torch.maximum(first, last)  # negative floats run backwards
    finite = torch.isfinite(low) & torch.isfinite(high)
    low, high = torch.where(finite, low, 0.0), torch.where(finite, high, 0.0)
    inside = (bounds >= low[:, None]) & (bounds <= high[:, None])
    if int(inside.sum(1).max()) > 1:
        return None
    below = (bounds < low[:, None]).sum(1)  # bounds under the whole cell = bucketize's index there
    split = torch.full((1 << 16,), float("inf"))
    rows, cols = inside.nonzero(as_tuple=True)
    split[rows] = bounds[cols]
    return split, order[below], order[(below + 1).clamp(max=len(order) - 1)]


def _quantize_4bit_blocks(flat: torch.Tensor, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU quantize_4bit kernel for whole 64-value blocks, the same arithmetic without its
    bucketize: (packed uint8 (n/2,), absmax float32 (n/64,)). ~4x faster, in bounded memory."""
    split, code_lo, code_hi = tables
    n = flat.numel()
    packed = torch.empty(n // 2, dtype=torch.uint8)
    absmax = torch.empty(n // BLOCKSIZE_4BIT, dtype=torch.float32)
    for start in range(0, n, _FAST_CHUNK):
        a = flat[start : start + _FAST_CHUNK].float().view(-1, BLOCKSIZE_4BIT)
        am = a.abs().amax(dim=1)
        absmax[start // BLOCKSIZE_4BIT : start // BLOCKSIZE_4BIT + am.numel()] = am
        scaled = (a * (1.0 / am.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
        cell = (scaled.view(torch.int32) >> 16) + (1 << 15)
        q = torch.where(scaled > split.index_select(0, cell), code_hi.index_select(0, cell),
                        code_lo.index_select(0, cell))
        packed[start // 2 : start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def _quantize_4bit_cpu(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantState]:
    """bitsandbytes.functional.quantize_4bit(weight, blocksize=64, ...) on the CPU: the same packed bytes and
    quant state, faster and with bounded temporaries."""
    flat = weight.contiguous().reshape(-1)
    tables = _4bit_tables(spec.mode)
    if tables is not None and flat.numel() % BLOCKSIZE_4BIT == 0:
        data, scales = _quantize_4bit_blocks(flat, tables)
        if spec.quant_storage != torch.uint8:
            data = data.view(spec.quant_storage)
        data = data.unsqueeze(1)
    else:  # a partial last block: bitsandbytes' own kernel
        data, scales = torch.ops.bitsandbytes.quantize_4bit.default(
            flat, BLOCKSIZE_4BIT, spec.mode, spec.quant_storage
        )
    code = bnb.functional.get_4bit_type(spec.mode, device=weight.device)
    if not spec.double_quant:
        state = QuantState(
            absmax=scales, shape=weight.shape, code=code, blocksize=BLOCKSIZE_4BIT, quant_type=spec.mode,
            dtype=weight.dtype,
        )
        return data, state
    # as quantize_4bit(compress_statistics=True) does: the block scales, centred, quantized in blocks of 256
    offset = scales.mean()
    qscales, state2 = bnb.functional.quantize_blockwise(scales - offset, blocksize=_NESTED_BLOCKSIZE)
    state = QuantState(
        absmax=qscales, shape=weight.shape, code=code, blocksize=BLOCKSIZE_4BIT, quant_type=spec.mode,
        dtype=weight.dtype, offset=offset, state2=state2,
    )
    return data, state


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What Int8Params._quantize does: row-wise absmax int8 of a float16 copy, (CB, SCB). On the CPU neoxlite's
    kernel (neoxlite/csrc/linear_quant.c, 6-25x faster), else the same arithmetic as bitsandbytes' kernel in slices
    of rows through one reused float32 buffer (same bits, less memory traffic and bounded temporaries)."""
    kernel = quant_kernel()
    if kernel is not None and weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in QUANT_DTYPES:
        quantized = kernel.quantize_int8(weight.contiguous())  # one pass per row, rows in parallel: same bits
        if quantized is not None:
            return quantized
    w16 = weight.contiguous().to(torch.float16)
    if w16.device.type != "cpu" or w16.dim() != 2:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w16)
        return cb, scb
    n_rows, cols = w16.shape
    rows = max(CHUNK_ELEMENTS // max(cols, 1), 1)
    cb = torch.empty(w16.shape, dtype=torch.int8)
    scb = torch.empty(n_rows, dtype=torch.float32)
    buf = torch.empty(min(rows, n_rows) * cols, dtype=torch.float32)
    for start in range(0, n_rows, rows):
        a = w16[start : start + rows]
        stats = a.abs().amax(dim=1).float()  # max(|a|) per row, as bitsandbytes takes it
        scb[start : start + rows] = stats
        b = buf[: a.numel()].view(a.shape)
        b.copy_(a)  # float16 -> float32 is exact: the product below is bitsandbytes' a * (127 / stats)
        b.mul_((127.0 / stats).unsqueeze(-1)).round_()
        cb[start : start + rows].copy_(b)
    return cb, scb


def _new_linear8bit(in_features: int, out_features: int, bias: bool, spec: QuantSpec) -> Linear8bit:
    return Linear8bit(
        in_features, out_features, bias, has_fp16_weights=False, threshold=spec.int8_threshold, device="meta"
    )


def _new_linear4bit(in_features: int, out_features: int, bias: bool, spec: QuantSpec) -> Linear4bit:
    return Linear4bit(
        in_features,
        out_features,
        bias,
        spec.compute_dtype,
        compress_statistics=spec.double_quant,
        quant_type=spec.mode,
        quant_storage=spec.quant_storage,
        device="meta",
    )


def _finish(module: nn.Module, bias: torch.Tensor | None, device: torch.device) -> nn.Module:
    if bias is not None:
        module.bias = nn.Parameter(bias.to(device), requires_grad=False)
    module.requires_grad_(False)
    return module.eval()  # bitsandbytes' int8 matmul takes its training path (different numbers) in train mode


def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a neoxlite.quant.QuantSpec, got {type(spec).__name__}")
    if not spec.enabled:
        raise ValueError("QuantSpec(mode='none') quantizes nothing; keep the layer as a plain nn.Linear")


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, device: torch.device | str
) -> nn.Module:
    """A ready bitsandbytes layer on `device` holding `weight` (out_features, in_features) quantized by `spec`.

    The weight is quantized as given, on `device`, like transformers does: pass it already cast to the model's
    dtype (int8 always quantizes from float16, as bitsandbytes does). `bias` is kept as given, moved to `device`.
    """
    _check_spec(spec)
    device = torch.device(device)
    if weight.dim() != 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"quantize_linear needs a 2-D float16/bfloat16/float32 weight, got {tuple(weight.shape)} {weight.dtype}"
        )
    out_features, in_features = weight.shape
    if spec.is_4bit:
        module = _new_linear4bit(in_features, out_features, bias is not None, spec)
        params = bnb.nn.Params4bit(
            weight.to(device),
            requires_grad=False,
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=spec.double_quant,
            quant_type=spec.mode,
            quant_storage=spec.quant_storage,
            module=module,
        )
        if device.type == "cpu":
            params.data, params.quant_state = _quantize_4bit_cpu(params.data, spec)
            params.bnb_quantized = True
            module.quant_state = params.quant_state
        else:
            params = params.to(device)  # quantizes here (bitsandbytes' Params4bit._quantize)
        module.weight = params
    else:
        module = _new_linear8bit(in_features, out_features, bias is not None, spec)
        cb, scb = _quantize_int8(weight.to(device))
        module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    return _finish(module, bias, device)


def serialized_keys(spec: QuantSpec, bias: bool = False) -> tuple[str, ...]:
    """The tensor keys (relative to the layer) of one quantized linear layer in transformers' format."""
    _check_spec(spec)
    if spec.is_4bit:
        keys = ["weight", "weight.absmax", "weight.quant_map"]
        if spec.double_quant:
            keys += ["weight.nested_absmax", "weight.nested_quant_map"]
        keys.append(f"weight.quant_state.bitsandbytes__{spec.mode}")
    else:
        keys = ["weight", "SCB", "weight_format"]
    return tuple(keys) + (("bias",) if bias else ())


def _bad(name: str, problem: str) -> ValueError:
    where = f" for {name}" if name else ""
    return ValueError(
        f"pre-quantized weights{where}: {problem}. The checkpoint's quant-state tensors do not match its "
        "quantization_config; re-create it with `neoxlite quantize` from the unquantized checkpoint."
    )


def _check_keys(tensors: Mapping[str, torch.Tensor], spec: QuantSpec, name: str) -> None:
    expected = set(serialized_keys(spec))
    optional = {"bias"} | ({"weight_format"} if spec.mode == "int8" else set())
    missing = sorted(expected - set(tensors) - optional)
    unexpected = sorted(set(tensors) - expected - optional)
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if problems:
        raise _bad(name, f"{'; '.join(problems)} (quantization_config says {spec.describe()})")


def _quant_info(tensors: Mapping[str, torch.Tensor], spec: QuantSpec, name: str) -> dict[str, Any]:
    """The packed quant state's JSON (quant_type, blocksize, dtype, shape, nested_*), every field that
    bitsandbytes' QuantState.from_dict reads checked for presence and type: it comes from the checkpoint."""
    try:
        info = unpack_tensor_to_dict(tensors[f"weight.quant_state.bitsandbytes__{spec.mode}"])
    except (ValueError, RecursionError):  # not UTF-8 JSON (UnicodeDecodeError is a ValueError)
        raise _bad(name, "the packed quant state is not valid JSON") from None
    if not isinstance(info, dict):
        raise _bad(name, f"the packed quant state is a JSON {type(info).__name__}, not an object")
    if info.get("quant_type") != spec.mode:
        raise _bad(name, f"quant state says quant_type={reprlib.repr(info.get('quant_type'))}, config says "
                         f"{spec.mode!r}")
    fields = {"quant_type", "blocksize", "dtype", "shape"}
    if spec.double_quant:
        fields |= {"nested_blocksize", "nested_dtype", "nested_offset"}
    missing, unknown = sorted(fields - set(info)), sorted(set(info) - fields)
    if missing or unknown:  # an unknown key could also replace a tensor (absmax, ...) in bitsandbytes' update
        raise _bad(name, f"quant state lacks fields {missing} or has unknown ones {reprlib.repr(unknown)}")
    dims = info["shape"]
    if not (isinstance(dims, list) and len(dims) == 2 and all(is_int(d) and 0 < d < 2**31 for d in dims)):
        raise _bad(name, f"quant state has no 2-D weight shape ({reprlib.repr(dims)})")
    for key in ("blocksize", "nested_blocksize") if spec.double_quant else ("blocksize",):
        if not is_int(info[key]) or info[key] not in _BNB_BLOCKSIZES:
            raise _bad(name, f"quant state {key} is {reprlib.repr(info[key])}, not one bitsandbytes supports "
                             f"({', '.join(map(str, _BNB_BLOCKSIZES))})")
    for key in ("dtype", "nested_dtype") if spec.double_quant else ("dtype",):
        if getattr(torch, str(info[key]), None) not in _FLOAT_DTYPES:
            raise _bad(name, f"quant state {key} {reprlib.repr(info[key])} is not a float dtype")
    offset = info.get("nested_offset", 0.0)
    # NaN fails the comparison; a huge int is compared exactly, never converted
    if not ((isinstance(offset, float) or is_int(offset)) and abs(offset) <= sys.float_info.max):
        raise _bad(name, f"quant state nested_offset {reprlib.repr(offset)} is not a finite number")
    return info


def _load_4bit(tensors: Mapping[str, torch.Tensor], spec: QuantSpec, device: torch.device, name: str, shape):
    weight = tensors["weight"]
    info = _quant_info(tensors, spec, name)
    out_features, in_features = info["shape"]
    if shape is not None and (out_features, in_features) != tuple(shape):
        raise _bad(name, f"quant state shape {[out_features, in_features]} != layer shape {list(shape)}")
    if weight.dtype != spec.quant_storage:
        raise _bad(name, f"weight dtype {weight.dtype} != bnb_4bit_quant_storage {spec.quant_storage}")
    n = out_features * in_features
    if weight.numel() * weight.element_size() * 2 != n + n % 2:
        raise _bad(name, f"packed weight holds {weight.numel() * weight.element_size() * 2} values, expected {n}")
    blocksize = info["blocksize"]
    absmax = tensors["weight.absmax"]
    if absmax.numel() != -(-n // blocksize):
        raise _bad(name, f"{absmax.numel()} block scales for {n} values with blocksize {blocksize}")
    if spec.double_quant:
        nested = tensors["weight.nested_absmax"]
        if absmax.dtype != torch.uint8 or nested.numel() != -(-absmax.numel() // info["nested_blocksize"]):
            raise _bad(name, "nested (double-quant) scales do not match the block scales")
    elif absmax.dtype != torch.float32:
        raise _bad(name, f"block scales are {absmax.dtype}, expected float32 without double quant")
    module = _new_linear4bit(in_features, out_features, "bias" in tensors, spec)
    stats = {k: v for k, v in tensors.items() if k.startswith("weight.")}
    module.weight = bnb.nn.Params4bit.from_prequantized(
        data=weight, quantized_stats=stats, requires_grad=False, device=device, module=module
    )
    return module


def _load_8bit(tensors: Mapping[str, torch.Tensor], spec: QuantSpec, device: torch.device, name: str, shape):
    weight, scb = tensors["weight"], tensors["SCB"]
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise _bad(name, f"int8 weight expected, got {tuple(weight.shape)} {weight.dtype}")
    out_features, in_features = weight.shape
    if shape is not None and (out_features, in_features) != tuple(shape):
        raise _bad(name, f"weight shape {list(weight.shape)} != layer shape {list(shape)}")
    if scb.dtype != torch.float32 or tuple(scb.shape) != (out_features,):
        raise _bad(name, f"SCB must be float32 of shape ({out_features},), got {tuple(scb.shape)} {scb.dtype}")
    fmt = tensors.get("weight_format")
    if fmt is not None and int(fmt.item()) != 0:
        raise _bad(name, f"weight_format={int(fmt.item())}; only row-major (0) int8 weights are supported")
    module = _new_linear8bit(in_features, out_features, "bias" in tensors, spec)
    cb = weight.to(device)
    module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb.to(device))
    return module


def load_quantized_linear(
    tensors: Mapping[str, torch.Tensor],
    spec: QuantSpec,
    device: torch.device | str,
    *,
    shape: tuple[int, int] | None = None,
    name: str = "",
) -> nn.Module:
    """A bitsandbytes layer on `device` from pre-quantized tensors (keys as in `serialized_keys`), as quantized.

    `shape` (out_features, in_features), when given, is checked against the quant state; `name` (the layer's
    full name) goes into error messages. Raises ValueError when tensors are missing, unexpected or inconsistent.
    """
    _check_spec(spec)
    _check_keys(tensors, spec, name)
    device = torch.device(device)
    load = _load_4bit if spec.is_4bit else _load_8bit
    module = load(tensors, spec, device, name, shape)
    return _finish(module, tensors.get("bias"), device)


def is_quantized(module: nn.Module) -> bool:
    """True for the bitsandbytes layers this package makes."""
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantized_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's tensors in transformers' checkpoint format (keys relative to the layer), bit-exact."""
    if isinstance(module, Linear4bit):
        weight, qs = module.canonical()
    elif isinstance(module, bnb.nn.Linear4bit):
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError("this bitsandbytes Linear4bit was repacked for the CPU; build it with quant.quantize_linear")
        weight, qs = module.weight.data, module.weight.quant_state.as_dict(packed=True)
    elif isinstance(module, bnb.nn.Linear8bitLt):
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        if module.weight.dtype != torch.int8 or scb is None:
            raise ValueError("this Linear8bitLt holds no int8 weight yet; build it with quant.quantize_linear")
        out = {"weight": module.weight.data}
        if module.bias is not None:
            out["bias"] = module.bias.data
        out["SCB"] = scb
        out["weight_format"] = torch.tensor(0, dtype=torch.uint8)  # row-major, as bitsandbytes writes it
        return out
    else:
        raise TypeError(f"quantized_state needs a bitsandbytes linear layer, got {type(module).__name__}")
    out = {"weight": weight}
    if module.bias is not None:
        out["bias"] = module.bias.data
    out.update({"weight." + k: v for k, v in qs.items()})
    return out


def move(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move a (quantized or plain) layer to `device` in place, quant state included; returns it."""
    return module.to(torch.device(device))


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if isinstance(module, bnb.nn.Linear4bit):
        qs = module.weight.quant_state
        if qs is not None:
            tensors += [qs.absmax, qs.code]
            if qs.nested:
                tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
        if isinstance(module, Linear4bit) and module._canonical is not None:
            tensors += list(module._canonical.values())
    elif isinstance(module, bnb.nn.Linear8bitLt):
        tensors += [t for t in (module.weight.SCB, module.state.SCB, module.state.CB) if t is not None]
    return tensors


def nbytes(module: nn.Module) -> int:
    """Bytes held by a module and its children (quant state included), each storage counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for sub in module.modules():
        for t in _module_tensors(sub):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total
