"""Disk offload under a CPU budget: neoxlite against accelerate's disk offload, in the same run.

    .venv/bin/python bench/offload.py [--shape pythia-1.4b] [--cpu-memory 1GiB] [--batches 1 4 16]
                                      [--new-tokens 8] [--prompt-tokens 16] [--repeats 2] [--threads N]
                                      [--skip-accelerate] [--cold] [--ram-limit 3GiB] [--quant nf4]

A pythia-1.4b-shaped random checkpoint (2.6 GiB in bf16) is decoded greedily with a 1 GiB CPU budget; whatever
does not fit is read from the offload dir at every step. Each measurement runs in a fresh process and reports
  - decode tokens/s (batch x new tokens after the first, over their time; prefill excluded; the best of
    --repeats generations in the same process), and neoxlite's with every weight in RAM for reference,
  - peak RSS growth of the process over its state just before loading (VmHWM, reset at that point),
  - for neoxlite, the share of the disk-read bound: bytes the plan reads per step / the disk's read bandwidth for
    those blocks (read the ways the scheduler reads them, one or two at a time, after dropping them from the page
    cache; the faster counts). Without --cold the store stays in the page cache of a machine with RAM to spare
    and runs can beat that bound; --cold drops each block's pages after use, so every step reads from the disk
    itself.
accelerate runs `AutoModelForCausalLM.from_pretrained(device_map="auto", max_memory={"cpu": budget},
offload_folder=...)` with the same dtype, prompts and token counts.

--ram-limit SIZE runs every measurement in a memory cgroup of SIZE (page cache included; needs root and a
cgroup v1 or v2 memory controller), after dropping the checkpoint and both stores from the page cache: the
machine the issue describes, whose RAM cannot keep the model cached, so both engines really read the disk.

--quant MODE (nf4, fp4, int8; compute dtype bf16) quantizes the linear layers, offloaded blocks included, and
times neoxlite a second time with NEOXLITE_CPU_KERNELS=0 (bitsandbytes' CPU kernels for the quantized layers):
the gain of neoxlite's quantized kernels. accelerate is not run then (its disk offload takes no bitsandbytes
layers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, peak_rss, random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ child processes
def _baseline() -> int:
    """Resets the high-water RSS mark to now and returns the current RSS."""
    import psutil

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return psutil.Process().memory_info().rss


def _prompts(batch: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(100, 50000, (batch, tokens), generator=g)


def _timed_generate(model: torch.nn.Module, args: argparse.Namespace) -> float:
    """Best decode tokens/s of --repeats greedy generations of --new-tokens for a batch of --batch prompts."""
    ids = _prompts(args.batch, args.prompt_tokens)
    tok_s = 0.0
    for _ in range(args.repeats):
        stamps = []
        for _ in model.stream_generate(ids, max_new_tokens=args.new_tokens, eos_token_id=-1):
            stamps.append(time.perf_counter())
        tok_s = max(tok_s, args.batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return tok_s


def child_resident(args: argparse.Namespace) -> dict:
    """neoxlite with every weight in RAM (no budget): the compute-bound speed offloading is measured against."""
    from neoxlite.model import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16, progress=False, **_quant(args))
    return dict(tok_s=_timed_generate(model, args))


def _quant(args: argparse.Namespace) -> dict:
    return {"quant": args.quant, "compute_dtype": torch.bfloat16} if args.quant else {}


def child_neoxlite(args: argparse.Namespace) -> dict:
    from neoxlite.config import GPTNeoXConfig
    from neoxlite.model import GPTNeoXForCausalLM
    from neoxlite.offload.store import drop_cached, map_data, read_ahead

    with torch.device("meta"):  # one-time library setup (meta kernels) before the baseline
        GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=8))
    before = _baseline()
    start = time.perf_counter()
    model = GPTNeoXForCausalLM.from_pretrained(
        args.ckpt, dtype=torch.bfloat16, cpu_memory=args.cpu_memory, offload_dir=args.offload_dir,
        max_batch_size=args.batch, max_context=args.prompt_tokens + args.new_tokens, progress=False, **_quant(args))
    load_s = time.perf_counter() - start
    scheduler = model.gpt_neox.scheduler
    if args.cold:  # every disk layer dropped after use (by default only those the page cache cannot keep)
        scheduler.uncached = {i for i, src in scheduler.sources.items() if hasattr(src, "entry")}
    tok_s = _timed_generate(model, args)
    growth = peak_rss() - before
    plan = model.offload_plan
    moved = plan.bytes_moved_per_step(args.batch).get("disk->cpu", 0)
    # The disk's speed for the scheduler's own reads of these blocks, caches dropped first: one after the other
    # (mapped and populated, as the worker thread does), and two at a time (the worker and the reader thread);
    # the faster of the two is the bound.
    entries = [src.entry for src in scheduler.sources.values()]
    bandwidth = 0.0
    for streams in (1, 2):
        for entry in entries:
            drop_cached(entry)
        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(map_data if streams == 1 else read_ahead, entries))
        bandwidth = max(bandwidth, sum(e.data_bytes for e in entries) / (time.perf_counter() - start))
    bound = args.batch / (moved / bandwidth) if moved else float("inf")
    # Disk layers the page cache cannot keep are dropped after use (scheduler.uncached); the others stay cached,
    # so only the uncached bytes come from the disk once the first step has read everything.
    uncached = sum(scheduler.sources[i].layout.nbytes for i in scheduler.uncached)
    return dict(tok_s=tok_s, growth=growth, load_s=load_s, read_gbps=bandwidth / 1e9, bound_tok_s=bound,
                moved=moved, on_disk=len(plan.blocks_on("disk")), blocks=len(plan.homes), uncached=uncached,
                uncached_bound_tok_s=args.batch / (uncached / bandwidth) if uncached else float("inf"))


def child_accelerate(args: argparse.Namespace) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    transformers.logging.set_verbosity_error()
    before = _baseline()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.ckpt, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": args.cpu_memory},
        offload_folder=args.offload_dir)
    load_s = time.perf_counter() - start
    stamps: list[float] = []

    class Stamp(LogitsProcessor):  # called once per step, after that step's forward pass
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = _prompts(args.batch, args.prompt_tokens)
    tok_s = 0.0
    for _ in range(args.repeats):
        stamps.clear()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0)
        tok_s = max(tok_s, args.batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    on_disk = sum(1 for d in model.hf_device_map.values() if d == "disk")
    return dict(tok_s=tok_s, growth=peak_rss() - before, load_s=load_s, on_disk=on_disk,
                blocks=len(model.hf_device_map))


# ------------------------------------------------------------------------------------------ a smaller machine
class MemoryCgroup:
    """A memory cgroup (v1 or v2) holding a child process to `limit` bytes of RAM, page cache included."""

    def __init__(self, limit: int) -> None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            self.path, limit_file = Path(f"/sys/fs/cgroup/neoxlite-bench-{os.getpid()}"), "memory.max"
        else:
            self.path, limit_file = Path(f"/sys/fs/cgroup/memory/neoxlite-bench-{os.getpid()}"), "memory.limit_in_bytes"
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / limit_file).write_text(str(limit))
        except OSError as err:
            raise SystemExit(f"--ram-limit needs a writable cgroup memory controller (root): {err}") from err

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def drop_page_cache(*folders: Path) -> None:
    """Evicts every file under `folders` from the page cache (so a limited child starts cold)."""
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def run_child(engine: str, args: argparse.Namespace, batch: int, offload_dir: Path, kernels: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--ckpt", str(args.ckpt), "--batch", str(batch),
           "--offload-dir", str(offload_dir), "--cpu-memory", args.cpu_memory,
           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.cold:
        cmd.append("--cold")
    if args.quant:
        cmd += ["--quant", args.quant]
    env = {**os.environ, "PYTHONPATH": str(REPO), **({} if kernels else {"NEOXLITE_CPU_KERNELS": "0"})}
    cgroup = args.cgroup
    if cgroup is not None:
        drop_page_cache(args.ckpt, offload_dir)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         preexec_fn=cgroup.enter if cgroup is not None else None)
    if run.returncode:
        killed = " (killed: over --ram-limit?)" if run.returncode < 0 or run.returncode == 137 else ""
        raise SystemExit(f"{engine} batch {batch} failed{killed}:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-1.4b")
    parser.add_argument("--cpu-memory", default="1GiB")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="generations timed per process (best counts)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads in both engines (1 is faster on a machine other jobs keep busy)")
    parser.add_argument("--skip-accelerate", action="store_true")
    parser.add_argument("--cold", action="store_true", help="neoxlite drops each block's cached pages after use")
    parser.add_argument("--ram-limit", help="run each measurement in a memory cgroup of this size (e.g. 3GiB)")
    parser.add_argument("--quant", choices=["nf4", "fp4", "int8"],
                        help="quantized linears; also timed with bitsandbytes' CPU kernels (the kernels' gain)")
    parser.add_argument("--child", choices=["neoxlite", "accelerate", "resident"], help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child = {"neoxlite": child_neoxlite, "accelerate": child_accelerate, "resident": child_resident}[args.child]
        result = child(args)
        print(json.dumps(result))
        return

    args.cgroup = MemoryCgroup(_size(args.ram_limit)) if args.ram_limit else None
    args.ckpt = random_checkpoint(args.shape, torch.bfloat16)
    size = sum(f.stat().st_size for f in args.ckpt.glob("*.safetensors"))
    if args.quant:
        args.skip_accelerate = True  # accelerate's disk offload does not take bitsandbytes layers
    print(f"{args.shape} bf16{f' quantized {args.quant}' if args.quant else ''} ({size / 2**30:.2f} GiB on disk "
          f"unquantized), cpu_memory={args.cpu_memory}, prompt {args.prompt_tokens} "
          f"tokens, {args.new_tokens} new, torch threads {args.threads}, best of {args.repeats}"
          f"{', cold reads' if args.cold else ''}"
          f"{f', each process limited to {args.ram_limit} of RAM (page cache included)' if args.ram_limit else ''}",
          file=sys.stderr)
    from neoxlite.cpu_kernels import kernel_status

    # which engine computes each batch's linears: on a CPU with AMX, batches above the measured crossover
    # (about 4 rows) take oneDNN's matrix-engine matmul, which is where batch 16 gains
    print(f"CPU linears: {kernel_status()}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="offload-bench-", dir=OUT))
    ours_dir, theirs_dir = work / "neoxlite", work / "accelerate"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    # The first load writes neoxlite's store (timed separately): later runs reuse it, as users' runs do.
    first = run_child("neoxlite", args, args.batches[0], ours_dir)
    print(f"neoxlite first load (writes the store): {first['load_s']:.1f} s", file=sys.stderr)
    rows = []
    for batch in args.batches:
        ours = run_child("neoxlite", args, batch, ours_dir)
        # With --ram-limit the whole model does not fit the limited machine's RAM: no all-in-RAM reference there.
        resident = None if args.cgroup else run_child("resident", args, batch, ours_dir)
        theirs = None if args.skip_accelerate else run_child("accelerate", args, batch, theirs_dir)
        bnb_kernels = run_child("neoxlite", args, batch, ours_dir, kernels=False) if args.quant else None
        rows.append((batch, ours, theirs))
        line = (f"batch {batch:>2}: neoxlite {ours['tok_s']:6.2f} tok/s, RSS +{ours['growth'] / 2**30:.2f} GiB, "
                f"{ours['tok_s'] / ours['bound_tok_s']:.0%} of the disk-read bound ({ours['bound_tok_s']:.2f} tok/s "
                f"at {ours['read_gbps']:.2f} GB/s uncached, {ours['moved'] / 2**30:.2f} GiB/step, "
                f"{ours['on_disk']}/{ours['blocks']} blocks on disk), load {ours['load_s']:.1f} s")
        if 0 < ours["uncached"] < ours["moved"]:  # (with no limit known, the kernel's own LRU decides)
            line += (f"\n          page cache keeps {(ours['moved'] - ours['uncached']) / 2**30:.2f} GiB of them: "
                     f"{ours['uncached'] / 2**30:.2f} GiB/step read from disk, bound for that "
                     f"{ours['uncached_bound_tok_s']:.2f} tok/s -> {ours['tok_s'] / ours['uncached_bound_tok_s']:.0%}")
        if resident:
            line += (f"\n          all in RAM (no budget) {resident['tok_s']:6.2f} tok/s: offloaded runs at "
                     f"{ours['tok_s'] / resident['tok_s']:.0%} of it")
        if bnb_kernels:
            line += (f"\n          with bitsandbytes' CPU kernels (NEOXLITE_CPU_KERNELS=0) {bnb_kernels['tok_s']:6.2f} "
                     f"tok/s: neoxlite's {args.quant} kernels gain {ours['tok_s'] / bnb_kernels['tok_s']:.2f}x")
        if theirs:
            line += (f"\n          accelerate {theirs['tok_s']:6.2f} tok/s, RSS +{theirs['growth'] / 2**30:.2f} GiB "
                     f"({theirs['on_disk']}/{theirs['blocks']} modules on disk), load {theirs['load_s']:.1f} s"
                     f"\n          ratio {ours['tok_s'] / theirs['tok_s']:.1f}x")
        print(line, flush=True)
    budget = _size(args.cpu_memory)
    print(f"budget {args.cpu_memory}: neoxlite peak RSS growth " +
          ", ".join(f"b{b} {o['growth'] / budget:.2f}x" for b, o, _ in rows) + " of the budget")
    if len(rows) > 1:
        print("neoxlite throughput vs batch 1: " + ", ".join(f"b{b} {o['tok_s'] / rows[0][1]['tok_s']:.1f}x"
                                                               for b, o, _ in rows))
    if args.cgroup is not None:
        args.cgroup.close()
    print(f"(stores in {work}; remove with: neoxlite offload clear --offload-dir {ours_dir})", file=sys.stderr)


def _size(text: str) -> int:
    from neoxlite.offload.budget import parse_size

    return parse_size(text)


if __name__ == "__main__":
    main()
