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

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> StaticCache:
        """A cache over existing buffers (views of a SlotCache's slot) that already hold `length` tokens."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = keys, values
        cache.max_length = keys[0].shape[2]
        cache.length = length
        return cache


class SlotCache:
    """Keys and values for continuous batching: (slots, heads, max_length, head_size) per layer, allocated once.

    Each slot holds one sequence filled to its own length; a slot is reused when its sequence finishes. A prompt
    is prefilled into a slot through `slot()` (a batch-of-one StaticCache over that slot's buffers, so prefill
    is exactly the ordinary forward), and the decode steps of all running slots go through `step()`.
    """

    def __init__(self, config: GPTNeoXConfig, slots: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        buffers = StaticCache(config, slots, max_length, dtype, device)  # one row of buffers per slot
        self.keys, self.values = buffers.keys, buffers.values
        self.slots = slots
        self.max_length = max_length

    def slot(self, slot: int, length: int) -> StaticCache:
        """Slot `slot` as a StaticCache of batch one that already holds `length` tokens (views, no copy)."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} is outside the cache's {self.slots} slots")
        return StaticCache.over([k[slot:slot + 1] for k in self.keys], [v[slot:slot + 1] for v in self.values], length)

    def step(self, rows: list[int], positions: list[int]) -> RowStep:
        """One decode step: row b's new token goes to position positions[b] of slot rows[b]."""
        if len(set(rows)) != len(rows) or len(rows) != len(positions):
            raise ValueError(f"each row needs its own slot and one position: rows {rows}, positions {positions}")
        for slot, position in zip(rows, positions, strict=True):
            if not (0 <= slot < self.slots and 0 <= position < self.max_length):
                raise IndexError(f"slot {slot} position {position} is outside the cache "
                                 f"({self.slots} slots of {self.max_length} positions)")
        device = self.keys[0].device
        return RowStep(self, rows, positions, torch.tensor(rows, device=device),
                       torch.tensor(positions, device=device))


class RowStep:
    """A decode step over independent rows of a SlotCache: row b writes its new k, v at positions[b] of slot
    rows[b] and attends to that slot's positions 0..positions[b] only (no padding, no shared offset)."""

    def __init__(self, cache: SlotCache, rows: list[int], positions: list[int], rows_tensor: torch.Tensor,
                 positions_tensor: torch.Tensor) -> None:
        self.cache = cache
        self.rows, self.positions = rows, positions  # Python ints: the per-row attention slices by them
        self.rows_tensor, self.positions_tensor = rows_tensor, positions_tensor  # (B,) int64 on the cache's device

    @property
    def keys(self) -> list[torch.Tensor]:
        return self.cache.keys

    @property
    def values(self) -> list[torch.Tensor]:
        return self.cache.values

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Writes k, v (B, heads, 1, hs) at each row's slot and position; returns each row's (1, heads, length, hs)
        keys and values so far."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        # advanced indices around a slice: the indexed view is (B, heads, hs)
        keys[self.rows_tensor, :, self.positions_tensor] = k[:, :, 0]
        values[self.rows_tensor, :, self.positions_tensor] = v[:, :, 0]
        return [(keys[s:s + 1, :, :p + 1], values[s:s + 1, :, :p + 1])
                for s, p in zip(self.rows, self.positions, strict=True)]
