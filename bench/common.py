"""Shared pieces of the benchmarks: model shapes, random hub-layout checkpoints, memory read bandwidth, RSS."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"

SHAPES = {
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "pythia-1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192),
}


def random_checkpoint(shape: str, dtype: torch.dtype = torch.bfloat16, folder: Path | None = None) -> Path:
    """A random checkpoint of a Pythia shape in hub layout (written by transformers once, then reused)."""
    import transformers

    folder = folder or OUT / f"{shape}-{str(dtype).removeprefix('torch.')}"
    if (folder / "config.json").exists():
        return folder
    cfg = transformers.GPTNeoXConfig(
        vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.GPTNeoXForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight") else torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, max_shard_size="500MB")
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text())
    config.pop("rope_parameters", None)
    config.update(rotary_pct=0.25, rotary_emb_base=10000)
    cfg_path.write_text(json.dumps(config, indent=2))
    del model
    return folder


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes per second this machine's cores read from RAM: the best of several streaming reads (a sum and a
    matrix-vector product) over a buffer four times the size of the L3 cache, repeated, best run kept."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    matrix = x.view(-1, 4096)
    vector = torch.ones(4096)
    best = float("inf")
    for probe in (x.sum, lambda: torch.mv(matrix, vector)):
        probe()
        for _ in range(repeats):
            start = time.perf_counter()
            probe()
            best = min(best, time.perf_counter() - start)
    return nbytes / best


def rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def peak_rss() -> int:
    """This process image's highest resident set so far, bytes: VmHWM of /proc/self/status (Linux). Not
    getrusage's ru_maxrss, which keeps the peak of the process that forked this one across exec (a test's
    pytest, for one)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the peak RSS is read the Linux way")
