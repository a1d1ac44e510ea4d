"""Fault injection: writes killed at every point of their progress, full disks, corrupted bytes.

A child process (a fork of the test, so no interpreter start-up per kill) counts the write's own steps (each
chunk written, each fsync, rename and copy) and SIGKILLs itself at step N, for every N the uninterrupted
write takes; a chunk at the kill point is half written first. Afterwards the output must be absent or complete
and loadable (an overwritten one: the old or the new, never absent), and the next run must clean what the killed
one left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hostile import assert_one_line_error, run_neoxlite

from neoxlite.offload import store as store_mod
from neoxlite.offload.store import BlockStore

FP = "c" * 64
BLOCKS = ("embed_in", "layers.0")


class KillAt:
    """Counts the write's steps in a child process and kills the process at step `n` (0: never)."""

    def __init__(self, n: int) -> None:
        self.n, self.count = n, 0

    def step(self, before_dying: Callable[[], None] = lambda: None) -> None:
        self.count += 1
        if self.count == self.n:
            before_dying()
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, owner: object, name: str) -> None:
        """Counts a step before and after every call of owner.name."""
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            self.step()
            result = real(*args, **kwargs)
            self.step()
            return result

        setattr(owner, name, counted)


def in_killed_child(n: int, work: Callable[[KillAt], None], steps_file: Path) -> bool:
    """Runs work(KillAt(n)) in a forked child; True when the child was killed, False when it finished (and then
    wrote the number of steps it took to `steps_file`)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            killer = KillAt(n)
            work(killer)
            steps_file.write_text(str(killer.count))
            code = 0
        except BaseException:
            traceback.print_exc()  # shown with the test's failure
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the child failed before its kill point"
    return False


def every_kill_point(work: Callable[[KillAt], None], tmp_path: Path, check: Callable[[int], None]) -> int:
    """Runs `work` once uninterrupted to count its steps, then once killed at each step, calling check(n) after
    each; returns the number of steps."""
    steps_file = tmp_path / "steps"
    assert not in_killed_child(0, work, steps_file)
    total = int(steps_file.read_text())
    assert total > 5
    check(0)  # the uninterrupted write is complete too (and check starts the next try afresh)
    for n in range(1, total + 1):
        assert in_killed_child(n, work, steps_file), f"step {n} of {total} was never reached"
        check(n)
    return total


def count_safetensors_writes(killer: KillAt) -> None:
    """Makes every safetensors file save_pretrained writes two counted steps (in the child process), the kill
    at the first leaving the file half written, as safetensors leaves it when killed mid-file."""
    import neoxlite.saving as saving

    real_save = saving.save_file

    def save_file(tensors, path, metadata=None):
        def half_written() -> None:
            real_save(tensors, path, metadata=metadata)
            os.truncate(path, os.path.getsize(path) // 2)
        killer.step(half_written)
        real_save(tensors, path, metadata=metadata)
        killer.step()

    saving.save_file = save_file


# ------------------------------------------------------------------------------------------ the offload store
def block(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g).half(),
            "i": torch.arange(7, dtype=torch.int64)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class HalfWriter:
    """A file whose every write is a counted step; the write at the kill point lands half before the kill."""

    def __init__(self, f, killer: KillAt) -> None:
        self.f, self.killer = f, killer

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.killer.step(lambda: (self.f.write(view[: len(view) // 2]), self.f.flush()))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def store_writes(offload: Path) -> Callable[[KillAt], None]:
    def work(killer: KillAt) -> None:
        real_fdopen = os.fdopen
        store_mod.os.fdopen = lambda fd, mode: HalfWriter(real_fdopen(fd, mode), killer)
        for name in ("replace", "fsync"):
            killer.wrap(store_mod.os, name)
        store = BlockStore(offload, FP)
        for i, name in enumerate(BLOCKS):
            store.write(name, block(i))
    return work


def test_store_killed_at_every_step_of_its_writes(tmp_path):
    offload = tmp_path / "offload"
    offload.mkdir()
    root = offload / f"neoxlite-{FP[:16]}"

    def check(n: int) -> None:
        store = BlockStore(offload, FP)  # the next run
        assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")], f"leftovers after a kill at {n}"
        for i, name in enumerate(BLOCKS):
            if name in store.blocks:  # listed: intact and exact
                assert store.has(name) and same(store.read(name), block(i)), f"kill at {n}: {name}"
        for i, name in enumerate(BLOCKS):
            if not store.has(name):
                store.write(name, block(i))
        assert all(same(BlockStore(offload, FP).read(name), block(i)) for i, name in enumerate(BLOCKS))
        shutil.rmtree(root)  # the next kill point starts from an empty store again

    assert every_kill_point(store_writes(offload), tmp_path, check) >= 3 * len(BLOCKS)


def test_a_live_writer_keeps_its_temp_file_while_another_run_opens_the_store(tmp_path):
    """Three processes may share one offload dir: opening the store never takes a live write for an orphan."""
    store = BlockStore(tmp_path, FP)
    seen: list[list[str]] = []

    def chunks():
        yield b"x" * store_mod.DATA_ALIGN
        BlockStore(tmp_path, FP)  # another run opens the store in the middle of this write
        seen.append([p.name for p in store.root.iterdir() if p.name.endswith(".tmp")])
        yield b"y" * 10

    store_mod._atomic_write(store.root / "layers.9.safetensors", chunks())
    assert len(seen[0]) == 1 and (store.root / "layers.9.safetensors").stat().st_size == store_mod.DATA_ALIGN + 10


@pytest.mark.parametrize("seed", range(6))
def test_corrupted_block_bytes_are_detected_and_rebuilt(tmp_path, seed):
    rng = random.Random(seed)
    store = BlockStore(tmp_path, FP)
    entry = store.write("layers.0", block(0))
    with open(entry.path, "r+b") as f:
        for _ in range(rng.randint(1, 4)):
            offset = rng.randrange(entry.file_bytes)
            f.seek(offset)
            old = f.read(1)
            f.seek(offset)
            f.write(bytes([old[0] ^ rng.randint(1, 255)]))
    again = BlockStore(tmp_path, FP)
    assert not again.has("layers.0") and not entry.path.exists()
    again.write("layers.0", block(0))
    assert same(BlockStore(tmp_path, FP).read("layers.0"), block(0))


def test_corrupted_manifest_bytes_mean_rebuild_never_a_traceback_or_a_deletion_outside(tmp_path, capsys):
    offload = tmp_path / "offload"
    offload.mkdir()
    precious = tmp_path / "layers.0.safetensors"  # a file outside the store named like a block
    precious.write_text("keep")
    store = BlockStore(offload, FP)
    for i, name in enumerate(BLOCKS):
        store.write(name, block(i))
    manifest = store.root / "manifest.json"
    good = manifest.read_bytes()
    rng = random.Random(0)
    rebuilt = 0
    for _ in range(60):
        damaged = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        manifest.write_bytes(bytes(damaged))
        again = BlockStore(offload, FP)
        listed = list(again.blocks)
        for i, name in enumerate(BLOCKS):
            if name in listed:  # the change left the content as signed (e.g. whitespace): still exact
                assert again.has(name) and same(again.read(name), block(i))
        rebuilt += not listed
        for i, name in enumerate(BLOCKS):
            if not again.has(name):
                again.write(name, block(i))
        manifest.write_bytes(good)
    assert precious.read_text() == "keep"
    assert rebuilt > 40 and "rebuilding this store" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ quantize
@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from helpers import make_checkpoint

    folder = tmp_path_factory.mktemp("quant-src") / "src"
    make_checkpoint(folder, initializer_range=0.2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))  # copied as it is
    return folder


def quantize_into(src: Path, dst: Path, quant: str, overwrite: bool = False) -> None:
    from neoxlite.quant.serialize import quantize_checkpoint

    quantize_checkpoint(src, dst, quant=quant, max_shard_size="100KB", overwrite=overwrite, progress=False)


def logits(folder: Path) -> torch.Tensor:
    from neoxlite import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    with torch.no_grad():
        return model(torch.arange(12)[None] % 96).logits


def quantize_work(src: Path, dst: Path, quant: str, overwrite: bool) -> Callable[[KillAt], None]:
    def work(killer: KillAt) -> None:
        import neoxlite.quant.serialize as serialize

        count_safetensors_writes(killer)
        killer.wrap(os, "replace")
        killer.wrap(os, "fsync")
        killer.wrap(serialize.shutil, "copyfileobj")
        quantize_into(src, dst, quant, overwrite)
    return work


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_quantize_killed_at_every_step_leaves_dst_absent_or_complete(source, tmp_path, overwrite):
    from neoxlite.fileio import remove_orphans

    expected = {}
    for quant in ("int8", "nf4"):
        quantize_into(source, tmp_path / f"ref-{quant}", quant)
        expected[quant] = logits(tmp_path / f"ref-{quant}")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "q"

    def fresh() -> None:
        shutil.rmtree(out)
        out.mkdir()
        if overwrite:  # an older int8 checkpoint that the nf4 one replaces
            shutil.copytree(tmp_path / "ref-int8", dst)

    def check(n: int) -> None:
        remove_orphans(dst)  # what the next run of `quantize ... q` does first (a lost dst comes back from .q.old)
        if dst.exists():  # complete: the old one (int8) or the new one (nf4), never a mix
            got = logits(dst)
            assert any(torch.equal(got, want) for want in expected.values()), f"kill at step {n}"
        else:  # absent only when there was no old one
            assert not overwrite, f"a kill at step {n} lost the old checkpoint"
        assert [p.name for p in out.iterdir()] in ([], ["q"]), f"leftovers after a kill at step {n}"
        fresh()

    fresh()
    every_kill_point(quantize_work(source, dst, "nf4", overwrite), tmp_path, check)
    quantize_into(source, dst, "nf4", overwrite=True)
    assert torch.equal(logits(dst), expected["nf4"])


def test_a_killed_quantize_leftover_is_removed_by_the_next_run(source, tmp_path):
    dst = tmp_path / "q"
    assert in_killed_child(3, quantize_work(source, dst, "int8", False), tmp_path / "steps")
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    quantize_into(source, dst, "int8")  # the next run
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_a_live_quantize_keeps_its_partial_folder_while_another_run_cleans(tmp_path):
    from neoxlite.fileio import atomic_folder, remove_orphans

    dst = tmp_path / "q"
    with atomic_folder(dst) as partial:
        (partial / "config.json").write_text("{}")
        assert remove_orphans(dst) == [] and partial.exists()  # another run's cleanup: the lock says it is live
    assert (dst / "config.json").exists() and [p.name for p in tmp_path.iterdir()] == ["q"]


# ------------------------------------------------------------------------------------------ full disks
@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (root only); skips the test where mounting is not allowed."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full disks still run")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_store_on_a_full_tmpfs(tmp_path):
    with small_disk(tmp_path / "disk", "96k") as disk:
        store = BlockStore(disk, FP)
        written = []
        with pytest.raises(OSError, match="no space left in the offload dir") as info:
            for i in range(20):
                store.write(f"layers.{i}", block(i))
                written.append(i)
        assert info.value.errno == errno.ENOSPC and written
        again = BlockStore(disk, FP)
        assert sorted(again.blocks) == sorted(f"layers.{i}" for i in written)
        assert all(same(again.read(f"layers.{i}"), block(i)) for i in written)
        assert not [p for p in again.root.iterdir() if p.name.endswith(".tmp")]


def test_quantize_on_a_full_tmpfs(source, tmp_path, monkeypatch):
    import neoxlite.quant.serialize as serialize

    with small_disk(tmp_path / "disk", "64k") as disk:
        assert_one_line_error(run_neoxlite("quantize", str(source), str(disk / "q"), "--quant", "int8"),
                              "needs about", "free some space")
        monkeypatch.setattr(serialize, "_check_space", lambda model, dst: None)  # the disk fills during the write
        with pytest.raises(OSError, match="no space left on the disk holding") as info:
            quantize_into(source, disk / "q", "int8")
        assert info.value.errno == errno.ENOSPC
        assert list(disk.iterdir()) == []


def test_quantize_simulated_full_disk(source, tmp_path, monkeypatch):
    """The same fault where no tmpfs can be mounted: safetensors' writer fails as it does on a full disk."""
    import neoxlite.saving as saving

    def full(tensors, path, metadata=None):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(saving, "save_file", full)
    with pytest.raises(OSError, match="no space left on the disk holding") as info:
        quantize_into(source, tmp_path / "q", "int8")
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ save_pretrained in place
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two models of one shape with different weights (the old checkpoint and the new one)."""
    from helpers import make_checkpoint

    from neoxlite import GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("two-models")
    for seed in (0, 1):
        make_checkpoint(root / f"m{seed}", seed=seed)
    return [GPTNeoXForCausalLM.from_pretrained(root / f"m{seed}", progress=False) for seed in (0, 1)]


@pytest.mark.parametrize("old_shard,new_shard", [("100KB", "100KB"), ("2GiB", "100KB"), ("100KB", "2GiB")],
                         ids=["sharded-over-sharded", "sharded-over-single", "single-over-sharded"])
def test_save_pretrained_killed_at_every_step_leaves_old_or_new_weights(two_models, tmp_path, old_shard, new_shard):
    """A save into a folder already holding a checkpoint, a tokenizer and a user's notes, killed at every step:
    the folder always loads as the old model or the new one (never a mix, never nothing), the other files stay,
    and the next save removes what the killed one left."""
    import neoxlite.saving as saving

    old, new = two_models
    expected = [logits_of(old), logits_of(new)]
    folder, reference = tmp_path / "ckpt", tmp_path / "reference"
    old.save_pretrained(reference, max_shard_size=old_shard)
    (reference / "tokenizer.json").write_text("{}")
    (reference / "NOTES.md").write_text("mine")

    def work(killer: KillAt) -> None:
        count_safetensors_writes(killer)
        for name in ("replace", "fsync", "unlink"):
            killer.wrap(os, name)
        new.save_pretrained(folder, max_shard_size=new_shard)

    def check(n: int) -> None:
        got = logits_of(load_folder(folder))
        assert any(torch.equal(got, want) for want in expected), f"kill at step {n}: neither model"
        assert (folder / "NOTES.md").read_text() == "mine" and (folder / "tokenizer.json").exists()
        saving._remove_dead_stages(folder)  # what the next save does first
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], f"leftovers after step {n}"
        shutil.rmtree(folder)
        shutil.copytree(reference, folder)

    shutil.copytree(reference, folder)
    every_kill_point(work, tmp_path, check)
    new.save_pretrained(folder, max_shard_size=new_shard)  # uninterrupted: the new model, no old weight file left
    assert torch.equal(logits_of(load_folder(folder)), expected[1])
    index = folder / "model.safetensors.index.json"
    wanted = {index.name, *json.loads(index.read_text())["weight_map"].values()} if index.exists() else {
        "model.safetensors"}
    assert {p.name for p in folder.iterdir() if "safetensors" in p.name} == wanted


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None] % 96).logits


def load_folder(folder: Path):
    from neoxlite import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
