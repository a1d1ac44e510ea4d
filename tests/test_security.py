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


def test_demo_heads_share_the_demo_model_shards():
    from neoxlite.demo import demo_head_paths

    for head in demo_head_paths():
        assert any(name.startswith("../model/") for name in Checkpoint(head).files)


def test_cli_index_naming_a_device_is_one_line_and_no_hang(checkpoint, tmp_path):
    folder, _ = checkpoint()
    bad = copy_checkpoint(folder, tmp_path / "bad")
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


def test_cli_malformed_header_is_one_line(checkpoint, tmp_path):
    folder, _ = checkpoint()
    bad = copy_checkpoint(folder, tmp_path / "bad")
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    write_safetensors(shard, [GOOD], bytes(16))
    assert_one_line_error(run_neoxlite("generate", "hi", "-m", str(bad), "--device", "cpu"), shard.name)


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
