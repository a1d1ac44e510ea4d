"""Fuzzing the checkpoint reader: mutated safetensors headers and index files, seeded and bounded.

Each mutation must give one ValueError naming the mutated file, or load exactly what the (mutated) header
describes; never another exception type, a hang, or an open of any file outside the checkpoint folder and
its sibling folder.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from hostile import write_safetensors
from safetensors.torch import save_file

from neoxlite.checkpoint import INDEX, Checkpoint

CASES = 300  # per file kind; a few seconds in all
GARBAGE = [-1, 0, 1, 3, 2**31, 2**63, 2**64 + 1, -(2**63), "x", "", None, [], {}, [1], [1, 2, 3], 1.5,
           float("nan"), True, [0, -4], [4, 0], [0, 10**12], [0, 4], ["0", "4"], {"a": 1}, "F32", "BF16", [2, 2]]
NAMES = ["/etc/passwd", "/dev/stdin", "/dev/zero", "../outside.safetensors", "../../far.safetensors",
         "../sib/sib.safetensors", "sub/../a.safetensors", "./a.safetensors", "a.safetensors/", "..", ".", "",
         "missing.safetensors", "a.safetensors\x00", "../ckpt/b.safetensors", "/proc/self/mem", "~/x", 5, None,
         ["a.safetensors"], "a.safetensors", "b.safetensors"]


@pytest.fixture
def tree(tmp_path):
    """root/ckpt (two shards and an index), root/sib (a legitimate sibling shard), decoys further out."""
    root = tmp_path / "root"
    folder = root / "ckpt"
    folder.mkdir(parents=True)
    (root / "sib").mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"x.w": torch.randn(3, 4, generator=g), "x.b": torch.randn(4, generator=g).half(),
               "x.i": torch.arange(5, dtype=torch.int64)}, folder / "a.safetensors")
    save_file({"y.w": torch.randn(2, 2, generator=g).bfloat16(), "y.m": torch.tensor([True, False])},
              folder / "b.safetensors")
    save_file({"z.w": torch.randn(6, generator=g)}, root / "sib" / "sib.safetensors")
    weight_map = {"x.w": "a.safetensors", "x.b": "a.safetensors", "x.i": "a.safetensors",
                  "y.w": "b.safetensors", "y.m": "b.safetensors", "z.w": "../sib/sib.safetensors"}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({"x.w": torch.zeros(3, 4)}, root / "outside.safetensors")  # valid files the index must not reach
    save_file({"x.w": torch.zeros(3, 4)}, tmp_path / "far.safetensors")
    return root


def read_all(folder: Path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    ckpt = Checkpoint(folder)
    return ckpt, {key: ckpt.read(key) for key in ckpt.keys}


class Watch:
    """Records every path opened through os.open and fails a case that runs longer than a second."""

    def __init__(self, monkeypatch) -> None:
        self.opened: list[Path] = []
        real = os.open

        def recording_open(path, *args, **kwargs):
            self.opened.append(Path(os.fsdecode(path)).resolve())
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", recording_open)

        def hang(signum, frame):
            raise TimeoutError("the checkpoint reader hung")

        self.previous = signal.signal(signal.SIGALRM, hang)

    def __enter__(self):
        self.opened.clear()
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.fixture
def watch(monkeypatch):
    watching = Watch(monkeypatch)
    yield watching
    signal.signal(signal.SIGALRM, watching.previous)


def check_case(tree: Path, watch: Watch, mutated: str, case: str) -> str:
    """Runs the reader on the mutated tree; returns 'error' or 'loaded' after checking the outcome."""
    allowed = [(tree / "ckpt").resolve(), (tree / "sib").resolve()]
    with watch:
        try:
            ckpt, tensors = read_all(tree / "ckpt")
            outcome = "loaded"
        except ValueError as err:
            assert mutated in str(err), f"{case}: the error does not name {mutated}: {err}"
            outcome = "error"
    outside = [p for p in watch.opened if not any(p.is_relative_to(a) for a in allowed)]
    assert not outside, f"{case}: opened {outside}"
    if outcome == "loaded":  # exactly what the header describes: its dtype, its shape, its bytes
        for key, tensor in tensors.items():
            assert tensor.dtype == ckpt.dtype(key) and tuple(tensor.shape) == ckpt.shape(key), case
            start, end = ckpt.span(key)
            raw = ckpt.files[ckpt.shard_of[key]].read_bytes()[start:end]
            assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == raw, case
    return outcome


def mutate_header(header: dict, rng: random.Random) -> object:
    header = copy.deepcopy(header)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    kind = rng.randrange(9)
    if kind == 0:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(GARBAGE)
    elif kind == 1:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 2:
        shift = rng.choice([-8, -1, 1, 2, 8, 64])
        start, end = entry["data_offsets"]
        entry["data_offsets"] = [start + shift, end + (shift if rng.random() < 0.5 else 0)]
    elif kind == 3:
        entry["shape"] = list(reversed(entry["shape"])) if rng.random() < 0.5 else entry["shape"] + [1]
    elif kind == 4:
        entry["shape"] = [d + rng.choice([-1, 1]) for d in entry["shape"]]
    elif kind == 5:
        header[rng.choice(["new", key + "2", "__metadata__"])] = rng.choice(GARBAGE + [dict(entry)])
    elif kind == 6:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "f32"])
    elif kind == 7:
        del header[key]
    else:
        return rng.choice([[entry], "header", 7, None, [header]])
    return header


def test_fuzz_safetensors_headers(tree, watch):
    folder = tree / "ckpt"
    original = (folder / "a.safetensors").read_bytes()
    size = int.from_bytes(original[:8], "little")
    header, data = json.loads(original[8:8 + size]), original[8 + size:]
    rng = random.Random(1234)
    outcomes = []
    for i in range(CASES):
        target = folder / "a.safetensors"
        kind = rng.randrange(4)
        if kind < 2:  # a mutated JSON header
            write_safetensors(target, mutate_header(header, rng), data)
        elif kind == 2:  # raw bytes: the length field, the header text, the data
            raw = bytearray(original)
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(min(len(raw), 8 + size + 16))] = rng.randrange(256)
            target.write_bytes(bytes(raw))
        else:  # truncated, extended, or a length that lies
            choice = rng.randrange(3)
            if choice == 0:
                target.write_bytes(original[: rng.randrange(len(original))])
            elif choice == 1:
                target.write_bytes(original + os.urandom(rng.randint(1, 64)))
            else:
                write_safetensors(target, header, data, length=rng.choice([0, 1, size - 1, size + 1, 2**40, 2**64 - 1]))
        outcomes.append(check_case(tree, watch, "a.safetensors", f"header case {i}"))
    target.write_bytes(original)
    assert check_case(tree, watch, "a.safetensors", "the original") == "loaded"
    assert outcomes.count("error") > CASES // 2 and "loaded" in outcomes


def test_fuzz_index_files(tree, watch):
    folder = tree / "ckpt"
    original = (folder / INDEX).read_bytes()
    index = json.loads(original)
    rng = random.Random(5678)
    outcomes = []
    for i in range(CASES):
        kind = rng.randrange(4)
        mutated = copy.deepcopy(index)
        if kind == 0:  # shard names
            for key in rng.sample(sorted(mutated["weight_map"]), rng.randint(1, 3)):
                mutated["weight_map"][key] = rng.choice(NAMES)
            text = json.dumps(mutated)
        elif kind == 1:  # the map itself
            mutated["weight_map"] = rng.choice(GARBAGE + [{}, {"x.w": None}])
            text = json.dumps(mutated)
        elif kind == 2:
            text = json.dumps(rng.choice([[index], "index", None, {"metadata": {}}, {"weight_map": NAMES}]))
        else:
            raw = bytearray(original)
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            text = bytes(raw).decode("latin-1")
        (folder / INDEX).write_bytes(text.encode("latin-1", errors="replace"))
        outcomes.append(check_case(tree, watch, INDEX, f"index case {i}"))
    assert outcomes.count("error") > CASES // 2 and "loaded" in outcomes
