"""Quantized loading: peak RAM growth and wall time, neoxlite against transformers + bitsandbytes in one run.

    .venv/bin/python bench/load.py [--shape pythia-1.4b] [--modes nf4 int8] [--skip-reference]

Each load runs in a fresh process: after the imports its peak-RSS mark (VmHWM) is reset through
/proc/self/clear_refs, and growth = VmHWM after the load minus VmRSS before it. The fp16 checkpoint (written once under bench/out/) is read through once first so every load
finds it in the page cache. Cases per mode: neoxlite quantizing while it loads; neoxlite loading the
pre-quantized checkpoint that `neoxlite quantize` wrote (no quantization); transformers + bitsandbytes with the
same settings (quant type, double quant, float16 compute dtype, float16 weights, the same skipped modules).
The budget line is the quantized footprint plus two fp16 transformer blocks.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, SHAPES, random_checkpoint  # noqa: E402

CASES = ("neoxlite", "neoxlite-prequantized", "transformers")


def status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def child(case: str, mode: str, folder: str) -> dict:
    """One load in this process; returns its measurements."""
    import torch

    if case == "transformers":
        import transformers
        from neoxlite.quant import QuantSpec

        config = QuantSpec(mode).to_config()
        bnb = transformers.BitsAndBytesConfig(
            **{k: v for k, v in config.items() if not k.startswith("_") and k != "quant_method"}
        )
        load = lambda: transformers.GPTNeoXForCausalLM.from_pretrained(  # noqa: E731
            folder, quantization_config=bnb, dtype=torch.float16, device_map="cpu"
        )
        footprint = lambda m: m.get_memory_footprint()  # noqa: E731
    else:
        import bitsandbytes  # noqa: F401  (imported before the baseline, as in the transformers case)

        from neoxlite import GPTNeoXForCausalLM

        kwargs = {} if case == "neoxlite-prequantized" else {"quant": mode}
        load = lambda: GPTNeoXForCausalLM.from_pretrained(folder, progress=False, **kwargs)  # noqa: E731
        footprint = lambda m: m.memory_footprint()  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (ru_maxrss survives exec)
    before = status("VmRSS")
    start = time.perf_counter()
    model = load()
    wall = time.perf_counter() - start
    peak = status("VmHWM")
    return {"wall": wall, "growth": peak - before, "footprint": footprint(model)}


def run_child(case: str, mode: str, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", case, mode, str(folder)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prequantized(folder: Path, mode: str) -> Path:
    """The pre-quantized checkpoint (written once by quant.serialize, reused)."""
    from neoxlite.quant.serialize import quantize_checkpoint

    dst = folder.with_name(f"{folder.name}-{mode}")
    if not (dst / "config.json").exists():
        start = time.perf_counter()
        quantize_checkpoint(folder, dst, quant=mode, progress=False)
        print(f"[wrote {dst.name} in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return dst


def warm(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-1.4b", choices=sorted(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["nf4", "int8"], choices=["nf4", "fp4", "int8"])
    parser.add_argument("--skip-reference", action="store_true", help="neoxlite only")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    import torch

    folder = random_checkpoint(args.shape, torch.float16)
    shape = SHAPES[args.shape]
    h, f = shape["hidden_size"], shape["intermediate_size"]
    block_fp16 = 2 * (4 * h * h + 2 * h * f + 9 * h + f)  # one transformer layer's weights in fp16
    ckpt_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"{args.shape}: checkpoint {ckpt_bytes / 2**30:.2f} GiB fp16 in {folder.relative_to(OUT.parent)}; "
          f"one fp16 block {block_fp16 / 2**20:.0f} MiB")
    cases = [c for c in CASES if not (args.skip_reference and c == "transformers")]
    for mode in args.modes:
        source = {c: prequantized(folder, mode) if c == "neoxlite-prequantized" else folder for c in cases}
        results = {}
        for case in cases:
            warm(source[case])
            results[case] = r = run_child(case, mode, source[case])
            print(f"  {mode:>4} {case:<22} {r['wall']:6.1f} s  peak growth {r['growth'] / 2**30:5.2f} GiB  "
                  f"footprint {r['footprint'] / 2**30:5.2f} GiB", flush=True)
        ours = results["neoxlite"]
        budget = ours["footprint"] + 2 * block_fp16
        verdict = "within" if ours["growth"] <= budget else "OVER"
        print(f"  {mode:>4} budget (footprint + 2 fp16 blocks) {budget / 2**30:.2f} GiB: neoxlite {verdict}")
        if "transformers" in results:
            ref = results["transformers"]
            for case in ("neoxlite", "neoxlite-prequantized"):
                r = results[case]
                print(f"  {mode:>4} {case} vs transformers: peak growth {r['growth'] / ref['growth']:.2f}x "
                      f"(goal <= 0.33), speed {ref['wall'] / r['wall']:.2f}x (goal >= 2)")


if __name__ == "__main__":
    main()
