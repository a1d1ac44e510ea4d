"""The decode step of a resident CUDA model, captured once per (batch size, cache length, dtype) as a CUDA graph
and replayed every token: at batch 1 a step is hundreds of small kernels, and launching them from Python costs
more than running them (issue 17: 5% of the weight-read bound before).

What is captured is generation.decode_one_token on a fixed-shape cache (the whole buffer read under a mask built
from a position tensor), so the graph and the eager step compute the same kernels on the same inputs; sampling
runs beside the graph on its logits, the eager code path (a seeded CPU generator draws on the CPU as it always
has, so a seed gives the same tokens with or without graphs and on every device).

Where capture cannot apply the step runs eagerly, and `describe(model)` says why:
- int8 layers with an outlier threshold (LLM.int8(), bitsandbytes' default 6.0): the outlier columns are found
  with torch.argwhere, whose size is read back from the GPU, which a graph cannot hold;
- any other capture error (a kernel that synchronises), reported once, that shape then stays eager.
The captured steps live on the model and go with it; .to()/.half() drop them (they hold the tensors' addresses).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger("neoxlite")

LENGTH_QUANTUM = 256  # cache lengths are rounded up to this: generations of nearby lengths share one graph
MAX_CAPTURED = 4  # shapes kept per model (each holds its KV cache); the oldest goes first
_STORE = "_captured_decode"  # the model's __dict__ key for its OrderedDict of CapturedStep


def wanted(flag: bool | None) -> bool:
    """The keyword when given, else NEOXLITE_CUDA_GRAPHS (0 turns graphs off; on by default)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("NEOXLITE_CUDA_GRAPHS", "1").strip() != "0"


def fixed_shape(model: nn.Module) -> bool:
    """Whether generation uses the fixed-shape step: a CUDA model whose layers all live on the GPU (an offloaded
    model keeps its scheduler's copy-stream overlap and the step it had)."""
    from neoxlite.model import ResidentScheduler

    base = model.base_model
    return model.device.type == "cuda" and isinstance(base.scheduler, ResidentScheduler)


def eager_reason(model: nn.Module) -> str | None:
    """Why this model's step cannot be captured, or None."""
    from neoxlite.quant.layers import Linear8bit

    for name, module in model.named_modules():
        if isinstance(module, Linear8bit) and module.state.threshold > 0:
            return (f"{name} is int8 with outlier threshold {module.state.threshold}: bitsandbytes finds the "
                    "outlier columns with torch.argwhere, which reads back (load with int8_threshold=0 to capture)")
    return None


class CapturedStep:
    """One shape's step: its input tensors (a generation.DecodeStep, reused by every generation of that shape)
    and, once captured, the graph and the logits tensor it writes."""

    def __init__(self, step: Any, eager: str | None) -> None:
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.eager = eager  # why this shape runs eagerly, or None
        self.capture_seconds: float | None = None

    def run(self, step_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's (B, V) logits: the graph replayed, captured on the first call (the inputs then hold a real
        step, so the warm-up runs write the cache exactly what the step writes)."""
        if self.eager is not None:
            return step_fn()
        if self.graph is None:
            try:
                self._capture(step_fn)
            except RuntimeError as error:  # a kernel that synchronises: this shape stays eager
                self.graph, self.logits, self.eager = None, None, f"capture failed: {error}"
                log.warning("neoxlite: the decode step could not be captured as a CUDA graph (%s); running it "
                            "eagerly", error)
                return step_fn()
        self.graph.replay()
        return self.logits

    def _capture(self, step_fn: Callable[[], torch.Tensor]) -> None:
        start = time.perf_counter()
        side = _warmup_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
            for _ in range(2):  # lazy initialisation (cuBLAS handles, bitsandbytes' buffers) happens here
                step_fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step_fn()
        torch.cuda.synchronize()
        self.graph, self.logits = graph, logits
        self.capture_seconds = time.perf_counter() - start
        B, _, _, L = self.step.visible.shape
        log.info("neoxlite: captured the decode step (batch %d, cache %d) as a CUDA graph in %.2f s", B, L,
                 self.capture_seconds)


def _warmup_stream() -> torch.cuda.Stream:
    """One side stream for every warm-up: cuBLAS keeps a workspace per stream it has run on, so a new stream per
    capture would keep one more workspace each time."""
    global _WARMUP
    if _WARMUP is None or _WARMUP.device != torch.device("cuda", torch.cuda.current_device()):
        _WARMUP = torch.cuda.Stream()
    return _WARMUP


_WARMUP: torch.cuda.Stream | None = None


def captured_step(model: nn.Module, key: tuple[int, int, torch.dtype], make_step: Callable[[], Any]) -> CapturedStep:
    """The model's captured step for (batch size, cache length, dtype), made (not yet captured) when new."""
    store: OrderedDict[tuple[int, int, torch.dtype], CapturedStep] = model.__dict__.setdefault(_STORE, OrderedDict())
    entry = store.get(key)
    if entry is None:
        while len(store) >= MAX_CAPTURED:
            store.popitem(last=False)
        entry = store[key] = CapturedStep(make_step(), eager_reason(model))
    store.move_to_end(key)
    return entry


def describe(model: nn.Module) -> str:
    """One line per captured shape: captured (and how long capture took) or eager and why."""
    store = model.__dict__.get(_STORE) or {}
    lines = []
    for (batch, length, dtype), entry in store.items():
        if entry.capture_seconds is not None:
            state = f"captured in {entry.capture_seconds:.2f} s"
        else:
            state = f"eager: {entry.eager}" if entry.eager else "not captured yet"
        lines.append(f"decode step batch {batch}, cache {length}, {str(dtype).removeprefix('torch.')}: {state}")
    return "\n".join(lines) or "no decode step captured"


def release(model: nn.Module) -> None:
    """Drops the model's captured steps and their memory (graphs, KV caches, inputs)."""
    model.__dict__.pop(_STORE, None)
