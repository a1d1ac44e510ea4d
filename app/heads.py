"""What a head tab tells its visitor: what the labels mean, and examples to click.

Both come from the checkpoint: the labels from config.json's `id2label`, the words about them and the
examples from its model card (README.md), when it has one:

    ## Labels
    One paragraph on what the labels mean.

    ## Examples
    ```python
    import os
    ```

Each fenced block under "## Examples" is one example; for a question-answering head, its first line is the
question and the rest the context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MAX_CARD_BYTES = 256 * 2**10  # a model card larger than this is not read
MAX_EXAMPLES = 8
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class HeadGuide:
    labels: str  # one line: what the labels mean
    examples: list[list[str]]  # one row per example: [text] or, for question answering, [question, context]


def _section(card: str, title: str) -> str:
    """The text under `## title` up to the next heading of level 1 or 2 ("" when there is none)."""
    match = re.search(rf"^##\s+{re.escape(title)}\s*$(.*?)(?=^#{{1,2}}\s|\Z)", card, re.MULTILINE | re.DOTALL)
    return match.group(1).strip() if match else ""


def read_card(folder: Path) -> str:
    """The checkpoint's README.md, "" when it has none that is a file inside it of at most MAX_CARD_BYTES."""
    from neoxlite.checkpoint import read_metadata_file

    card = folder / "README.md"
    if not card.is_file() or card.stat().st_size > MAX_CARD_BYTES:
        return ""
    try:
        raw = read_metadata_file(card, "model card")  # confined: a link to a file elsewhere is not shown
    except ValueError:
        return ""
    return raw[:MAX_CARD_BYTES].decode("utf-8", errors="replace")


def guide(folder: Path, id2label: dict[int, str] | None, task: str) -> HeadGuide:
    """The labels line and the examples for the head checkpoint in `folder`."""
    card = read_card(folder)
    about = " ".join(_section(card, "Labels").split("\n\n")[0].split())
    if task == "answer":
        labels = about or "The answer is the span of the context that answers the question, with its probability."
    else:
        names = ", ".join(f"`{name}`" for _, name in sorted((id2label or {}).items(), key=lambda kv: int(kv[0])))
        labels = f"Labels: {names}." + (f" {about}" if about else "")
    examples = []
    for block in _FENCE.findall(_section(card, "Examples"))[:MAX_EXAMPLES]:
        text = block.rstrip("\n")
        if task == "answer":
            question, _, context = text.partition("\n")
            if question.strip() and context.strip():
                examples.append([question.strip(), context])
        elif text.strip():
            examples.append([text])
    return HeadGuide(labels, examples)
