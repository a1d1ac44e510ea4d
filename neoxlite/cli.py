"""The `neoxlite` command: generate, chat, and the subcommands that other packages register (app, plan, quantize).

Text goes to stdout; timings and progress go to stderr. User errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from neoxlite.options import (
    add_load_options,
    add_model_option,
    add_sampling_options,
    load_kwargs,
    sampling_kwargs,
)

# Subcommands that live beside their package: each module has register(subparsers).
EXTENSIONS: tuple[str, ...] = ("neoxlite.quant.cli", "neoxlite.offload.cli", "neoxlite.app.cli", "neoxlite.serve.cli")


def load_for_cli(args: argparse.Namespace) -> tuple[Any, Any]:
    from neoxlite.api import load

    start = time.perf_counter()
    model, tokenizer = load(args.model, **load_kwargs(args))
    print(f"[loaded in {time.perf_counter() - start:.1f} s on {model.device}]", file=sys.stderr)
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    from neoxlite.generation import stream_text

    sampling_kwargs(args)  # bad flags fail before the load
    model, tokenizer = load_for_cli(args)
    # Flags the user gave, then the checkpoint's generation_config.json, then the CLI's defaults.
    sampling = sampling_kwargs(args, getattr(model, "generation_config", None))
    prompt_tokens = len(tokenizer(args.prompt).input_ids)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    start = time.perf_counter()
    first = None
    pieces = 0
    for piece in stream_text(model, tokenizer, args.prompt, **sampling):
        first = first or time.perf_counter()
        pieces += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    end = time.perf_counter()
    rate = (pieces - 1) / (end - first) if first and pieces > 1 else 0.0
    print(f"[prompt {prompt_tokens} tokens, first token after {((first or end) - start):.2f} s, "
          f"{pieces} pieces, {rate:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from neoxlite.app.prompting import (  # the app's chat formatting, shared with the terminal
        build_prompt,
        cut_at_stop,
    )
    from neoxlite.generation import context_limit, stream_text

    sampling_kwargs(args)  # bad flags fail before the load
    model, tokenizer = load_for_cli(args)
    # Flags the user gave, then the checkpoint's generation_config.json, then the CLI's defaults.
    sampling = sampling_kwargs(args, getattr(model, "generation_config", None))
    history: list[dict[str, str]] = []
    print("[chat: empty line or Ctrl-D to quit]", file=sys.stderr)
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        prompt = build_prompt(tokenizer, args.system, history, message,
                              max_new_tokens=sampling["max_new_tokens"], context_length=context_limit(model.config))
        if prompt.notice:
            print(f"[{prompt.notice}]", file=sys.stderr)
        sys.stdout.write("model> ")
        reply, shown = "", ""
        settings = {**sampling, "max_new_tokens": prompt.max_new_tokens}
        for piece in stream_text(model, tokenizer, prompt.text, stop_strings=list(prompt.stop_strings) or None, **settings):
            reply += piece
            visible, stopped = cut_at_stop(reply, prompt.stop_strings)
            sys.stdout.write(visible[len(shown):])
            sys.stdout.flush()
            shown = visible
            if stopped:
                break
        sys.stdout.write("\n")
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": shown.strip()}]
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoxlite", description="Run GPT-NeoX models on one ordinary machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("prompt")
    add_model_option(gen)
    add_sampling_options(gen)
    add_load_options(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat in the terminal")
    chat.add_argument("--system", default="", help="system prompt")
    add_model_option(chat)
    add_sampling_options(chat)
    add_load_options(chat)
    chat.set_defaults(func=cmd_chat)

    for name in EXTENSIONS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError) as err:
        print(f"neoxlite {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
