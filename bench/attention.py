"""One decode step's attention for a layer of pythia shapes: neoxlite's kernel against PyTorch's ops, in one run.

    .venv/bin/python bench/attention.py [--shape pythia-410m] [--rows 1 16] [--context 128 1000 2000] [--repeats 20]

For each batch (rows of independent sequences, as continuous batching runs them) and cached length, times
`BF16Kernel.decode_attention_rows` (rotary, cache write and attention in one call) and the same step in PyTorch's
ops (the rotary of neoxlite.model, the cache write, scaled_dot_product_attention), best of --repeats, and prints
both, the ratio and the kernel's rate in cached positions per second per head. The outputs are compared too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES  # noqa: E402


def best_of(repeats: int, step) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def measure(kernel, rows: int, context: int, heads: int, hs: int, rot: int, repeats: int,
            generator: torch.Generator) -> str:
    """One (rows, cached length) case: both versions timed and compared; the report line."""
    from neoxlite.model import _apply_rotary

    past, capacity = context, context + 1  # the new token goes to position `past`
    qkv = torch.randn(rows, 1, heads * 3 * hs, generator=generator).bfloat16()
    angle = torch.randn(rows, 1, 1, rot, generator=generator)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    keys = torch.randn(rows, heads, capacity, hs, generator=generator).bfloat16()
    values = torch.randn(rows, heads, capacity, hs, generator=generator).bfloat16()
    slots, positions = torch.arange(rows), torch.full((rows,), past)

    def ours() -> torch.Tensor:
        return kernel.decode_attention_rows(qkv, cos, sin, keys, values, slots, positions, heads)

    def torchs() -> torch.Tensor:
        split = qkv.view(rows, 1, heads, 3 * hs).transpose(1, 2)
        q = _apply_rotary(split[..., :hs], cos, sin)
        keys[:, :, past:past + 1] = _apply_rotary(split[..., hs:2 * hs], cos, sin)
        values[:, :, past:past + 1] = split[..., 2 * hs:]
        out = F.scaled_dot_product_attention(q, keys, values)
        return out.transpose(1, 2).reshape(rows, 1, heads * hs)

    with torch.inference_mode():
        difference = (ours().float() - torchs().float()).abs().max().item()
        t_ours, t_torch = best_of(repeats, ours), best_of(repeats, torchs)
    rate = rows * heads * capacity / t_ours
    return (f"rows {rows:3d}, {capacity:5d} positions: kernel {t_ours * 1e3:8.3f} ms, PyTorch {t_torch * 1e3:8.3f} ms "
            f"({t_torch / t_ours:5.2f}x); {rate / 1e6:7.1f} M positions/s; max |difference| {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="pythia-410m", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from neoxlite.cpu_kernels import bf16_kernel, kernel_status

    kernel = bf16_kernel()
    if kernel is None:
        raise SystemExit(f"no CPU kernel here: {kernel_status()}")
    shape = SHAPES[args.shape]
    heads, hs = shape["num_attention_heads"], shape["hidden_size"] // shape["num_attention_heads"]
    rot = hs // 4  # rotary_pct 0.25, as Pythia
    print(f"{args.shape}: {heads} heads of {hs}, rotary {rot}; {torch.get_num_threads()} threads; {kernel_status()}")
    generator = torch.Generator().manual_seed(0)
    for rows in args.rows:
        for context in args.context:
            print(measure(kernel, rows, context, heads, hs, rot, args.repeats, generator), flush=True)


if __name__ == "__main__":
    main()
