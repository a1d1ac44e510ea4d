"""The demo checkpoints shipped inside the package (trained by tools/train_demo.py; numbers in tools/demo_report.md).

A 6.8M-parameter GPT-NeoX trained on the Python standard library's source, in hub layout (config.json,
sharded safetensors, tokenizer.json), plus three heads that share its lower layers:

- ``token-classification``: the token type Python's ``tokenize`` gives each token
  (WHITESPACE, NAME, KEYWORD, OP, NUMBER, STRING, COMMENT, NEWLINE).
- ``sequence-classification``: the kind of statement a short chunk of code starts with
  (function, class, import, control_flow, statement).
- ``question-answering``: "What does NAME return?" answered with the expression of NAME's return
  statement. Input: the tokens of ``question + "\\n"``, then the tokens of the context (1-3 functions).

Each is an ordinary checkpoint folder: ``GPTNeoXFor....from_pretrained(demo_path(head))``.
A head folder's index maps the shared layers to ``../model/``, so the folders stay side by side.
"""

from __future__ import annotations

from pathlib import Path

HEADS = ("sequence-classification", "token-classification", "question-answering")
_ROOT = Path(__file__).resolve().parent


def demo_path(head: str | None = None) -> Path:
    """Folder of the demo language model, or of one of its heads (a name in HEADS)."""
    if head is None:
        folder = _ROOT / "model"
    elif head in HEADS:
        folder = _ROOT / head
    else:
        raise ValueError(f"unknown demo head {head!r}; choose one of {', '.join(HEADS)} (or None for the language model)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo checkpoint {folder} is missing from this installation; reinstall neoxlite, "
            "or rebuild it with `python tools/train_demo.py all` from a source checkout"
        )
    return folder


def demo_head_paths() -> list[Path]:
    """Folders of every demo head, in the app's tab order."""
    return [demo_path(head) for head in HEADS]


__all__ = ["HEADS", "demo_head_paths", "demo_path"]
