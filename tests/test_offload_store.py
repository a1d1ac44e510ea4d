"""The disk tier: atomic block files, fingerprints, corruption detection, full disks, bad offload dirs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neoxlite.offload import store as store_mod
from neoxlite.offload.store import (
    DATA_ALIGN,
    TENSOR_ALIGN,
    BlockStore,
    check_offload_dir,
    fingerprint,
    list_stores,
    remove,
)

FP = "f" * 64


def block_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "attention.dense.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "attention.dense.bias": torch.randn(8, generator=g),
        "mlp.idx": torch.arange(5, dtype=torch.int64),
        "packed": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "scalar": torch.tensor(0, dtype=torch.uint8),
        "half": torch.randn(3, 1, generator=g).half(),
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_write_read_roundtrip_is_safetensors_and_aligned(tmp_path):
    s = BlockStore(tmp_path, FP)
    tensors = block_tensors()
    entry = s.write("layers.0", tensors)
    assert entry.data_offset % DATA_ALIGN == 0
    assert same(s.read("layers.0"), tensors)
    with safe_open(entry.path, "pt") as f:  # a plain safetensors file, readable by anyone
        assert same({k: f.get_tensor(k) for k in f.keys() if not k.startswith("__pad__.")}, tensors)
    assert all(t.start % TENSOR_ALIGN == 0 for t in entry.tensors.values())  # views fit CUDA's vector loads
    # read into a larger reused buffer: views, no copies
    buf = torch.zeros(entry.data_bytes + 100, dtype=torch.uint8)
    views = s.read_into("layers.0", buf)
    assert same(views, tensors)
    assert all(v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for v in views.values())
    assert not list(s.root.glob("*.tmp"))


def test_store_is_reused_by_a_new_process(tmp_path):
    BlockStore(tmp_path, FP).write("layers.1", block_tensors(1))
    again = BlockStore(tmp_path, FP)
    assert again.blocks == ["layers.1"] and again.has("layers.1")
    assert same(again.read("layers.1"), block_tensors(1))
    assert BlockStore(tmp_path, "e" * 64).blocks == []  # another fingerprint, another store


def test_fingerprint_tracks_checkpoint_and_settings(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"w": torch.zeros(4)}, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text("{}")
    (ckpt / "README.md").write_text("not part of the identity")
    base = fingerprint(ckpt, {"dtype": "bfloat16"})
    assert fingerprint(ckpt, {"dtype": "bfloat16"}) == base
    assert fingerprint(ckpt, {"dtype": "float32"}) != base
    (ckpt / "README.md").write_text("edited")
    assert fingerprint(ckpt, {"dtype": "bfloat16"}) == base
    time.sleep(0.01)
    save_file({"w": torch.ones(4)}, ckpt / "model.safetensors")  # same size, new mtime
    assert fingerprint(ckpt, {"dtype": "bfloat16"}) != base
    with pytest.raises(FileNotFoundError):
        fingerprint(tmp_path, {})


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_block_is_detected_dropped_and_rebuilt(tmp_path, damage):
    entry = BlockStore(tmp_path, FP).write("layers.2", block_tensors(2))
    if damage == "flip":
        with open(entry.path, "r+b") as f:
            f.seek(entry.data_offset + 3)
            byte = f.read(1)
            f.seek(entry.data_offset + 3)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        os.truncate(entry.path, entry.file_bytes - 1)
    else:
        entry.path.unlink()
    s = BlockStore(tmp_path, FP)  # a later run
    assert not s.has("layers.2")
    assert s.blocks == [] and not entry.path.exists()
    assert BlockStore(tmp_path, FP).blocks == []  # the manifest no longer lists it
    s.write("layers.2", block_tensors(2))
    assert BlockStore(tmp_path, FP).has("layers.2")


def test_unreadable_manifest_lists_nothing(tmp_path):
    s = BlockStore(tmp_path, FP)
    s.write("layers.0", block_tensors())
    (s.root / "manifest.json").write_text("{ not json")
    assert BlockStore(tmp_path, FP).blocks == []


def test_two_writers_merge_their_manifests(tmp_path):
    a, b = BlockStore(tmp_path, FP), BlockStore(tmp_path, FP)
    a.write("layers.0", block_tensors(0))
    b.write("layers.1", block_tensors(1))
    assert sorted(BlockStore(tmp_path, FP).blocks) == ["layers.0", "layers.1"]


class _FullDisk:
    """A file object whose writes fail with ENOSPC after `room` bytes, like a full disk."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_gives_a_clear_error_and_no_broken_store(tmp_path, monkeypatch):
    s = BlockStore(tmp_path, FP)
    s.write("layers.0", block_tensors(0))
    real_fdopen = os.fdopen
    monkeypatch.setattr(store_mod.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), room=DATA_ALIGN + 10))
    with pytest.raises(OSError, match="no space left in the offload dir") as info:
        s.write("layers.1", block_tensors(1))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert not list(s.root.glob(".*tmp")) and not (s.root / "layers.1.safetensors").exists()
    again = BlockStore(tmp_path, FP)
    assert again.blocks == ["layers.0"] and again.has("layers.0")


def test_check_space_refuses_before_writing(tmp_path, monkeypatch):
    s = BlockStore(tmp_path, FP)
    usage = type("usage", (), {"free": 10 * 2**20})
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(OSError, match="has 10.00 MiB free but the blocks to store need 1.00 GiB") as info:
        s.check_space(2**30)
    assert info.value.errno == errno.ENOSPC
    s.check_space(2**20)


def test_missing_offload_dir_is_created_a_non_directory_refused(tmp_path):
    BlockStore(tmp_path / "nope" / "deeper", FP)
    assert (tmp_path / "nope" / "deeper").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        check_offload_dir(tmp_path / "file")


@contextlib.contextmanager
def read_only(path: Path):
    """Make `path` unwritable even for root (chattr +i) when running as root; chmod otherwise."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root and chattr +i is not available here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def test_read_only_offload_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro), pytest.raises(ValueError, match="not writable"):
        BlockStore(ro, FP)


def test_remove_deletes_only_neoxlite_stores(tmp_path):
    BlockStore(tmp_path, FP).write("layers.0", block_tensors())
    BlockStore(tmp_path, "a" * 64).write("layers.0", block_tensors())
    (tmp_path / "keep.txt").write_text("user file")
    stores = list_stores(tmp_path)
    assert len(stores) == 2 and all(n > 0 for _, n in stores)
    removal = remove(tmp_path, fingerprint="a" * 64)
    assert [p.name for p, _ in removal.removed] == ["neoxlite-" + "a" * 16] and removal.kept == []
    remove(tmp_path)
    assert list_stores(tmp_path) == [] and (tmp_path / "keep.txt").exists()
    manifestless = tmp_path / "unrelated"
    manifestless.mkdir()
    remove(tmp_path)
    assert manifestless.exists()


def test_a_folder_in_a_block_files_place_is_a_clear_error(tmp_path):
    BlockStore(tmp_path, FP).write("layers.0", block_tensors())
    path = BlockStore(tmp_path, FP).root / "layers.0.safetensors"
    path.unlink()
    path.mkdir()
    (path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="holds layers.0.safetensors, which is not a regular file"):
        BlockStore(tmp_path, FP).has("layers.0")
    assert (path / "keep.txt").exists()


def test_remove_never_deletes_a_users_folder_or_files(tmp_path):
    """Folders whose names merely start with the prefix are not stores; a store holding anything a store does not
    write is kept whole (reported), and a link named like a store is not followed."""
    notes = tmp_path / "neoxlite-notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("my work")
    upper = tmp_path / ("neoxlite-" + "A" * 16)
    upper.mkdir()
    store = BlockStore(tmp_path, FP)
    store.write("layers.0", block_tensors())
    (store.root / "mine.txt").write_text("a user's file put in the store")
    (store.root / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"keep")
    (tmp_path / ("neoxlite-" + "b" * 16)).symlink_to(elsewhere, target_is_directory=True)
    assert [p for p, _ in list_stores(tmp_path)] == [store.root]
    removal = remove(tmp_path)
    assert removal.removed == [] and removal.kept == [(store.root, ["mine.txt", "sub"])]
    assert (notes / "thesis.tex").read_text() == "my work" and upper.exists() and (elsewhere / "data.bin").exists()
    assert (store.root / "manifest.json").exists() and (store.root / "layers.0.safetensors").exists()
    (store.root / "mine.txt").unlink()
    (store.root / "sub").rmdir()
    removal = remove(tmp_path)
    assert [p for p, _ in removal.removed] == [store.root] and not store.root.exists()
    assert (notes / "thesis.tex").exists() and (elsewhere / "data.bin").exists()


def test_manifest_records_layout(tmp_path):
    s = BlockStore(tmp_path, FP, describe={"checkpoint": "x"})
    entry = s.write("embed_in", {"weight": torch.randn(10, 4)})
    data = json.loads((s.root / "manifest.json").read_text())
    assert data["fingerprint"] == FP and data["describe"] == {"checkpoint": "x"}
    assert data["blocks"]["embed_in"]["tensors"]["weight"] == ["F32", [10, 4], 0, 160]
    assert entry.tensors["weight"].end == 160


# ------------------------------------------------------------------------------ mapping with huge pages
HUGE = 2 * 2**20


def pmd_mapped_bytes() -> int:
    """Bytes of file pages this process maps with 2 MiB page-table entries (smaps' FilePmdMapped)."""
    with open("/proc/self/smaps") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("FilePmdMapped:")) * 1024


def huge_file_folios_possible(directory: Path) -> bool:
    """Whether this kernel and filesystem read a file into 2 MiB page-cache folios for a MADV_HUGEPAGE mapping
    (THP enabled, a filesystem with large folios such as ext4 on Linux 6.16+ or xfs)."""
    import mmap

    probe = directory / "probe"
    probe.write_bytes(os.urandom(4 * HUGE))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(fd, 4 * HUGE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
                m.madvise(store_mod.MADV_POPULATE_READ)
            except OSError:
                return False
            return pmd_mapped_bytes() > 0
    finally:
        os.close(fd)
        probe.unlink()


def test_mapped_block_uses_huge_pages_right_after_writing(tmp_path):
    """A block written to the store and then mapped comes in 2 MiB page-table entries, which makes mapping and
    unmapping each streamed block per step nearly free; this needs the written pages dropped from the page cache
    (the write path caches them in small folios) and the mapping to ask for huge pages."""
    if not Path("/proc/self/smaps").exists() or not huge_file_folios_possible(tmp_path):
        pytest.skip("this kernel or filesystem gives no 2 MiB page-cache folios")
    s = BlockStore(tmp_path, FP)
    # written in pieces smaller than 2 MiB, as a layer's tensors are, so the write path caches small folios
    tensors = {f"w{k}": torch.randint(0, 255, (HUGE // 4,), dtype=torch.uint8) for k in range(36)}
    entry = s.write("layers.0", tensors)
    before = pmd_mapped_bytes()
    data = store_mod.map_data(entry)
    # every 2 MiB stretch of the file that lies wholly in the data section, but the first: the kernel's read-ahead
    # from the mapping's first page brings that one in smaller folios
    first = -(-entry.data_offset // HUGE) * HUGE
    whole = (entry.data_offset + entry.data_bytes - first) // HUGE * HUGE
    assert pmd_mapped_bytes() - before in (whole - HUGE, whole)
    assert same(entry.views(data), tensors)
    del data
    assert pmd_mapped_bytes() == before  # unmapped with the last view


def cached_fraction(entry: store_mod.BlockEntry) -> float:
    """Share of the block's data pages in the page cache (mincore on a fresh mapping, which faults nothing in)."""
    import ctypes
    import mmap

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    with open(entry.path, "rb") as f, mmap.mmap(f.fileno(), entry.data_bytes, flags=mmap.MAP_SHARED,
                                                 prot=mmap.PROT_READ, offset=entry.data_offset) as m:
        pages = -(-entry.data_bytes // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        address = np.frombuffer(m, dtype=np.uint8).ctypes.data
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(entry.data_bytes), vec) == 0
        return sum(v & 1 for v in vec) / pages


def test_read_ahead_fills_the_page_cache_and_maps_nothing_afterwards(tmp_path):
    s = BlockStore(tmp_path, FP)
    entry = s.write("layers.0", {f"w{k}": torch.randint(0, 255, (3 * 2**20,), dtype=torch.uint8) for k in range(7)})
    store_mod.drop_cached(entry)
    assert cached_fraction(entry) < 0.1
    store_mod.read_ahead(entry, window=4 * 2**20)
    assert cached_fraction(entry) == 1.0
    with open("/proc/self/maps") as f:
        assert str(entry.path) not in f.read()  # every window was unmapped again: nothing counts in RSS


def test_map_data_without_populate_read_touches_every_page(tmp_path, monkeypatch):
    """Kernels before Linux 5.14 refuse MADV_POPULATE_READ: the block is mapped and read page by page instead."""
    s = BlockStore(tmp_path, FP)
    tensors = {"w": torch.randint(0, 255, (3 * 2**20 + 5,), dtype=torch.uint8)}
    entry = s.write("layers.0", tensors)
    monkeypatch.setattr(store_mod, "MADV_POPULATE_READ", 0x7FFF)  # an advice no kernel knows: EINVAL
    assert same(entry.views(store_mod.map_data(entry)), tensors)
    store_mod.read_ahead(entry)
    assert cached_fraction(entry) == 1.0


def test_a_block_truncated_under_its_mapping_is_an_error_not_a_crash(tmp_path):
    import mmap
    import platform
    import re

    release = re.match(r"(\d+)\.(\d+)", platform.release())
    if platform.system() != "Linux" or not release or tuple(map(int, release.groups())) < (5, 14):
        pytest.skip("needs MADV_POPULATE_READ (Linux 5.14+); older kernels would be touched into a SIGBUS")

    path = tmp_path / "block"
    path.write_bytes(os.urandom(8 * 2**20))
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 8 * 2**20, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    os.truncate(path, 2**20)  # what touching the missing pages would turn into a SIGBUS
    with pytest.raises(OSError, match="truncated while in use.*offload clear"):
        store_mod._populate(m, path)
    m.close()
