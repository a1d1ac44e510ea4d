"""Shared fixtures: small random checkpoints in hub layout, built once per session and reused across tests."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_checkpoint  # tests/ is on sys.path (rootdir-less test folder)

# Tiny test models gain nothing from intra-op threads, and on a loaded shared machine OpenMP's spinning threads
# make each small matmul many times slower (a 100-token generate: 13 s with 2 threads, 0.7 s with 1).
torch.set_num_threads(int(os.environ.get("NEOXLITE_TEST_THREADS", "1")))

# neoxlite's CPU kernels are built into a cache private to this test session (a fresh build, no stale library).
os.environ.setdefault("NEOXLITE_CACHE", tempfile.mkdtemp(prefix="neoxlite-test-cache-"))

# The real GPT-NeoX-20B tokenizer, kept next to the repo (never copied into it).
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared/tokenizers/gpt-neox-20b"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Any]]:
    """`checkpoint(arch="GPTNeoXForCausalLM", classic=True, shard_kb=64, dtype=torch.float32, seed=0, **config)`
    -> (folder, reference transformers model). Each distinct set of arguments is written once per session;
    treat both the folder and the reference model as read-only.

    Weights are drawn with initializer_range 0.2 (10x transformers' default) unless overridden: with tiny
    weights attention is nearly uniform and a wrong rotary or mask would hide under the 1e-4 tolerance."""
    built: dict[str, tuple[Path, Any]] = {}

    def make(arch: str = "GPTNeoXForCausalLM", *, classic: bool = True, shard_kb: int | None = 64,
             dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
        overrides = {"initializer_range": 0.2, **overrides}
        key = repr((arch, classic, shard_kb, dtype, seed, sorted(overrides.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp("ckpt")
            # transformers' config mutates dicts it is given (rope_scaling); keep the caller's intact.
            reference = make_checkpoint(folder, arch, seed=seed, shard_kb=shard_kb, classic=classic, dtype=dtype,
                                        **copy.deepcopy(overrides))
            built[key] = (folder, reference)
        return built[key]

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip on machines without a CUDA GPU (bench/gpu_check.sh runs them where one is)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
