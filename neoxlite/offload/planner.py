"""Placement planning: which tier (GPU memory, CPU RAM, disk) is each block's home.

`plan()` is a pure function of sizes and budgets: no torch state, no files. It answers

- where each block lives ("gpu", "cpu" or "disk"),
- how many bytes each tier holds (weights, KV cache, activation workspace, transfer slots),
- how many bytes cross each link per generated token, and the tokens/s those links allow,
- or, when no placement fits, a ValueError naming what does not fit and the smallest budget that would.

Rules (why they are what they are):

- The compute tier (GPU on CUDA machines, else CPU RAM) first holds the KV cache and the activation
  workspace; they are needed at every step and cannot be streamed.
- If any block has to be streamed, the compute tier also holds `slots` transfer slots, each the size of the
  largest streamed block: one holds the block being computed, the other receives the next one.
- `embed_in` is read by rows (one row per token), so it never travels whole: it takes whatever room the
  head and layers leave, on the compute tier, else in CPU RAM, else on disk (a few KiB of rows per token
  are cheap to read from any of them). When the embedding is tied to the output head it is a whole-matrix
  block like any other.
- `head` (final norm + output projection) runs where it lives: the model moves the hidden state to it.
  It is a whole-matrix read every token, so it comes first for the compute tier; it cannot live on disk
  (nothing streams it), so without room on the compute tier it lives in CPU RAM.
- Layers fill the fastest tier in model order: a resident prefix gives the scheduler time to bring the
  first streamed layer in while the prefix computes. What does not fit on the compute tier goes to CPU RAM
  (GPU machines), then to disk.
- On GPU machines, blocks streamed from disk pass through `slots` pinned CPU staging buffers, counted
  against the CPU budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from neoxlite.offload.budget import format_size

GPU, CPU, DISK = "gpu", "cpu", "disk"
EMBED, HEAD = "embed_in", "head"
DEFAULT_SLOTS = 2


class BudgetTooSmall(ValueError):
    """No placement fits; `budget` ("gpu_memory" or "cpu_memory") needs at least `minimum` bytes
    (None when no amount of that budget would do, e.g. without an offload dir)."""

    def __init__(self, message: str, budget: str, minimum: int | None) -> None:
        super().__init__(message)
        self.budget = budget
        self.minimum = minimum


class _Misfit(NamedTuple):
    """A failed placement: the tier that is too small and why."""

    tier: str
    reason: str


@dataclass(frozen=True)
class Links:
    """Sustained bandwidths in bytes/s, for the speed estimate only (placement does not depend on them).

    Defaults are typical figures: PCIe 4.0 x16 with pinned memory, an NVMe SSD, DDR4/DDR5 dual channel,
    and HBM on a data-centre GPU. `neoxlite plan` prints which figures it used.
    """

    pcie: float = 20e9
    disk: float = 2e9
    cpu_memory: float = 20e9
    gpu_memory: float = 1.5e12


class Bound(NamedTuple):
    """A lower bound on a decoding step's time from one resource: the bytes it must carry, each part at its
    bandwidth (bytes/s), e.g. ((1.7 GiB, 20e9, "PCIe"),)."""

    resource: str
    parts: tuple[tuple[int, float, str], ...]

    @property
    def seconds(self) -> float:
        return sum(n / bandwidth for n, bandwidth, _ in self.parts)


@dataclass(frozen=True)
class Plan:
    homes: dict[str, str]                 # block -> "gpu" | "cpu" | "disk", in model order
    block_bytes: dict[str, int]           # block -> bytes in final (cast or quantized) form
    compute: str                          # "gpu" or "cpu": the tier that runs the layers
    budgets: dict[str, int]               # "gpu" / "cpu" -> budget in bytes
    offload_dir: str | None               # the disk tier (None: no disk tier)
    reserved: dict[str, dict[str, int]]   # tier -> {"kv_cache"|"workspace"|"slots"|"staging": bytes}
    slot_bytes: int                       # size of one transfer slot (0 when nothing streams)
    slots: int                            # number of transfer slots (0 when nothing streams)
    gathered: dict[str, int] = field(default_factory=dict)  # block -> bytes read per token (row reads)
    links: Links = field(default_factory=Links)

    # ------------------------------------------------------------------ accounting
    def blocks_on(self, tier: str) -> list[str]:
        return [b for b, home in self.homes.items() if home == tier]

    def weight_bytes(self, tier: str) -> int:
        return sum(self.block_bytes[b] for b in self.blocks_on(tier))

    def tier_bytes(self, tier: str) -> int:
        """Everything the plan puts on a tier: weights plus its reservations."""
        return self.weight_bytes(tier) + sum(self.reserved.get(tier, {}).values())

    @property
    def streamed(self) -> list[str]:
        """Blocks that travel whole to the compute tier at every forward pass, in model order."""
        return [b for b, home in self.homes.items()
                if home != self.compute and b not in self.gathered and b != HEAD]

    def bytes_moved_per_step(self, batch: int = 1) -> dict[str, int]:
        """Bytes over each link for one decoding step of `batch` sequences (one new token each)."""
        moved = {"disk->cpu": 0, "cpu->gpu": 0}
        for block in self.streamed:
            if self.homes[block] == DISK:
                moved["disk->cpu"] += self.block_bytes[block]
            if self.compute == GPU:
                moved["cpu->gpu"] += self.block_bytes[block]
        for block, row_bytes in self.gathered.items():
            if self.homes[block] == DISK:
                moved["disk->cpu"] += row_bytes * batch
            if self.compute == GPU and self.homes[block] != GPU:
                moved["cpu->gpu"] += row_bytes * batch
        return {link: n for link, n in moved.items() if n}

    def bounds(self, batch: int = 1) -> list[Bound]:
        """Lower bounds on one decoding step's time, one per resource, with the bytes and bandwidth behind each.

        Transfers overlap with compute (that is what the scheduler's prefetch is for), so each resource is a
        separate bound: link bytes / link bandwidth, and weight bytes / the computing tier's memory bandwidth
        (decoding reads every weight once per step). Compute, kernel launches and Python come on top.
        """
        moved = self.bytes_moved_per_step(batch)
        bounds = []
        if moved.get("disk->cpu"):
            bounds.append(Bound("disk read", ((moved["disk->cpu"], self.links.disk, "disk"),)))
        if moved.get("cpu->gpu"):
            bounds.append(Bound("PCIe", ((moved["cpu->gpu"], self.links.pcie, "PCIe"),)))
        gpu = self.compute == GPU
        computed = {b: n for b, n in self.block_bytes.items() if b not in self.gathered}
        # The head runs where it lives: on a GPU machine it may be in RAM, read at CPU memory speed.
        in_ram = computed.pop(HEAD) if gpu and self.homes.get(HEAD) == CPU else 0
        parts = [(sum(computed.values()), self.links.gpu_memory if gpu else self.links.cpu_memory,
                  "GPU memory" if gpu else "CPU memory")]
        if in_ram:
            parts.append((in_ram, self.links.cpu_memory, "CPU memory, the head"))
        bounds.append(Bound("memory bandwidth", tuple(parts)))
        return bounds

    def seconds_per_step(self, batch: int = 1) -> dict[str, float]:
        """The bounds of `bounds()` as seconds, by resource."""
        return {bound.resource: bound.seconds for bound in self.bounds(batch)}

    def tokens_per_second(self, batch: int = 1) -> float:
        """Tokens/s the slowest resource allows (the whole batch shares each block transfer)."""
        step = max(self.seconds_per_step(batch).values())
        return float("inf") if step == 0 else batch / step

    def explain(self, batch: int = 1) -> str:
        """Human-readable placement, bytes per tier, and what one decoding step of `batch` sequences moves and
        reads, as upper bounds on tokens/s with the bytes and bandwidths behind them."""
        lines = [f"compute on: {self.compute.upper()}"]
        if self.slots:
            lines[0] += f"   transfer slots: {self.slots} x {format_size(self.slot_bytes)}"
        lines.append("placement:")
        for tier in (GPU, CPU, DISK):
            blocks = self.blocks_on(tier)
            if blocks:
                lines.append(f"  {tier:<5} {_ranges(blocks)}")
        lines.append("bytes per tier:")
        for tier in (GPU, CPU, DISK):
            if tier == GPU and self.compute != GPU or tier == DISK and self.offload_dir is None:
                continue
            parts = [f"weights {format_size(self.weight_bytes(tier))}"]
            parts += [f"{name} {format_size(n)}" for name, n in self.reserved.get(tier, {}).items() if n]
            limit = f"in {self.offload_dir}" if tier == DISK else f"budget {format_size(self.budgets[tier])}"
            lines.append(f"  {tier:<5} {format_size(self.tier_bytes(tier)):>11} ({limit}): " + ", ".join(parts))
        moved = self.bytes_moved_per_step(batch)
        moved_text = ", ".join(f"{link} {format_size(n)}" for link, n in moved.items()) or "nothing moves"
        lines.append(f"one decoding step at batch {batch} (a new token for each sequence; the batch shares each "
                     f"weight read): {moved_text}")
        for bound in sorted(self.bounds(batch), key=lambda b: -b.seconds):
            rate = float("inf") if bound.seconds == 0 else batch / bound.seconds
            reads = " + ".join(f"{format_size(n)} read per step at {bw / 1e9:,.4g} GB/s ({where})"
                               for n, bw, where in bound.parts)
            lines.append(f"  at most {rate:,.1f} tokens/s ({bound.resource} bound): {reads}")
        lines.append("  (bounds from bandwidth alone: the slowest sets the pace, and the arithmetic, kernel launches "
                     "and Python come on top)")
        links = self.links
        lines.append(f"bandwidths assumed: disk {links.disk / 1e9:,.4g} GB/s, PCIe {links.pcie / 1e9:,.4g} GB/s, "
                     f"CPU memory {links.cpu_memory / 1e9:,.4g} GB/s, GPU memory {links.gpu_memory / 1e9:,.4g} GB/s")
        return "\n".join(lines)


def _ranges(blocks: list[str]) -> str:
    """'layers.0', 'layers.1', 'layers.2', 'head' -> 'layers.0-2, head'."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(f"layers.{run[0]}" if len(run) == 1 else f"layers.{run[0]}-{run[-1]}")
            run.clear()

    for block in blocks:
        if block.startswith("layers."):
            index = int(block.split(".")[1])
            if run and index != run[-1] + 1:
                flush()
            run.append(index)
        else:
            flush()
            out.append(block)
    flush()
    return ", ".join(out)


def activation_bytes(*, hidden_size: int, intermediate_size: int, num_heads: int, vocab_size: int,
                     batch: int, tokens: int, context: int, dtype_bytes: int) -> int:
    """Peak activation memory of one forward over `tokens` new tokens per sequence (prefill is the peak).

    Counts the residual stream and a layer's intermediates (qkv, attention output, MLP up-projection and its
    activation), the attention kernel's float32 score tiles (PyTorch's flash/memory-efficient kernels, masked or
    not, work through the context in blocks of about 128 keys per query; measured on the CPU), and float32
    logits of the last position (generation keeps only those).
    """
    bt = batch * tokens
    layer = bt * (6 * hidden_size + 2 * intermediate_size) * dtype_bytes
    scores = batch * num_heads * tokens * min(context, 128) * 4 if tokens > 1 else 0
    logits = batch * vocab_size * (4 + dtype_bytes)
    return layer + scores + logits


def plan(
    blocks: Mapping[str, int],
    *,
    kv_cache_bytes: int,
    workspace_bytes: int,
    gpu_memory: int | None,
    cpu_memory: int,
    offload_dir: str | None,
    compute: str,
    gathered: Mapping[str, int] | None = None,
    slots: int = DEFAULT_SLOTS,
    links: Links | None = None,
) -> Plan:
    """Places every block; raises ValueError with the smallest workable budget when nothing fits.

    blocks: block name -> bytes in final form, in model order ("embed_in", "layers.0", ..., "head").
    gathered: blocks read by rows -> bytes read per token (e.g. {"embed_in": hidden_size * itemsize});
        pass {} when the embedding is tied to the head.
    compute: "gpu" or "cpu". gpu_memory is ignored (may be None) when compute is "cpu".
    """
    if compute not in (GPU, CPU):
        raise ValueError(f"compute={compute!r}: expected 'gpu' or 'cpu'")
    if compute == GPU and gpu_memory is None:
        raise ValueError("compute='gpu' needs gpu_memory (bytes)")
    if slots < 2:
        raise ValueError(f"slots={slots}: streaming needs at least 2 (one computing, one arriving)")
    for name, n in blocks.items():
        if n < 0:
            raise ValueError(f"block {name} has negative size {n}")
    gathered = dict(gathered or {})
    unknown = sorted(set(gathered) - set(blocks))
    if unknown:
        raise ValueError(f"gathered names blocks that are not in blocks: {unknown}")
    budgets = {GPU: (gpu_memory or 0) if compute == GPU else 0, CPU: cpu_memory}

    def attempt(b: dict[str, int]) -> Plan | _Misfit:
        return _place(b, offload_dir, blocks=dict(blocks), kv=kv_cache_bytes, ws=workspace_bytes,
                      gathered=gathered, compute=compute, slots=slots, links=links or Links())

    result = attempt(budgets)
    if isinstance(result, Plan):
        return result
    # Nothing fits: name the tier that failed and search the smallest budget for it that would work with the
    # other budgets as given (placement only improves as a budget grows, so bisection finds the minimum).
    tier, reason = result
    name = "gpu_memory" if tier == GPU else "cpu_memory"
    disk_hint = " Give an offload dir (offload_dir= / --offload-dir) so blocks can live on disk." if offload_dir is None else ""
    hi = 2 * (sum(blocks.values()) + kv_cache_bytes + workspace_bytes) + 2**20
    if not isinstance(attempt({**budgets, tier: hi}), Plan):
        raise BudgetTooSmall(f"no placement fits: {reason}; more {name} alone does not help.{disk_hint}", name, None)
    lo = budgets[tier]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if isinstance(attempt({**budgets, tier: mid}), Plan):
            hi = mid
        else:
            lo = mid
    raise BudgetTooSmall(
        f"{name}={format_size(budgets[tier])} is too small: {reason}. The smallest {name} that fits is "
        f"{format_size(hi)} ({hi} bytes); or lower the batch size or context length.{disk_hint}",
        name, hi,
    )


def _place(budgets: dict[str, int], offload_dir: str | None, *, blocks: dict[str, int], kv: int, ws: int,
           gathered: dict[str, int], compute: str, slots: int, links: Links) -> Plan | _Misfit:
    """One placement attempt: a Plan, or (tier that is too small, why)."""
    if kv + ws > budgets[compute]:
        return _Misfit(compute, f"the KV cache ({format_size(kv)}) and activation workspace ({format_size(ws)}) "
                                f"alone need {format_size(kv + ws)} on the {compute.upper()}")
    whole = [b for b in blocks if b not in gathered]
    streamable = [b for b in whole if b != HEAD]
    if sum(blocks[b] for b in whole) <= budgets[compute] - kv - ws or (compute == CPU and offload_dir is None):
        candidates = [0]  # nothing streams (or, on CPU machines without a disk tier, nothing could): no slots
    else:
        # Slot sizes from the largest streamable block down: a smaller slot leaves room for more resident
        # layers, and is valid when every block that ends up streamed fits in it.
        candidates = sorted({blocks[b] for b in streamable}, reverse=True) or [0]
    failure: _Misfit | None = None
    for slot in candidates:
        result = _fill(slot, budgets, offload_dir is not None, blocks=blocks, kv=kv, ws=ws, whole=whole,
                       gathered=gathered, compute=compute, slots=slots)
        if isinstance(result, _Misfit):
            failure = failure or result
            continue
        homes, reserved = result
        if any(blocks[b] > slot for b in streamable if homes[b] != compute):
            continue
        return Plan(homes={b: homes[b] for b in blocks}, block_bytes=dict(blocks), compute=compute,
                    budgets=dict(budgets), offload_dir=offload_dir, reserved=reserved,
                    slot_bytes=slot, slots=slots if slot else 0, gathered=dict(gathered), links=links)
    assert failure is not None, "the largest slot size cannot be too small"
    return failure


def _fill(slot: int, budgets: dict[str, int], has_disk: bool, *, blocks: dict[str, int], kv: int, ws: int,
          whole: list[str], gathered: dict[str, int], compute: str,
          slots: int) -> tuple[dict[str, str], dict[str, dict[str, int]]] | _Misfit:
    lower = CPU if compute == GPU else None  # RAM below the compute tier (GPU machines)
    room = dict(budgets)
    reserved: dict[str, dict[str, int]] = {compute: {"kv_cache": kv, "workspace": ws}}
    room[compute] -= kv + ws
    if slot:
        if slots * slot > room[compute]:
            return _Misfit(compute, f"{slots} transfer slots of {format_size(slot)} (the largest streamed block) "
                                    f"need {format_size(slots * slot)} besides the KV cache ({format_size(kv)}) "
                                    f"and workspace ({format_size(ws)})")
        reserved[compute]["slots"] = slots * slot
        room[compute] -= slots * slot
    homes: dict[str, str] = {}

    def put(block: str, tier: str) -> None:
        homes[block] = tier
        if tier != DISK:
            room[tier] -= blocks[block]

    # Compute tier: the head first (read whole every step, and it cannot stream), then layers in order.
    for block in sorted(whole, key=lambda b: b != HEAD):
        if blocks[block] <= room[compute]:
            put(block, compute)
    if HEAD in whole and HEAD not in homes:
        if lower is None or blocks[HEAD] > room[lower]:
            tier = lower or compute
            return _Misfit(tier, f"the head ({format_size(blocks[HEAD])}) must stay in {tier.upper()} memory "
                                 "(it is not streamed) and does not fit")
        put(HEAD, lower)
    rest = [b for b in whole if b not in homes]
    if lower is not None and rest:
        # GPU machine: layers that stream go to CPU RAM in order; if some must go on to disk, the pinned
        # staging buffers they pass through are reserved first.
        if has_disk and sum(blocks[b] for b in rest) > room[lower]:
            if slots * slot > room[lower]:
                return _Misfit(lower, f"{slots} pinned staging buffers of {format_size(slot)} for blocks read "
                                      f"from disk need {format_size(slots * slot)} of CPU RAM")
            reserved[lower] = {"staging": slots * slot}
            room[lower] -= slots * slot
        for block in rest:
            if blocks[block] <= room[lower]:
                put(block, lower)
        rest = [b for b in rest if b not in homes]
    if rest:
        if not has_disk:
            tier = lower or compute
            return _Misfit(tier, f"{_ranges(rest)} ({format_size(sum(blocks[b] for b in rest))}) do not fit in memory")
        for block in rest:
            put(block, DISK)
    # Row-read blocks take what room is left: compute tier, then RAM, then disk (a few KiB per token).
    for block in gathered:
        tier = next((t for t in (compute, lower) if t is not None and blocks[block] <= room[t]), None)
        if tier is None:
            if not has_disk:
                tier = lower or compute
                return _Misfit(tier, f"{block} ({format_size(blocks[block])}) does not fit in memory")
            tier = DISK
        put(block, tier)
    return homes, reserved
