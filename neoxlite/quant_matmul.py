"""Quantized CPU linears for many input rows (a prefill, a batch above the kernels' crossover): the weight is
dequantized a tile of output rows at a time into one reused buffer and each tile multiplied by PyTorch's matmul
(oneDNN or MKL; on AMX tiles where the CPU has them), so no whole dequantized weight is ever held.

The numbers are bitsandbytes' CPU path for the same layer (its dequantize-and-matmul for 4-bit, its LLM.int8
arithmetic for int8) up to the order of fp32 sums: each tile is what bitsandbytes computes for those output
columns. What it saves is bitsandbytes' per-call work: a full dequantized copy of the weight (int8: a float32 one)
allocated and written every call, and for double quantization the block scales decoded into a second full array.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from neoxlite import matrix_engine

if TYPE_CHECKING:
    from neoxlite.cpu_kernels import QuantKernel

# Values per dequantized tile: 2M (4 MiB in bf16, 8 MiB in fp32; 256 rows of a 8192-input layer, 1024 of a
# 2048-input one). Fewer, larger tiles mean fewer matmul calls, each a parallel region whose threads must all
# arrive: on this project's shared 2-core Zen 3 (load average ~9, 2 threads, 512 rows, a pythia-410m block's
# four nf4 linears, best of 3) 1<<18 values per tile took 4.6 s, 1<<19 1.9 s, 1<<20 1.2 s, 1<<21 1.0-1.1 s,
# 1<<22 0.9 s; the int8 figures were too noisy there to rank (1.5-2.4 s at every size).
TILE_VALUES = 1 << 21

_buffers = threading.local()  # one tile buffer per thread and dtype: a server's threads never share one


def _tile_buffer(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, k) view of this thread's reused buffer for `dtype`, grown when a layer needs more."""
    held = getattr(_buffers, "by_dtype", None)
    if held is None:
        held = _buffers.by_dtype = {}
    buffer = held.get(dtype)
    if buffer is None or buffer.numel() < rows * k:
        buffer = held[dtype] = torch.empty(rows * k, dtype=dtype)
    return buffer[: rows * k].view(rows, k)


def tile_rows(k: int) -> int:
    """Output rows per tile for a layer of `k` inputs: TILE_VALUES worth, a multiple of 16, at least 16."""
    return max(16, TILE_VALUES // k // 16 * 16)


def linear_4bit(kernel: QuantKernel, x: torch.Tensor, codes: torch.Tensor, out_features: int, table: torch.Tensor,
                absmax: torch.Tensor, nested: tuple[torch.Tensor, torch.Tensor, float] | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias for the 4-bit weight QuantKernel.linear_4bit reads (same arguments), in the dtype of x
    (float32/bfloat16/float16, bias in it too): bitsandbytes' F.linear(x, dequantize_4bit(W), bias), a tile of
    output columns at a time, multiplied in matrix_engine.matmul_dtype(x.dtype): in float32 where the CPU has no
    native bf16/fp16 matmul (the products of two bf16 or fp16 values are exact in fp32, so this is the same
    fp32-accumulated product up to the order of its sums)."""
    k = x.shape[-1]
    dtype = matrix_engine.matmul_dtype(x.dtype)
    rows = x.reshape(-1, k).to(dtype).contiguous()  # float32: exact
    bias = None if bias is None else bias.to(dtype)
    out = torch.empty((rows.shape[0], out_features), dtype=x.dtype)
    step = tile_rows(k)
    for start in range(0, out_features, step):
        count = min(step, out_features - start)
        weight = _tile_buffer(count, k, dtype)
        kernel.dequantize_4bit(codes, table, absmax, nested, start, weight, x.dtype)
        # the assignment rounds a float32 result to x's dtype once, as a matmul in that dtype does
        out[:, start:start + count] = F.linear(rows, weight, None if bias is None else bias[start:start + count])
    return out.view(*x.shape[:-1], out_features)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, threshold: float,
                bias: torch.Tensor | None) -> torch.Tensor:
    """LLM.int8 as bitsandbytes' inference forward computes it on a CPU without AVX512: the inputs quantized per
    row from float16 with the columns holding a value >= `threshold` (0: none) left out, the int8 products summed
    by a float32 matmul (exact below 2^24, as bitsandbytes' own), scaled by row max * `scales` / 127^2, plus bias,
    rounded to the dtype of x; then the outlier columns multiplied in that dtype and added. `weight` int8
    (out_features, in_features), `scales` fp32 per output row."""
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    quantized, row_max, outlier_cols = _quantize_rows(rows, threshold)
    quantized = quantized.float()
    outliers = rows[:, outlier_cols] if outlier_cols.numel() else None
    out = torch.empty((rows.shape[0], n), dtype=x.dtype)
    step = tile_rows(k)
    for start in range(0, n, step):
        end = min(start + step, n)
        tile = _tile_buffer(end - start, k, torch.float32)
        tile.copy_(weight[start:end])  # int8 -> float32 is exact
        sums = quantized @ tile.T
        result = sums * (row_max[:, None] * scales[None, start:end]) * 6.200124e-05  # bitsandbytes' 1 / 127^2
        if bias is not None:
            result += bias[start:end]
        result = result.to(x.dtype)
        if outliers is not None:  # bitsandbytes' dequantized outlier columns: int8 * SCB / 127, in x's dtype
            dequantized = weight[start:end, outlier_cols] * scales[start:end, None] * 7.874015718698502e-3
            result = result.addmm(outliers, dequantized.to(x.dtype).T)
        out[:, start:end] = result
    return out.view(*x.shape[:-1], n)


def _quantize_rows(rows: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' int8_vectorwise_quant(rows.to(float16), threshold): (int8 rows, fp32 row maxima, the outlier
    columns). A value >= threshold is left out of its row's maximum, and its whole column is zero in the int8
    rows (bitsandbytes zeroes the columns only for more than one row: a single row's outliers are its only
    values there, already zero)."""
    x16 = rows.to(torch.float16)
    outlier_cols = torch.empty(0, dtype=torch.int64)
    if threshold > 0.0:
        is_outlier = x16.abs() >= threshold
        outlier_cols = torch.argwhere(is_outlier.any(dim=0)).view(-1)
        masked = x16.masked_fill(is_outlier, 0)
    else:
        masked = x16
    row_max = masked.abs().amax(dim=1).float()
    quantized = torch.round(masked * (127.0 / row_max[:, None])).to(torch.int8)
    quantized[:, outlier_cols] = 0
    return quantized, row_max, outlier_cols
