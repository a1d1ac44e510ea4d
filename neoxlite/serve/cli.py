"""`neoxlite serve`: load a model and answer OpenAI API requests on it, batched."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from neoxlite.options import add_load_options, add_model_option, load_kwargs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_BATCH = 8
UI_PATH = "/ui"
DESCRIPTION = ("Serve a GPT-NeoX model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, "
               f"/v1/models), with continuous batching of up to --max-batch-size (default {DEFAULT_BATCH}) "
               "concurrent requests.")


def register(subparsers: Any) -> None:
    """Adds `neoxlite serve` to the neoxlite command (neoxlite.cli.EXTENSIONS)."""
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                                   description=DESCRIPTION)
    add_model_option(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every /v1 request, and with --ui on the app "
                             f"at {UI_PATH} too: the browser asks to log in, any user name and KEY as password "
                             "(default: no key)")
    parser.add_argument("--max-waiting", type=int, default=64, metavar="N",
                        help="requests queued beyond the running batch before answering 429 (default: 64)")
    parser.add_argument("--ui", action="store_true",
                        help=f"also serve the Gradio app at {UI_PATH} on the same port, its chat batched with the "
                             "API's requests on the same model (behind --api-key when given)")
    add_load_options(parser)  # --max-batch-size also sets how many requests are decoded together
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from neoxlite.api import load
    from neoxlite.serve.api import KeyRequired, Server, create_app, own_batcher

    kwargs = load_kwargs(args)
    batch = kwargs.setdefault("max_batch_size", DEFAULT_BATCH)
    if batch < 1 or args.max_waiting < 1:
        raise ValueError(f"--max-batch-size ({batch}) and --max-waiting ({args.max_waiting}) must be at least 1")
    name = args.model or "neoxlite-demo"
    if args.ui:  # one model and one batcher: the app's, which the API asks for once the app has loaded
        from neoxlite.app.cli import mount

        server = Server(name, lambda: engine.chat_batcher(), api_key=args.api_key)  # `engine` is set just below
        app = create_app(server)
        engine = mount(app, UI_PATH, args.model, **kwargs)
        engine.max_waiting = args.max_waiting  # before the batcher is made (at server.start_loading)
        if args.api_key is not None:  # the page and its Gradio API can chat and unload the model: the same key
            app.add_middleware(KeyRequired, prefix=UI_PATH, key=args.api_key)
    else:
        batcher = own_batcher(lambda: load(args.model, **kwargs), max_batch_size=batch,
                              max_context=kwargs.get("max_context"), max_waiting=args.max_waiting)
        server = Server(name, batcher, api_key=args.api_key)
        app = create_app(server)
    server.start_loading()
    page = f", the app at http://{args.host}:{args.port}{UI_PATH}" if args.ui else ""
    print(f"neoxlite serve: {name} at http://{args.host}:{args.port}/v1{page} (loading; GET /health says when "
          "ready)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.close()
    return 0
