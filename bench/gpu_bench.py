"""GPU benchmarks for bench/gpu_check.sh (one lent CUDA machine, a few minutes).

    python bench/gpu_bench.py [--shape pythia-1.4b] [--gpu-memory 1GiB] [--batches 1 4 16] [--tokens 32]
                              [--skip resident compiled offloaded] [--out FILE.jsonl]

1. Resident decode, fp16 and nf4, at each batch size: neoxlite (captured decode step, and eager) against
   transformers' eager generate (fp16) and transformers + bitsandbytes (nf4, same settings), greedy: tokens/s,
   share of the weight-read bound (the GPU's measured read bandwidth / weight bytes per step, times the batch),
   same tokens or not. Then ("compiled") fp16 batch 1 against transformers with a static cache + torch.compile.
2. Offloaded decode with a GPU budget smaller than the model: neoxlite (gpu_memory=budget, rest in pinned RAM)
   against accelerate's CPU offload (device_map="auto", max_memory={0: budget, "cpu": ...}) at each batch size:
   tokens/s, peak GPU memory against the budget, and the PCIe bound (bytes the plan moves per step / measured
   pinned host-to-device bandwidth) with neoxlite's share of it.
`--smoke` runs the same code on the CPU with a tiny shape (checks the script, measures nothing of interest).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, SHAPES, random_checkpoint  # noqa: E402

SHAPES.setdefault("tiny", dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(run: Callable[[int], object], tokens: int, batch: int, device: torch.device) -> float:
    """Decode tokens/s: (time of `tokens` new) - (time of 1 new), best of 2, for a whole batch."""
    run(2)
    best_long = best_short = float("inf")
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        run(1)
        sync(device)
        best_short = min(best_short, time.perf_counter() - start)
        start = time.perf_counter()
        run(tokens)
        sync(device)
        best_long = min(best_long, time.perf_counter() - start)
    return batch * (tokens - 1) / max(best_long - best_short, 1e-9)


def h2d_bandwidth(nbytes: int = 256 << 20) -> float:
    """Pinned host -> device copy bandwidth, bytes/s (best of 5)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def device_read_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s the compute device reads its own memory (best of 5 sums)."""
    x = torch.ones(nbytes // 2, dtype=torch.float16, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    del x
    return nbytes / best


def free() -> None:
    """Returns the memory of models the caller has just dropped (`del model` first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts(batch: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.randint(100, 50000, (batch, n), generator=torch.Generator().manual_seed(batch)).to(device)


def record(args: argparse.Namespace, **figures: object) -> None:
    """One JSON line of figures in --out (gpu_check.sh points it into $OUT), beside the printed line."""
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(figures) + "\n")


def resident(args: argparse.Namespace, folder: Path, device: torch.device) -> None:
    """Greedy decode with every weight on the GPU, fp16 then nf4, at each batch size: neoxlite with its captured
    decode step and without, against transformers' eager generate (fp16) and transformers + bitsandbytes (nf4).
    The bound: the GPU's measured read bandwidth / bytes of weights a step reads, times the batch."""
    import transformers
    from neoxlite.quant import QuantSpec

    from neoxlite import GPTNeoXForCausalLM, cuda_graphs

    bandwidth = device_read_bandwidth(device)
    for mode in ("fp16", "nf4"):
        qkw = {} if mode == "fp16" else dict(quant="nf4", compute_dtype=torch.float16)
        ours = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float16, device=device, progress=False, **qkw)
        nbytes = sum(ours.block_sizes().values()) - ours.block_sizes()["embed_in"]
        rates: dict[tuple[str, int], float] = {}
        tokens: dict[int, torch.Tensor] = {}
        for batch in args.batches:
            ids = prompts(batch, args.prompt_tokens, device)
            for graphs in (True, False):
                rates["neoxlite" if graphs else "neoxlite eager", batch] = decode_rate(
                    lambda n, m=ours, x=ids, g=graphs: m.generate(x, max_new_tokens=n, eos_token_id=[], cuda_graphs=g),
                    args.tokens, batch, device)
            tokens[batch] = ours.generate(ids, max_new_tokens=16, eos_token_id=[]).cpu()
        status = cuda_graphs.describe(ours)
        del ours
        free()
        ref_kw = {}
        if qkw:
            config = QuantSpec.from_kwargs(**qkw).to_config()
            ref_kw["quantization_config"] = transformers.BitsAndBytesConfig(
                **{k: v for k, v in config.items() if not k.startswith("_") and k != "quant_method"})
        ref = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map={"": device},
                                                              **ref_kw).eval()
        reference = "transformers" + ("+bnb" if qkw else "")
        same = {}
        for batch in args.batches:
            ids = prompts(batch, args.prompt_tokens, device)
            rates[reference, batch] = decode_rate(lambda n, m=ref, x=ids: reference_generate(m, x, n), args.tokens,
                                                  batch, device)
            same[batch] = torch.equal(reference_generate(ref, ids, 16).cpu(), tokens[batch])
        del ref
        free()
        print(f"resident {mode} ({args.shape}), weights {nbytes / 1e9:.2f} GB/step at {bandwidth / 1e12:.2f} TB/s; "
              f"{status.replace(chr(10), '; ')}", flush=True)
        for batch in args.batches:
            bound = batch * bandwidth / nbytes
            ours_rate = rates["neoxlite", batch]
            parts = [f"{name} {rate:.1f} tok/s ({rate / bound:.0%})" for (name, b), rate in rates.items() if b == batch]
            ratio = ours_rate / rates[reference, batch] if (reference, batch) in rates else float("nan")
            print(f"  batch {batch:>2}: bound {bound:.0f} tok/s; " + ", ".join(parts)
                  + f"; neoxlite/{reference} {ratio:.1f}x; same 16 greedy tokens as {reference}: "
                  f"{same.get(batch)}", flush=True)
            record(args, section="resident", mode=mode, shape=args.shape, batch=batch, bound_tok_s=bound,
                   rates={name: rate for (name, b), rate in rates.items() if b == batch},
                   same_tokens=same.get(batch), graphs=status)


def reference_generate(model: torch.nn.Module, ids: torch.Tensor, n: int, **extra: object) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, **extra)


def compiled(args: argparse.Namespace, folder: Path, device: torch.device) -> None:
    """transformers with a static cache, which its generate compiles with torch.compile on a GPU (fp16, batch 1;
    compiling costs a minute or more, so it runs after the figures above are out), beside neoxlite again."""
    import transformers

    from neoxlite import GPTNeoXForCausalLM

    ids = prompts(1, args.prompt_tokens, device)
    ours = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float16, device=device, progress=False)
    nbytes = sum(ours.block_sizes().values()) - ours.block_sizes()["embed_in"]
    ours_rate = decode_rate(lambda n, m=ours: m.generate(ids, max_new_tokens=n, eos_token_id=[]), args.tokens, 1,
                            device)
    del ours
    free()
    ref = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map={"": device}).eval()
    start = time.perf_counter()
    reference_generate(ref, ids, 4, cache_implementation="static")  # the compilation
    compile_s = time.perf_counter() - start
    rate = decode_rate(lambda n, m=ref: reference_generate(m, ids, n, cache_implementation="static"), args.tokens, 1,
                       device)
    del ref
    free()
    bound = device_read_bandwidth(device) / nbytes
    print(f"resident fp16 ({args.shape}, batch 1): transformers static cache + torch.compile {rate:.1f} tok/s "
          f"({rate / bound:.0%} of the bound, compiled in {compile_s:.0f} s); neoxlite {ours_rate:.1f} tok/s "
          f"({ours_rate / bound:.0%}); ratio {ours_rate / rate:.2f}x", flush=True)
    record(args, section="compiled", shape=args.shape, batch=1, bound_tok_s=bound, compile_s=compile_s,
           rates={"transformers static+compile": rate, "neoxlite": ours_rate})


def offloaded(args: argparse.Namespace, folder: Path, device: torch.device) -> None:
    import transformers

    from neoxlite import GPTNeoXForCausalLM
    from neoxlite.offload.budget import format_size, parse_size

    budget = parse_size(args.gpu_memory)
    link = h2d_bandwidth() if device.type == "cuda" else float("nan")
    print(f"offloaded fp16 ({args.shape}), gpu_memory={args.gpu_memory}, pinned host->device "
          f"{link / 1e9:.1f} GB/s", flush=True)
    for batch in args.batches:
        ids = prompts(batch, args.prompt_tokens, device)
        context = args.prompt_tokens + args.tokens
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ours = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float16, device=device, progress=False,
                                                  gpu_memory=budget if device.type == "cuda" else None,
                                                  cpu_memory="64GiB", max_batch_size=batch, max_context=context)
        plan = ours.offload_plan
        ours_rate = decode_rate(lambda n, m=ours, x=ids: m.generate(x, max_new_tokens=n, eos_token_id=[]),
                                args.tokens, batch, device)
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
        moved = plan.bytes_moved_per_step(batch).get("cpu->gpu", 0)
        pcie_bound = batch / (moved / link) if moved else float("inf")
        streamed = len(plan.streamed)
        del ours
        free()
        max_memory = {0: budget, "cpu": "64GiB"} if device.type == "cuda" else {"cpu": "64GiB"}
        ref = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="auto",
                                                              max_memory=max_memory).eval()

        def ref_run(n: int, x=ids, m=ref) -> torch.Tensor:
            return m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

        ref_rate = decode_rate(ref_run, args.tokens, batch, device)
        del ref, ref_run
        free()
        print(f"  batch {batch:>2}: neoxlite {ours_rate:7.2f} tok/s ({streamed} layers streamed, "
              f"{format_size(moved)}/step, PCIe bound {pcie_bound:.2f} tok/s -> {ours_rate / pcie_bound:.0%}), "
              f"peak GPU {format_size(peak)} of {format_size(budget)}; accelerate {ref_rate:7.2f} tok/s; "
              f"ratio {ours_rate / ref_rate:.1f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-1.4b")
    parser.add_argument("--gpu-memory", default="1GiB")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[], choices=["resident", "compiled", "offloaded"])
    parser.add_argument("--out", type=Path, help="append the figures here as JSON lines")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.tokens, args.batches, device = "tiny", 4, [1, 2], torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")
        device = torch.device("cuda")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    folder = random_checkpoint(args.shape, torch.float16, OUT / f"{args.shape}-float16")
    failed = []
    # Each section runs even when one before it fails: a lent GPU's minutes are too few to rerun everything.
    for name, section in (("resident", resident), ("compiled", compiled), ("offloaded", offloaded)):
        if name in args.skip:
            continue
        try:
            section(args, folder, device)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            free()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
