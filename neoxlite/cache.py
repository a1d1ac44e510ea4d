"""A static KV cache: fixed-shape buffers allocated once per generation, filled in place."""

from __future__ import annotations

import torch

from neoxlite.config import GPTNeoXConfig


class StaticCache:
    """Keys and values of every layer, (B, heads, max_length, head_size) each, on the compute device.

    Each forward writes its keys and values at positions held in a tensor (`begin`), with index_copy_, so a step
    reads no Python position and can be captured as a CUDA graph. What attention reads is either the filled part
    (`read_end` a Python int: the CPU step, whose kernels and slices take one, and prefill) or, with `fixed_shape`,
    the whole buffer under a mask the caller builds from the position tensor (the step a CUDA graph captures:
    one shape for every step).
    """

    def __init__(self, config: GPTNeoXConfig, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, fixed_shape: bool = False) -> None:
        shape = (batch_size, config.num_attention_heads, max_length, config.head_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_length = max_length
        self.length = 0  # tokens already stored by forward() (the CPU step and prefill; the fixed step keeps none)
        self.fixed_shape = fixed_shape
        self.write_positions = torch.zeros(1, dtype=torch.long, device=device)  # where this forward writes
        self.read_end: int | None = None  # how much attention reads; None: all of it (fixed_shape)

    @staticmethod
    def nbytes(config: GPTNeoXConfig, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        """Bytes the cache takes, for memory planning before it exists."""
        per_layer = 2 * batch_size * config.num_attention_heads * max_length * config.head_size * dtype.itemsize
        return per_layer * config.num_hidden_layers

    def begin(self, write_positions: torch.Tensor, read_end: int | None) -> None:
        """The next forward writes at `write_positions` ((T,) int64 on the cache's device) and attends to the
        first `read_end` positions (None: the whole buffer)."""
        self.write_positions, self.read_end = write_positions, read_end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this step's k, v (B, heads, T, hs) at the write positions and returns what attention reads."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, self.write_positions, k)
        values.index_copy_(2, self.write_positions, v)
        if self.read_end is None:
            return keys, values
        return keys[:, :, :self.read_end], values[:, :, :self.read_end]

    def reset(self) -> None:
        """Empties the cache for another generation of the same shape (a captured step keeps its buffers)."""
        for buffer in (*self.keys, *self.values):
            buffer.zero_()
        self.length = 0

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
        cache.fixed_shape = False
        cache.write_positions = torch.zeros(1, dtype=torch.long, device=keys[0].device)
        cache.read_end = None
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
