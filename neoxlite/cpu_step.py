"""The CPU decode fast path: a layer's one-token step through neoxlite's kernels (neoxlite/csrc).

model.py holds the math; this module wraps a layer's decode step, as gpt-fast keeps `decode_one_token` apart
from its model. It computes the same operations in the same order as the layer's forward() (so the same bits),
but calls the kernels directly: at batch 1 each module call or attribute lookup is a measurable share of a step.
GPTNeoXLayer.forward asks `decode_kernel` whether it applies and hands the step to `decode_step`; a resident
model's block loop asks `decode_plan` once per step for every layer and calls `decode_step` itself;
GPTNeoXAttention.attend asks `decode_attention` for the fused rotary + cache write + attention kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from neoxlite.cache import RowStep, StaticCache
from neoxlite.cpu_kernels import BF16Kernel, DecodeCall, bf16_kernel
from neoxlite.linear import DecodeLinear

if TYPE_CHECKING:
    from neoxlite.model import GPTNeoXAttention, GPTNeoXLayer

_CACHED = "_kernel_step"  # the layer's __dict__ key: (parameter slots, {any_rows: KernelStep or None})


def decode_attention(fused: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     kv: tuple[StaticCache | RowStep, int], num_heads: int,
                     out: torch.Tensor | None = None) -> torch.Tensor | None:
    """(B, 1, 3C) fused q/k/v -> (B, 1, C) attention output by the kernel (rotary, cache write and attention in one
    call) where it computes this step (bf16 on the CPU, no autograd), else None. rope: cos, sin (B, 1, 1, rot) or
    (B, rot); `out`: an empty (B, 1, C) bf16 tensor for the result."""
    cache, layer_idx = kv
    keys, values = cache.keys[layer_idx], cache.values[layer_idx]
    if (fused.dtype != torch.bfloat16 or fused.device.type != "cpu" or keys.dtype != torch.bfloat16
            or keys.device.type != "cpu" or not keys.is_contiguous() or not values.is_contiguous()
            or keys.shape[-1] > 512 or (torch.is_grad_enabled() and fused.requires_grad)):
        return None
    kernel = bf16_kernel()
    if kernel is None:
        return None
    cos, sin = rope
    if isinstance(cache, RowStep):
        return kernel.decode_attention_rows(fused, cos, sin, keys, values, cache.rows_tensor,
                                            cache.positions_tensor, num_heads, out)
    return kernel.decode_attention(fused, cos, sin, keys, values, cache.length, num_heads, out)


def decode_kernel(layer: GPTNeoXLayer, x: torch.Tensor, kv: tuple[StaticCache | RowStep, int]) -> BF16Kernel | None:
    """neoxlite's CPU kernels when they can run this decode step's linears (bf16 or fp32 in RAM, unquantized,
    no autograd, a batch the linear kernel takes), else None."""
    if (x.dtype is not torch.bfloat16 and x.dtype is not torch.float32) or not x.is_cpu or torch.is_grad_enabled():
        return None
    cached = layer.__dict__.get(_CACHED)
    if cached is None or not all(params.get(name) is tensor for params, name, tensor in cached[0]):
        cached = layer.__dict__[_CACHED] = (_parameter_slots(layer), {})
    rows = isinstance(kv[0], RowStep)
    if rows not in cached[1]:
        cached[1][rows] = KernelStep.of(layer, any_rows=rows)
    step = cached[1][rows]
    if step is None or step.dtype is not x.dtype:
        return None
    kernel = bf16_kernel()
    if kernel is None or not kernel.rows_for(x.dtype):
        return None
    # Rows of independent sequences take the kernel at any batch: it computes each row alone, so each gets
    # the bits it gets in a batch of one (what continuous batching promises); a batch otherwise up to where
    # the kernel beats PyTorch's matmul.
    return kernel if isinstance(kv[0], RowStep) or x.shape[0] <= kernel.rows_for(x.dtype) else None


def decode_plan(layers: Sequence[GPTNeoXLayer], x: torch.Tensor, cache: StaticCache | RowStep
                ) -> list[tuple[GPTNeoXLayer, BF16Kernel]] | None:
    """decode_kernel() for every layer of a resident model at once, before the first one runs: (layer, kernel)
    pairs for the block loop to hand to decode_step, or None unless every layer is a GPTNeoXLayer with its own
    forward() (not a replacement module or an override), takes the direct step, and calling it as a module would
    run no hook (its own or a global forward hook).

    Why: between two layers' kernel calls, the module call, the scheduler's fetch and decode_kernel's checks run
    with their code and data pushed out of the caches by the weights, about 50 us a layer (a twentieth of an nf4
    step at pythia-410m); run together here, before any kernel call, they cost a few. Nothing a check reads can
    change during a step of a resident model (the offload scheduler, which rebinds tensors per layer, keeps the
    per-layer check)."""
    from neoxlite.model import GPTNeoXLayer  # (model.py imports this module)

    if x.shape[1] != 1 or _global_forward_hooks():
        return None
    plan = []
    for i, layer in enumerate(layers):
        if (type(layer).forward is not GPTNeoXLayer.forward or layer.training or layer._forward_hooks
                or layer._forward_pre_hooks):
            return None
        kernel = decode_kernel(layer, x, (cache, i))
        if kernel is None:
            return None
        plan.append((layer, kernel))
    return plan


def _global_forward_hooks() -> bool:
    """True where torch.nn.Module calls would run a global forward hook (or this torch keeps them elsewhere)."""
    module = torch.nn.modules.module
    return any(getattr(module, name, True) for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


def decode_step(layer: GPTNeoXLayer, kernel: BF16Kernel, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[StaticCache | RowStep, int]) -> torch.Tensor:
    """layer.forward() for one new token after decode_kernel() said yes: the same operations in the same order
    (the same bits as the module path), called directly, without a module call, attribute lookup or check per
    operation (at batch 1 those cost about a tenth of a step)."""
    s: KernelStep = layer.__dict__[_CACHED][1][isinstance(kv[0], RowStep)]
    # After a kernel call has streamed megabytes of weights through the caches, PyTorch's code and data come back
    # from memory: its first op then costs several times its warm time (bench/cold_ops.py: torch.empty 17 against
    # 2 us, a layer norm 34 against 5), where a ctypes call into the kernels costs a few us. So the PyTorch ops of
    # the step run together here, before the first kernel: the norms (with the parallel residual both read x) and
    # the rotary rows; the kernels write into outputs allocated once per thread at batch 1 (KernelStep.outputs),
    # so the calls between run no PyTorch op.
    normed1 = F.layer_norm(x, s.shape, *s.norm1)
    normed = F.layer_norm(x, s.shape, *s.norm2) if s.parallel else None
    qkv_out, attention_out, dense_out, up_out, down_out = s.outputs(x.shape[0])
    cos, sin = rope
    rows = (cos.reshape(x.shape[0], -1), sin.reshape(x.shape[0], -1))
    fused = s.qkv(normed1, out=qkv_out)
    attended = decode_attention(fused, rows, kv, s.attention.num_heads, attention_out)
    if attended is None:  # (fp32, or a cache the kernel does not read)
        attended = s.attention.attend(fused, rope, None, kv)
    attn = s.dense(attended, out=dense_out)
    if not s.parallel:
        x = x + attn
        normed = F.layer_norm(x, s.shape, *s.norm2)
    # (GELU fused into s.up when exact)
    hidden = s.up(normed, out=up_out) if s.act is None else s.act(s.up(normed, out=up_out))
    out = s.down(hidden, out=down_out)
    return out + attn + x if s.parallel else x + out  # the reference's order of bf16 roundings


def release(layer: GPTNeoXLayer) -> None:
    """Drops the references the fast path keeps to the layer's tensors (see GPTNeoXLayer.release_cached_tensors)."""
    layer.__dict__.pop(_CACHED, None)


@dataclass(frozen=True)
class KernelStep:
    """A layer's tensors for decode_step, looked up once: at batch 1 each nn.Module attribute lookup costs about a
    microsecond, and a step made about fifty."""

    norm1: tuple[torch.Tensor, torch.Tensor, float]  # weight, bias, eps
    norm2: tuple[torch.Tensor, torch.Tensor, float]
    shape: tuple[int, ...]  # the norms' normalized_shape
    qkv: DecodeCall  # each linear's DecodeLinear.decode_call
    dense: DecodeCall
    up: DecodeCall  # with GELU when act is None
    down: DecodeCall
    widths: tuple[int, int, int, int, int]  # the outputs' widths: qkv, attention, dense, up, down
    attention: GPTNeoXAttention  # its attend(): the decode kernel in bf16, PyTorch's ops otherwise
    dtype: torch.dtype
    parallel: bool
    act: Any  # None: exact GELU, fused into the first MLP linear
    # this thread's output tensors for one row (decode_step's results never alias them: the step ends in adds
    # that allocate); dropped with the thread or the step
    reused: threading.local = field(default_factory=threading.local, compare=False, repr=False)

    def outputs(self, batch: int) -> Sequence[torch.Tensor]:
        """Empty (batch, 1, width) tensors for the step's kernels (qkv, attention, dense, up, down). One row's
        are allocated once per thread and reused: a decode step at batch 1 then allocates nothing before its
        kernel calls."""
        kept = getattr(self.reused, "outputs", None) if batch == 1 else None
        if kept is not None:
            return kept
        fresh = [torch.empty((batch, 1, n), dtype=self.dtype) for n in self.widths]
        if batch == 1:
            self.reused.outputs = fresh
        return fresh

    @classmethod
    def of(cls, layer: GPTNeoXLayer, any_rows: bool = False) -> KernelStep | None:
        """None unless every linear is a DecodeLinear a kernel computes in the norms' dtype (neoxlite's Linear on
        weights the kernel reads, or a quantized layer) and the norms are in RAM, all in one dtype. any_rows: for
        rows of independent sequences (DecodeLinear.decode_call)."""
        attention, mlp = layer.attention, layer.mlp
        linears = (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        dtype = layer.input_layernorm.weight.dtype if layer.input_layernorm.weight is not None else None
        calls = [m.decode_call(dtype, gelu=m is mlp.dense_h_to_4h and mlp.exact_gelu, any_rows=any_rows)
                 if isinstance(m, DecodeLinear) and dtype is not None else None for m in linears]
        if not (all(c is not None for c in calls)
                and all(n.weight is not None and n.bias is not None and n.weight.dtype is dtype
                        and n.bias.dtype is dtype and n.weight.is_cpu for n in norms)):
            return None
        qkv, dense, up, down = calls
        norm1, norm2 = ((n.weight, n.bias, n.eps) for n in norms)
        widths = (linears[0].out_features, linears[1].in_features, *(m.out_features for m in linears[1:]))
        return cls(norm1, norm2, tuple(norms[0].normalized_shape), qkv, dense, up, down, widths, attention, dtype,
                   layer.use_parallel_residual, None if mlp.exact_gelu else mlp.act)


def _parameter_slots(layer: GPTNeoXLayer) -> tuple[tuple[dict[str, Any], str, Any], ...]:
    """(owner dict, name, object) for the submodules and tensors KernelStep holds: the same objects later means
    the same layer (the offload scheduler rebinds tensors and swaps quantized modules; .to() clears the cache
    through GPTNeoXLayer._apply)."""
    attention, mlp = layer.attention, layer.mlp
    owners = ((layer, ("attention", "mlp", "input_layernorm", "post_attention_layernorm")),
              (attention, ("query_key_value", "dense")), (mlp, ("dense_h_to_4h", "dense_4h_to_h")))
    modules = tuple((m._modules, name, m._modules.get(name)) for m, names in owners for name in names)
    leaves = [module for _, _, module in modules if module is not None and module not in (attention, mlp)]
    return modules + tuple((m._parameters, name, m._parameters.get(name)) for m in leaves for name in ("weight", "bias"))
