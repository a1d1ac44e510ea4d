"""Which engine computes a CPU linear of a given number of rows: neoxlite's kernels or PyTorch's matmul.

neoxlite's kernels (neoxlite/csrc) form the products with vector instructions and read the weight once per call:
for the few rows of a decode step the work is bound by memory bandwidth, and they beat PyTorch's bf16 matmul
(oneDNN). With more rows the work is compute. On a CPU with a matrix engine (Intel AMX: amx_bf16 and amx_tile)
oneDNN runs bf16 matmuls on its tiles, several times faster than any vector kernel. Measured on a Sapphire Rapids
Xeon, a 2048 -> 8192 bf16 linear on 2 threads (issue 18):

    rows   kernel    oneDNN (AMX)
       1   0.65 ms   1.24 ms
       4   0.95 ms   1.16 ms
      16   3.39 ms   1.43 ms
      32   6.00 ms   1.60 ms

so for oneDNN the crossover lies between 4 and 16 rows (AMX_DEFAULT_ROWS). neoxlite's own AMX kernel
(linear_bf16.c) beats oneDNN up to 128-256 rows and the vector kernel from 4 rows on: on AMX CPUs it is the
kernel. Where AMX can run, the crossover is measured at first use (calibrate(): both engines timed on that shape at
CANDIDATE_ROWS) and cached per CPU model, torch version and thread count. Where it cannot, the row limits stated
in neoxlite.cpu_kernels (measured with bench/decode.py) stay: a vector-only CPU has no faster engine for these
sizes.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from neoxlite.fileio import atomic_write_text

AMX_DEFAULT_ROWS = 4
# Row counts both engines are timed at; the pick is one of them.
CANDIDATE_ROWS = (1, 2, 4, 8, 16, 32)
# neoxlite's own AMX kernel is timed further: it measured as fast as oneDNN's up to 128-256 rows (2048 -> 8192,
# 2 threads: 1.09 / 1.88 ms at 64 rows, 3.59 / 4.19 ms at 256, 8.40 / 8.02 ms at 512).
AMX_CANDIDATE_ROWS = (*CANDIDATE_ROWS, 64, 128, 256)
# The shape timed (in_features, out_features): a pythia-1.4b MLP up-projection, the measurement.
CALIBRATION_SHAPE = (2048, 8192)
_REPEATS = 5

# Linux's arch_prctl: a process must ask for the AMX tile data state before its first tile instruction.
_SYS_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.cache
def amx() -> tuple[bool, str]:
    """(whether oneDNN can run bf16 matmuls on AMX in this process, why or why not in words)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"no AMX on {platform.system()} {platform.machine()}"
    flags = cpu_flags()
    missing = [flag for flag in ("amx_tile", "amx_bf16") if flag not in flags]
    if missing:
        return False, f"this CPU has no {' / '.join(missing)} (/proc/cpuinfo)"
    granted, why = _tile_permission()
    return (True, "AMX (amx_tile, amx_bf16; tile use granted)") if granted else (False, why)


# The CPU features with which PyTorch's matmul multiplies bf16 / fp16 natively; without them oneDNN converts
# and is several times slower than a float32 matmul of the same (exactly widened) values. On this project's Zen 3
# (AVX2, 2 threads, shared machine) a 512 x 1024 @ 1024 x 4096 product took 0.9-1.4 s in bf16 and 0.18-0.23 s
# in fp32.
_NATIVE_MATMUL = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


@functools.cache
def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which to multiply `dtype` values (float32/bfloat16/float16) on this CPU: itself where the CPU
    multiplies it natively, else float32 (the product of two bf16 or fp16 values is exact in fp32, so only the
    order of the fp32 sums differs). AMX counts only where this process may use it (amx())."""
    native = _NATIVE_MATMUL.get(dtype, ())
    flags = cpu_flags()
    usable = [flag for flag in native if flag in flags and (not flag.startswith("amx") or amx()[0])]
    return dtype if dtype is torch.float32 or usable else torch.float32


def _cpuinfo(field: str) -> str | None:
    """The first CPU's `field` in /proc/cpuinfo ("" when absent), or None where the file cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith(field)), "")


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    model = _cpuinfo("model name")
    if model is None:
        return platform.processor() or "unknown"
    return model or "unknown"


def _tile_permission() -> tuple[bool, str]:
    """Asks the kernel for the tile data state (what oneDNN does itself), then checks it was granted."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    bits = ctypes.c_uint64(0)
    libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                 ctypes.c_ulong(_XFEATURE_XTILEDATA))
    if libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_GET_XCOMP_PERM), ctypes.byref(bits)) != 0:
        return False, f"arch_prctl(ARCH_GET_XCOMP_PERM) failed (errno {ctypes.get_errno()}): kernel older than 5.16?"
    if not bits.value >> _XFEATURE_XTILEDATA & 1:
        return False, "the OS did not grant this process AMX tile use (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return True, ""


def pick_rows(timings: Mapping[int, tuple[float, float]]) -> int:
    """The most rows the kernel should serve given {rows: (kernel seconds, engine seconds)}: the largest measured
    row count up to which the kernel is never slower. At least 1: one row (a batch-1 decode step) is bandwidth-bound
    and stays on the kernel, where a short calibration is noisiest."""
    best = 1
    for rows in sorted(timings):
        kernel_s, engine_s = timings[rows]
        if kernel_s > engine_s:
            break
        best = rows
    return best


def time_engines(kernel: Callable[[torch.Tensor], object], engine: Callable[[torch.Tensor], object],
                 in_features: int, dtype: torch.dtype, candidates: tuple[int, ...] = CANDIDATE_ROWS
                 ) -> dict[int, tuple[float, float]]:
    """{rows: (kernel seconds, engine seconds)}, each the fastest of a few calls on random inputs (on a shared
    machine, other jobs only ever add time: the fastest call is the engine's own cost)."""
    timings = {}
    for rows in candidates:
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
        timings[rows] = _best_times(kernel, engine, x)
    return timings


def _best_times(kernel: Callable[[torch.Tensor], object], engine: Callable[[torch.Tensor], object],
                x: torch.Tensor) -> tuple[float, float]:
    """The fastest of a few calls of each, alternated: a burst of load from another job slows both alike."""
    kernel(x)  # warm: first-call allocations, oneDNN's primitive creation
    engine(x)
    runs: tuple[list[float], list[float]] = ([], [])
    for _ in range(_REPEATS):
        for call, times in ((kernel, runs[0]), (engine, runs[1])):
            start = time.perf_counter()
            call(x)
            times.append(time.perf_counter() - start)
    return min(runs[0]), min(runs[1])


def machine_busy() -> bool:
    """Whether other work loads the cores now (the 1-minute load average above the core count): a crossover
    measured then is used but not kept, since it would send every later run to the engine a busy minute favoured."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:  # no load average on this system
        return False


def crossover(name: str, measure: Callable[[], Mapping[int, tuple[float, float]]], folder: Path) -> tuple[int, str]:
    """(rows the kernel serves for `name`, where that figure comes from): the cached measurement for this CPU model,
    torch version and thread count in `folder`, else measure() now, written there atomically for next time."""
    key = f"{cpu_model()}|torch {torch.__version__}|{torch.get_num_threads()} threads|{name}"
    path = folder / "crossover.json"
    saved = _read(path)
    if key in saved:
        return int(saved[key]["rows"]), f"measured earlier ({path})"
    busy = machine_busy()
    timings = measure()
    rows = pick_rows(timings)
    if busy:
        return rows, "measured now, on a busy machine (not kept: measured again next time)"
    saved[key] = {"rows": rows, "ms": {str(r): [round(k * 1e3, 3), round(e * 1e3, 3)] for r, (k, e) in timings.items()}}
    try:
        atomic_write_text(path, json.dumps(saved, indent=1))
    except OSError:  # an unwritable cache: measured again next time
        pass
    return rows, "measured now"


def _read(path: Path) -> dict:
    """The cached measurements; a missing, unreadable or malformed file counts as none (it is only a cache)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {key: value for key, value in saved.items()
            if isinstance(value, dict) and isinstance(value.get("rows"), int) and value["rows"] >= 1}
