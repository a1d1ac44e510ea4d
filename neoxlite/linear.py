"""The model's linear layer: nn.Linear, with CPU calls of a few rows sent to neoxlite's kernels.

At batch 1 a decode step is a chain of matrix-vector products and its speed is how fast the weights stream from
memory. PyTorch's bf16 path (oneDNN) reaches about 60% of the machine's read bandwidth on them; the kernel in
neoxlite/csrc/linear_bf16.c reaches about 95% (bench/decode.py). In fp32, neoxlite/csrc/linear_f32.c reads
about an eighth faster than MKL's GEMV for up to four rows. Both read the ordinary row-major weight, so the
parameter, state_dict(), .to() and saving are untouched. Results are nn.Linear's up to the order of the fp32
sums (in bf16, the same single rounding); tests/test_cpu_kernels.py checks them. Everything else (other dtypes
and devices, many rows as in a prefill, autograd) is nn.Linear's own forward.
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from neoxlite.cpu_kernels import BF16Kernel, DecodeCall, bf16_kernel


@runtime_checkable
class DecodeLinear(Protocol):
    """A linear layer the direct decode step (neoxlite.cpu_step.decode_step) can call without a module
    call: this Linear, and the quantized layers of neoxlite.quant."""

    def decode_call(self, dtype: torch.dtype, gelu: bool = False,
                    any_rows: bool = False) -> DecodeCall | None:
        """A function call(x, out=None) computing the layer (then F.gelu with `gelu`) on contiguous CPU inputs of
        `dtype` with as many rows as the bf16 kernel serves, with the same bits as the layer's forward, into `out`
        when given (cpu_kernels.DecodeCall); None where a kernel does not compute it. With `any_rows` (rows of
        independent sequences) one engine computes every batch size, so each row gets the bits it gets alone."""
        ...


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel_for(x)
        return kernel.linear(x, self.weight, self.bias) if kernel else F.linear(x, self.weight, self.bias)

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """self(x) for rows of independent sequences (continuous batching): the kernel at any number of rows, as
        it computes each row alone, so each row gets the bits it gets in a batch of one."""
        kernel = self._kernel_for(x, any_rows=True)
        return kernel.linear(x, self.weight, self.bias) if kernel else F.linear(x, self.weight, self.bias)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """F.gelu(self(x)), fused into the kernel call where the kernel runs."""
        kernel = self._kernel_for(x)
        return kernel.linear(x, self.weight, self.bias, gelu=True) if kernel else F.gelu(F.linear(x, self.weight,
                                                                                                  self.bias))

    def decode_call(self, dtype: torch.dtype, gelu: bool = False,
                    any_rows: bool = False) -> DecodeCall | None:
        """DecodeLinear.decode_call: the kernel on this layer's own parameters (one engine at every batch)."""
        kernel = bf16_kernel()
        if kernel is None or not self.kernel_ready() or self.weight.dtype is not dtype:
            return None
        return functools.partial(kernel.linear, weight=self.weight, bias=self.bias, gelu=gelu)

    def kernel_ready(self) -> bool:
        """The weights are in a form the kernel reads: bf16 or fp32, contiguous, in RAM."""
        weight, bias = self.weight, self.bias
        return (weight.dtype in _KERNEL_DTYPES and weight.is_cpu and weight.is_contiguous()
                and (bias is None or (bias.dtype is weight.dtype and bias.is_contiguous())))

    def _kernel_for(self, x: torch.Tensor, any_rows: bool = False) -> BF16Kernel | None:
        weight, bias = self.weight, self.bias
        if (x.dtype is weight.dtype and x.is_cpu and self.kernel_ready()
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                   or (bias is not None and bias.requires_grad)))):
            kernel = bf16_kernel()
            rows = kernel.rows_for(x.dtype) if kernel is not None else 0
            if rows and (any_rows or x.numel() <= rows * weight.shape[1]):
                return kernel
        return None


_KERNEL_DTYPES = (torch.bfloat16, torch.float32)
