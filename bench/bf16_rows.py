"""neoxlite's bf16 linear kernel against PyTorch's bf16 matmul (oneDNN) by number of input rows, and a prompt's
prefill through the whole model with the kernel and with PyTorch's matmul above 32 rows.

    .venv/bin/python bench/bf16_rows.py [--shape pythia-410m] [--rows 1 4 16 32 128 512] [--prompt 512]

Per row count: both engines on the shape's MLP up-projection (hidden -> 4 x hidden, bias), best of --repeats, in
ms and GFLOP/s, and their ratio; then the prefill of a --prompt-token prompt (random weights of the shape, bf16)
with the status line's row limit and with the kernel held to 32 rows (the limit before it took every row count on
AVX2), best of --repeats each. Both in one run, on this machine's threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, random_checkpoint  # noqa: E402


def best_ms(run: Callable[[], object], repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-410m", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 128, 512])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens of the prefill (0: skip it)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import neoxlite.cpu_kernels as cpu_kernels
    from neoxlite import GPTNeoXForCausalLM

    kernel = cpu_kernels.bf16_kernel()
    if kernel is None:
        raise SystemExit(f"no bf16 kernel here: {cpu_kernels.kernel_status()}")
    print(f"{torch.get_num_threads()} threads; {cpu_kernels.kernel_status()}")
    hidden = SHAPES[args.shape]["hidden_size"]
    inner = SHAPES[args.shape]["intermediate_size"]
    weight, bias = torch.randn(inner, hidden).bfloat16(), torch.randn(inner).bfloat16()
    for rows in args.rows:
        x = torch.randn(rows, hidden).bfloat16()
        ours = best_ms(lambda x=x: kernel.linear(x, weight, bias), args.repeats)
        torchs = best_ms(lambda x=x: F.linear(x, weight, bias), args.repeats)
        flop = 2 * rows * hidden * inner / 1e6
        print(f"{rows:4d} rows, {hidden} -> {inner}: kernel {ours:8.2f} ms ({flop / ours:6.1f} GFLOP/s), "
              f"oneDNN {torchs:8.2f} ms ({flop / torchs:6.1f} GFLOP/s), kernel {torchs / ours:.2f}x")
    if args.prompt:
        model = GPTNeoXForCausalLM.from_pretrained(random_checkpoint(args.shape), dtype=torch.bfloat16,
                                                   progress=False)
        prompt = torch.randint(2, 50000, (1, args.prompt), generator=torch.Generator().manual_seed(0))

        def prefill() -> None:
            with torch.inference_mode():
                model(prompt, logits_to_keep=1)

        limited = dataclasses.replace(kernel, max_rows=min(kernel.max_rows, 32))
        times = {}
        for name, used in (("the status line's limit", kernel), ("kernel up to 32 rows", limited)):
            cpu_kernels._loaded = used
            times[name] = best_ms(prefill, max(1, args.repeats // 2))
        cpu_kernels._loaded = kernel
        first, second = times.values()
        print(f"prefill of {args.prompt} tokens, {args.shape} bf16: " +
              ", ".join(f"{name} {ms / 1e3:.2f} s ({args.prompt / ms * 1e3:.0f} tok/s)" for name, ms in times.items())
              + f"; {second / first:.2f}x")


if __name__ == "__main__":
    main()
