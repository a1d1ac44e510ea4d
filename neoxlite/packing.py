"""bf16 linear layers on the CPU with their weights in oneDNN's blocked layout.

At batch 1 a decode step is a chain of matrix-vector products; PyTorch's default bf16 kernel reads a plain
row-major weight at about half the speed oneDNN reaches on the same weight reordered once into its blocked
layout (bench/decode.py measures the effect). The results are the same bits as nn.Linear (fp32 accumulation,
one rounding; tests/test_packing.py checks it), the reordered copy replaces the plain one (no extra memory),
and state_dict(), save_pretrained() and .to()/.half()/.cuda() see a plain weight again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Linear):
    """nn.Linear whose weight lives in oneDNN's layout until something needs the plain tensor."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.weight_packed: torch.Tensor | None = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.register_parameter("weight", None)
        self._register_state_dict_hook(_plain_weight_in_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")

    def unpack(self) -> None:
        """Back to a plain weight Parameter (before moving, casting or training)."""
        if self.weight_packed is not None:
            self.weight = nn.Parameter(self.weight_packed.to_dense(), requires_grad=False)
            self.weight_packed = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> PackedLinear:
        self.unpack()
        return super()._apply(fn, *args, **kwargs)

    def packed_nbytes(self) -> int:
        w = self.weight_packed
        return 0 if w is None else w.numel() * w.element_size()

    def extra_repr(self) -> str:
        return super().extra_repr() + (", packed" if self.weight_packed is not None else "")


def _plain_weight_in_state_dict(module: PackedLinear, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    if module.weight_packed is not None:
        state[prefix + "weight"] = module.weight_packed.to_dense()


def pack_linears(model: nn.Module) -> int:
    """Replaces every plain bf16 CPU nn.Linear of the layers and the LM head; returns how many were packed."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and packing_available(child.weight.dtype, child.weight.device):
                if any(child.weight is p for p in _shared_parameters(model, child)):
                    continue  # a tied weight must stay one plain tensor
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def _shared_parameters(model: nn.Module, linear: nn.Linear) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
