"""Greedy decode speed on this machine: neoxlite against transformers in the same run, and the bandwidth bound.

    .venv/bin/python bench/decode.py [--shape pythia-410m] [--dtypes bf16 fp32] [--tokens 64]
    .venv/bin/python bench/decode.py --dtypes bf16 --quant int8 nf4 fp4    (bitsandbytes layers, compute dtype = dtype)
    .venv/bin/python bench/decode.py --dtypes bf16 --quant none nf4 int8 --llama-cpp $L/lcpp --llama-cpp-src SRC
    .venv/bin/python bench/decode.py --dtypes bf16 --batch 1 4 16 32 --skip-reference   (batched decode)

Decoding one token reads every weight once (the embedding only one row), so tokens/s can be at most
read bandwidth / weight bytes. The bandwidth of a shared machine drifts by a third within minutes, so it is
probed before and after every timed model, and the share of the bound is taken against the highest probe of the
whole run (the conservative choice; the range seen is printed). Each figure is the median of several timed runs of `tokens` new tokens after
a fixed prompt, with prefill subtracted (a run of 1 new token is timed the same way).

With --batch, each model decodes batches of that many sequences; tokens/s counts every sequence's tokens, and
the bound is per step (one read of the weights serves the whole batch). Which engine computes which batch (the
kernel, or oneDNN on AMX above the measured crossover) is in the status line printed first.

Quantized layers run neoxlite's kernels (neoxlite/csrc/linear_quant.c); the reference is transformers +
bitsandbytes with the same settings. With --llama-cpp VENV (a virtualenv with llama-cpp-python, built as
../shared/anchors/README.md says) and --llama-cpp-src (llama.cpp's source tree, for its GGUF converter), llama.cpp
decodes the same checkpoint beside each row (f16 beside bf16, q8_0 beside int8, q4_0 beside nf4/fp4) with the
anchors' own script; the GGUF files are converted once and kept outside the repository, under
$TMPDIR/neoxlite-gguf (--gguf-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, random_checkpoint, read_bandwidth  # noqa: E402

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors"
TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
LLAMA_TYPES = {"none": "f16", "int8": "q8_0", "nf4": "q4_0", "fp4": "q4_0"}  # llama.cpp's counterpart of each mode

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def decode_rate(run: Callable[[int], None], tokens: int, repeats: int) -> float:
    """Tokens/s of the decode phase: (time for `tokens` new) - (time for 1 new), over tokens - 1."""
    run(4)  # warm up caches and lazy kernels
    long_runs, short_runs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run(1)
        short_runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        run(tokens)
        long_runs.append(time.perf_counter() - start)
    return (tokens - 1) / (statistics.median(long_runs) - statistics.median(short_runs))


def decode_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decoded token reads: every block but the input embedding table (one row is read).
    Quantized layers count their packed weights and quant state, packed bf16 layers their blocked copy."""
    sizes = model.block_sizes()
    return sum(sizes.values()) - sizes["embed_in"]


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Runs one llama.cpp step; a failure stops the benchmark with the step's own error output."""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp {what} failed (exit {done.returncode}): {' '.join(command)}\n"
                         f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def llama_cpp_rate(venv: Path, source: Path, scratch: Path, folder: Path, mode: str, tokens: int) -> str:
    """llama.cpp's decode figure for `folder` in the counterpart of `mode`, as the anchors' script prints it."""
    python = venv / "bin" / "python"
    kind = LLAMA_TYPES[mode]
    scratch.mkdir(parents=True, exist_ok=True)
    gguf = scratch / f"{folder.name}-{kind}.gguf"
    if not gguf.exists():
        staged = scratch / f"{folder.name}-input"  # the checkpoint plus the tokenizer files the converter wants
        staged.mkdir(exist_ok=True)
        for item in folder.iterdir():
            if not (staged / item.name).exists():
                (staged / item.name).symlink_to(item.resolve())
        shutil.copy(TOKENIZER, staged / "tokenizer.json")
        (staged / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPTNeoXTokenizer"}))
        env = {**os.environ, "LLAMA_CPP_SRC": str(source)}
        outtype = "q8_0" if kind == "q8_0" else "f16"
        converted = gguf if kind != "q4_0" else scratch / f"{folder.name}-f16.gguf"
        if not converted.exists():  # written under a temporary name: an interrupted run leaves no half file
            partial = converted.with_suffix(".partial")
            _run([sys.executable, str(ANCHORS / "gguf_convert.py"), str(staged), "--outtype", outtype,
                  "--outfile", str(partial)], f"conversion to {outtype}", env)
            partial.replace(converted)
        if kind == "q4_0":
            quantize = ("import llama_cpp, ctypes, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                        "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; "
                        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), "
                        "ctypes.byref(p)))")
            partial = gguf.with_suffix(".partial")
            _run([str(python), "-c", quantize, str(converted), str(partial)], "q4_0 quantization")
            partial.replace(gguf)
    out = _run([str(python), str(ANCHORS / "llamacpp_bench.py"), str(gguf), str(tokens)], "decode benchmark")
    return out.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-410m", choices=sorted(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], metavar="N",
                        help="sequences decoded together (each figure counts the tokens of all of them)")
    parser.add_argument("--skip-reference", action="store_true", help="neoxlite only")
    parser.add_argument("--quant", nargs="+", default=["none"], choices=["none", "int8", "nf4", "fp4"],
                        help="linear-layer quantization modes to time (bitsandbytes; compute dtype = --dtypes)")
    parser.add_argument("--llama-cpp", type=Path, metavar="VENV",
                        help="a virtualenv with llama-cpp-python: time llama.cpp beside each row")
    parser.add_argument("--llama-cpp-src", type=Path, metavar="DIR", default=os.environ.get("LLAMA_CPP_SRC"),
                        help="llama.cpp's source tree (vendor/llama.cpp of the llama-cpp-python sdist; default "
                             "$LLAMA_CPP_SRC), for converting the checkpoint to GGUF")
    parser.add_argument("--gguf-dir", type=Path, default=Path(tempfile.gettempdir()) / "neoxlite-gguf",
                        help="where llama.cpp's GGUF files are converted once and kept (outside the repository)")
    args = parser.parse_args()
    if min(args.batch) < 1:
        parser.error(f"--batch {min(args.batch)}: give batch sizes of at least 1")
    if args.llama_cpp and not (args.llama_cpp / "bin" / "python").exists():
        parser.error(f"--llama-cpp {args.llama_cpp}: no bin/python there; give the llama-cpp-python virtualenv")
    if args.llama_cpp and not (args.llama_cpp_src and (Path(args.llama_cpp_src) / "convert_hf_to_gguf.py").exists()):
        parser.error("--llama-cpp needs --llama-cpp-src (or $LLAMA_CPP_SRC): the llama.cpp source tree holding "
                     "convert_hf_to_gguf.py")

    import transformers

    from neoxlite import GPTNeoXForCausalLM
    from neoxlite.cpu_kernels import kernel_status

    probes = [read_bandwidth()]
    print(f"machine: {torch.get_num_threads()} threads, read bandwidth {probes[0] / 1e9:.1f} GB/s; "
          f"{kernel_status()}")
    prompts = {b: torch.randint(2, 50000, (b, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
               for b in args.batch}
    prompt = prompts[args.batch[0]][:1]  # the token check: one sequence
    for name, mode in [(d, q) for d in args.dtypes for q in args.quant]:
        dtype = DTYPES[name]
        folder = random_checkpoint(args.shape, torch.bfloat16 if dtype != torch.float32 else torch.float32)
        qkw = {} if mode == "none" else {"quant": mode, "compute_dtype": dtype}
        ours = GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype, progress=False, **qkw)
        if mode != "none":
            name = f"{name} {mode}"
        nbytes = decode_bytes(ours)
        ours_rates = {b: b * decode_rate(lambda n, m=ours, p=prompts[b]: m.generate(p, max_new_tokens=n,
                                                                                    eos_token_id=[]),
                                         args.tokens, args.repeats) for b in args.batch}
        probes.append(read_bandwidth())
        ours_tokens = ours.generate(prompt, max_new_tokens=16, eos_token_id=[])
        del ours
        ref_rates = None
        if not args.skip_reference:
            if mode == "none":
                ref = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            else:
                from neoxlite.quant import QuantSpec

                config = QuantSpec.from_kwargs(**qkw).to_config()
                bnb = transformers.BitsAndBytesConfig(
                    **{k: v for k, v in config.items() if not k.startswith("_") and k != "quant_method"})
                ref = transformers.GPTNeoXForCausalLM.from_pretrained(
                    folder, dtype=dtype, quantization_config=bnb, device_map="cpu").eval()

            def ref_run(n: int, p: torch.Tensor, ref=ref) -> None:
                ref.generate(p, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

            ref_rates = {b: b * decode_rate(lambda n, p=prompts[b]: ref_run(n, p), args.tokens, args.repeats)
                         for b in args.batch}
            probes.append(read_bandwidth())
            ref_tokens = ref.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
            same = torch.equal(ref_tokens, ours_tokens)
            if not same:  # where they part, and how close the reference's own choice was there
                at = int((ref_tokens[0] != ours_tokens[0]).nonzero()[0])
                with torch.no_grad():
                    logits = ref(ours_tokens[:, :at]).logits[0, -1].float()
                gap = float(logits[ref_tokens[0, at]] - logits[ours_tokens[0, at]])
                same = (f"False (from new token {at - prompt.shape[1]}, where the reference's logits for its "
                        f"token and neoxlite's differ by {gap:.3g}: a near-tie)")
            del ref
        bound = max(probes) / nbytes
        for b in args.batch:
            label = name if len(args.batch) == 1 else f"{name} batch {b}"
            ours_rate = ours_rates[b]
            line = (f"{args.shape} {label}: neoxlite {ours_rate:.1f} tok/s = {ours_rate / (b * bound):.0%} of the "
                    f"{b * bound:.1f} tok/s bound ({nbytes / 1e9:.2f} GB/step; bandwidth probes "
                    f"{min(probes) / 1e9:.1f}-{max(probes) / 1e9:.1f} GB/s, bound from the highest)")
            if ref_rates is not None:
                ref_rate = ref_rates[b]
                line += (f"; transformers {ref_rate:.1f} tok/s = {ref_rate / (b * bound):.0%}; ratio "
                         f"{ours_rate / ref_rate:.2f}x")
                if b == args.batch[0]:
                    line += f"; same tokens: {same}"
            if args.llama_cpp and b == args.batch[0]:
                llama = llama_cpp_rate(args.llama_cpp, Path(args.llama_cpp_src), args.gguf_dir, folder, mode,
                                       args.tokens)
                line += f"\n    beside it, {llama}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
