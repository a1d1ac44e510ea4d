"""Command-line flags shared by every neoxlite command, defined once.

`add_load_options` / `load_kwargs` carry the model-loading flags onto `from_pretrained` keywords with the same
names; `add_sampling_options` / `sampling_kwargs` carry the sampling flags onto `generate` keywords. The CLI and
the app both use them, so flags, keywords and defaults cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

QUANT_MODES = ("none", "int8", "nf4", "fp4")
DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")

# Sampling defaults for the CLI and the app (the Python API keeps transformers' defaults: greedy). On the command
# line a checkpoint's generation_config.json comes first: these fill only what neither a flag nor it sets.
DEFAULT_SAMPLING = dict(max_new_tokens=128, temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=None)

# Keywords without an underscore that error messages use only as the setting's name (see flag_names).
_BARE_KEYWORDS = ("temperature", "seed")

# flag dest -> from_pretrained keyword (the same names; listed to keep the mapping explicit)
_LOAD_KEYWORDS = ("dtype", "device", "quant", "compute_dtype", "gpu_memory", "cpu_memory", "offload_dir",
                  "max_batch_size", "max_context")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=None,
                        help="checkpoint folder or hub id (default: the built-in demo model)")


def add_load_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the model-loading flags to `parser` (in their own argument group) and returns it."""
    group = parser.add_argument_group("loading")
    group.add_argument("--dtype", choices=DTYPES, default=None,
                       help="weight dtype for unquantized layers (default: the checkpoint's)")
    group.add_argument("--device", default=None,
                       help="compute device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    group.add_argument("--quant", choices=QUANT_MODES, default=None,
                       help="quantize linear layers while loading (default: none, or the checkpoint's own)")
    group.add_argument("--compute-dtype", choices=DTYPES[1:], default=None,
                       help="dtype quantized layers compute in (default: float16)")
    group.add_argument("--gpu-memory", default=None, metavar="SIZE",
                       help='GPU budget for weights, e.g. "6GiB" (default: free GPU memory less a margin)')
    group.add_argument("--cpu-memory", default=None, metavar="SIZE",
                       help='RAM budget for weights, e.g. "8GiB" (default: free RAM less a margin)')
    group.add_argument("--offload-dir", default=None, metavar="DIR",
                       help="folder for blocks that fit in neither budget (default: no disk tier)")
    group.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                       help="with budgets: sequences per batch to reserve KV cache and activations for (default 1)")
    group.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                       help="with budgets: prompt + new tokens to reserve room for (default: min(2048, the model's))")
    return parser


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `from_pretrained` keywords the user set on the command line (unset flags are left out)."""
    import torch

    from neoxlite.loading import parse_dtype
    from neoxlite.offload.budget import parse_size

    kwargs = {name: getattr(args, name) for name in _LOAD_KEYWORDS if getattr(args, name, None) is not None}
    if kwargs.get("quant") == "none":
        kwargs["quant"] = None
    for name in ("dtype", "compute_dtype"):
        if name in kwargs:
            kwargs[name] = parse_dtype(kwargs[name])  # the loader's one table of dtype names
            if kwargs[name] is None:  # "auto": the checkpoint's
                del kwargs[name]
    for name in ("gpu_memory", "cpu_memory"):  # checked here, so a typo fails before the load
        parse_size(kwargs.get(name), name=name)
    for name in ("max_batch_size", "max_context"):
        if name in kwargs and kwargs[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {kwargs[name]}")
    if "device" not in kwargs:
        kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return kwargs


def flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """`message` (an error raised by the Python API) with the keywords the user set as flags spelled as those
    flags: "top_p must be within (0, 1]" -> "--top-p must be within (0, 1]", "gpu_memory='x'" -> "--gpu-memory 'x'"."""
    for action in parser._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        keyword = action.dest
        if flag is None or ("_" not in keyword and keyword not in _BARE_KEYWORDS):
            continue
        message = re.sub(rf"(?<![\w.\-/]){keyword}(?!\w)(=?)", lambda m, f=flag: f + (" " if m.group(1) else ""),
                         message)
    message = re.sub(r"(--[\w-]+) */ *\1\b", r"\1", message)  # "offload_dir= / --offload-dir" said it twice
    # "max_context=9 (--max-context)" became "--max-context 9 (--max-context)": drop a hint that only repeats flags
    return re.sub(r" \((--[\w-]+(?:/--[\w-]+)*)\)", lambda m: "" if all(
        message.count(f) > 1 for f in m.group(1).split("/")) else m.group(0), message)


def add_sampling_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # Unset flags stay None, so the checkpoint's generation_config.json (else DEFAULT_SAMPLING) decides them.
    group = parser.add_argument_group("sampling")
    d = DEFAULT_SAMPLING
    then = "default: the checkpoint's generation_config.json, else"
    group.add_argument("--max-new-tokens", type=int, default=None,
                       help=f"tokens to generate at most ({then} {d['max_new_tokens']})")
    group.add_argument("--temperature", type=float, default=None,
                       help=f"0 means greedy ({then} {d['temperature']})")
    group.add_argument("--top-k", type=int, default=None,
                       help=f"keep the k most likely tokens, 0: off ({then} {d['top_k']})")
    group.add_argument("--top-p", type=float, default=None,
                       help=f"nucleus sampling mass, 1.0: off ({then} {d['top_p']})")
    group.add_argument("--repetition-penalty", type=float, default=None,
                       help=f"1.0: off ({then} {d['repetition_penalty']})")
    group.add_argument("--seed", type=int, default=d["seed"], help="make sampling reproducible")
    return parser


def sampling_kwargs(args: argparse.Namespace | dict[str, Any], generation_config: Any = None) -> dict[str, Any]:
    """generate() keywords from parsed flags (or a dict with the same names); temperature 0 means greedy.

    A setting not given (a flag left unset; a key missing from the dict) comes from `generation_config` (the
    model's, from the checkpoint's generation_config.json) when it sets it, else from DEFAULT_SAMPLING."""
    if isinstance(args, argparse.Namespace):
        values = {k: v for k, v in vars(args).items() if v is not None}  # None: the flag was not given
    else:
        values = dict(args)

    def configured(name: str) -> Any:
        value = getattr(generation_config, name, None)
        return DEFAULT_SAMPLING[name] if value is None else value

    if "temperature" in values:  # a temperature asks for sampling (or, at 0, for greedy)
        temperature = float(values["temperature"])
        if not 0 <= temperature < float("inf"):  # refuses NaN and inf too
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
        do_sample = temperature > 0
    else:
        temperature = float(configured("temperature"))
        do_sample = getattr(generation_config, "do_sample", None) is not False and temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(values["max_new_tokens"] if "max_new_tokens" in values else configured("max_new_tokens")),
        "repetition_penalty": float(values["repetition_penalty"] if "repetition_penalty" in values
                                    else configured("repetition_penalty")),
        "do_sample": do_sample,
    }
    if kwargs["max_new_tokens"] <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {kwargs['max_new_tokens']}")
    if do_sample:
        top_k = values["top_k"] if "top_k" in values else configured("top_k")
        top_p = values["top_p"] if "top_p" in values else configured("top_p")
        kwargs.update(temperature=temperature, top_k=int(top_k or 0),  # 0: off
                      top_p=float(top_p if top_p is not None else 1.0))
    from neoxlite.generation import SamplingSettings, check_seed

    seed = values.get("seed")
    if seed is not None and seed != "":
        kwargs["seed"] = check_seed(int(seed))  # refused now, not after the load, when torch cannot take it

    # generate()'s own checks, run now so that a bad value fails before the model loads
    SamplingSettings(**{k: kwargs[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
                        if k in kwargs})
    return kwargs
