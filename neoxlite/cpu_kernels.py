"""neoxlite's C kernels for CPU decoding (neoxlite/csrc), built with the system C compiler at first use.

The build takes about a second and is cached under ~/.cache/neoxlite/kernels (or $NEOXLITE_CACHE/kernels),
keyed by the source, the flags and the compiler, and written with an atomic rename so that concurrent first
uses never load half a file. Where the kernels cannot run (not x86-64, no AVX2, no C compiler, a failed
build, or NEOXLITE_CPU_KERNELS=0) `bf16_kernel()` returns None and callers keep PyTorch's own path;
`kernel_status()` says which case applies.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch  # loaded before the kernel, so the kernel's libgomp.so.1 is torch's and shares its threads
import torch.nn.functional as F

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("linear_bf16.c", "linear_f32.c", "decode_attention_bf16.c")]
_HEADERS = [Path(__file__).with_name("csrc") / "bf16.h"]
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]
_LIBS = ["-lm"]
_ISA_NAMES = {1: "AVX2+FMA", 2: "AVX512-BF16"}
# Input rows up to which the kernel beats oneDNN's bf16 matmul (bench/decode.py; measured on Sapphire Rapids):
# AVX512-BF16 forms 32 products per instruction, AVX2 widens bf16 to fp32 first and falls behind sooner.
_MAX_ROWS = {1: 4, 2: 32}
# fp32 rows served by one pass over the weights; beyond that MKL's GEMM reads them once for all rows.
MAX_ROWS_F32 = 4


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

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               gelu: bool = False) -> torch.Tensor:
        """x @ weight.T + bias for contiguous CPU tensors of one dtype. bf16: fp32 accumulation, one rounding to
        bf16, and with `gelu` F.gelu of that bf16 result (PyTorch's own CPU formula) in the same call. fp32: GELU
        applied after. Any number of rows; each row's result has the same bits whatever the others are."""
        n, k = weight.shape
        rows = x.reshape(-1, k).contiguous()
        out = torch.empty((rows.shape[0], n), dtype=x.dtype)
        bias_ptr = None if bias is None else bias.data_ptr()
        if x.dtype is torch.float32:
            # groups of MAX_ROWS_F32 rows (each row's sums in the same order whatever the group: same bits)
            for start in range(0, rows.shape[0], MAX_ROWS_F32):
                group = rows[start:start + MAX_ROWS_F32]
                self.library.neox_linear_f32(self.isa, group.data_ptr(), weight.data_ptr(), bias_ptr,
                                             out[start:].data_ptr(), group.shape[0], n, k)
            out = F.gelu(out) if gelu else out
        else:
            self.library.neox_linear_bf16(self.isa, rows.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(),
                                          rows.shape[0], n, k, int(gelu))
        return out.view(*x.shape[:-1], n)

    def decode_attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, past: int, heads: int) -> torch.Tensor:
        """One decode step of NeoX attention without a mask: rotary on q and k, k and v written into the cache
        at `past`, attention over positions 0..past. qkv (B, 1, heads * 3 * hs); cos, sin (B, 1, 1, rot);
        keys, values (B, heads, capacity, hs), contiguous. Returns (B, 1, heads * hs)."""
        return self._attention(qkv, cos, sin, keys, values, heads, past, None, None)

    def decode_attention_rows(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                              values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                              heads: int) -> torch.Tensor:
        """decode_attention() for rows of independent sequences (continuous batching): row b writes position
        positions[b] of slot slots[b] and attends to that slot's positions 0..positions[b]. keys, values (slots,
        heads, capacity, hs); slots, positions (B,) int64, checked by the caller (neoxlite.cache.SlotCache.step)
        to lie inside the cache. Each row's result is the bits decode_attention gives it in a batch of one."""
        slots, positions = slots.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous()
        assert slots.shape == positions.shape == (qkv.shape[0],)
        return self._attention(qkv, cos, sin, keys, values, heads, 0, slots, positions)

    def _attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, heads: int, past: int, slots: torch.Tensor | None,
                   positions: torch.Tensor | None) -> torch.Tensor:
        batch, capacity, hs = qkv.shape[0], keys.shape[2], keys.shape[3]
        cos, sin = cos.reshape(batch, -1).contiguous(), sin.reshape(batch, -1).contiguous()
        qkv = qkv.contiguous()
        out = torch.empty((batch, 1, heads * hs), dtype=torch.bfloat16)
        self.library.neox_decode_attention_bf16(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[1], keys.data_ptr(), values.data_ptr(),
            out.data_ptr(), batch, heads, hs, cos.shape[1], capacity, past,
            None if slots is None else slots.data_ptr(), None if positions is None else positions.data_ptr(),
            hs**-0.5)
        return out


# Set to False to compute with PyTorch's operations only: bf16 results then equal transformers' bit for bit
# (the kernels change only the order of fp32 sums). The environment's NEOXLITE_CPU_KERNELS=0 does the same.
enabled = True

_lock = threading.Lock()
_loaded: BF16Kernel | None = None
_status: str | None = None


def bf16_kernel() -> BF16Kernel | None:
    """The bf16 linear kernel, built and loaded on the first call; None where it cannot run here."""
    global _loaded, _status
    if not enabled:
        return None
    if _status is None:
        with _lock:
            if _status is None:
                _loaded, _status = _load()
    return _loaded


def kernel_status() -> str:
    """One line for logs and benchmarks: which kernel runs, or why none does."""
    if not enabled:
        return "CPU kernels off (neoxlite.cpu_kernels.enabled = False): PyTorch's bf16 matmul"
    bf16_kernel()
    assert _status is not None
    return _status


def _load() -> tuple[BF16Kernel | None, str]:
    if os.environ.get("NEOXLITE_CPU_KERNELS", "1") == "0":
        return None, "CPU kernels off (NEOXLITE_CPU_KERNELS=0): PyTorch's bf16 matmul"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no CPU kernels for {platform.machine()}: PyTorch's bf16 matmul"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc/gcc; or set CC) to build the CPU kernels: PyTorch's bf16 matmul"
    try:
        path = _build(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"building the CPU kernels failed ({error}): PyTorch's bf16 matmul"
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
    isa = library.neox_best_isa()
    if isa not in _ISA_NAMES:
        return None, "this CPU has neither AVX2+FMA nor AVX512-BF16: PyTorch's bf16 matmul"
    kernel = BF16Kernel(library, isa, _MAX_ROWS[isa])
    return kernel, f"neoxlite {kernel.isa_name} kernel for bf16 linears up to {kernel.max_rows} rows"


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
