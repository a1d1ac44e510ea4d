"""Trust boundaries: what a checkpoint folder's files may make neoxlite read, and how bad input fails.

Each test first builds the attack or the fault the issue reported (an index naming /etc/passwd, a malformed
header, ...) and checks that it now gives one clear ValueError naming the file, never a read outside the
folder, a hang, or a traceback from deep inside torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hostile import assert_one_line_error, run_neoxlite, write_safetensors
from safetensors.torch import save_file

import neoxlite
import neoxlite.checkpoint as checkpoint_module
from neoxlite.api import load
from neoxlite.checkpoint import INDEX, Checkpoint


def copy_checkpoint(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def point_first_shard_at(folder: Path, name: str) -> str:
    """Rewrites the index so that every tensor of its first shard is said to live in `name`; returns the old name."""
    index = json.loads((folder / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    return first


# ------------------------------------------------------------------------------------ item 1: shard paths
@pytest.mark.parametrize("name", ["/etc/passwd", "/dev/stdin", "../../outside.safetensors", "../outside.safetensors",
                                  "./model.safetensors", "sub//x.safetensors", "a\\b.safetensors", ""])
def test_index_cannot_name_files_outside_the_folder(checkpoint, tmp_path, name):
    folder, _ = checkpoint()
    bad = copy_checkpoint(folder, tmp_path / "models" / "bad")
    save_file({"w": torch.zeros(2)}, tmp_path / "outside.safetensors")  # a foreign, valid file two levels up
    save_file({"w": torch.zeros(2)}, tmp_path / "models" / "outside.safetensors")  # and one beside the folder
    point_first_shard_at(bad, name)
    with pytest.raises(ValueError, match=INDEX):
        neoxlite.GPTNeoXForCausalLM.from_pretrained(bad)


def test_shards_may_not_be_devices_fifos_or_links_outside(checkpoint, tmp_path):
    folder, _ = checkpoint()
    bad = copy_checkpoint(folder, tmp_path / "models" / "bad")
    first = point_first_shard_at(bad, "fifo.safetensors")
    os.mkfifo(bad / "fifo.safetensors")  # opening it for reading would block forever
    with pytest.raises(ValueError, match="not a regular file"):
        Checkpoint(bad)
    (bad / "fifo.safetensors").unlink()
    (bad / "fifo.safetensors").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        Checkpoint(bad)
    (bad / "fifo.safetensors").unlink()
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(bad / first, outside)  # a real shard, but outside: a link does not make it part of the folder
    (bad / "fifo.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        Checkpoint(bad)


def test_shards_in_a_sibling_folder_load_exactly(checkpoint, tmp_path):
    """The rule the shipped demo heads rely on: `../base/x.safetensors` beside the checkpoint folder is fine."""
    folder, ref = checkpoint()
    copy_checkpoint(folder, tmp_path / "base")
    head = copy_checkpoint(folder, tmp_path / "head")
    first = point_first_shard_at(head, "../base/" + sorted(p.name for p in folder.glob("model-*.safetensors"))[0])
    (head / first).unlink()
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(head)
    ids = torch.arange(10)[None] % ref.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert Checkpoint(head).files[f"../base/{first}"] == (tmp_path / "base" / first).resolve()


def test_hub_cache_snapshots_read_their_blobs_through_huggingface_hubs_links(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({"w": torch.arange(4.0)}, repo / "blobs" / "9f86d081")
    (snapshot / "model.safetensors").symlink_to("../../blobs/9f86d081")  # as huggingface_hub links them
    assert torch.equal(Checkpoint(snapshot).read("w"), torch.arange(4.0))
    (snapshot / "model.safetensors").unlink()
    (snapshot / INDEX).write_text(json.dumps({"weight_map": {"w": "../../blobs/9f86d081"}}))  # a name, not a link
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        Checkpoint(snapshot)


def test_demo_heads_share_the_demo_model_shards():
    from neoxlite.demo import demo_head_paths

    for head in demo_head_paths():
        assert any(name.startswith("../model/") for name in Checkpoint(head).files)


def test_cli_index_naming_a_device_is_one_line_and_no_hang(tmp_path):
    from neoxlite.demo import demo_path

    bad = copy_checkpoint(demo_path(), tmp_path / "bad")  # with its tokenizer, which the CLI reads first
    point_first_shard_at(bad, "/dev/stdin")
    run = run_neoxlite("generate", "hi", "-m", str(bad), "--device", "cpu", timeout=60)
    assert_one_line_error(run, INDEX, "/dev/stdin")


# ------------------------------------------------------------------------------------ item 7: malformed headers
GOOD = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data, match", [
    ({"w": {**GOOD, "shape": [3, 2]}}, bytes(16), "needs 24"),
    ({"w": {**GOOD, "data_offsets": [16, 0]}}, bytes(16), "outside the file"),
    ({"w": {**GOOD, "data_offsets": [-16, 0]}}, bytes(16), "outside the file"),
    ({"w": {**GOOD, "data_offsets": [0, 32]}}, bytes(16), "outside the file"),
    ([GOOD], bytes(16), "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2, 2]}}, bytes(16), "data_offsets"),
    ({"w": {**GOOD, "data_offsets": [0, "16"]}}, bytes(16), "data_offsets"),
    ({"w": {**GOOD, "shape": [2, -2]}}, bytes(16), "shape"),
    ({"w": {**GOOD, "shape": "2x2"}}, bytes(16), "shape"),
    ({"w": {**GOOD, "dtype": "F8"}}, bytes(16), "dtype"),
    ({"w": GOOD, "v": {**GOOD, "data_offsets": [8, 24]}}, bytes(24), "overlap"),
    ({"w": "GOOD"}, bytes(16), "not a JSON object"),
    ({"__metadata__": [1], "w": GOOD}, bytes(16), "__metadata__"),
    (b'{"w": ' * 100_000, b"", "corrupt"),  # nested deep enough to exhaust the JSON parser's recursion
    (b'{"w": 1, "w": 2}', b"", "corrupt"),
])
def test_malformed_safetensors_headers_are_one_value_error(tmp_path, header, data, match):
    write_safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ValueError, match=match) as info:
        Checkpoint(tmp_path)
    assert "model.safetensors" in str(info.value)


def test_header_length_is_checked_against_the_file_and_never_echoed(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")  # like /etc/passwd
    with pytest.raises(ValueError, match="header length does not fit") as info:
        Checkpoint(tmp_path)
    assert str(int.from_bytes(b"root:x:0", "little")) not in str(info.value)
    write_safetensors(tmp_path / "model.safetensors", {"w": GOOD}, bytes(16), length=10**9)
    with pytest.raises(ValueError, match="header length does not fit"):
        Checkpoint(tmp_path)


def test_a_valid_hand_made_file_loads_exactly(tmp_path):
    values = torch.arange(4, dtype=torch.float32)
    write_safetensors(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}, "w": GOOD},
                      values.numpy().tobytes())
    assert torch.equal(Checkpoint(tmp_path).read("w"), values.view(2, 2))


@pytest.mark.parametrize("index, match", [
    ({"metadata": {}}, "weight_map"),
    ({"weight_map": ["model.safetensors"]}, "weight_map"),
    ({"weight_map": {"w": 3}}, "not a shard file name"),
    ({"weight_map": {}}, "weight_map"),
    ([1, 2], "weight_map"),
    ("{ not json", "not valid JSON"),
])
def test_malformed_index_is_one_value_error(tmp_path, index, match):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / INDEX).write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(ValueError, match=match) as info:
        Checkpoint(tmp_path)
    assert INDEX in str(info.value)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}))
    with pytest.raises(ValueError, match="also in"):
        Checkpoint(tmp_path)


# ------------------------------------------------------------------------------------ item 2: the store manifest
FP = "f" * 64


def block(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g).half()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rewrite_manifest(root: Path, edit, *, checksum: bool) -> None:
    """Applies `edit` to the manifest; checksum=True re-signs it, as someone who knows the format would."""
    from neoxlite.offload.store import _manifest_checksum

    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    if checksum:
        data["sha256"] = _manifest_checksum(data)
    (root / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("checksum", [False, True], ids=["edited", "edited-and-re-signed"])
def test_manifest_cannot_delete_a_file_outside_the_store(tmp_path, capsys, checksum):
    from neoxlite.offload.store import BlockStore

    offload = tmp_path / "offload"
    offload.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    store = BlockStore(offload, FP)
    store.write("layers.0", block())

    def attack(data):
        entry = data["blocks"]["layers.0"]
        entry["file"], entry["crc32"] = "../../precious.txt", 1  # the old format's file field, a failing CRC
        data["blocks"]["../../precious.txt"] = dict(entry)  # and a block named like a path

    rewrite_manifest(store.root, attack, checksum=checksum)
    again = BlockStore(offload, FP)
    assert not again.has("layers.0") and not again.has("../../precious.txt")
    assert precious.read_text() == "keep me"
    assert "rebuilding this store" in capsys.readouterr().err
    again.write("layers.0", block())
    assert same(BlockStore(offload, FP).read("layers.0"), block())


@pytest.mark.parametrize("checksum", [False, True], ids=["edited", "edited-and-re-signed"])
def test_shifted_offsets_are_never_used(tmp_path, capsys, checksum):
    """The issue's report: shifting a tensor's offsets gave wrong text with exit 0."""
    from neoxlite.offload.store import BlockStore

    store = BlockStore(tmp_path, FP)
    store.write("layers.0", block())

    def shift(data):
        for record in data["blocks"]["layers.0"]["tensors"].values():
            record[2] += 4
            record[3] += 4 if checksum else 0  # re-signed: a consistent-looking span, still the wrong bytes

    rewrite_manifest(store.root, shift, checksum=checksum)
    again = BlockStore(tmp_path, FP)
    # Unsigned: the checksum fails. Re-signed: the layout disagrees with the block file's own header.
    assert not again.has("layers.0")
    if not checksum:
        assert "does not match its checksum" in capsys.readouterr().err
    again.write("layers.0", block())
    assert same(BlockStore(tmp_path, FP).read("layers.0"), block())


def test_a_damaged_manifest_rebuilds_the_store_of_a_loaded_model(tmp_path, capfd):
    """Through the loader, as `neoxlite generate --offload-dir` runs it: one notice line, the same text."""
    from neoxlite.demo import demo_path

    offload = tmp_path / "offload"
    offload.mkdir()
    kwargs = dict(cpu_memory="13MiB", max_context=64, offload_dir=offload)
    ids = torch.tensor([[5, 6, 7]])
    first = neoxlite.GPTNeoXForCausalLM.from_pretrained(demo_path(), **kwargs).generate(ids, max_new_tokens=4)
    (manifest,) = offload.glob("neoxlite-*/manifest.json")
    manifest.write_text(manifest.read_text().replace('"crc32": ', '"crc32": 1'))  # an edit, no checksum
    capfd.readouterr()
    again = neoxlite.GPTNeoXForCausalLM.from_pretrained(demo_path(), **kwargs).generate(ids, max_new_tokens=4)
    notices = [line for line in capfd.readouterr().err.splitlines() if "rebuilding this store" in line]
    assert torch.equal(again, first) and len(notices) == 1


def test_a_manifest_that_is_a_fifo_does_not_hang(tmp_path, capsys):
    from neoxlite.offload.store import BlockStore

    store = BlockStore(tmp_path, FP)
    store.write("layers.0", block())
    (store.root / "manifest.json").unlink()
    os.mkfifo(store.root / "manifest.json")
    assert BlockStore(tmp_path, FP).blocks == []
    assert "not a regular file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ item 3: the fingerprint
def test_fingerprint_covers_shards_in_a_sibling_folder(tmp_path):
    from neoxlite.offload.store import fingerprint

    base, head = tmp_path / "base", tmp_path / "head"
    base.mkdir()
    head.mkdir()
    save_file({"w": torch.zeros(4)}, base / "shared.safetensors")
    save_file({"h": torch.zeros(2)}, head / "model-head.safetensors")
    (head / INDEX).write_text(json.dumps({"weight_map": {"w": "../base/shared.safetensors",
                                                         "h": "model-head.safetensors"}}))
    before = fingerprint(head, {})
    save_file({"w": torch.ones(5)}, base / "shared.safetensors")  # the shared shard changes, the head folder not
    assert fingerprint(head, {}) != before


# ------------------------------------------------------------------------------------ item 5: store leftovers
def test_orphaned_temp_files_are_removed_but_not_a_live_writers(tmp_path):
    import fcntl

    from neoxlite.offload.store import BlockStore

    root = BlockStore(tmp_path, FP).root
    orphan = root / ".layers.3.safetensors.abcd1234.tmp"  # what a kill -9 in the middle of a write leaves
    orphan.write_bytes(bytes(100))
    live = root / ".layers.4.safetensors.efgh5678.tmp"
    live.write_bytes(bytes(100))
    user_file = root / ".notes.tmp"  # not a name the store generates
    user_file.write_text("mine")
    with open(live, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # as _atomic_write holds it until the rename
        BlockStore(tmp_path, FP)  # the next run
        assert not orphan.exists() and live.exists() and user_file.exists()
    BlockStore(tmp_path, FP)
    assert not live.exists() and user_file.exists()


# ------------------------------------------------------------------------------------ item 4: quantize DST
@pytest.mark.parametrize("where", ["parent", "same", "inside", "sibling-shards"])
def test_quantize_never_writes_over_its_source(checkpoint, tmp_path, where):
    from neoxlite.quant.serialize import quantize_checkpoint

    folder, _ = checkpoint()
    src = copy_checkpoint(folder, tmp_path / "models" / "src")
    if where == "sibling-shards":  # SRC reads shards from ../base/; DST may not replace that folder either
        base = copy_checkpoint(folder, tmp_path / "models" / "base")
        first = point_first_shard_at(src, "../base/" + sorted(p.name for p in base.glob("model-*.safetensors"))[0])
        (src / first).unlink()
    dst = {"parent": tmp_path / "models", "same": src, "inside": src / "nf4",
           "sibling-shards": tmp_path / "models" / "base"}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="overlaps the source folder"):
        quantize_checkpoint(src, dst, quant="nf4", overwrite=True, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cli_quantize_over_the_parent_of_src_is_one_line_and_src_stays(checkpoint, tmp_path):
    folder, _ = checkpoint()
    src = copy_checkpoint(folder, tmp_path / "models" / "src")
    run = run_neoxlite("quantize", str(src), str(tmp_path / "models"), "--quant", "nf4", "--overwrite")
    assert_one_line_error(run, "overlaps the source folder")
    assert (src / "config.json").exists()


def test_cli_max_shard_size_inf_is_one_line_before_loading(checkpoint, tmp_path):
    from neoxlite.quant.serialize import quantize_checkpoint

    folder, _ = checkpoint()
    run = run_neoxlite("quantize", str(folder), str(tmp_path / "out"), "--quant", "nf4", "--max-shard-size", "inf")
    assert_one_line_error(run, "--max-shard-size", "inf")
    assert "loading" not in run.stderr  # refused before the model is read
    for size in ("nan", "0", "1e400", "9" * 400):
        with pytest.raises(ValueError, match="--max-shard-size"):
            quantize_checkpoint(folder, tmp_path / "out", quant="nf4", max_shard_size=size, progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ item 6: app input limits
def test_app_refuses_a_huge_message_from_its_length_without_tokenizing():
    import time

    from neoxlite.app.engine import Engine, Sampling

    engine = Engine.from_paths()  # the shipped demo and its heads
    engine.load()
    calls = []
    for tokenizer in engine.tokenizers.values():
        real = tokenizer.encode
        tokenizer.encode = lambda *a, real=real, **k: calls.append(a) or real(*a, **k)
    huge = "x" * 20_000_000
    requests = [lambda: engine.classify(huge), lambda: engine.tag(huge), lambda: engine.answer("q?", huge),
                lambda: engine.answer(huge, "short context"),
                lambda: engine.chat_prompt("", [], huge, Sampling()), lambda: engine.chat_prompt(huge, [], "hi", Sampling())]
    for request in requests:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"too long: 20,000,000 bytes.*holds at most [\d,]+ bytes"):
            request()
        assert time.perf_counter() - start < 2.0  # tokenizing it took tens of seconds
    assert all(len(args[0]) < 100 for args in calls)  # only the short companions of the huge texts
    assert engine.classify("def f(x):\n    return x\n")  # ordinary text still goes through


# ------------------------------------------------------------------------------------ item 7: the rest
def test_tokenizer_larger_than_the_model_is_refused_at_load(tmp_path):
    from neoxlite.demo import demo_path

    folder = copy_checkpoint(demo_path(), tmp_path / "small-vocab")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 100  # the embedding keeps its 100 rows; the tokenizer has thousands of tokens
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file

    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        tensors = {k: (v[:100].clone() if k.endswith(("embed_in.weight", "embed_out.weight")) else v)
                   for k, v in tensors.items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    (folder / INDEX).write_text(json.dumps({"weight_map": {k: s.name for s in folder.glob("*.safetensors")
                                                           for k in load_file(s)}}))
    with pytest.raises(ValueError, match="tokens but the model's vocabulary has 100"):
        load(folder)
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder)  # the model alone loads; ids past it are refused
    with pytest.raises(ValueError, match="token id 500 but the model.s vocabulary has ids 0 to 99"):
        model.generate(torch.tensor([[5, 500]]), max_new_tokens=2)


def test_invalid_tokenizer_files_are_one_value_error_naming_the_file(tmp_path):
    from neoxlite.demo import demo_path

    folder = copy_checkpoint(demo_path(), tmp_path / "bad-tokenizer")
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        neoxlite.GPTNeoXTokenizerFast.from_pretrained(folder)
    shutil.copy(demo_path() / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json is not a JSON object"):
        neoxlite.GPTNeoXTokenizerFast.from_pretrained(folder)


def nan_weights(folder: Path, dst: Path) -> Path:
    """A copy of the checkpoint whose final layer norm is NaN: every logit is NaN."""
    from safetensors.torch import load_file

    bad = copy_checkpoint(folder, dst)
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        if any("final_layer_norm" in k for k in tensors):
            tensors = {k: (torch.full_like(v, float("nan")) if "final_layer_norm.weight" in k else v)
                       for k, v in tensors.items()}
            save_file(tensors, shard, metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
def test_nan_logits_are_a_clear_error(checkpoint, tmp_path, do_sample):
    folder, _ = checkpoint()
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(nan_weights(folder, tmp_path / "nan"))
    with pytest.raises(ValueError, match="non-finite logits"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=do_sample, temperature=0.7)


def test_cli_nan_weights_greedy_is_one_line_not_an_empty_success(tmp_path):
    from neoxlite.demo import demo_path

    bad = nan_weights(demo_path(), tmp_path / "nan-demo")
    run = run_neoxlite("generate", "def f(x):", "-m", str(bad), "--device", "cpu", "--temperature", "0")
    assert_one_line_error(run, "non-finite logits")


@pytest.mark.parametrize("setting", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                     dict(top_p=float("nan")), dict(repetition_penalty=float("inf")),
                                     dict(repetition_penalty=float("nan"))])
def test_non_finite_sampling_settings_are_refused(setting):
    from neoxlite.generation import SamplingSettings

    with pytest.raises(ValueError, match="finite|must be"):
        SamplingSettings(do_sample=True, **setting)
    with pytest.raises(ValueError, match="finite|must be"):
        SamplingSettings(do_sample=False, **setting)


def test_cli_temperature_nan_is_refused_not_run_greedy():
    from neoxlite.options import sampling_kwargs

    run = run_neoxlite("generate", "def f(x):", "--temperature", "nan", "--max-new-tokens", "2", "--device", "cpu")
    assert_one_line_error(run, "temperature", "nan")
    assert "loaded" not in run.stderr  # refused before the model loads
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        sampling_kwargs({"temperature": float("inf")})


def test_a_model_larger_than_ram_without_budgets_is_refused_before_allocating(checkpoint, monkeypatch):
    from neoxlite.offload import budget

    folder, _ = checkpoint()
    monkeypatch.setattr(budget, "free_cpu_memory", lambda: 10_000)
    with pytest.raises(ValueError, match=r"this model needs 0\.0 GiB of RAM, you have 0\.0 GiB free; pass "
                                         r"--cpu-memory and --offload-dir"):
        neoxlite.GPTNeoXForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------- metadata files and sizes
def test_config_json_that_is_a_fifo_or_huge_is_refused_without_reading(checkpoint, tmp_path, monkeypatch):
    folder, _ = checkpoint()
    bad = copy_checkpoint(folder, tmp_path / "bad")
    (bad / "config.json").unlink()
    os.mkfifo(bad / "config.json")  # reading it would block forever
    with pytest.raises(ValueError, match="config.json is not a regular file"):
        neoxlite.GPTNeoXForCausalLM.from_pretrained(bad)
    (bad / "config.json").unlink()
    shutil.copyfile(folder / "config.json", bad / "config.json")
    monkeypatch.setattr(checkpoint_module, "MAX_METADATA_BYTES", 100)
    with pytest.raises(ValueError, match=r"config.json is [\d,]+ bytes, more than any real one"):
        neoxlite.GPTNeoXForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("size", ["inf", "nan", "0", "-1GB", "lots"])
def test_save_pretrained_refuses_a_shard_size_that_is_not_a_positive_size(checkpoint, tmp_path, size):
    folder, _ = checkpoint()
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="--max-shard-size"):
        model.save_pretrained(tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()
