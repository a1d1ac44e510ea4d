"""The moonshot: GPT-NeoX-20B in nf4 under gpu_memory="8GiB", cpu_memory="16GiB" (issue 17).

    python bench/moonshot_20b.py [--folder bench/out/neox-20b-nf4] [--batches 1 16] [--tokens 8] [--out FILE]
    python bench/moonshot_20b.py --shape tiny --write-only --folder DIR      (the writer alone, what the CPU test runs)

1. Writes a GPT-NeoX-20B-shaped checkpoint with random weights, pre-quantized to nf4, in the format
   `neoxlite quantize` writes (transformers' bitsandbytes serialization: each layer's packed weight with its
   quant-state tensors, quantization_config in config.json), one safetensors shard per layer. Each layer is drawn,
   quantized (on the GPU when there is one) and written before the next is drawn: the 40 GB fp16 model never
   exists, and peak RSS stays about one layer above the start (printed, and checked by tests/test_moonshot.py).
   An existing folder of the same shape is reused.
2. Loads it with neoxlite under the budgets and decodes greedily at each batch size: tok/s, the PCIe bound (bytes
   the plan streams per step / measured pinned host-to-device bandwidth) and the share of it, peak GPU memory
   against gpu_memory and peak RSS against cpu_memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, peak_rss, rss  # noqa: E402

# GPT-NeoX-20B (EleutherAI/gpt-neox-20b config.json); `tiny` keeps its structure at a size the CPU test writes
SHAPES = {
    "neox-20b": dict(hidden_size=6144, num_hidden_layers=44, num_attention_heads=64, intermediate_size=24576,
                     vocab_size=50432),
    "tiny": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048,
                 vocab_size=1024),
}


def layer_tensors(config, spec, i: int, device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Layer i's tensors in checkpoint form: random fp16 linears quantized by `spec` on `device`, then on the CPU."""
    from neoxlite.quant import quantize_linear, quantized_state

    C, F = config.hidden_size, config.intermediate_size
    prefix = f"gpt_neox.layers.{i}."
    out: dict[str, torch.Tensor] = {}
    for name, (rows, cols) in {"attention.query_key_value": (3 * C, C), "attention.dense": (C, C),
                               "mlp.dense_h_to_4h": (F, C), "mlp.dense_4h_to_h": (C, F)}.items():
        weight = torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float16) * 0.02
        bias = torch.zeros(rows, dtype=torch.float16, device=device)
        layer = quantize_linear(weight, bias, spec, device)
        del weight
        out.update({f"{prefix}{name}.{key}": t.to("cpu").contiguous() for key, t in quantized_state(layer).items()})
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{prefix}{norm}.weight"] = torch.ones(C, dtype=torch.float16)
        out[f"{prefix}{norm}.bias"] = torch.zeros(C, dtype=torch.float16)
    return out


def write_checkpoint(folder: Path, shape: str, device: torch.device) -> dict[str, int]:
    """Writes the pre-quantized checkpoint (see the module doc); returns RSS before and its peak while writing."""
    from neoxlite.quant import QuantSpec, quantize_linear

    from neoxlite.config import GPTNeoXConfig
    from neoxlite.fileio import atomic_folder

    spec = QuantSpec.from_kwargs(quant="nf4", compute_dtype=torch.float16)
    config = GPTNeoXConfig(**SHAPES[shape], architectures=["GPTNeoXForCausalLM"], torch_dtype="float16",
                           quantization_config=spec.to_config())
    generator = torch.Generator(device=device).manual_seed(0)
    C, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    # quantize once before measuring: the first call loads bitsandbytes' and neoxlite's kernels (RSS not of ours)
    quantize_linear(torch.zeros(64, 64, dtype=torch.float16, device=device), None, spec, device)
    start = rss()
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_folder(folder, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        shards = [lambda: {"gpt_neox.embed_in.weight": (torch.randn(V, C, generator=generator, device=device,
                                                                     dtype=torch.float16) * 0.02).cpu()}]
        shards += [lambda i=i: layer_tensors(config, spec, i, device, generator) for i in range(L)]
        shards += [lambda: {"gpt_neox.final_layer_norm.weight": torch.ones(C, dtype=torch.float16),
                            "gpt_neox.final_layer_norm.bias": torch.zeros(C, dtype=torch.float16),
                            "embed_out.weight": (torch.randn(V, C, generator=generator, device=device,
                                                             dtype=torch.float16) * 0.02).cpu()}]
        for n, make in enumerate(shards, 1):
            tensors = make()  # one shard's tensors alive at a time
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            print(f"\r  wrote shard {n}/{len(shards)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    layer_fp16 = 2 * (4 * C * C + 2 * C * config.intermediate_size)
    return {"rss_start": start, "rss_peak": peak_rss(), "bytes": total, "layer_fp16_bytes": layer_fp16,
            "model_fp16_bytes": L * layer_fp16 + 2 * V * C * 2}


def run(args: argparse.Namespace, folder: Path) -> dict[str, object]:
    from gpu_bench import decode_rate, h2d_bandwidth, prompts

    from neoxlite import GPTNeoXForCausalLM
    from neoxlite.offload.budget import format_size, parse_size

    device = torch.device("cuda")
    gpu_budget, cpu_budget = parse_size(args.gpu_memory), parse_size(args.cpu_memory)
    torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = GPTNeoXForCausalLM.from_pretrained(folder, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                                               max_batch_size=max(args.batches),
                                               max_context=args.prompt_tokens + args.tokens, progress=False)
    load_s = time.perf_counter() - start
    plan = model.offload_plan
    link = h2d_bandwidth()
    figures: dict[str, object] = {"load_s": load_s, "h2d_GBps": link / 1e9, "batches": {}}
    print(f"loaded in {load_s:.0f} s; pinned host->device {link / 1e9:.1f} GB/s; {len(plan.streamed)} blocks streamed",
          flush=True)
    for batch in args.batches:
        ids = prompts(batch, args.prompt_tokens, device)
        rate = decode_rate(lambda n, x=ids: model.generate(x, max_new_tokens=n, eos_token_id=[]), args.tokens, batch,
                           device)
        moved = plan.bytes_moved_per_step(batch).get("cpu->gpu", 0)
        bound = batch / (moved / link) if moved else float("inf")
        figures["batches"][batch] = {"tok_s": rate, "pcie_bound_tok_s": bound, "moved_per_step": moved}
        print(f"  batch {batch:>2}: {rate:.2f} tok/s, PCIe bound {bound:.2f} tok/s ({format_size(moved)}/step) -> "
              f"{rate / bound:.0%}", flush=True)
    peak_gpu = torch.cuda.max_memory_allocated() - base_gpu
    peak_ram = peak_rss()
    figures.update(peak_gpu=peak_gpu, gpu_budget=gpu_budget, peak_rss=peak_ram, cpu_budget=cpu_budget)
    print(f"  peak GPU memory {format_size(peak_gpu)} of {format_size(gpu_budget)} "
          f"({'within' if peak_gpu <= gpu_budget else 'OVER'}); peak RSS {format_size(peak_ram)} of "
          f"{format_size(cpu_budget)} ({'within' if peak_ram <= cpu_budget else 'OVER'})", flush=True)
    figures["within_budgets"] = peak_gpu <= gpu_budget and peak_ram <= cpu_budget
    return figures


def reusable(folder: Path, shape: str) -> bool:
    """A complete checkpoint of this shape is already there (a killed write leaves none: atomic_folder)."""
    if not (folder / "model.safetensors.index.json").exists():
        return False
    config = json.loads((folder / "config.json").read_text())
    return all(config.get(key) == value for key, value in SHAPES[shape].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="neox-20b", choices=sorted(SHAPES))
    parser.add_argument("--folder", type=Path, help="where the checkpoint goes (default bench/out/<shape>-nf4)")
    parser.add_argument("--write-only", action="store_true", help="write the checkpoint, measure nothing")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--gpu-memory", default="8GiB")
    parser.add_argument("--cpu-memory", default="16GiB")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    folder = args.folder or OUT / f"{args.shape}-nf4"
    if not args.write_only and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the moonshot measures a GPU (--write-only writes the checkpoint alone)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures: dict[str, object] = {"shape": args.shape}
    if reusable(folder, args.shape):
        print(f"reusing {folder}", flush=True)
    else:
        start = time.perf_counter()
        written = write_checkpoint(folder, args.shape, device)
        growth = written["rss_peak"] - written["rss_start"]
        print(f"wrote {folder} ({written['bytes'] / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s; RSS grew "
              f"{growth / 1e6:.0f} MB at most while writing: {growth / written['layer_fp16_bytes']:.1f} fp16 layers "
              f"(the fp16 model is {written['model_fp16_bytes'] / 1e9:.2f} GB)", flush=True)
        figures["writer"] = written
    if not args.write_only:
        figures.update(run(args, folder))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
