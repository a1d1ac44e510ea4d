"""neoxlite.limits: text refused from its byte length before tokenizing, never text that fits."""

import pytest

from neoxlite.demo import demo_path
from neoxlite.limits import check_text_fits, longest_token_bytes, max_text_bytes
from neoxlite.tokenizer import GPTNeoXTokenizerFast


def demo_tokenizer() -> GPTNeoXTokenizerFast:
    return GPTNeoXTokenizerFast.from_pretrained(demo_path())


def test_text_that_fits_passes_and_longer_text_is_refused_without_tokenizing(monkeypatch):
    tok = demo_tokenizer()
    limit = max_text_bytes(tok, 16)
    assert limit == 16 * longest_token_bytes(tok) > 16
    check_text_fits("x" * limit, tok, 16)
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: pytest.fail("tokenized"))
    with pytest.raises(ValueError, match=rf"message is too long: {limit + 1:,} bytes.*at most {limit:,} bytes"):
        check_text_fits("x" * (limit + 1), tok, 16, what="message")


def test_bound_is_never_below_the_real_token_count():
    tok = demo_tokenizer()
    text = "def f(x):\n    return x  # é ü 日本\n" * 40
    tokens = len(tok(text).input_ids)
    check_text_fits(text, tok, tokens)  # exactly as many tokens as the text needs: accepted
    assert len(text.encode()) <= max_text_bytes(tok, tokens)
