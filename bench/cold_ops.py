"""What a small operation costs right after a decode kernel call, against the same operation warm.

    .venv/bin/python bench/cold_ops.py [--threads 2] [--calls 640]

A decode step streams each layer's weights (megabytes) through the caches; the small operations between the
kernel calls (a layer norm, a residual add, allocating the next output, the Python and ctypes code of the next
call) then find their code and data evicted. For each operation this times one run right after an int8 kernel
call on a 1024 -> 4096 weight (a different copy each time, so the weight comes from RAM as in decode) and a
second run straight after the first (warm), and prints both means. neoxlite.cpu_step.decode_step is shaped by
these figures: its PyTorch ops run together before the first kernel call, and the calls write into outputs
allocated there.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_kernels import bind, kernel_or_exit  # noqa: E402

WIDTH, OUT = 1024, 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=640, help="kernel calls (each followed by one cold run)")
    args = parser.parse_args()
    kernel = kernel_or_exit(args.threads)
    gen = torch.Generator().manual_seed(0)
    # 256 MiB of weights: each call reads its copy from RAM
    streams = [bind(kernel, "int8", WIDTH, OUT, gen)[0] for _ in range(64)]
    small = bind(kernel, "int8", WIDTH, 16, gen)[0]
    x = torch.randn(1, WIDTH, generator=gen).to(torch.bfloat16)
    row = torch.randn(1, 1, WIDTH, generator=gen).to(torch.bfloat16)
    norm = (torch.ones(WIDTH, dtype=torch.bfloat16), torch.zeros(WIDTH, dtype=torch.bfloat16))
    out = torch.empty(1, 16, dtype=torch.bfloat16)
    operations: dict[str, Callable[[], object]] = {
        "torch.empty (1, 1024) bf16": lambda: torch.empty((1, WIDTH), dtype=torch.bfloat16),
        "F.layer_norm (1, 1, 1024) bf16": lambda: F.layer_norm(row, (WIDTH,), *norm, 1e-5),
        "bf16 add (1, 1, 1024)": lambda: row + row,
        "ctypes call of an empty C function": kernel.library.neox_amx_int8_from,
        "bound int8 call 1024 -> 16": lambda: small(x),
        "bound int8 call 1024 -> 16, out given": lambda: small(x, out=out),
    }
    print(f"# {args.threads} thread(s); microseconds, mean over {args.calls} runs after a kernel call on a "
          f"{WIDTH} -> {OUT} int8 weight read from RAM")
    print(f"{'operation':40} {'cold':>7} {'warm':>7}")
    for name, operation in operations.items():
        cold = warm = 0.0
        for i in range(args.calls):
            streams[i % len(streams)](x)
            start = time.perf_counter()
            operation()
            middle = time.perf_counter()
            operation()
            cold, warm = cold + middle - start, warm + time.perf_counter() - middle
        print(f"{name:40} {cold / args.calls * 1e6:7.1f} {warm / args.calls * 1e6:7.1f}", flush=True)


if __name__ == "__main__":
    main()
