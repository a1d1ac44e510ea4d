"""A chat as a file: JSON in the OpenAI messages format (export and import) and Markdown (export).

JSON: `[{"role": "system" | "user" | "assistant", "content": "..."}, ...]`, the list the OpenAI chat API
takes (also accepted: `{"messages": [...]}`). The system prompt is the leading "system" message, if any.
"""

from __future__ import annotations

import json
from typing import Any

from neoxlite.app.prompting import Message

from neoxlite.limits import lone_surrogate

ROLES = ("user", "assistant")
MAX_CHAT_BYTES = 16 * 2**20  # a chat file larger than this is not a chat


def to_openai(system: str, history: list[Message]) -> list[Message]:
    lead = [{"role": "system", "content": system}] if system.strip() else []
    return lead + [{"role": m["role"], "content": m["content"]} for m in history]


def to_json(system: str, history: list[Message]) -> str:
    return json.dumps(to_openai(system, history), ensure_ascii=False, indent=2) + "\n"


def to_markdown(system: str, history: list[Message], title: str = "Chat") -> str:
    """One section per message; text kept as written (code stays code)."""
    parts = [f"# {title}"]
    if system.strip():
        parts.append(f"**System:** {system.strip()}")
    for m in history:
        parts.append(f"### {'User' if m['role'] == 'user' else 'Assistant'}\n\n{m['content']}")
    return "\n\n".join(parts) + "\n"


def from_json(text: str | bytes, source: str = "the chat file") -> tuple[str, list[Message]]:
    """(system prompt, history) from an OpenAI messages list; ValueError naming what is wrong otherwise."""
    if len(text) > MAX_CHAT_BYTES:
        raise ValueError(f"{source} is over {MAX_CHAT_BYTES:,} bytes: too large for a chat file")
    try:
        data: Any = json.loads(text)
    except RecursionError:
        raise ValueError(f"{source} is not a chat: its JSON is nested too deeply; export a chat first to see "
                         "the format") from None
    except ValueError as e:
        raise ValueError(f"{source} is not JSON ({e}); export a chat first to see the format") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise ValueError(f'{source} must hold a list of {{"role": ..., "content": ...}} messages')
    system, history = "", []
    for i, m in enumerate(data):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (*ROLES, "system"):
            raise ValueError(f'{source}: message {i} is not {{"role": "system"|"user"|"assistant", "content": text}}')
        at = lone_surrogate(m["content"])
        if at is not None:
            raise ValueError(f"{source}: message {i} holds a lone surrogate (character {at}), which is not "
                             "text; fix or re-export the file")
        if m["role"] == "system":
            if history:
                raise ValueError(f"{source}: message {i} is a system message after the conversation started")
            system = (system + "\n" + m["content"]).strip("\n")
        else:
            history.append({"role": m["role"], "content": m["content"]})
    return system, history
