"""Chat history -> prompt text, cut to fit the model's context.

A checkpoint whose tokenizer carries a chat template gets its own format (`apply_chat_template`);
any other gets a plain transcript:

    {system prompt}

    User: {message}
    Assistant: {reply}
    User: {message}
    Assistant:

That is the "chat" style. The "continue" style is for base models (Pythia, the demo): the conversation is
one document, the system prompt followed by every message and reply exactly as written, and the model
continues it.

History is a list of `{"role": "user" | "assistant", "content": str}` dicts, oldest first, the format
`gr.Chatbot` shows. When the whole history does not fit, the oldest turns are left out (a turn is a user
message and the replies after it) and the caller gets a notice to show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

USER_PREFIX = "User:"
ASSISTANT_PREFIX = "Assistant:"
# where a plain-transcript reply ends: the model starting the next user turn
PLAIN_STOP_STRINGS = ("\n" + USER_PREFIX,)

Message = dict[str, str]
STYLES = ("chat", "continue")


@dataclass
class Prompt:
    text: str
    n_tokens: int
    max_new_tokens: int  # the reply budget left after the prompt, at most what was asked for
    dropped_messages: int  # oldest history messages left out to fit the context
    stop_strings: tuple[str, ...] = field(default=())
    notice: str = ""  # shown to the user when something was cut; "" otherwise
    style: str = "chat"  # "continue": the reply is kept exactly as generated (whitespace matters there)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def stop_strings(tokenizer: Any) -> tuple[str, ...]:
    """Text that ends the assistant's turn: the template's end-of-turn marker, or the next "User:" line.

    The marker is what the template writes after an assistant message (e.g. "<|im_end|>"); a template whose
    turns end with the eos token alone needs none, generation stops at eos anyway.
    """
    if not has_chat_template(tokenizer):
        return PLAIN_STOP_STRINGS
    probe = "\u2063reply\u2063"  # invisible separators: text no template adds by itself
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    marker = text[text.rindex(probe) + len(probe):].strip()
    return (marker,) if marker and marker != getattr(tokenizer, "eos_token", None) else ()


def render(tokenizer: Any, system: str, messages: list[Message], style: str = "chat") -> str:
    """The prompt text for `messages` (ending with a user message), ready for the assistant's reply."""
    if style == "continue":
        return system + "".join(m["content"] for m in messages)
    system = system.strip()
    if has_chat_template(tokenizer):
        full = ([{"role": "system", "content": system}] if system else []) + messages
        return tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
    lines = [system, ""] if system else []
    for message in messages:
        prefix = USER_PREFIX if message["role"] == "user" else ASSISTANT_PREFIX
        lines.append(f"{prefix} {message['content'].strip()}")
    lines.append(ASSISTANT_PREFIX)
    return "\n".join(lines)


def _turn_starts(history: list[Message]) -> list[int]:
    """Indices where history may start without splitting a turn: each user message, and the end."""
    return [i for i, m in enumerate(history) if m["role"] == "user"] + [len(history)]


def build_prompt(tokenizer: Any, system: str, history: list[Message], message: str, *,
                 max_new_tokens: int, context_length: int, style: str = "chat",
                 max_text_bytes: int | None = None) -> Prompt:
    """The longest recent part of `history` that, with `message` and the reply budget, fits the context.

    Keeps `max_new_tokens` for the reply when it can; with no history left and still too little room, the
    reply budget shrinks. Raises ValueError when the message by itself does not leave room for one token.
    `max_text_bytes` (neoxlite.limits.max_text_bytes for the context): history beyond that many UTF-8 bytes
    cannot fit and is left out before anything is tokenized. The turn to start from is found by bisection, so a
    long history costs a few tokenizations, not one per turn.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r} is not one of {', '.join(STYLES)}")
    stop = stop_strings(tokenizer) if style == "chat" else ()
    ask = [{"role": "user", "content": message}]
    starts = _turn_starts(history)
    lo, hi = _first_within(history, starts, system, message, max_text_bytes), len(starts) - 1

    def measure(start: int) -> tuple[str, int]:
        text = render(tokenizer, system, history[start:] + ask, style)
        return text, len(tokenizer.encode(text))

    fitted: tuple[int, str, int] | None = None
    while lo < hi:  # the first start that fits (less history never takes more tokens); the last one if none does
        mid = (lo + hi) // 2
        text, n_tokens = measure(starts[mid])
        if n_tokens + max_new_tokens <= context_length:
            hi, fitted = mid, (mid, text, n_tokens)
        else:
            lo = mid + 1
    start = starts[lo]
    text, n_tokens = fitted[1:] if fitted is not None and fitted[0] == lo else measure(start)
    room = context_length - n_tokens
    if room < 1:
        raise ValueError(
            f"The message and system prompt take {n_tokens} tokens; the model's context holds "
            f"{context_length}, with room for at least one reply token. Shorten the message or the system prompt."
        )
    notes = []
    if start:
        notes.append(f"left out the {start} oldest message{'s' if start > 1 else ''}")
    if room < max_new_tokens:
        notes.append(f"the reply is limited to {room} tokens")
    notice = ""
    if notes:
        notice = (f"To fit the model's {context_length}-token context, {' and '.join(notes)} "
                  f"(prompt: {n_tokens} tokens).")
    return Prompt(text=text, n_tokens=n_tokens, max_new_tokens=min(max_new_tokens, room),
                  dropped_messages=start, stop_strings=stop, notice=notice, style=style)


def utf8_size(text: str) -> int:
    """UTF-8 bytes of `text`, a lone surrogate counted as the 3 bytes it would take."""
    return len(text.encode("utf-8", "surrogatepass"))


def _first_within(history: list[Message], starts: list[int], system: str, message: str,
                  max_text_bytes: int | None) -> int:
    """The index in `starts` of the first turn from which the prompt's text is at most `max_text_bytes` (each
    message's text, stripped as rendered, is in the prompt); history before it needs more tokens than the context
    holds. 0 when there is no limit."""
    if max_text_bytes is None:
        return 0
    room = max_text_bytes - utf8_size(system.strip()) - utf8_size(message.strip())
    suffix = [0] * (len(history) + 1)  # suffix[i]: bytes of history[i:]
    for i in range(len(history) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + utf8_size(history[i]["content"].strip())
    return next(k for k, start in enumerate(starts) if suffix[start] <= room or start == len(history))


def cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> tuple[str, bool]:
    """(the part of `text` safe to show, whether a stop string was reached).

    Holds back a tail that could be the start of a stop string, so "\\nUs" never flashes on screen.
    """
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    hold = max((_held(text, s) for s in stop_strings), default=0)
    return text[: len(text) - hold], False


def _held(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than it): only the places in the last
    len(stop) - 1 characters where stop's first character is are tried, so a long stop string costs little."""
    tail = text[max(0, len(text) - len(stop) + 1):]
    start = tail.find(stop[:1])
    while start >= 0:
        if stop.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find(stop[:1], start + 1)
    return 0
