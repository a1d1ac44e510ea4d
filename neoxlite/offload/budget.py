"""Memory budgets: parse sizes the user writes ("6GiB", "512MB", 10**9) and measure what is free.

A budget is the number of bytes a tier (GPU memory, CPU RAM) may hold for this model: weights that live
there, plus the KV cache, activation workspace and in-flight transfer buffers when it is the compute tier.
When the user sets no budget, the default is the memory free right now less a safety margin.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

logger = logging.getLogger(__name__)

# Decimal units (SI) and binary units (IEC), as `nvidia-smi`, `df` and accelerate spell them. A bare
# K/M/G/T means the binary unit, as in `docker --memory` and `ulimit`.
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$", re.ASCII)  # ASCII digits only: "٣GiB" is no size

# What the defaults leave free for everything that is not this model (other processes, the CUDA context,
# allocator fragmentation, Python objects): the larger of a fixed amount and a share of what is free.
GPU_MARGIN_BYTES = 512 * 2**20
CPU_MARGIN_BYTES = 1 * 2**30
MARGIN_FRACTION = 0.10


def parse_size(value: str | int | float | None, *, name: str = "size") -> int | None:
    """Return `value` in bytes. Accepts ints (bytes), "6GiB", "6GB", "512MiB", "1.5 GiB", "6G" (= GiB).

    None passes through (meaning "use the default"). Anything else raises ValueError naming `name`.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected a size such as '6GiB', '512MB' or a number of bytes")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name}={value!r}: expected a finite number of bytes")
        nbytes = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name}={value!r} is not a size: write a number with an optional unit, "
                "e.g. '6GiB', '6GB', '512MiB', '1.5 GiB' or 1000000 (bytes); "
                "units: B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB or K, M, G, T (powers of 1024)"
            )
        size = float(match.group(1)) * _UNITS[unit]
        if not math.isfinite(size):  # 400 digits parse as inf
            raise ValueError(f"{name}={value!r} is too large to be a size")
        nbytes = int(size)
    else:
        raise TypeError(
            f"{name}={value!r} ({type(value).__name__}): expected a size such as '6GiB' or an int of bytes"
        )
    if nbytes < 0:
        raise ValueError(f"{name}={value!r} is negative; a budget is a number of bytes >= 0")
    return nbytes


def format_size(nbytes: int | float) -> str:
    """Human-readable binary size: 1536 -> '1.50 KiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def cuda_device(device: torch.device | str | int | None = None) -> torch.device:
    """The CUDA device with its index filled in: torch's per-device calls (mem_get_info, set_device) refuse a
    bare "cuda", which means the current device."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def free_gpu_memory(device: torch.device | str | int | None = None) -> int:
    """Bytes free on a CUDA device right now (0 when CUDA is unavailable)."""
    if not torch.cuda.is_available():
        return 0
    free, _total = torch.cuda.mem_get_info(cuda_device(device))
    return int(free)


def free_cpu_memory() -> int:
    """Bytes of RAM the OS could give this process now without swapping: psutil's `available`, or less where
    the process's memory cgroup (a container's limit) allows less."""
    available = int(psutil.virtual_memory().available)
    room = cgroup_memory_room()
    return available if room is None else min(available, room)


def cgroup_memory_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup still allows: its limit less the anonymous memory charged to it (page
    cache is reclaimed under the limit, so it counts as room). None where no limit applies or none is readable.
    cgroup v2 (memory.max, memory.stat `anon`) and v1 (memory.limit_in_bytes, memory.stat `total_rss`)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            base, limit_file, anon_key = Path(root), "memory.max", "anon"
        elif "memory" in controllers.split(","):
            base, limit_file, anon_key = Path(root) / "memory", "memory.limit_in_bytes", "total_rss"
        else:
            continue
        # A container sees its own cgroup at the root of the mount, not at the host's path.
        for folder in (base / path.lstrip("/"), base):
            try:
                limit_text = (folder / limit_file).read_text().strip()
                stat = dict(ln.split() for ln in (folder / "memory.stat").read_text().splitlines() if ln.strip())
            except (OSError, ValueError):
                continue
            if limit_text == "max" or int(limit_text) >= 1 << 60:  # (v1 writes "no limit" as ~2**63)
                break
            return max(0, int(limit_text) - int(stat.get(anon_key, 0)))
    return None


def _less_margin(free: int, fixed: int) -> int:
    return max(0, free - max(fixed, int(free * MARGIN_FRACTION)))


def default_gpu_budget(device: torch.device | str | int | None = None) -> int:
    return _less_margin(free_gpu_memory(device), GPU_MARGIN_BYTES)


def default_cpu_budget() -> int:
    return _less_margin(free_cpu_memory(), CPU_MARGIN_BYTES)


@dataclass(frozen=True)
class Budgets:
    """Resolved budgets in bytes. gpu is 0 on machines without CUDA; offload_dir None means no disk tier."""

    gpu: int
    cpu: int
    offload_dir: str | None
    gpu_from_user: bool = False
    cpu_from_user: bool = False


def resolve_budgets(
    gpu_memory: str | int | float | None = None,
    cpu_memory: str | int | float | None = None,
    offload_dir: str | None = None,
    *,
    compute_device: torch.device | str = "cpu",
) -> Budgets:
    """Turn user budgets (or None: measured free memory less a margin) into bytes for the planner."""
    device = torch.device(compute_device)
    gpu = parse_size(gpu_memory, name="gpu_memory")
    cpu = parse_size(cpu_memory, name="cpu_memory")
    if gpu is not None and device.type != "cuda" and not torch.cuda.is_available():
        # As transformers does with a GPU in max_memory on a machine without one: said, then ignored.
        logger.warning("neoxlite: gpu_memory=%r ignored: this machine has no CUDA device; the model runs on the CPU",
                       gpu_memory)
        gpu = None
    if gpu is not None and gpu > 0 and device.type != "cuda":
        raise ValueError(
            f"gpu_memory={gpu_memory!r} was given but the compute device is {device}: "
            "drop gpu_memory or run on a CUDA device (device='cuda')"
        )
    if device.type == "cuda" and gpu is None:
        gpu_budget = default_gpu_budget(device)
    else:
        gpu_budget = gpu or 0
    return Budgets(
        gpu=gpu_budget,
        cpu=default_cpu_budget() if cpu is None else cpu,
        offload_dir=None if offload_dir is None else str(offload_dir),
        gpu_from_user=gpu is not None,
        cpu_from_user=cpu is not None,
    )
