"""`neoxlite quantize SRC DST --quant nf4|fp4|int8`: write a pre-quantized checkpoint (transformers' format)."""

from __future__ import annotations

import argparse
import math
import sys
import time

from neoxlite.options import DTYPES, QUANT_MODES

from .spec import DEFAULT_SKIP_MODULES


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quantize",
        help="write a pre-quantized checkpoint (bitsandbytes int8/nf4/fp4, transformers' format)",
        description="Quantize SRC block by block and write DST atomically: safetensors with each layer's quant "
        "state and quantization_config in config.json, loadable by transformers and by neoxlite as it is.",
    )
    parser.add_argument("src", help="checkpoint folder or hub id")
    parser.add_argument("dst", help="folder to create")
    parser.add_argument("--quant", required=True, choices=[m for m in QUANT_MODES if m != "none"])
    parser.add_argument("--compute-dtype", choices=DTYPES[1:], default=None,
                        help="dtype 4-bit layers compute in, stored in the config (default: float16)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="4-bit: keep the block scales in float32 instead of quantizing them again")
    parser.add_argument("--int8-threshold", type=float, default=6.0,
                        help="int8: activation outlier threshold of LLM.int8() (0: off; default 6.0)")
    parser.add_argument("--skip-modules", nargs="+", default=None, metavar="NAME",
                        help=f"layers kept in full precision (default: {' '.join(DEFAULT_SKIP_MODULES)})")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype of the full-precision layers, and of the weights before quantizing "
                        "(default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="where to quantize (default: cpu)")
    parser.add_argument("--max-shard-size", default="2GiB", help='largest safetensors shard (default: "2GiB")')
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from neoxlite.checkpoint import Checkpoint

    from .model import format_block_table
    from .serialize import quantize_checkpoint

    if not math.isfinite(args.int8_threshold):  # json.dumps would write NaN/Infinity, which is not JSON
        raise ValueError(f"--int8-threshold must be a finite number (0 turns outlier handling off), "
                         f"got {args.int8_threshold}")
    if args.skip_modules is not None and not all(name.strip() for name in args.skip_modules):
        # "" is a part of every layer's name: it would keep the whole model unquantized
        raise ValueError(f"--skip-modules takes layer names, got an empty one in {args.skip_modules}")
    start = time.perf_counter()
    model = quantize_checkpoint(
        args.src,
        args.dst,
        quant=args.quant,
        compute_dtype=args.compute_dtype,  # a name ("bf16", "bfloat16", ...): the spec parses every spelling
        double_quant=args.double_quant,
        int8_threshold=args.int8_threshold,
        skip_modules=args.skip_modules,
        dtype=args.dtype,  # likewise parsed by the loader's dtype table ("auto": the checkpoint's)
        device=args.device,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    written = Checkpoint(args.dst).total_bytes()
    print(f"[quantized in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print(f"wrote {args.dst}: {model.quant_spec.describe()}, {written:,} bytes of weights")
    print(format_block_table(model.block_sizes()))
    return 0
