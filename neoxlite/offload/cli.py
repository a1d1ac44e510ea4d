"""`neoxlite plan` (where each block would live, and what speed the links allow) and `neoxlite offload`
(list or clear the disk stores in an offload dir)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from neoxlite.offload.budget import format_size
from neoxlite.offload.planner import Links, Plan


def register(sub: argparse._SubParsersAction) -> None:
    from neoxlite.options import add_load_options, add_model_option

    p = sub.add_parser("plan", help="show where each block would live under the given budgets",
                       description="Plan a model's placement without loading it: each block's home (gpu, cpu, "
                       "disk), bytes per tier, bytes moved per generated token and the tokens/s the links allow.")
    add_model_option(p)
    add_load_options(p)
    links = p.add_argument_group("link bandwidths for the speed estimate (GB/s)")
    links.add_argument("--disk-gbps", type=float, default=None, help="disk read (default 2)")
    links.add_argument("--pcie-gbps", type=float, default=None, help="CPU -> GPU copies (default 20)")
    links.add_argument("--cpu-gbps", type=float, default=None, help="CPU memory (default 20)")
    links.add_argument("--gpu-gbps", type=float, default=None, help="GPU memory (default 1500)")
    links.add_argument("--measure-disk", action="store_true",
                       help="measure the disk read speed on the checkpoint's files (uncached reads)")
    p.set_defaults(func=cmd_plan)

    o = sub.add_parser("offload", help="list or clear the disk stores in an offload dir")
    osub = o.add_subparsers(dest="action", required=True)
    for name, helptext in (("list", "show neoxlite's stores and their sizes"),
                           ("clear", "delete neoxlite's stores (other files stay)")):
        a = osub.add_parser(name, help=helptext)
        a.add_argument("--offload-dir", required=True, metavar="DIR")
        a.set_defaults(func=cmd_offload)


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from neoxlite.checkpoint import Checkpoint
    from neoxlite.hub import resolve
    from neoxlite.offload.planner import Links
    from neoxlite.offload.store import measure_read_bandwidth
    from neoxlite.options import load_kwargs

    if args.model is None:
        from neoxlite.demo import demo_path

        args.model = str(demo_path())
    if args.device is None and args.gpu_memory is not None:
        args.device = "cuda"  # a GPU budget plans for a GPU, whether or not this machine has one
    kw = load_kwargs(args)
    if kw["device"].startswith("cuda") and not torch.cuda.is_available():
        if kw.get("gpu_memory") is None:
            raise ValueError("this machine has no CUDA device: give the GPU's memory (--gpu-memory 24GiB) to plan "
                             "for one")
        print(f"[no CUDA device here: planning for one with --gpu-memory {kw['gpu_memory']}, its host link at "
              f"{(args.pcie_gbps or Links.pcie / 1e9):.3g} GB/s (--pcie-gbps)]", file=sys.stderr)
    for flag in ("disk", "pcie", "cpu", "gpu"):
        value = getattr(args, f"{flag}_gbps")
        if value is not None and not 0 < value < float("inf"):  # refuses NaN too
            raise ValueError(f"--{flag}-gbps must be a positive number of GB/s, got {value}")
    overrides = {name: getattr(args, f"{flag}_gbps") * 1e9 for name, flag in
                 (("disk", "disk"), ("pcie", "pcie"), ("cpu_memory", "cpu"), ("gpu_memory", "gpu"))
                 if getattr(args, f"{flag}_gbps") is not None}
    if args.measure_disk:
        folder = resolve(args.model)
        ckpt = Checkpoint(folder)
        files = [folder / shard for shard in sorted(set(ckpt.shard_of.values()))]
        start = time.perf_counter()
        overrides["disk"] = measure_read_bandwidth(files)
        print(f"[disk read: {overrides['disk'] / 1e9:.2f} GB/s, measured in {time.perf_counter() - start:.1f} s]",
              file=sys.stderr)
    what, plan = plan_checkpoint(args.model, kw, dataclasses.replace(Links(), **overrides))
    print(what)
    print(plan.explain(kw.get("max_batch_size", 1)))
    print("(set the bandwidths with --disk-gbps, --pcie-gbps, --cpu-gbps, --gpu-gbps; the batch with "
          "--max-batch-size)")
    return 0


def plan_checkpoint(model: str | os.PathLike, kw: dict[str, Any], links: Links | None = None) -> tuple[str, Plan]:
    """(one line naming the checkpoint, its size and dtype; the plan) for a folder or hub id under the
    `from_pretrained` keywords `kw` (quant, dtype, device, budgets...), without loading any weights."""
    import torch

    from neoxlite.checkpoint import Checkpoint
    from neoxlite.config import GPTNeoXConfig
    from neoxlite.hub import resolve
    from neoxlite.loading import check_layer_count, parse_dtype, stored_float_dtype
    from neoxlite.model import GPTNeoXForCausalLM
    from neoxlite.offload.placement import Workload, plan_model, quantized_layer_names
    from neoxlite.quant.model import resolve_spec

    folder = resolve(model)
    config = GPTNeoXConfig.from_json_file(folder / "config.json")
    spec, prequantized = resolve_spec(config.quantization_config, quant=kw.get("quant"),
                                      compute_dtype=kw.get("compute_dtype"))
    ckpt = Checkpoint(folder)
    check_layer_count(ckpt, config, folder)
    dtype = parse_dtype(kw.get("dtype")) or stored_float_dtype(ckpt)  # the loader's own rule
    try:  # not the loader's check: a plan for a GPU this machine lacks is what a buyer asks for
        device = torch.device(kw.get("device") or "cpu")
    except RuntimeError:
        raise ValueError(f"unknown device {kw.get('device')!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    with torch.device("meta"):
        skeleton = GPTNeoXForCausalLM(config)
    plan = plan_model(skeleton, dtype=dtype, device=device, spec=spec,
                      quantized=quantized_layer_names(skeleton, spec, prequantized),
                      gpu_memory=kw.get("gpu_memory"), cpu_memory=kw.get("cpu_memory"),
                      offload_dir=kw.get("offload_dir"),
                      workload=Workload(kw.get("max_batch_size", 1), kw.get("max_context")), links=links or Links())
    what = f"{folder.name}: {len(plan.homes)} blocks, {format_size(sum(plan.block_bytes.values()))} in {dtype}"
    if spec.enabled:
        what += f" ({spec.describe()})"
    return what, plan


def cmd_offload(args: argparse.Namespace) -> int:
    from neoxlite.offload.store import list_stores, remove

    if not args.offload_dir.strip():  # "" would be the current folder
        raise ValueError("--offload-dir is empty; give the offload folder, e.g. --offload-dir ~/.cache/neoxlite/offload")
    if args.action == "list":
        stores = list_stores(args.offload_dir)
        for path, nbytes in stores:
            print(f"{format_size(nbytes):>11}  {path}")
    else:
        removal = remove(args.offload_dir)
        for path, nbytes in removal.removed:
            print(f"removed {path} ({format_size(nbytes)})")
        for path, foreign in removal.kept:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            print(f"kept {path}: it holds files neoxlite did not write ({shown}); move them out, or delete the "
                  "folder yourself if it is yours to delete")
        stores = removal.removed + removal.kept
    if not stores:
        print(f"no neoxlite stores in {args.offload_dir}")
    return 0
