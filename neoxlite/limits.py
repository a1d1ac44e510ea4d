"""Input limits checked before tokenizing: text too long for the model is refused from its length alone.

Tokenizing a 20 MB message holds the model's lock for tens of seconds and grows the process by gigabytes, so the
app and the server refuse such text first. The rule is exact, not a heuristic: every token covers at most
`longest_token_bytes` bytes of text, so text of more than `context_tokens * longest_token_bytes` UTF-8 bytes
needs more tokens than the context holds.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=16)  # one vocabulary scan per tokenizer
def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes any one token of `tokenizer`'s vocabulary stands for (an upper bound)."""
    # Byte-level BPE spells each byte as one character of up to 2 UTF-8 bytes, so this over-estimates: the
    # bound stays safe (it can only let slightly longer text through to the tokenizer, never refuse text that fits).
    return max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=1)


def max_text_bytes(tokenizer: Any, context_tokens: int) -> int:
    """The most UTF-8 bytes of text that can still fit in `context_tokens` tokens."""
    return context_tokens * longest_token_bytes(tokenizer)


def check_text_fits(text: str, tokenizer: Any, context_tokens: int, what: str = "text") -> None:
    """Raises ValueError when `text` cannot fit in `context_tokens` tokens, without tokenizing it."""
    limit = max_text_bytes(tokenizer, context_tokens)
    # Characters never outnumber bytes, so a long string is refused before encoding it at all.
    size = len(text) if len(text) > limit else len(text.encode("utf-8"))
    if size > limit:
        raise ValueError(f"the {what} is too long: {size:,} bytes, while this model's context of "
                         f"{context_tokens:,} tokens holds at most {limit:,} bytes of text; shorten it")


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds its first lone surrogate (half of a UTF-16 pair, which no UTF-8 text holds and no
    tokenizer reads: JSON's \\ud800 escapes and undecodable argv bytes make them), or None when it holds none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def check_text(text: str, where: str) -> str:
    """`text` from argv or a terminal, refused when it holds bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which no tokenizer can encode)."""
    at = lone_surrogate(text)
    if at is not None:
        raw = text[at].encode("utf-8", "surrogateescape") if 0xDC80 <= ord(text[at]) <= 0xDCFF else b""
        byte = f"byte 0x{raw[0]:02x}" if raw else f"character U+{ord(text[at]):04X}"
        raise ValueError(f"{where} is not valid UTF-8 text ({byte} at character {at}); use a UTF-8 "
                         "terminal/locale or convert the text to UTF-8")
    return text
