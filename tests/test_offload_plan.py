"""Budget parsing and the placement planner (pure functions: no model, no files)."""

from __future__ import annotations

import random

import pytest
import torch

from neoxlite.offload.budget import format_size, parse_size, resolve_budgets
from neoxlite.offload.planner import CPU, DISK, GPU, BudgetTooSmall, Links, Plan, activation_bytes, plan

GiB, MiB = 2**30, 2**20


# ------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * GiB), ("6GB", 6 * 10**9), ("512MiB", 512 * MiB), ("1.5 GiB", int(1.5 * GiB)),
    ("100", 100), ("2g", 2 * GiB), ("10 kb", 10_000), ("0", 0), (" 3 TiB ", 3 * 2**40), ("1.5e0GB", None),
    (4096, 4096), (1e9, 10**9),
])
def test_parse_size(text, expected):
    if expected is None:
        with pytest.raises(ValueError, match="not a size"):
            parse_size(text)
    else:
        assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["six GiB", "6 GiBs", "GiB", "-1GB", "", "6 parsecs", -5, "\u0663GiB", "\uff16GB"])
def test_parse_size_rejects_with_a_clear_message(bad):
    with pytest.raises(ValueError, match="cpu_memory"):
        parse_size(bad, name="cpu_memory")


def test_parse_size_types():
    assert parse_size(None) is None
    with pytest.raises(TypeError):
        parse_size(True)
    with pytest.raises(TypeError):
        parse_size([1])


def test_resolve_budgets_defaults_and_errors(monkeypatch, caplog):
    budgets = resolve_budgets(compute_device="cpu")
    assert budgets.cpu > 0 and budgets.gpu == 0 and budgets.offload_dir is None
    assert not budgets.cpu_from_user
    budgets = resolve_budgets(cpu_memory="1GiB", offload_dir="/x")
    assert budgets.cpu == GiB and budgets.cpu_from_user and budgets.offload_dir == "/x"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, and yet a CPU model: contradictory
    with pytest.raises(ValueError, match="gpu_memory"):
        resolve_budgets(gpu_memory="4GiB", compute_device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: ignored, as transformers does
    with caplog.at_level("WARNING", logger="neoxlite"):
        assert resolve_budgets(gpu_memory="4GiB", compute_device="cpu").gpu == 0
    assert "gpu_memory='4GiB' ignored: this machine has no CUDA device" in caplog.text


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(3 * GiB) == "3.00 GiB"


# ------------------------------------------------------------------------------------------ plans
def blocks_of(layers: int = 8, layer: int = 100 * MiB, embed: int = 200 * MiB, head: int = 200 * MiB) -> dict[str, int]:
    return {"embed_in": embed, **{f"layers.{i}": layer for i in range(layers)}, "head": head}


ROW = 4096  # bytes of one embedding row


def cpu_plan(cpu: int, offload_dir: str | None = "/offload", **kw) -> Plan:
    kw.setdefault("blocks", blocks_of())
    return plan(kv_cache_bytes=kw.pop("kv", 10 * MiB), workspace_bytes=kw.pop("ws", 5 * MiB), gpu_memory=None,
                cpu_memory=cpu, offload_dir=offload_dir, compute=CPU, gathered={"embed_in": ROW}, **kw)


def gpu_plan(gpu: int, cpu: int, offload_dir: str | None = "/offload", **kw) -> Plan:
    kw.setdefault("blocks", blocks_of())
    return plan(kv_cache_bytes=kw.pop("kv", 10 * MiB), workspace_bytes=kw.pop("ws", 5 * MiB), gpu_memory=gpu,
                cpu_memory=cpu, offload_dir=offload_dir, compute=GPU, gathered={"embed_in": ROW}, **kw)


def check_invariants(p: Plan) -> None:
    assert list(p.homes) == list(p.block_bytes)
    for tier in (GPU, CPU):
        assert p.tier_bytes(tier) <= p.budgets[tier], (tier, p.explain())
    if p.offload_dir is None:
        assert not p.blocks_on(DISK)
    assert p.homes.get("head") in (p.compute, CPU)
    for block in p.streamed:
        assert p.block_bytes[block] <= p.slot_bytes
    if p.streamed:
        assert p.reserved[p.compute]["slots"] == p.slots * p.slot_bytes and p.slots >= 2


def test_everything_fits_nothing_moves():
    p = cpu_plan(8 * GiB)
    assert set(p.homes.values()) == {CPU}
    assert p.slots == 0 and p.streamed == [] and p.bytes_moved_per_step() == {}
    assert "nothing moves" in p.explain()
    check_invariants(p)


def test_cpu_only_streams_a_suffix_from_disk():
    p = cpu_plan(800 * MiB)
    check_invariants(p)
    layers = [p.homes[f"layers.{i}"] for i in range(8)]
    # head first, then a resident prefix of layers; the rest (and the row-read embedding) on disk
    assert p.homes["head"] == CPU and p.homes["embed_in"] == DISK
    assert layers == sorted(layers, key=lambda h: h != CPU) and CPU in layers and DISK in layers
    streamed_bytes = sum(p.block_bytes[b] for b in p.streamed)
    assert p.bytes_moved_per_step(1) == {"disk->cpu": streamed_bytes + ROW}
    assert p.bytes_moved_per_step(16)["disk->cpu"] == streamed_bytes + 16 * ROW
    # one transfer serves the whole batch: throughput grows with it
    assert p.tokens_per_second(16) > 10 * p.tokens_per_second(1)
    assert p.tokens_per_second(1) == pytest.approx(1 / (p.bytes_moved_per_step(1)["disk->cpu"] / Links().disk))


def test_gpu_fills_gpu_then_ram_then_disk():
    p = gpu_plan(gpu=700 * MiB, cpu=500 * MiB)
    check_invariants(p)
    order = [p.homes[f"layers.{i}"] for i in range(8)]
    rank = {GPU: 0, CPU: 1, DISK: 2}
    assert order == sorted(order, key=rank.get) and set(order) == {GPU, CPU, DISK}
    assert p.homes["head"] == GPU and p.homes["embed_in"] in (CPU, DISK)
    assert p.reserved[CPU]["staging"] == 2 * p.slot_bytes  # blocks from disk pass through pinned buffers
    moved = p.bytes_moved_per_step()
    disk = sum(p.block_bytes[b] for b in p.blocks_on(DISK) if b != "embed_in")
    assert moved["cpu->gpu"] == sum(p.block_bytes[b] for b in p.streamed) + ROW
    assert moved["disk->cpu"] == disk + (ROW if p.homes["embed_in"] == DISK else 0)
    text = p.explain()
    for word in ("gpu", "cpu", "disk", "tokens/s", "staging", "slots", "kv_cache"):
        assert word in text


def test_gpu_without_room_for_the_head_keeps_it_in_ram():
    p = gpu_plan(gpu=400 * MiB, cpu=4 * GiB, blocks=blocks_of(head=300 * MiB))
    check_invariants(p)
    assert p.homes["head"] == CPU and "head" not in p.streamed


def test_gpu_everything_in_ram_needs_no_staging():
    p = gpu_plan(gpu=300 * MiB, cpu=4 * GiB)
    check_invariants(p)
    assert not p.blocks_on(DISK) and "staging" not in p.reserved.get(CPU, {})


def test_small_slot_when_big_blocks_are_resident():
    blocks = {"embed_in": 10 * MiB, "layers.0": 300 * MiB, **{f"layers.{i}": 50 * MiB for i in range(1, 9)}, "head": 10 * MiB}
    p = cpu_plan(500 * MiB, blocks=blocks)
    check_invariants(p)
    assert p.homes["layers.0"] == CPU and p.slot_bytes == 50 * MiB


@pytest.mark.parametrize("compute", [CPU, GPU])
def test_impossible_budget_names_the_minimum(compute):
    make = (lambda b: cpu_plan(b)) if compute == CPU else (lambda b: gpu_plan(gpu=b, cpu=4 * GiB))
    name = "cpu_memory" if compute == CPU else "gpu_memory"
    with pytest.raises(BudgetTooSmall, match=f"{name}=.* is too small") as info:
        make(100 * MiB)
    assert info.value.budget == name
    minimum = info.value.minimum
    assert f"({minimum} bytes)" in str(info.value)
    check_invariants(make(minimum))  # the minimum the error names works ...
    with pytest.raises(ValueError):
        make(minimum - 1)  # ... and is the smallest
    # 2 slots + KV cache + workspace, and on CPU-only machines the head (it cannot stream)
    assert minimum == (200 * MiB if compute == CPU else 0) + 2 * 100 * MiB + 15 * MiB


def test_minimum_cpu_for_staging_on_gpu_machines():
    with pytest.raises(ValueError, match="cpu_memory=.* is too small.*staging") as info:
        gpu_plan(gpu=700 * MiB, cpu=50 * MiB)
    assert "smallest cpu_memory that fits is 200.00 MiB" in str(info.value)


def test_without_offload_dir_everything_must_fit():
    with pytest.raises(ValueError, match="offload dir") as info:
        cpu_plan(GiB, offload_dir=None)
    # all blocks + KV + workspace
    assert "smallest cpu_memory that fits is" in str(info.value)
    assert str(sum(blocks_of().values()) + 15 * MiB) in str(info.value)


def test_kv_cache_alone_too_big():
    with pytest.raises(ValueError, match="KV cache"):
        cpu_plan(GiB, kv=2 * GiB)


def test_bad_arguments():
    with pytest.raises(ValueError, match="compute"):
        plan({}, kv_cache_bytes=0, workspace_bytes=0, gpu_memory=None, cpu_memory=0, offload_dir=None, compute="tpu")
    with pytest.raises(ValueError, match="slots"):
        cpu_plan(GiB, slots=1)
    with pytest.raises(ValueError, match="gathered"):
        plan({"a": 1}, kv_cache_bytes=0, workspace_bytes=0, gpu_memory=None, cpu_memory=10, offload_dir=None,
             compute=CPU, gathered={"b": 1})


def test_random_budgets_keep_the_invariants():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        blocks = blocks_of(n, layer=rng.randint(1, 100) * MiB, embed=rng.randint(1, 100) * MiB,
                           head=rng.randint(1, 100) * MiB)
        compute = rng.choice([CPU, GPU])
        kw = dict(kv=rng.randint(0, 50) * MiB, ws=rng.randint(0, 10) * MiB, blocks=blocks,
                  offload_dir=rng.choice([None, "/offload"]))
        cpu = rng.randint(0, 2000) * MiB
        try:
            p = cpu_plan(cpu, **kw) if compute == CPU else gpu_plan(rng.randint(0, 2000) * MiB, cpu, **kw)
        except ValueError as err:
            assert "smallest" in str(err) or "does not help" in str(err)
            continue
        check_invariants(p)


def test_activation_bytes_grow_with_batch_and_prompt():
    kw = dict(hidden_size=2048, intermediate_size=8192, num_heads=16, vocab_size=50304, dtype_bytes=2)
    decode = activation_bytes(batch=1, tokens=1, context=64, **kw)
    assert decode < activation_bytes(batch=4, tokens=1, context=64, **kw)
    assert activation_bytes(batch=1, tokens=64, context=64, **kw) > 10 * decode


# ------------------------------------------------------------------------------------------ measured free memory
def _cgroup_files(tmp_path, proc_line: str, files: dict[str, str]) -> tuple[str, str]:
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    for rel, text in files.items():
        path = tmp_path / "sys" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(proc), str(tmp_path / "sys")


@pytest.mark.parametrize("proc_line,files,want", [
    # cgroup v2: limit less anonymous memory (page cache is reclaimable room)
    ("0::/job", {"job/memory.max": "3000000000\n", "job/memory.stat": "anon 1000000000\nfile 1500000000\n"},
     2_000_000_000),
    ("0::/job", {"job/memory.max": "max\n", "job/memory.stat": "anon 5\n"}, None),
    # v1, the container's own cgroup mounted at the root rather than at the host's path
    ("4:memory:/host/path/abc", {"memory/memory.limit_in_bytes": "2684354560\n",
                                  "memory/memory.stat": "cache 9\nrss 7\ntotal_rss 684354560\n"}, 2_000_000_000),
    ("4:memory:/", {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.stat": "total_rss 1\n"},
     None),
    ("4:memory:/x", {}, None),  # nothing readable
])
def test_cgroup_memory_room(tmp_path, proc_line, files, want):
    from neoxlite.offload.budget import cgroup_memory_room

    proc, root = _cgroup_files(tmp_path, proc_line, files)
    assert cgroup_memory_room(proc, root) == want


def test_free_cpu_memory_is_the_smaller_of_the_machine_and_the_cgroup(monkeypatch):
    import psutil

    from neoxlite.offload import budget

    available = psutil.virtual_memory().available
    monkeypatch.setattr(budget, "cgroup_memory_room", lambda: 2**30)
    assert budget.free_cpu_memory() == min(available, 2**30)
    monkeypatch.setattr(budget, "cgroup_memory_room", lambda: None)
    assert abs(budget.free_cpu_memory() - available) < 2**30  # (other processes move it a little)


def test_uncached_layers_keep_what_fits_the_page_cache_spread_out():
    from neoxlite.offload.scheduler import uncached_layers

    layers = [(3, 100), (4, 100), (5, 100), (6, 100)]
    assert uncached_layers(layers, None) == set()  # no limit known: the kernel decides
    assert uncached_layers(layers, 400) == set()  # all fit: nothing dropped
    assert uncached_layers(layers, 250) == {3, 5}  # two stay cached, spread among those read from disk
    assert uncached_layers(layers, 0) == {3, 4, 5, 6}
    many = [(i, 96) for i in range(18)]
    assert sorted(uncached_layers(many, 9 * 96)) == list(range(0, 18, 2))  # every other one
