"""Per-call cost of the quantized CPU kernels (neoxlite/csrc/linear_quant.c) on single layers.

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python bench/quant_kernels.py [--ghz 2.9] [--rows 1]
        [--formats nf4 nf4-dq fp4 int8] [--threads 1] [--repeats 200]

For each format and layer shape (pythia-410m's MLP, 1024 -> 4096 and 4096 -> 1024, and 1.4b's 2048 -> 8192) it
prints microseconds per call, the weight bytes read per second and the cycles spent per 64 weights of one weight
row (at --ghz, the core's clock under load). Two figures per layer: "cold" cycles through copies of the weight
that together are four times the last-level cache (as sysfs reports it; within a quarter of the free memory), so
each call reads its weight from RAM, as a decode step does, and "hot" calls one copy again and again (the weight
stays in cache: the kernel's own compute cost). Best of --repeats
passes. The codes and scales are random (the kernels' cost does not depend on their values); the 4-bit tables are
bitsandbytes' own. Pin the process to one core and set the thread count to one for stable figures.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import neoxlite.quant as quant
import psutil
import torch
from neoxlite.quant import QuantSpec

from neoxlite.cpu_kernels import QuantKernel, kernel_status, quant_kernel

SHAPES = [(1024, 4096), (4096, 1024), (2048, 8192)]  # (in_features, out_features)
FORMATS = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache this machine reports (Linux sysfs), else `default`: some servers report hundreds of MiB
    of L3, and "cold" copies sized for 32 MiB would then be read from cache, not from RAM."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()  # e.g. "491520K"
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text))
        except (OSError, ValueError):  # unreadable or not a size: that entry is skipped
            continue
    return max(sizes, default=default)


def tables(mode: str, double_quant: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """bitsandbytes' 16-entry code of `mode` and, with double quant, its 256-entry code of the block scales."""
    spec = QuantSpec.from_kwargs(quant=mode, double_quant=double_quant, compute_dtype=torch.bfloat16)
    qs = quant.quantize_linear(torch.randn(64, 64), None, spec, "cpu").weight.quant_state
    return qs.code.float().contiguous(), qs.state2.code.float().contiguous() if double_quant else None


def bind(kernel: QuantKernel, fmt: str, k: int, n: int, gen: torch.Generator) -> tuple[Callable, int]:
    """One bound bf16 decode call on a fresh random weight of this format, and the bytes it reads per call."""
    if fmt == "int8":
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        scales = torch.rand(n, generator=gen) * 0.1
        return kernel.bind_int8(weight, scales, 6.0, None, torch.bfloat16), n * k + 4 * n
    mode, double_quant = fmt.removesuffix("-dq"), fmt.endswith("-dq")
    table, code2 = tables(mode, double_quant)
    codes = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen)
    blocks = n * k // 64
    if double_quant:
        absmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=gen)
        absmax2 = torch.rand((blocks + 255) // 256, generator=gen) * 0.01
        call = kernel.bind_4bit(codes, n, table, absmax, (code2, absmax2, 0.03), None, torch.bfloat16)
        return call, n * k // 2 + blocks + 4 * absmax2.numel()
    absmax = torch.rand(blocks, generator=gen) * 0.05
    return kernel.bind_4bit(codes, n, table, absmax, None, None, torch.bfloat16), n * k // 2 + 4 * blocks


def kernel_or_exit(threads: int) -> QuantKernel:
    """The quantized kernels, with `threads` torch threads; exits with the reason where they cannot run here."""
    torch.set_num_threads(threads)
    kernel = quant_kernel()
    if kernel is None:
        raise SystemExit(f"no quantized CPU kernel here: {kernel_status()}")
    return kernel


def best_time(calls: list[Callable], x: torch.Tensor, repeats: int) -> float:
    """Seconds per call: the best pass over `calls` (one call each), divided by their number."""
    for call in calls:
        call(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call(x)
        best = min(best, (time.perf_counter() - start) / len(calls))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=["nf4", "nf4-dq", "fp4", "int8"])
    parser.add_argument("--rows", type=int, default=1, help="input rows per call (1: a decode step)")
    parser.add_argument("--ghz", type=float, default=2.9, help="the core clock, for cycles (default 2.9)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30, help="timed passes; the best is kept")
    args = parser.parse_args()
    kernel = kernel_or_exit(args.threads)
    # four times the last-level cache, within a quarter of the free memory
    cold_bytes = min(4 * last_level_cache_bytes(), psutil.virtual_memory().available // 4)
    print(f"# {kernel.isa_name}, {args.threads} thread(s), {args.rows} row(s), bf16 compute, cycles at {args.ghz} GHz; "
          f"cold: copies over {cold_bytes / 2**20:.0f} MiB")
    print(f"{'format':8} {'layer':>11} | {'cold us':>8} {'GB/s':>6} {'cyc/64':>6} | {'hot us':>8} {'GB/s':>6} "
          f"{'cyc/64':>6}")
    gen = torch.Generator().manual_seed(0)
    for fmt in args.formats:
        for k, n in SHAPES:
            x = torch.randn(args.rows, k, generator=gen).to(torch.bfloat16)
            first, nbytes = bind(kernel, fmt, k, n, gen)
            copies = [first] + [bind(kernel, fmt, k, n, gen)[0] for _ in range(max(1, cold_bytes // nbytes))]
            cells = []
            for calls, repeats in ((copies, max(3, args.repeats // 4)), ([first] * 16, args.repeats)):
                seconds = best_time(calls, x, repeats)
                cycles_per_64 = seconds * args.ghz * 1e9 / (n * k / 64)
                cells.append(f"{seconds * 1e6:8.1f} {nbytes / seconds / 1e9:6.1f} {cycles_per_64:6.1f}")
            print(f"{fmt:8} {f'{k}x{n}':>11} | {cells[0]} | {cells[1]}", flush=True)
            del copies, first


if __name__ == "__main__":
    main()
