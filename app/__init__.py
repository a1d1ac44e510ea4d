"""neoxlite's Gradio app: chat, the classification heads, and a memory panel.

`python -m app`, `neoxlite app`, or from Python: `app.launch(model, heads, port=...)`.
"""

from app.cli import build_parser, launch, main

__all__ = ["build_parser", "launch", "main"]
