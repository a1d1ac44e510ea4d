"""Offloaded models compute exactly what resident ones do, hold their budgets, and reject bad input clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from neoxlite.model import GPTNeoXForCausalLM
from neoxlite.offload.placement import (
    Workload,
    final_block_sizes,
    plan_model,
    quantized_linear_bytes,
)
from neoxlite.offload.planner import BudgetTooSmall
from neoxlite.offload.scheduler import (
    DiskSource,
    HostSource,
    Layout,
    OffloadScheduler,
    RowReadEmbedding,
    block_state,
    pack,
)
from neoxlite.offload.store import BlockStore, list_stores

CONFIG = dict(num_hidden_layers=6)
PROMPTS = torch.tensor([[5, 17, 3, 44, 9, 12], [0, 0, 7, 8, 91, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def load(folder: Path, dtype: torch.dtype, **budgets) -> GPTNeoXForCausalLM:
    """from_pretrained with offload budgets (max_context small, so tiny budgets mean something)."""
    return GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype, progress=False, max_context=32, max_batch_size=2,
                                              **budgets)


def generate(model: GPTNeoXForCausalLM) -> torch.Tensor:
    return model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=10)


def homes(model) -> dict[str, str]:
    return dict(model.offload_plan.homes)


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint(**CONFIG)[0]


def layer_budget(folder: Path, dtype: torch.dtype, resident_layers: int) -> int:
    """A CPU budget with room for the head, KV cache, workspace, two slots and `resident_layers` layers."""
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(_config(folder))
    plan = plan_model(model, dtype=dtype, device="cpu", cpu_memory=1 << 40, offload_dir=None,
                      workload=Workload(2, 32))
    reserved = plan.reserved["cpu"]["kv_cache"] + plan.reserved["cpu"]["workspace"]
    layer = plan.block_bytes["layers.0"]
    spare = plan.block_bytes["embed_in"] // 2  # too little for the embedding: it goes to disk, read by rows
    return reserved + plan.block_bytes["head"] + (2 + resident_layers) * layer + spare


def _config(folder: Path):
    from neoxlite.config import GPTNeoXConfig

    return GPTNeoXConfig.from_json_file(folder / "config.json")


# ------------------------------------------------------------------------------------------ same tokens
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("placement", ["half on disk", "all on disk"])
def test_tokens_identical_whatever_the_placement(ckpt, tmp_path, dtype, placement):
    want = generate(load(ckpt, dtype))  # everything resident
    budget = layer_budget(ckpt, dtype, 3 if placement == "half on disk" else 0)
    model = load(ckpt, dtype, cpu_memory=budget, offload_dir=tmp_path)
    where = homes(model)
    layers = [where[f"layers.{i}"] for i in range(6)]
    assert layers == (["cpu"] * 3 + ["disk"] * 3 if placement == "half on disk" else ["disk"] * 6)
    assert where["embed_in"] == "disk" and where["head"] == "cpu"
    assert isinstance(model.gpt_neox.embed_in, RowReadEmbedding)
    assert torch.equal(generate(model), want)
    assert torch.equal(generate(model), want)  # and again: the prefetch wrapped around correctly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_from_ram_and_disk_in_one_model(ckpt, tmp_path, dtype):
    """The RAM path of the scheduler (pinned RAM -> GPU slot on CUDA machines) run on the CPU."""
    want = generate(load(ckpt, dtype))
    model = load(ckpt, dtype)
    base = model.gpt_neox
    store = BlockStore(tmp_path, "0" * 64)
    sources = {}
    for i in (1, 3):
        state, quantized = block_state(base.layers[i])
        layout = Layout.of(state, quantized)
        data = torch.empty(layout.nbytes, dtype=torch.uint8)
        pack(state, data, layout)
        sources[i] = HostSource(layout, data)
    state, quantized = block_state(base.layers[2])
    entry = store.write("layers.2", state, quantized)
    sources[2] = DiskSource(Layout.of_entry(entry), entry)
    layer_cls = type(base.layers[0])
    base.scheduler = OffloadScheduler(base.layers, sources, make_layer=lambda: layer_cls(model.config).to(dtype),
                                      compute_device="cpu", slots=2, slot_bytes=max(s.layout.nbytes for s in sources.values()))
    for i in sources:
        base.layers[i] = torch.nn.Identity()  # nothing left behind: the scheduler must supply these
    assert base.scheduler.describe() == {0: "resident", 1: "ram", 2: "disk", 3: "ram", 4: "resident", 5: "resident"}
    assert torch.equal(generate(model), want)


def test_interrupted_forward_pass_recovers(ckpt, tmp_path):
    want = generate(load(ckpt, torch.float32))
    model = load(ckpt, torch.float32, cpu_memory=layer_budget(ckpt, torch.float32, 0), offload_dir=tmp_path)
    scheduler = model.gpt_neox.scheduler
    scheduler.fetch(0)
    scheduler.done(0)
    scheduler.fetch(1)  # a forward pass that dies here (no done(1))
    assert torch.equal(generate(model), want)
    scheduler.fetch(4)  # and one that jumps
    assert torch.equal(generate(model), want)


def test_quantized_linear_bytes_match_serialized_sizes():
    quant = pytest.importorskip("neoxlite.quant")
    pytest.importorskip("bitsandbytes")
    for spec in (quant.QuantSpec(mode="nf4"), quant.QuantSpec(mode="fp4", double_quant=False),
                 quant.QuantSpec(mode="int8")):
        for out_f, in_f in ((96, 64), (200, 130)):
            layer = quant.quantize_linear(torch.randn(out_f, in_f), torch.randn(out_f), spec, "cpu")
            actual = Layout.of(quant.quantized_state(layer)).nbytes  # as stored and moved: aligned tensors
            estimate = quantized_linear_bytes(out_f, in_f, spec, bias_bytes=out_f * 4)
            assert actual <= estimate <= actual + 256, (spec, out_f, in_f)


def test_final_block_sizes_match_a_loaded_model(ckpt):
    model = load(ckpt, torch.bfloat16)
    with torch.device("meta"):
        meta = GPTNeoXForCausalLM(model.config)
    base = model.gpt_neox
    head = {"final_layer_norm." + k: v for k, v in base.final_layer_norm.state_dict().items()}
    stored = {  # the bytes each block takes in a slot or a store file (every tensor aligned)
        "embed_in": Layout.of(base.embed_in.state_dict()).nbytes,
        **{f"layers.{i}": Layout.of(block_state(layer)[0]).nbytes for i, layer in enumerate(base.layers)},
        "head": Layout.of({**head, "embed_out.weight": model.embed_out.weight}).nbytes,
    }
    assert final_block_sizes(meta, torch.bfloat16) == stored
    assert all(0 <= stored[b] - raw < 256 * 16 for b, raw in model.block_sizes().items())  # padding is small


# ------------------------------------------------------------------------------------------ the disk store
def test_store_reused_and_corrupted_block_rebuilt(ckpt, tmp_path):
    budget = layer_budget(ckpt, torch.float32, 1)
    want = generate(load(ckpt, torch.float32))
    load(ckpt, torch.float32, cpu_memory=budget, offload_dir=tmp_path)
    (store,) = tmp_path.glob("neoxlite-*")
    files = sorted(store.glob("*.safetensors"))
    assert [f.name for f in files] == ["embed_in.safetensors"] + [f"layers.{i}.safetensors" for i in range(1, 6)]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    model = load(ckpt, torch.float32, cpu_memory=budget, offload_dir=tmp_path)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # reused, not rewritten
    del model
    victim = store / "layers.2.safetensors"
    with open(victim, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    model = load(ckpt, torch.float32, cpu_memory=budget, offload_dir=tmp_path)
    assert victim.stat().st_mtime_ns != stamps[victim]  # detected and rebuilt ...
    assert torch.equal(generate(model), want)  # ... not used
    manifest = json.loads((store / "manifest.json").read_text())
    assert set(manifest["blocks"]) == {"embed_in"} | {f"layers.{i}" for i in range(1, 6)}


def test_other_settings_get_another_store(ckpt, tmp_path):
    load(ckpt, torch.float32, cpu_memory=layer_budget(ckpt, torch.float32, 1), offload_dir=tmp_path)
    load(ckpt, torch.bfloat16, cpu_memory=layer_budget(ckpt, torch.bfloat16, 1), offload_dir=tmp_path)
    assert len(list(tmp_path.glob("neoxlite-*"))) == 2


# ------------------------------------------------------------------------------------------ bad input
def test_impossible_budget_names_the_minimum(ckpt, tmp_path):
    with pytest.raises(BudgetTooSmall, match=r"cpu_memory=.* is too small.*smallest cpu_memory that fits") as info:
        load(ckpt, torch.float32, cpu_memory="10KiB", offload_dir=tmp_path)
    load(ckpt, torch.float32, cpu_memory=info.value.minimum, offload_dir=tmp_path)
    with pytest.raises(ValueError, match="offload dir"):
        load(ckpt, torch.float32, cpu_memory=layer_budget(ckpt, torch.float32, 1))  # no disk tier


def test_bad_offload_dirs_and_sizes(ckpt, tmp_path):
    budget = layer_budget(ckpt, torch.float32, 1)
    load(ckpt, torch.float32, cpu_memory=budget, offload_dir=tmp_path / "missing" / "nested")  # created
    assert (tmp_path / "missing" / "nested").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):  # reported even when the plan needs no disk
        load(ckpt, torch.float32, cpu_memory="1GiB", offload_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="cpu_memory='lots' is not a size"):
        load(ckpt, torch.float32, cpu_memory="lots", offload_dir=tmp_path)


def test_gpu_budget_without_a_gpu_is_ignored_with_a_notice(ckpt, caplog, monkeypatch):
    if torch.cuda.is_available():  # with a GPU, a GPU budget for a CPU model is a contradiction
        with pytest.raises(ValueError, match="gpu_memory"):
            load(ckpt, torch.float32, gpu_memory="1GiB", device="cpu")
        return
    with caplog.at_level("WARNING", logger="neoxlite"):
        model = load(ckpt, torch.float32, gpu_memory="1GiB")
    assert model.device.type == "cpu"
    assert [r.getMessage() for r in caplog.records] == [
        "neoxlite: gpu_memory='1GiB' ignored: this machine has no CUDA device; the model runs on the CPU"]


def test_read_only_offload_dir(ckpt, tmp_path):
    from test_offload_store import read_only

    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro), pytest.raises(ValueError, match="not writable"):
        load(ckpt, torch.float32, cpu_memory=layer_budget(ckpt, torch.float32, 1), offload_dir=ro)


def test_row_read_embedding_matches_a_lookup(tmp_path):
    table = torch.randn(50, 8).to(torch.bfloat16)
    entry = BlockStore(tmp_path, "1" * 64).write("embed_in", {"weight": table})
    emb = RowReadEmbedding(entry)
    ids = torch.tensor([[3, 3, 49, 0], [7, 3, 0, 1]])
    assert torch.equal(emb(ids), table[ids]) and emb.weight.dtype == torch.bfloat16 and emb.weight.numel() == 0
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))


# ------------------------------------------------------------------------------------------ budget held
RSS_SCRIPT = textwrap.dedent("""
    import json, sys, psutil, torch
    from neoxlite.config import GPTNeoXConfig
    from neoxlite.model import GPTNeoXForCausalLM
    folder, offload, budget, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), getattr(torch, sys.argv[4])
    torch.set_num_threads(1)
    # One-time costs go before the baseline: torch's thread pool, and its meta-device machinery (~70 MB of code
    # loaded on first use, whatever the model's size).
    torch.ones(64, 64) @ torch.ones(64, 64)
    with torch.device("meta"):
        GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=8))
    def status(key):  # a /proc/self/status figure in bytes (VmHWM: high-water RSS; RssFile: file-backed part)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def code_rss():  # resident pages of mapped shared libraries (.so): code, not data
        total, in_lib = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                    in_lib = len(head) >= 6 and ".so" in head[-1]
                elif in_lib and head[0] == "Rss:":
                    total += int(head[1]) * 1024
        return total

    before = psutil.Process().memory_info().rss
    code_before = code_rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    model = GPTNeoXForCausalLM.from_pretrained(folder, cpu_memory=budget, offload_dir=offload, max_context=32,
                                               dtype=dtype, progress=False)
    ids = torch.tensor([[5, 17, 3, 44, 9, 12]])
    out = model.generate(ids, max_new_tokens=8)
    # Library code first touched by loading and decoding is not the model's memory, and how much of it stays
    # resident depends on the page cache (kdamond reclaims cold pages), so it is not counted; everything else is.
    peak = status("VmHWM") - max(0, code_rss() - code_before)
    layer = model.offload_plan.block_bytes["layers.0"]
    total = sum(model.offload_plan.block_bytes.values())
    with open("/proc/self/maps") as f:  # block files mapped now: at most one per slot (the prefetched ones)
        mapped = len({line.split()[-1] for line in f if line.rstrip().endswith(".safetensors") and offload in line})
    slots = len(model.gpt_neox.scheduler._slots)
    print(json.dumps({"growth": peak - before, "layer": layer, "total": total, "tokens": out.tolist(),
                      "mapped": mapped, "slots": slots}))
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # (bf16 decodes through the direct kernel step)
def test_peak_rss_growth_stays_within_the_budget(checkpoint, tmp_path, dtype):
    """A 130 MB model (65 MB in bf16) under a budget of about a third of it: the process grows by the budget plus
    about one block, not the model."""
    folder = checkpoint(hidden_size=512, intermediate_size=2048, num_hidden_layers=10, vocab_size=2048,
                        num_attention_heads=8, shard_kb=None)[0]
    budget = (48 if dtype == "float32" else 24) * 2**20
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder), str(tmp_path), str(budget), dtype],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["total"] > 2.5 * budget
    slack = 8 * 2**20  # interpreter, torch's small allocations, a tensor or two in flight
    print(result["growth"] / 2**20, "MiB growth")
    assert result["growth"] <= budget + result["layer"] + slack, result
    assert 0 < result["mapped"] <= result["slots"], result  # a used layer's mapping is released at once


# ------------------------------------------------------------------------------------------ the commands
def test_cli_plan_and_offload_commands(ckpt, tmp_path, capsys):
    from neoxlite.cli import main

    budget = str(layer_budget(ckpt, torch.float32, 1))
    common = ["-m", str(ckpt), "--device", "cpu", "--dtype", "float32", "--max-context", "32", "--max-batch-size", "2"]
    assert main(["plan", *common, "--cpu-memory", budget, "--offload-dir", str(tmp_path), "--disk-gbps", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("placement:", "cpu   layers.0, head", "disk  embed_in, layers.1-5", "bytes per tier:",
                 "one decoding step at batch 2", "tokens/s (disk read bound)", "read per step at 1 GB/s (disk)",
                 "disk 1 GB/s"):
        assert text in out, out
    assert main(["plan", *common, "--cpu-memory", "1KiB", "--offload-dir", str(tmp_path)]) == 2
    assert "smallest --cpu-memory that fits" in capsys.readouterr().err

    load(ckpt, torch.float32, cpu_memory=int(budget), offload_dir=tmp_path)
    (tmp_path / "mine.txt").write_text("not neoxlite's")
    assert main(["offload", "list", "--offload-dir", str(tmp_path)]) == 0
    assert "neoxlite-" in capsys.readouterr().out
    assert main(["offload", "clear", "--offload-dir", str(tmp_path)]) == 0
    assert "removed" in capsys.readouterr().out
    assert not list(tmp_path.glob("neoxlite-*")) and (tmp_path / "mine.txt").exists()
    assert main(["offload", "clear", "--offload-dir", str(tmp_path / "nope")]) == 2
    # a user's folder named like a store stays; a store holding a user's file is kept and reported
    (tmp_path / "neoxlite-notes").mkdir()
    (tmp_path / "neoxlite-notes" / "thesis.tex").write_text("mine")
    load(ckpt, torch.float32, cpu_memory=int(budget), offload_dir=tmp_path)
    [(store, _)] = list_stores(tmp_path)
    (store / "draft.txt").write_text("mine too")
    assert main(["offload", "clear", "--offload-dir", str(tmp_path)]) == 0
    assert f"kept {store}: it holds files neoxlite did not write (draft.txt)" in capsys.readouterr().out
    assert (store / "draft.txt").exists() and (tmp_path / "neoxlite-notes" / "thesis.tex").exists()


def test_generate_refuses_more_than_the_plan_reserved(ckpt):
    model = GPTNeoXForCausalLM.from_pretrained(ckpt, progress=False, cpu_memory="1GiB", max_context=16)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        model.generate(torch.ones(2, 4, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_context=24"):
        model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=20)
    assert model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=12).shape == (1, 16)


# ------------------------------------------------------------------------------------------ save and move
def test_an_offloaded_model_saves_whole_and_refuses_to_move(ckpt, tmp_path):
    import transformers

    (tmp_path / "store").mkdir()
    model = load(ckpt, torch.bfloat16, cpu_memory=layer_budget(ckpt, torch.bfloat16, 3), offload_dir=tmp_path / "store")
    assert homes(model)["embed_in"] == "disk" and homes(model)["layers.5"] == "disk"
    model.save_pretrained(tmp_path / "saved", max_shard_size="100KB")  # several shards, streamed from the store
    assert len(list((tmp_path / "saved").glob("*.safetensors"))) > 1
    resident = load(ckpt, torch.bfloat16)
    reloaded = load(tmp_path / "saved", torch.bfloat16).state_dict()
    for key, value in resident.state_dict().items():  # every tensor, the disk-only embedding included
        assert torch.equal(reloaded[key], value), key
    ref, info = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert ref.dtype == torch.bfloat16 and not info["missing_keys"] and not info["unexpected_keys"], info
    with pytest.raises(RuntimeError, match="offloaded.*load it again"):
        model.to(torch.float32)
    with pytest.raises(RuntimeError, match="offloaded"):
        model.half()
    assert torch.equal(generate(model), generate(resident))  # still usable after the refusals


def test_layers_the_page_cache_cannot_keep_are_dropped_after_use(ckpt, tmp_path, monkeypatch):
    import neoxlite.offload.placement as placement
    import neoxlite.offload.scheduler as scheduler_mod

    want = generate(load(ckpt, torch.float32))
    budget = layer_budget(ckpt, torch.float32, 0)
    plan = load(ckpt, torch.float32, cpu_memory=budget, offload_dir=tmp_path).offload_plan
    layer = plan.block_bytes["layers.0"]
    # RAM free now: what generation still allocates, the layers in flight, the margin, and room for 2.5 layers
    upcoming = (plan.reserved["cpu"]["kv_cache"] + plan.reserved["cpu"]["workspace"]
                + (plan.slots + 1) * max(layer, plan.slot_bytes))
    monkeypatch.setattr(placement, "free_cpu_memory", lambda: placement.CACHE_MARGIN_BYTES + upcoming + 5 * layer // 2)
    dropped, read_ahead = [], []
    real_drop, real_read_ahead = scheduler_mod.drop_cached, scheduler_mod.read_ahead
    monkeypatch.setattr(scheduler_mod, "drop_cached", lambda entry: dropped.append(entry.name) or real_drop(entry))
    monkeypatch.setattr(scheduler_mod, "read_ahead",
                        lambda entry: read_ahead.append(entry.name) or real_read_ahead(entry))
    model = load(ckpt, torch.float32, cpu_memory=budget, offload_dir=tmp_path)
    scheduler = model.gpt_neox.scheduler
    assert list(scheduler.describe().values()) == ["disk"] * 6
    kept = sorted(set(range(6)) - scheduler.uncached)
    assert kept == [2, 4], kept  # as many as fit stay cached, spread out
    assert torch.equal(generate(model), want)
    assert dropped and set(dropped) == {f"layers.{i}" for i in scheduler.uncached}
    # the reader thread brought each dropped layer back ahead of its use, in the loop's order, each once per pass
    scheduler.close()
    uncached = [f"layers.{i}" for i in sorted(scheduler.uncached)]
    assert read_ahead[:len(uncached)] == uncached[1:] + uncached[:1]
    assert all(a != b for a, b in zip(read_ahead, read_ahead[1:], strict=False))
    assert set(read_ahead) == set(uncached)


def test_layers_marked_uncached_later_are_read_ahead_too(ckpt, tmp_path, monkeypatch):
    """bench/offload.py --cold marks every disk layer uncached after loading: the reader thread starts then."""
    import neoxlite.offload.scheduler as scheduler_mod

    want = generate(load(ckpt, torch.float32))
    read_ahead = []
    real_read_ahead = scheduler_mod.read_ahead
    monkeypatch.setattr(scheduler_mod, "read_ahead",
                        lambda entry: read_ahead.append(entry.name) or real_read_ahead(entry))
    model = load(ckpt, torch.float32, cpu_memory=layer_budget(ckpt, torch.float32, 0), offload_dir=tmp_path)
    scheduler = model.gpt_neox.scheduler
    assert not scheduler.uncached  # this machine's page cache holds them all
    assert torch.equal(generate(model), want) and not read_ahead
    scheduler.uncached = set(range(6))
    assert torch.equal(generate(model), want)
    scheduler.close()
    assert set(read_ahead) == {f"layers.{i}" for i in range(6)}
