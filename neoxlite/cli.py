"""The `neoxlite` command: generate, chat, and the subcommands that other packages register (app, plan, quantize).

Text goes to stdout; timings and progress go to stderr. Every user error is one line on stderr and a non-zero
status; Ctrl-C at any moment is one line and status 130; never a traceback unless NEOXLITE_DEBUG=1 asks for one.
This module imports nothing heavy at the top, so that all of this holds from the command's first moment.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from neoxlite.limits import check_text
from neoxlite.options import (
    add_load_options,
    add_model_option,
    add_sampling_options,
    flag_names,
    load_kwargs,
    sampling_kwargs,
)

# Subcommands that live beside their package: each module has register(subparsers).
EXTENSIONS: tuple[str, ...] = ("neoxlite.quant.cli", "neoxlite.offload.cli", "neoxlite.app.cli", "neoxlite.serve.cli")
# Errors the user can fix (bad flags, files, budgets): one line, status 2. Anything else is a bug: status 1.
USER_ERRORS = (ValueError, OSError)
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 2, 1, 130


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): the usage is one `--help` away."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class VersionAction(argparse.Action):
    """--version: prints neoxlite's version (read only when asked for: the lookup is slow to import)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        import neoxlite

        print(f"neoxlite {neoxlite.__version__}")
        parser.exit()


def load_for_cli(args: argparse.Namespace) -> tuple[Any, Any]:
    load_args = load_kwargs(args)  # checked before the (slow) import and load
    from neoxlite.api import load

    start = time.perf_counter()
    model, tokenizer = load(args.model, **load_args)
    print(f"[loaded in {time.perf_counter() - start:.1f} s on {model.device}]", file=sys.stderr)
    return model, tokenizer


class Timer:
    """Tokens and their times for the speed line: time to the first token (the prompt's prefill), then the
    decode rate over the tokens after it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None
        self.tokens = 0

    def count(self, pieces: Iterator[str]) -> Iterator[str]:
        for piece in pieces:
            self.first = self.first or time.perf_counter()
            self.tokens += 1
            yield piece
        self.stop()

    def stop(self) -> None:
        self.end = self.end or time.perf_counter()

    def timings(self) -> dict[str, float]:
        end = self.end or time.perf_counter()
        first = self.first or end
        decode = end - first
        rate = (self.tokens - 1) / decode if self.tokens > 1 and decode > 0 else 0.0
        return {"first_token_s": round(first - self.start, 4), "total_s": round(end - self.start, 4),
                "decode_tokens_per_s": round(rate, 2)}

    def line(self, prompt_tokens: int) -> str:
        t = self.timings()
        return (f"[prompt {prompt_tokens} tokens, first token after {t['first_token_s']:.2f} s, "
                f"{self.tokens} tokens, {t['decode_tokens_per_s']:.1f} tok/s]")


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from the argument, stdin (`-`) or --file: a file has no argv size limit (128 KiB a string)."""
    if args.file is not None and args.prompt is not None:
        raise ValueError("give the prompt once: PROMPT, - (stdin) or --file PATH")
    if args.file is not None:
        if not args.file:
            raise ValueError("--file needs a path: --file PATH")
        try:
            prompt = decode_utf8(Path(args.file).read_bytes(), f"--file {args.file}")
        except OSError as err:
            raise OSError(f"--file {args.file}: cannot read it: {err.strerror or err}") from None
    elif args.prompt == "-":
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise ValueError("PROMPT is - but stdin is closed; pipe the prompt in, or give PROMPT or --file PATH")
        prompt = decode_utf8(sys.stdin.buffer.read(), "stdin")
    elif args.prompt is None:
        raise ValueError("no prompt: give PROMPT, - to read it from stdin, or --file PATH")
    else:
        prompt = check_text(args.prompt, "PROMPT")
    if not prompt:
        raise ValueError("the prompt is empty: give some text to continue")
    return prompt


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "convert it to UTF-8, e.g. with iconv") from None


def capped_new_tokens(requested: int, prompt_tokens: int, context: int, what: str = "the model's") -> int:
    """max_new_tokens cut to what the context leaves after the prompt, said on stderr when it cuts."""
    room = context - prompt_tokens
    if 0 < room < requested:
        print(f"[--max-new-tokens {requested} capped at {room}: the prompt's {prompt_tokens} tokens and the reply "
              f"share {what} {context}-token context]", file=sys.stderr)
        return room
    return requested


def reply_context(model: Any) -> tuple[int, str]:
    """The tokens prompt and reply may take together: the model's context, or less when the memory plan reserved
    less (--max-context with budgets), and how to name it."""
    from neoxlite.generation import context_limit

    context = context_limit(model.config)
    reserved = getattr(model, "offload_workload", None)
    if reserved is not None and reserved[1] < context:
        return reserved[1], "the --max-context reserved"
    return context, "the model's"


def cmd_generate(args: argparse.Namespace) -> int:
    sampling_kwargs(args)  # bad flags fail before the prompt is read and the model loads
    prompt = read_prompt(args)
    model, tokenizer = load_for_cli(args)
    from neoxlite.generation import stream_tokens_as_text

    # Flags the user gave, then the checkpoint's generation_config.json, then the CLI's defaults.
    sampling = sampling_kwargs(args, getattr(model, "generation_config", None))
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    prompt_tokens = int(input_ids.shape[-1])
    sampling["max_new_tokens"] = capped_new_tokens(sampling["max_new_tokens"], prompt_tokens, *reply_context(model))
    stream = not args.json
    if stream and args.echo:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    timer = Timer()
    pieces = []
    for piece in timer.count(stream_tokens_as_text(model, tokenizer, input_ids, **sampling)):
        pieces.append(piece)
        if stream and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    text = "".join(pieces)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": text, "prompt_tokens": prompt_tokens, "tokens": timer.tokens,
                          "timings": timer.timings()}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    print(timer.line(prompt_tokens), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from neoxlite.chat import Chat

    sampling_kwargs(args)  # bad flags fail before the load
    check_text(args.system, "--system")
    given = {k: v for k, v in vars(args).items() if k in Chat.SETTINGS and v is not None}
    model, tokenizer = load_for_cli(args)
    return Chat(model, tokenizer, system=args.system, settings=given).run()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="neoxlite", description="Run GPT-NeoX models on one ordinary machine.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt, streaming the text",
                         description="Continue PROMPT, streaming the new text to stdout (after the prompt).")
    gen.add_argument("prompt", nargs="?", default=None, help='the text to continue; "-" reads it from stdin')
    gen.add_argument("-f", "--file", default=None, metavar="PATH", help="read the prompt from a file")
    gen.add_argument("--no-echo", dest="echo", action="store_false", help="print only the new text, not the prompt")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object when done (prompt, text, prompt_tokens, tokens, timings)")
    add_model_option(gen)
    add_sampling_options(gen)
    add_load_options(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat in the terminal (/help lists the commands)",
                          description="Chat in the terminal. Ctrl-C stops a reply, Ctrl-D or /bye leaves, /help "
                          'lists the commands, """ starts and ends a multi-line message.')
    chat.add_argument("--system", default="", help="system prompt")
    add_model_option(chat)
    add_sampling_options(chat)
    add_load_options(chat)
    chat.set_defaults(func=cmd_chat)

    for name in EXTENSIONS:
        importlib.import_module(name).register(sub)
    return parser


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Holds a Ctrl-C until the block ends, then raises it: torch's import probes numpy inside a try that
    swallows a KeyboardInterrupt (the command would run on as if nothing was pressed)."""
    pressed: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, `&` in a script): leave it so
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status."""
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
    prog, parser = " ".join(["neoxlite", *words[:1]]), None
    try:
        with interrupts_held():
            import torch  # noqa: F401  (the slow, Ctrl-C-swallowing import, done while a Ctrl-C is held)

            parser = build_parser()
        args = parser.parse_args(argv)
        prog = f"neoxlite {args.command}"
        return args.func(args)
    except KeyboardInterrupt:
        # Shutting down (threads, atexit) can take a moment: a second Ctrl-C ends the process at once.
        signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): what it wanted was written. Point stdout at /dev/null so the final
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as err:
        if os.environ.get("NEOXLITE_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message
        if parser is not None:
            message = flag_names(message, active_parser(parser, argv))
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:
        if os.environ.get("NEOXLITE_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(err).__name__}: {' '.join(str(err).split())} "
              "(NEOXLITE_DEBUG=1 shows the traceback; please report it)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def active_parser(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.ArgumentParser:
    """The subcommand's parser (its flags are the ones an error should name)."""
    words = list(sys.argv[1:] if argv is None else argv)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in words:
                if word in action.choices:
                    return action.choices[word]
    return parser


if __name__ == "__main__":
    sys.exit(main())
