"""A static KV cache: fixed-shape buffers allocated once per generation, filled in place."""

from __future__ import annotations

import torch

from neoxlite.config import GPTNeoXConfig


class StaticCache:
    """Keys and values of every layer, (B, heads, max_length, head_size) each, on the compute device."""

    def __init__(self, config: GPTNeoXConfig, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (batch_size, config.num_attention_heads, max_length, config.head_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_length = max_length
        self.length = 0  # tokens already stored; the model advances it after each forward

    @staticmethod
    def nbytes(config: GPTNeoXConfig, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        """Bytes the cache takes, for memory planning before it exists."""
        per_layer = 2 * batch_size * config.num_attention_heads * max_length * config.head_size * dtype.itemsize
        return per_layer * config.num_hidden_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this step's k, v after the cached ones and returns views of everything so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps only the given batch rows (drops finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
