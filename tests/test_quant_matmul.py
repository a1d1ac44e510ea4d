"""The quantized many-row path (neoxlite.quant_matmul, neoxlite/csrc/dequantize_4bit.c) against bitsandbytes' CPU
path: the dequantized 4-bit tiles bit for bit, the products up to the order of fp32 sums on odd shapes, 33-512
rows, fp32/bf16/fp16, with and without bias, 1 and 2 threads; and the layers routing rows above the crossover.
"""

from __future__ import annotations

import dataclasses

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from test_quant_kernels import DTYPES, assert_sum_order_only, layer_4bit, layer_int8, threads

import neoxlite.cpu_kernels
from neoxlite import matrix_engine, quant_matmul
from neoxlite.cpu_kernels import kernel_status, quant_kernel

KERNEL = quant_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no quantized CPU kernel here: {kernel_status()}")
MODES_4BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 output rows on these small layers: several tiles per call, the last one partial."""
    monkeypatch.setattr(quant_matmul, "TILE_VALUES", 16 * 64)


@needs_kernel
@pytest.mark.parametrize("mode,double_quant", MODES_4BIT)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_tiles_are_bitsandbytes_dequantized_weights(mode, double_quant, dtype):
    layer = layer_4bit(mode, double_quant, dtype, 300, 640, bias=False, seed=1)  # 300 * 10 blocks: 12 nested
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    codes, _, table, absmax, nested = layer._prepare_kernel()
    for first, rows in ((0, 1), (101, 97), (290, 10)):
        for out_dtype in {dtype, torch.float32}:  # float32 holds them exactly
            tile = torch.empty(rows, 640, dtype=out_dtype)
            KERNEL.dequantize_4bit(codes, table, absmax, nested, first, tile, dtype)
            assert torch.equal(tile, want[first:first + rows].to(out_dtype))


@needs_kernel
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("mode,double_quant", MODES_4BIT)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n,k", [(33, 13, 64), (40, 130, 192), (512, 33, 320)])
def test_4bit_many_rows_are_bitsandbytes_dequantize_and_matmul(mode, double_quant, dtype, rows, n, k):
    layer = layer_4bit(mode, double_quant, dtype, n, k, bias=rows % 2 == 0, seed=rows + n)
    qs = layer.weight.quant_state
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    want = bnb.matmul_4bit(x, layer.weight, bias=layer.bias, quant_state=qs)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, qs).to(dtype)
    for count in (1, 2):
        with threads(count):
            got = quant_matmul.linear_4bit(KERNEL, x, *layer._prepare_kernel(), layer.bias)
        assert_sum_order_only(got, want, x, weight)


@needs_kernel
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("rows,n,k", [(33, 13, 7), (40, 130, 100), (512, 33, 64)])
def test_int8_many_rows_are_bitsandbytes_llm_int8(dtype, threshold, rows, n, k):
    layer = layer_int8(dtype, n, k, bias=rows % 2 == 0, threshold=threshold, seed=rows + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    x[3, 1] = x[7, 5] = -8.0  # two outlier columns (with a threshold)
    with torch.no_grad():
        want = bnb.nn.Linear8bitLt.forward(layer, x)
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    bias = None if layer.bias is None else layer.bias.to(dtype)
    for count in (1, 2):
        with threads(count):
            got = quant_matmul.linear_int8(x, layer.weight.data, scb, threshold, bias)
        # the int8 sums are exact in both, the rest is the same operations: equal but for the outlier products'
        # fp32 sum in fp32 (addmm's own order)
        if dtype is torch.float32 and threshold:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_layers_send_rows_above_the_crossover_to_the_tiles(mode, monkeypatch):
    """More rows than the kernel serves (a prefill; here also a batch above a crossover forced to 2 rows) go to
    neoxlite.quant_matmul, with bitsandbytes' numbers; up to the crossover the kernel runs."""
    layer = layer_4bit(mode, True, torch.bfloat16, 64, 128, True, 0) if mode != "int8" else \
        layer_int8(torch.bfloat16, 64, 128, True, 6.0, 0)
    name = "linear_int8" if mode == "int8" else "linear_4bit"
    calls = []
    original = getattr(quant_matmul, name)
    monkeypatch.setattr(quant_matmul, name, lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(neoxlite.cpu_kernels, "_quant", dataclasses.replace(KERNEL, max_rows=2, max_rows_4bit=2,
                                                                             max_rows_4bit_amx=2))
    x = torch.randn(3, 1, 128).bfloat16()
    with torch.no_grad():
        want = bnb.nn.Linear8bitLt.forward(layer, x) if mode == "int8" else \
            bnb.matmul_4bit(x, layer.weight, bias=layer.bias, quant_state=layer.weight.quant_state)
        got = layer(x)
        assert len(calls) == 1
        assert_sum_order_only(got.float(), want.float(), x.float(), torch.ones(64, 128))
        assert torch.equal(layer.forward_gelu(x), F.gelu(got)) and len(calls) == 2
        layer(x[:2])
        assert len(calls) == 2  # two rows: the kernel


def test_the_matmul_dtype_follows_the_cpus_native_support(monkeypatch):
    for flags, bf16, fp16 in (({"avx2"}, torch.float32, torch.float32),
                              ({"avx512_bf16"}, torch.bfloat16, torch.float32),
                              ({"avx512_fp16", "avx512_bf16"}, torch.bfloat16, torch.float16)):
        monkeypatch.setattr(matrix_engine, "cpu_flags", lambda flags=flags: flags)
        matrix_engine.matmul_dtype.cache_clear()
        try:
            assert [matrix_engine.matmul_dtype(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == \
                [torch.float32, bf16, fp16]
        finally:
            matrix_engine.matmul_dtype.cache_clear()


def test_tiles_hold_a_bounded_share_of_the_weight():
    assert quant_matmul.tile_rows(1 << 21) == 16  # at least 16 rows
    assert quant_matmul.tile_rows(2048) * 2048 == quant_matmul.TILE_VALUES
    assert quant_matmul.tile_rows(1000) % 16 == 0 and quant_matmul.tile_rows(1000) * 1000 <= quant_matmul.TILE_VALUES
