"""Quantized prefill on the CPU: one transformer block's four linears of a Pythia shape, PROMPT rows each, timed
through neoxlite's many-row path (neoxlite.quant_matmul: tiles dequantized into a reused buffer, torch's matmul)
and through bitsandbytes' own CPU forward (the path before issue 18), in the same run; prints ms per block and
the ratio. The best of --repeats calls each (on a shared machine, other jobs only ever add time).

    .venv/bin/python bench/quant_prefill.py --shape pythia-410m --quant nf4 int8 --rows 512 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import bitsandbytes as bnb
import torch
from common import SHAPES
from neoxlite.quant import QuantSpec
from neoxlite.quant.layers import quantize_linear

from neoxlite.cpu_kernels import kernel_status

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def block_linears(shape: str, spec: QuantSpec, dtype: torch.dtype) -> list[torch.nn.Module]:
    """query_key_value, attention dense, dense_h_to_4h, dense_4h_to_h of one block, random weights."""
    h, inner = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
    generator = torch.Generator().manual_seed(0)
    return [quantize_linear((torch.randn(n, k, generator=generator) * 0.02).to(dtype), torch.zeros(n, dtype=dtype),
                            spec, "cpu") for k, n in ((h, 3 * h), (h, h), (h, inner), (inner, h))]


def _matmul_4bit(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What neoxlite's Linear4bit ran for many rows before issue 18 (bitsandbytes' CPU repacking skipped)."""
    return bnb.matmul_4bit(x, layer.weight, bias=layer.bias, quant_state=layer.weight.quant_state)


def run_block(layers: list[torch.nn.Module], inputs: dict[int, torch.Tensor], forward):
    """A call running forward(layer, its input) for each of the block's linears."""
    return lambda: [forward(layer, inputs[layer.in_features]) for layer in layers]


def best_ms(call, repeats: int) -> float:
    call()  # warm: first-call allocations, oneDNN's primitive creation
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return min(runs) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="pythia-410m")
    parser.add_argument("--quant", nargs="+", choices=["nf4", "fp4", "int8"], default=["nf4", "int8"])
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    print(f"{kernel_status()}\nthreads {args.threads}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"{'quant':>5} {'rows':>5} {'neoxlite ms':>12} {'bitsandbytes ms':>16} {'speed-up':>9}")
    for mode in args.quant:
        spec = QuantSpec(mode="int8") if mode == "int8" else QuantSpec(mode=mode, compute_dtype=dtype)
        layers = block_linears(args.shape, spec, dtype)
        x = {k: torch.randn(args.rows, k).to(dtype) for k in {layer.in_features for layer in layers}}
        reference = bnb.nn.Linear8bitLt.forward if mode == "int8" else _matmul_4bit
        with torch.no_grad():
            ours = best_ms(run_block(layers, x, torch.nn.Module.__call__), args.repeats)
            theirs = best_ms(run_block(layers, x, reference), args.repeats)
        print(f"{mode:>5} {args.rows:>5} {ours:>12.1f} {theirs:>16.1f} {theirs / ours:>8.2f}x")


if __name__ == "__main__":
    main()
