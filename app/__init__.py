"""neoxlite's Gradio app: chat, the classification heads, and a memory panel.

`neoxlite app`, `python -m neoxlite.app`, or from Python: `neoxlite.app.launch(model, heads, port=...)`.
The repository keeps it in the top-level `app/` folder; it installs as `neoxlite.app`.
"""

from neoxlite.app.cli import build_parser, launch, main

__all__ = ["build_parser", "launch", "main"]
