"""neoxlite's C kernels for CPU decoding (neoxlite/csrc), built with the system C compiler at first use.

The build takes about a second and is cached under ~/.cache/neoxlite/kernels (or $NEOXLITE_CACHE/kernels),
keyed by the source, the flags and the compiler, and written with an atomic rename so that concurrent first
uses never load half a file. Where the kernels cannot run (not x86-64, no AVX2, no C compiler, a failed
build, or NEOXLITE_CPU_KERNELS=0) `bf16_kernel()` and `quant_kernel()` return None and callers keep PyTorch's (or
bitsandbytes') own path; `kernel_status()` says which case applies.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch  # loaded before the kernel, so the kernel's libgomp.so.1 is torch's and shares its threads
import torch.nn.functional as F

from neoxlite import matrix_engine, quant_matmul

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("linear_bf16.c", "linear_f32.c", "decode_attention_bf16.c", "linear_quant.c",
                         "dequantize_4bit.c")]
_HEADERS = [Path(__file__).with_name("csrc") / name for name in ("bf16.h", "gelu.h", "avx2_math.h", "amx.h")]
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]
_LIBS = ["-lm"]
_ISA_NAMES = {1: "AVX2+FMA", 2: "AVX512-BF16", 3: "AMX-BF16"}
ISA_AVX512BF16, ISA_AMX = 2, 3
# The AMX kernel (linear_bf16.c) takes in_features in whole 32-value tile rows; other widths (no GPT-NeoX model
# has one) take the AVX512-BF16 kernel, the same for every call on that layer, so its bits do not depend on the
# batch either.
AMX_K = 32
# Input rows up to which the kernel serves bf16 linears on a CPU without AMX. Without a matrix engine oneDNN's
# bf16 matmul is vector code too. On AVX2 it is far slower at every size: on this project's Zen 3 (no native
# bf16, 2 threads, quiet) a 1024 -> 4096 linear ran 18 GFLOP/s in oneDNN at 32-512 rows against the kernel's
# 92-113 (5.2-6.3x; bench/bf16_rows.py), so there the kernel takes every row count, prefills included.
# AVX512-BF16 has native bf16 dot products in oneDNN as well: that CPU keeps the 32 rows measured on it. The earlier AVX2 limit of 4 rows was
# measured on Sapphire Rapids, where oneDNN ran on AMX: that case is neoxlite.matrix_engine's measured crossover.
EVERY_ROW = 1 << 62
_MAX_ROWS = {1: EVERY_ROW, 2: 32}
# fp32 rows served by one pass over the weights; beyond that MKL's GEMM reads them once for all rows.
MAX_ROWS_F32 = 4
# A bound linear: call(x, out=None) -> x @ W.T + bias, written into `out` (an empty contiguous tensor of the
# result's shape and dtype) when one is given; callers use the returned tensor (fp32 with GELU returns a new one).
DecodeCall = Callable[..., torch.Tensor]
_QUANT_ISA_NAMES = {1: "AVX2+FMA", 2: "AVX512F/BW"}
_QUANT_ISA_AMX_INT8 = 3  # neox_linear_int8's code for the AVX512 loops with AMX-INT8 tiles (neox_amx_int8_from)
# Input rows up to which the quantized kernels serve a call (decode steps, small batches, the offload
# scheduler's batches); more rows (a prefill) go to neoxlite.quant_matmul (the weight dequantized tile by tile,
# torch's matmul). On this project's AVX2 machine the kernels win up to 32 rows on a pythia-410m MLP
# (1024 -> 4096, bf16, best of 5 on a shared machine; kernel / tiles, ms: nf4 3/20 at 8 rows, 15/20 at 16,
# 28/32 at 32; int8 1/21, 2/25, 4/30, 1 thread; at 2 threads the tiles lose by more). On a 2048 -> 8192 layer
# at 1 thread nf4's tiles won at 32 rows (157/108 ms) and lost at 16 (57/73). Where AMX can run, each format's
# crossover is measured (neoxlite.matrix_engine) against the tiles.
MAX_ROWS_QUANT = 32
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
QUANT_DTYPES = tuple(_DTYPE_CODES)


@dataclass(frozen=True)
class BF16Kernel:
    """The loaded library, the instruction set it runs with here, and the batch it is used up to."""

    library: ctypes.CDLL
    isa: int
    max_rows: int

    @property
    def isa_name(self) -> str:
        return _ISA_NAMES[self.isa]

    def rows_for(self, dtype: torch.dtype) -> int:
        """Input rows up to which the linear kernel serves `dtype` (0: not at all)."""
        return self.max_rows if dtype is torch.bfloat16 else MAX_ROWS_F32 if dtype is torch.float32 else 0

    @property
    def vector_isa(self) -> int:
        """The vector instruction set (fp32 linears, and bf16 widths the AMX kernel does not take)."""
        return ISA_AVX512BF16 if self.isa == ISA_AMX else self.isa

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               gelu: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias for CPU tensors of one dtype (weight and bias contiguous). bf16: fp32 accumulation,
        one rounding to bf16, and with `gelu` F.gelu of that bf16 result (PyTorch's own CPU formula) in the same
        call. fp32: GELU applied after. Any number of rows; each row's result has the same bits whatever the others
        are. `out`: an empty contiguous tensor of the result's shape and dtype to write into (see
        neoxlite.cpu_step.decode_step for why); fp32 with `gelu` returns GELU of it as a new tensor."""
        n, k = weight.shape
        x = x if x.is_contiguous() else x.contiguous()
        rows = x.numel() // k
        if out is None:
            out = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
        bias_ptr = None if bias is None else bias.data_ptr()
        if x.dtype is torch.float32:
            # groups of MAX_ROWS_F32 rows (each row's sums in the same order whatever the group: same bits)
            for start in range(0, rows, MAX_ROWS_F32):
                count = min(MAX_ROWS_F32, rows - start)
                self.library.neox_linear_f32(self.vector_isa, x.data_ptr() + 4 * start * k, weight.data_ptr(),
                                             bias_ptr, out.data_ptr() + 4 * start * n, count, n, k)
            return F.gelu(out) if gelu else out
        isa = self.isa if self.isa != ISA_AMX or k % AMX_K == 0 else self.vector_isa
        _check(self.library.neox_linear_bf16(isa, x.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(), rows,
                                             n, k, int(gelu)))
        return out

    def decode_attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, past: int, heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of NeoX attention without a mask: rotary on q and k, k and v written into the cache
        at `past`, attention over positions 0..past. qkv (B, 1, heads * 3 * hs); cos, sin (B, 1, 1, rot) or
        (B, rot); keys, values (B, heads, capacity, hs), contiguous. Returns (B, 1, heads * hs), in `out` if given
        (empty, contiguous, that shape, bf16)."""
        return self._attention(qkv, cos, sin, keys, values, heads, past, None, None, out)

    def decode_attention_rows(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                              values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                              heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """decode_attention() for rows of independent sequences (continuous batching): row b writes position
        positions[b] of slot slots[b] and attends to that slot's positions 0..positions[b]. keys, values (slots,
        heads, capacity, hs); slots, positions (B,) int64, checked by the caller (neoxlite.cache.SlotCache.step)
        to lie inside the cache. Each row's result is the bits decode_attention gives it in a batch of one."""
        slots, positions = slots.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous()
        assert slots.shape == positions.shape == (qkv.shape[0],)
        return self._attention(qkv, cos, sin, keys, values, heads, 0, slots, positions, out)

    def _attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, heads: int, past: int, slots: torch.Tensor | None,
                   positions: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        batch, capacity, hs = qkv.shape[0], keys.shape[2], keys.shape[3]
        if cos.dim() != 2 or not cos.is_contiguous() or not sin.is_contiguous():
            cos, sin = cos.reshape(batch, -1).contiguous(), sin.reshape(batch, -1).contiguous()
        qkv = qkv.contiguous()
        if out is None:
            out = torch.empty((batch, 1, heads * hs), dtype=torch.bfloat16)
        self.library.neox_decode_attention_bf16(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[1], keys.data_ptr(), values.data_ptr(),
            out.data_ptr(), batch, heads, hs, cos.shape[1], capacity, past,
            None if slots is None else slots.data_ptr(), None if positions is None else positions.data_ptr(),
            hs**-0.5)
        return out


@dataclass(frozen=True)
class QuantKernel:
    """The quantized linear kernels (neoxlite/csrc/linear_quant.c) and the instruction set they run with here.

    Both compute x @ W.T + bias in the dtype of x (float32, bfloat16 or float16; bias in it too, contiguous CPU
    tensors) from a compact weight, with fp32 sums and the roundings of bitsandbytes' CPU path, for up to
    `max_rows` (int8) or `max_rows_4bit` input rows; with `gelu`, F.gelu of the rounded result in the same call."""

    library: ctypes.CDLL
    isa: int
    max_rows: int = MAX_ROWS_QUANT  # int8
    max_rows_4bit: int = MAX_ROWS_QUANT  # nf4 / fp4: fewer where AMX runs the dequantized matmul faster
    # 4-bit layers computing in bf16 on an AMX CPU: each task's weight rows dequantized a chunk at a time into an
    # L1 buffer and multiplied on the tiles (linear_bf16.c, neox_linear_4bit_amx), from more than
    # vector_rows_4bit rows (fewer: the vector kernel, which reads from memory faster at one row) up to
    # max_rows_4bit_amx rows; rows of independent sequences (continuous batching) take the tiles at any batch
    amx_4bit: bool = False
    vector_rows_4bit: int = 1
    # int8 on an AMX CPU with amx_int8: from a few input rows (neox_amx_int8_from) the tiles form the same exact
    # int32 sums (tdpbssd), so the bits are the vector loops' at any batch (linear_quant.c, linear8_amx)
    amx_int8: bool = False
    max_rows_4bit_amx: int = MAX_ROWS_QUANT

    def rows_4bit(self, dtype: torch.dtype) -> int:
        """Input rows up to which a 4-bit layer computing in `dtype` takes this kernel (more: quant_matmul)."""
        return self.max_rows_4bit_amx if self.amx_4bit and dtype is torch.bfloat16 else self.max_rows_4bit

    @property
    def isa_name(self) -> str:
        return _QUANT_ISA_NAMES[self.isa]

    def linear_4bit(self, x: torch.Tensor, codes: torch.Tensor, out_features: int, table: torch.Tensor,
                    absmax: torch.Tensor, nested: tuple[torch.Tensor, torch.Tensor, float] | None,
                    bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
        """4-bit weights: `codes` uint8, out_features x in_features / 2 bytes, row-major, each byte two indices
        into the 16 fp32 values of `table` (the first value of a pair in the high nibble); one scale per 64
        values, in_features a multiple of 64. The scales are `absmax` (fp32), or with `nested` = (code2, absmax2,
        offset) `code2[absmax] * absmax2[block // 256] + offset` with absmax uint8. The weight is
        table[index] * scale rounded to the dtype of x."""
        return self.bind_4bit(codes, out_features, table, absmax, nested, bias, x.dtype, gelu)(x)

    def bind_4bit(self, codes: torch.Tensor, out_features: int, table: torch.Tensor, absmax: torch.Tensor,
                  nested: tuple[torch.Tensor, torch.Tensor, float] | None, bias: torch.Tensor | None,
                  dtype: torch.dtype, gelu: bool = False, any_rows: bool = False
                  ) -> DecodeCall:
        """linear_4bit with everything but x fixed, for inputs of `dtype`: the weight's pointers are taken once
        (a decode step makes about a hundred calls; per call, Python's handling of the arguments cost as much
        as the kernel on a small layer). The returned call keeps the tensors alive."""
        weights = (codes.data_ptr(), table.data_ptr(), *_scale_pointers(absmax, nested),
                   None if bias is None else bias.data_ptr())
        tail = (out_features, codes.numel() * 2 // out_features, int(gelu))
        keep = (codes, table, absmax, nested, bias)
        vector = self._bind(self.library.neox_linear_4bit, (self.isa, _DTYPE_CODES[dtype]), weights, tail, dtype, keep)
        if not self.amx_4bit or dtype is not torch.bfloat16:
            return vector
        tiles = self._bind(self.library.neox_linear_4bit_amx, (), weights, tail, dtype, keep)
        if any_rows:  # one engine whatever the batch: each row gets the bits it gets alone
            return tiles
        rows = self.vector_rows_4bit
        return lambda x, out=None: vector(x, out) if x.numel() <= rows * x.shape[-1] else tiles(x, out)

    def linear_int8(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, threshold: float,
                    bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
        """LLM.int8: `weight` int8 (out_features, in_features) with fp32 `scales` per row (the weight is
        weight * scales / 127). The inputs are quantized per row as bitsandbytes does; the columns with a value
        >= `threshold` (0: none) are multiplied in the dtype of x instead."""
        return self.bind_int8(weight, scales, threshold, bias, x.dtype, gelu)(x)

    def dequantize_4bit(self, codes: torch.Tensor, table: torch.Tensor, absmax: torch.Tensor,
                        nested: tuple[torch.Tensor, torch.Tensor, float] | None, first_row: int,
                        out: torch.Tensor, dtype: torch.dtype) -> None:
        """Rows first_row .. first_row + len(out) - 1 of the 4-bit weight linear_4bit() reads (same arguments) as
        bitsandbytes' CPU dequantize_4bit computes them in `dtype` (float32/bfloat16/float16), written into `out`
        (rows x in_features, contiguous, `dtype` or float32, which holds them exactly)."""
        rows, k = out.shape
        assert out.is_contiguous() and k % 64 == 0 and codes.numel() * 2 >= (first_row + rows) * k
        status = self.library.neox_dequantize_4bit(
            self.isa, _DTYPE_CODES[dtype], _DTYPE_CODES[out.dtype], codes.data_ptr(), table.data_ptr(),
            *_scale_pointers(absmax, nested), out.data_ptr(), first_row, rows, k)
        _check(status)

    def bind_int8(self, weight: torch.Tensor, scales: torch.Tensor, threshold: float, bias: torch.Tensor | None,
                  dtype: torch.dtype, gelu: bool = False) -> DecodeCall:
        """linear_int8 with everything but x fixed, as bind_4bit."""
        n, k = weight.shape
        weights = (weight.data_ptr(), scales.data_ptr(), threshold, None if bias is None else bias.data_ptr())
        isa = _QUANT_ISA_AMX_INT8 if self.amx_int8 else self.isa
        return self._bind(self.library.neox_linear_int8, (isa, _DTYPE_CODES[dtype]), weights, (n, k, int(gelu)),
                          dtype, (weight, scales, bias))

    @staticmethod
    def _bind(function: Callable[..., int], head: tuple, weights: tuple, tail: tuple, dtype: torch.dtype,
              keep: tuple) -> DecodeCall:
        """function(*head, x, *weights, y, rows, *tail): x (rows, K) in, y (rows, N) out, both `dtype`."""
        n, k = tail[0], tail[1]

        def call(x: torch.Tensor, out: torch.Tensor | None = None, keep: tuple = keep) -> torch.Tensor:
            # `out`: as BF16Kernel.linear's; `keep`: the weight stays alive
            assert x.dtype is dtype and x.shape[-1] == k, (x.dtype, x.shape, dtype, k)
            x = x if x.is_contiguous() else x.contiguous()
            if out is None:
                out = torch.empty((*x.shape[:-1], n), dtype=dtype)
            status = function(*head, x.data_ptr(), *weights, out.data_ptr(), x.numel() // k, *tail)
            if status:
                _check(status)
            return out

        return call

    def quantize_int8(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Row-wise absmax int8 of `weight` (2-D, contiguous, float32/bfloat16/float16) as bitsandbytes' Int8Params
        computes it (from a float16 copy): (int8 weight, fp32 row maxima); None when a value is beyond float16's
        range, where only PyTorch's own arithmetic gives bitsandbytes' bits."""
        n, k = weight.shape
        q, scales = torch.empty((n, k), dtype=torch.int8), torch.empty(n, dtype=torch.float32)
        status = self.library.neox_quantize_int8(self.isa, _DTYPE_CODES[weight.dtype], weight.data_ptr(),
                                                 q.data_ptr(), scales.data_ptr(), n, k)
        if status == 1:
            return None
        _check(status)
        return q, scales


def _scale_pointers(absmax: torch.Tensor, nested: tuple[torch.Tensor, torch.Tensor, float] | None) -> tuple:
    """The C kernels' block-scale arguments (absmax, absmax8, code2, absmax2, offset): fp32 `absmax`, or with
    `nested` = (code2, absmax2, offset) the uint8 codes in `absmax` and the pointers that decode them."""
    if nested is None:
        return absmax.data_ptr(), None, None, None, 0.0
    code2, absmax2, offset = nested
    return None, absmax.data_ptr(), code2.data_ptr(), absmax2.data_ptr(), offset


def _check(status: int) -> None:
    if status == -2:
        raise MemoryError("neoxlite's CPU kernel could not allocate its input buffers")
    assert status == 0, f"CPU kernel returned {status}"


# Set to False to compute with PyTorch's operations only: bf16 results then equal transformers' bit for bit
# (the kernels change only the order of fp32 sums). The environment's NEOXLITE_CPU_KERNELS=0 does the same.
enabled = True

_lock = threading.Lock()
_loaded: BF16Kernel | None = None
_quant: QuantKernel | None = None
_status: str | None = None


def bf16_kernel() -> BF16Kernel | None:
    """The bf16 linear kernel, built and loaded on the first call; None where it cannot run here."""
    _ensure_loaded()
    return _loaded if enabled else None


def quant_kernel() -> QuantKernel | None:
    """The quantized linear kernels, built and loaded on the first call; None where they cannot run here."""
    _ensure_loaded()
    return _quant if enabled else None


def _ensure_loaded() -> None:
    global _loaded, _quant, _status
    if enabled and _status is None:
        with _lock:
            if _status is None:
                _loaded, _quant, _status = _load()


def kernel_status() -> str:
    """One line for logs and benchmarks: which kernel runs, or why none does."""
    if not enabled:
        return f"CPU kernels off (neoxlite.cpu_kernels.enabled = False): {_FALLBACK}"
    _ensure_loaded()
    assert _status is not None
    return _status


_FALLBACK = "PyTorch's bf16 matmul, bitsandbytes' quantized linears"


def _load() -> tuple[BF16Kernel | None, QuantKernel | None, str]:
    if os.environ.get("NEOXLITE_CPU_KERNELS", "1") == "0":
        return None, None, f"CPU kernels off (NEOXLITE_CPU_KERNELS=0): {_FALLBACK}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, None, f"no CPU kernels for {platform.machine()}: {_FALLBACK}"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, None, f"no C compiler (cc/gcc; or set CC) to build the CPU kernels: {_FALLBACK}"
    try:
        path = _build(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        return None, None, f"building the CPU kernels failed ({error}): {_FALLBACK}"
    library = ctypes.CDLL(str(path))
    library.neox_best_isa.restype = ctypes.c_int
    library.neox_linear_bf16.restype = ctypes.c_int
    library.neox_linear_bf16.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    library.neox_linear_f32.restype = ctypes.c_int
    library.neox_linear_f32.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    library.neox_decode_attention_bf16.restype = None
    library.neox_decode_attention_bf16.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 3
                                                   + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 2
                                                   + [ctypes.c_float])
    library.neox_quant_isa.restype = ctypes.c_int
    library.neox_linear_4bit.restype = ctypes.c_int
    library.neox_linear_4bit.argtypes = ([ctypes.c_int] * 2 + [ctypes.c_void_p] * 7 + [ctypes.c_float]
                                         + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_int])
    library.neox_has_amx.restype = ctypes.c_int
    library.neox_amx_int8_from.restype = ctypes.c_int
    library.neox_linear_4bit_amx.restype = ctypes.c_int
    library.neox_linear_4bit_amx.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_float] + [ctypes.c_void_p] * 2
                                             + [ctypes.c_int64] * 3 + [ctypes.c_int])
    library.neox_linear_int8.restype = ctypes.c_int
    library.neox_linear_int8.argtypes = ([ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_float]
                                         + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_int])
    library.neox_quantize_int8.restype = ctypes.c_int
    library.neox_quantize_int8.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    library.neox_dequantize_4bit.restype = ctypes.c_int
    library.neox_dequantize_4bit.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 6 + [ctypes.c_float]
                                             + [ctypes.c_void_p] + [ctypes.c_int64] * 3)
    isa, quant_isa = library.neox_best_isa(), library.neox_quant_isa()
    if isa not in _ISA_NAMES or quant_isa not in _QUANT_ISA_NAMES:
        return None, None, f"this CPU has neither AVX2+FMA+F16C nor AVX512: {_FALLBACK}"
    kernel, quant = BF16Kernel(library, isa, _MAX_ROWS[isa]), QuantKernel(library, quant_isa)
    has_amx, why = matrix_engine.amx()
    # every AMX CPU has AVX512-BF16, which the AMX kernels' stores use; an old compiler builds them as stubs
    # (GCC 11 or Clang 12 know the instructions), and then oneDNN alone runs the tiles
    if has_amx and isa == ISA_AVX512BF16 and library.neox_has_amx():
        kernel = BF16Kernel(library, ISA_AMX, _MAX_ROWS[ISA_AVX512BF16])
    if has_amx:
        # measured per build of the kernels: a changed kernel (an upgrade) is timed again, not judged by old figures
        build = path.stem.removeprefix("neoxlite-cpu-")

        def measured(name: str, measure: Callable[[], dict[int, tuple[float, float]]]) -> tuple[int, str]:
            return matrix_engine.crossover(f"{name}|kernels {build}", measure, _cache_dir())

        rows, source = measured(f"bf16 {kernel.isa_name}", lambda: _time_bf16(kernel))
        rows_4bit, _ = measured(f"nf4 {quant.isa_name} tiles", lambda: _time_4bit(quant))
        if kernel.isa == ISA_AMX and quant.isa == 2 and "amx_int8" in matrix_engine.cpu_flags():
            quant = dataclasses.replace(quant, amx_int8=True)
        int8_name = f"int8 {quant.isa_name}{' AMX-INT8' if quant.amx_int8 else ''} tiles"
        rows_int8, _ = measured(int8_name, lambda: _time_int8(quant))
        kernel = dataclasses.replace(kernel, max_rows=rows)
        quant = dataclasses.replace(quant, max_rows=rows_int8, max_rows_4bit=rows_4bit)
        if kernel.isa == ISA_AMX and quant.isa == 2:
            amx_quant = dataclasses.replace(quant, amx_4bit=True, vector_rows_4bit=0)  # tiles at every row count
            rows_amx, _ = measured("nf4 bf16 AMX tiles", lambda: _time_4bit(amx_quant))
            rows_vector, _ = measured("nf4 bf16 vector AMX", lambda: _time_4bit_engines(amx_quant))
            quant = dataclasses.replace(amx_quant, max_rows_4bit_amx=rows_amx, vector_rows_4bit=rows_vector)
        above, crossover = "oneDNN (AMX) above", f"crossovers {source}"
    else:
        above, crossover = "oneDNN (vector) above", f"no matrix engine: {why}"
    matmul = {name: str(matrix_engine.matmul_dtype(dtype)).removeprefix("torch.")
              for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))}
    bf16_rows = "every row count" if kernel.max_rows == EVERY_ROW else f"1-{kernel.max_rows} rows, {above}"
    amx_int8 = f" (AMX-INT8 from {quant.library.neox_amx_int8_from()} rows)" if quant.amx_int8 else ""
    amx_4bit = (f" (in bf16: 1-{quant.vector_rows_4bit}, AMX kernel for {quant.vector_rows_4bit + 1}-"
                f"{quant.max_rows_4bit_amx} rows and continuous-batching steps)" if quant.amx_4bit else "")
    return kernel, quant, (
        f"bf16: neoxlite {kernel.isa_name} kernel for {bf16_rows}; "
        f"fp32: kernel for 1-{MAX_ROWS_F32} rows, MKL above; nf4/fp4: {quant.isa_name} kernel for "
        f"1-{quant.max_rows_4bit} rows{amx_4bit}, neoxlite's dequantized tiles + torch's matmul above (bf16 in "
        f"{matmul['bf16']}, fp16 in {matmul['fp16']}); int8: kernel for 1-{quant.max_rows} rows{amx_int8}, int8 tiles + "
        f"torch's float32 matmul above; continuous-batching steps: kernels at every batch ({crossover})")


def _time_bf16(kernel: BF16Kernel, shape: tuple[int, int] = matrix_engine.CALIBRATION_SHAPE
               ) -> dict[int, tuple[float, float]]:
    """The bf16 kernel and PyTorch's matmul timed on a linear of `shape` (in_features, out_features)."""
    k, n = shape
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    candidates = matrix_engine.AMX_CANDIDATE_ROWS if kernel.isa == ISA_AMX else matrix_engine.CANDIDATE_ROWS
    return matrix_engine.time_engines(lambda x: kernel.linear(x, weight, None), lambda x: F.linear(x, weight),
                                      k, torch.bfloat16, candidates)


def _random_4bit(shape: tuple[int, int]) -> tuple:
    """linear_4bit's weight arguments (codes, out_features, table, absmax, nested) for a random layer of `shape`
    (in_features, out_features): timing needs no real weight (the cost does not depend on the values, and no
    bitsandbytes import is needed)."""
    k, n = shape
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=generator)
    return codes, n, torch.linspace(-1, 1, 16), torch.rand(n * k // 64, generator=generator) * 0.05, None


def _time_4bit(quant: QuantKernel, shape: tuple[int, int] = matrix_engine.CALIBRATION_SHAPE
               ) -> dict[int, tuple[float, float]]:
    """The 4-bit kernel and the many-row path (neoxlite.quant_matmul: dequantized tiles, torch's matmul) timed on
    a bf16 linear of `shape` (in_features, out_features)."""
    args = (*_random_4bit(shape), None)  # no bias
    candidates = matrix_engine.AMX_CANDIDATE_ROWS if quant.amx_4bit else matrix_engine.CANDIDATE_ROWS
    return matrix_engine.time_engines(lambda x: quant.linear_4bit(x, *args),
                                      lambda x: quant_matmul.linear_4bit(quant, x, *args), shape[0], torch.bfloat16,
                                      candidates)


def _time_4bit_engines(quant: QuantKernel, shape: tuple[int, int] = matrix_engine.CALIBRATION_SHAPE
                       ) -> dict[int, tuple[float, float]]:
    """The 4-bit vector kernel against the AMX kernel (`quant` with amx_4bit), both in bf16, on a random layer."""
    args = (*_random_4bit(shape), None)  # no bias
    vector = dataclasses.replace(quant, amx_4bit=False).bind_4bit(*args, torch.bfloat16)
    return matrix_engine.time_engines(vector, quant.bind_4bit(*args, torch.bfloat16, any_rows=True), shape[0],
                                      torch.bfloat16)


def _time_int8(quant: QuantKernel, shape: tuple[int, int] = matrix_engine.CALIBRATION_SHAPE
               ) -> dict[int, tuple[float, float]]:
    """The int8 kernel and the many-row path (int8 tiles, torch's float32 matmul) timed on a bf16 LLM.int8 linear
    of `shape` (in_features, out_features), with LLM.int8's usual outlier threshold."""
    k, n = shape
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    args = (weight, torch.rand(n, generator=generator) * 0.1, 6.0, None)
    candidates = matrix_engine.AMX_CANDIDATE_ROWS if quant.amx_int8 else matrix_engine.CANDIDATE_ROWS
    return matrix_engine.time_engines(lambda x: quant.linear_int8(x, *args),
                                      lambda x: quant_matmul.linear_int8(x, *args), k, torch.bfloat16, candidates)


def _cache_dir() -> Path:
    root = os.environ.get("NEOXLITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "neoxlite")
    return Path(root) / "kernels"


def _build(compiler: str) -> Path:
    """Compiles the source once per (source, flags, compiler) and returns the shared library's path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [*(f.read_text() for f in _SOURCES + _HEADERS), *_FLAGS, *_LIBS, version]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable home: build into a private temporary folder instead
        folder = Path(tempfile.mkdtemp(prefix="neoxlite-kernels-"))
    target = folder / f"neoxlite-cpu-{key}.so"
    if target.exists():
        return target
    fd, partial = tempfile.mkstemp(dir=folder, prefix=".neoxlite-cpu-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", partial, *_LIBS],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-500:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
