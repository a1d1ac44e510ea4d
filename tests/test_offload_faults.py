"""An offloaded model under hostile conditions: its store edited while it runs, and bad workload keywords."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_offload_run import CONFIG, generate, layer_budget, load

from neoxlite.offload.placement import Workload

FIX = "neoxlite offload clear --offload-dir"


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint(**CONFIG)[0]


@pytest.fixture(scope="module")
def want(ckpt):
    return generate(load(ckpt, torch.float32))


def on_disk(ckpt: Path, offload_dir: Path):
    """A model with every layer and the embedding in the disk store, after one generation; and the store."""
    model = load(ckpt, torch.float32, cpu_memory=layer_budget(ckpt, torch.float32, 0), offload_dir=offload_dir)
    generate(model)
    (store,) = offload_dir.glob("neoxlite-*")
    return model, store


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 4096)


def overwrite(path: Path) -> None:  # same size, other bytes: only the content tells
    with open(path, "r+b") as f:
        f.seek(-4096, os.SEEK_END)
        f.write(b"\x7f" * 4096)


def replace_by_other_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4096:] = b"\x11" * 4096
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.parametrize("block", ["layers.3", "embed_in"])
@pytest.mark.parametrize("damage, said", [
    (truncate, "truncated"), (overwrite, "was changed"), (replace_by_other_bytes, "was changed"),
    (Path.unlink, "was deleted"),
])
def test_a_block_file_changed_under_a_running_model_is_a_clear_error(ckpt, tmp_path, want, block, damage, said):
    model, store = on_disk(ckpt, tmp_path)
    damage(store / f"{block}.safetensors")
    for _ in range(2):  # and again: not a crash, not wrong numbers the second time either
        with pytest.raises(OSError, match=f"offload block .*{block}.safetensors.*{said}.*{FIX}"):
            generate(model)
    with pytest.raises(OSError, match=said):  # saving reads the store too
        model.save_pretrained(tmp_path / "saved")


def test_a_block_file_replaced_by_the_same_bytes_is_fine(ckpt, tmp_path, want):
    """Another process sharing the store may rebuild a block (a new file, the same bytes): not an error."""
    model, store = on_disk(ckpt, tmp_path)
    for block in ("layers.3", "embed_in"):
        path = store / f"{block}.safetensors"
        shutil.copyfile(path, tmp_path / "copy")
        os.replace(tmp_path / "copy", path)
    assert torch.equal(generate(model), want)
    assert torch.equal(generate(model), want)


# ------------------------------------------------------------------------------------------ bad workloads
@pytest.mark.parametrize("kw, error, message", [
    (dict(max_context=0), ValueError, "max_context=0: must be at least 1"),
    (dict(max_context=-5), ValueError, "max_context=-5: must be at least 1"),
    (dict(max_batch_size=0), ValueError, "max_batch_size=0: must be at least 1"),
    (dict(max_context=1.5), TypeError, "max_context=1.5: expected a whole number of tokens"),
    (dict(max_context="64"), TypeError, "max_context='64': expected a whole number of tokens"),
    (dict(max_context=True), TypeError, "max_context=True: expected a whole number"),
    (dict(max_batch_size="2"), TypeError, "max_batch_size='2': expected a whole number of sequences"),
    (dict(max_batch_size=None), TypeError, "max_batch_size=None: expected a whole number"),
])
def test_bad_workload_keywords_name_themselves(ckpt, kw, error, message):
    from neoxlite.model import GPTNeoXForCausalLM

    with pytest.raises(error, match=message):
        GPTNeoXForCausalLM.from_pretrained(ckpt, progress=False, cpu_memory="1GiB", **kw)


def test_a_context_past_the_models_own_reserves_only_what_the_model_can_hold(ckpt):
    from neoxlite.model import GPTNeoXForCausalLM

    limit = GPTNeoXForCausalLM.from_pretrained(ckpt, progress=False).config.max_position_embeddings
    model = GPTNeoXForCausalLM.from_pretrained(ckpt, progress=False, cpu_memory="1GiB", max_context=10**12)
    assert model.offload_workload == (1, limit)
    assert Workload(1, 10**12).context(model.config) == limit


@pytest.mark.parametrize("offload_dir, error, message", [
    ("", ValueError, "offload_dir is empty"), ("   ", ValueError, "offload_dir is empty"),
    (5, TypeError, "offload_dir=5: expected a folder path"),
])
def test_an_empty_or_non_path_offload_dir_is_refused(ckpt, tmp_path, monkeypatch, offload_dir, error, message):
    monkeypatch.chdir(tmp_path)  # "" was taken as the current folder, and the store written there
    with pytest.raises(error, match=message):
        load(ckpt, torch.float32, cpu_memory=layer_budget(ckpt, torch.float32, 0), offload_dir=offload_dir)
    assert list(tmp_path.iterdir()) == []


def test_plan_refuses_an_empty_offload_dir_too(ckpt, capsys):
    from neoxlite.cli import main

    assert main(["plan", "-m", str(ckpt), "--offload-dir", ""]) != 0
    assert "--offload-dir is empty" in capsys.readouterr().err


@pytest.mark.parametrize("budgets", [{}, "offloaded"])
def test_a_shard_rewritten_while_loading_is_refused(ckpt, tmp_path, budgets):

    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    if budgets:
        budgets = dict(cpu_memory=layer_budget(ckpt, torch.float32, 0), offload_dir=tmp_path / "offload")
    shard = sorted(folder.glob("*.safetensors"))[-2]

    def rewrite(block: str, done: int, total: int) -> None:
        if done == 2:  # another process re-downloads a shard: the weights read so far may be the old ones
            overwrite(shard)

    with pytest.raises(ValueError, match=f"{shard.name} changed while the model was loading"):
        load(folder, torch.float32, on_block=rewrite, **budgets)
    load(folder, torch.float32, **budgets)  # once it is complete, it loads
