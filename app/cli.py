"""`neoxlite app` (or `python -m neoxlite.app`): load a model (and heads) and serve the Gradio app."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neoxlite.options import add_load_options, add_model_option, load_kwargs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DESCRIPTION = "Chat with a GPT-NeoX model and try its classification heads in the browser."


def add_app_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The app's flags: model and heads, where to listen, and the shared loading flags."""
    add_model_option(parser)
    parser.add_argument("--head", action="append", default=[], metavar="PATH",
                        help="a checkpoint with a sequence-classification, token-classification or QA head to "
                             "serve as well (repeatable; default with no -m: the demo's heads)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    add_load_options(parser)
    return parser


def build_parser(prog: str = "neoxlite app") -> argparse.ArgumentParser:
    return add_app_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def register(subparsers: Any) -> None:
    """Adds `neoxlite app` to the neoxlite command (neoxlite.cli.EXTENSIONS)."""
    parser = subparsers.add_parser("app", help="serve the Gradio app: chat, heads, memory panel",
                                   description=DESCRIPTION)
    add_app_arguments(parser).set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    launch(args.model, args.head, host=args.host, port=args.port, share=args.share, **load_kwargs(args))
    return 0


def launch(model: str | Path | None = None, heads: Sequence[str | Path] = (), *, host: str = DEFAULT_HOST,
           port: int | None = DEFAULT_PORT, share: bool = False, block: bool = True, **load: Any):
    """Starts the app; the weights load in the background while the page is already up.

    `load` goes to `from_pretrained` (quant, gpu_memory, cpu_memory, offload_dir, dtype, device, ...).
    With block=False returns (demo, url) at once; call `demo.close()` to stop. With block=True serves
    until interrupted.
    """
    from neoxlite.app.ui import CSS

    _, demo = _build(model, heads, **load)
    # show_error: a value Gradio itself refuses (a string for a slider, from an API client) is named too, as
    # mount() does, instead of "the app raised an exception"
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                            quiet=not block, css=CSS, show_error=True)
    print(f"neoxlite app on {url}", file=sys.stderr)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo, url


def mount(api: Any, path: str, model: str | Path | None = None, **load: Any) -> Any:
    """Mounts the app at `path` of the FastAPI app `api` (`neoxlite serve --ui`: the page beside the OpenAI API on
    one port) and starts loading; returns its Engine, whose chat batcher the API shares."""
    import gradio as gr
    from neoxlite.app.ui import CSS

    engine, demo = _build(model, (), **load)
    gr.mount_gradio_app(api, demo, path=path, css=CSS)
    return engine


def _build(model: str | Path | None, heads: Sequence[str | Path], **load: Any) -> tuple[Any, Any]:
    """(the Engine, its Blocks app queued), the weights loading in the background."""
    from neoxlite.app.engine import Engine
    from neoxlite.app.ui import create_app

    engine = Engine.from_paths(model, heads, **load)
    demo = create_app(engine)
    demo.queue(default_concurrency_limit=1)
    engine.start()
    return engine, demo


def main(argv: Sequence[str] | None = None, prog: str = "neoxlite app") -> int:
    """`python -m neoxlite.app [flags]`; user errors print one line and exit 2."""
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
