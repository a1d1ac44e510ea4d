"""The app against hostile or broken input: huge imported chats, lone surrogates, deep JSON, a damaged hub cache,
and values of the wrong kind. Each test calls the app's functions directly (no server)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("gradio")

from neoxlite.app import chats, models  # noqa: E402
from neoxlite.app.engine import Engine, Sampling  # noqa: E402
from neoxlite.app.prompting import build_prompt, render  # noqa: E402
from neoxlite.app.ui import _export, _import_chat, meter_html  # noqa: E402

from neoxlite.demo import demo_path  # noqa: E402
from neoxlite.limits import max_text_bytes  # noqa: E402


class CountingTokenizer:
    """One token per word, and a record of every text it was asked to encode."""

    chat_template = None

    def __init__(self):
        self.seen: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.seen.append(text)
        return [0] * len(text.split())


def turns(n: int, text: str = "one two three") -> list[dict[str, str]]:
    return [{"role": role, "content": text} for _ in range(n) for role in ("user", "assistant")]


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine.from_paths(demo_path())
    engine.load()
    return engine


def test_a_long_history_is_fitted_with_a_few_tokenizations():
    history = turns(2000)  # a 100 KB imported chat: one tokenization per turn took minutes on a real tokenizer
    tokenizer = CountingTokenizer()
    prompt = build_prompt(tokenizer, "", history, "last", max_new_tokens=5, context_length=50)
    assert len(tokenizer.seen) <= 2 * 12 + 2, f"{len(tokenizer.seen)} tokenizations for {len(history)} messages"
    ask = [{"role": "user", "content": "last"}]
    linear = next(start for start in range(0, len(history) + 1, 2)  # the answer the one-by-one search gives
                  if len(render(tokenizer, "", history[start:] + ask).split()) + 5 <= 50)
    assert prompt.dropped_messages == linear and prompt.n_tokens + prompt.max_new_tokens <= 50
    bounded = CountingTokenizer()
    assert build_prompt(bounded, "", history, "last", max_new_tokens=5, context_length=50,
                        max_text_bytes=400).text == prompt.text
    assert max(len(text) for text in bounded.seen) < 600  # history beyond the byte bound was never tokenized


def test_the_meter_tokenizes_only_what_can_fit(engine):
    tokenizer = engine.tokenizers["chat"]
    limit = max_text_bytes(tokenizer, engine.context_length("chat"))
    history = turns(600, "x = 1\n" * 200)  # ~1.4 MB: the whole chat, tokenized at each update, took tens of seconds
    seen = []
    real = tokenizer.encode
    try:
        tokenizer.encode = lambda text, *a, **k: (seen.append(text), real(text, *a, **k))[1]
        counts, used = engine.chat_tokens("", history)
    finally:
        del tokenizer.encode
    assert used is None and counts[0] is None and counts[-1] > 0
    assert sum(len(text) for text in seen) <= limit
    assert "more than 512 tokens" in meter_html(engine, "", history, "chat")
    counts, used = engine.chat_tokens("", turns(1, "hi"))
    assert used > 0 and None not in counts


def test_chat_files_refuse_deep_json_and_lone_surrogates():
    with pytest.raises(ValueError, match="nested too deeply"):
        chats.from_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="message 0 holds a lone surrogate"):
        chats.from_json('[{"role": "user", "content": "a\\ud800b"}]')
    with pytest.raises(Exception, match="no chat file came with the upload"):
        _import_chat(None, "Markdown")


def test_a_huge_upload_is_refused_from_its_first_bytes(tmp_path):
    huge = tmp_path / "chat.json"
    with open(huge, "wb") as file:
        file.truncate(64 * chats.MAX_CHAT_BYTES)  # sparse: the whole of it was read into memory first
    with pytest.raises(Exception, match="too large for a chat file"):
        _import_chat(str(huge), "Markdown")
    ok = tmp_path / "ok.json"
    ok.write_text(chats.to_json("sys", [{"role": "user", "content": "hi"}]))
    past, _, system, _ = _import_chat(str(ok), "Markdown")
    assert (system, past) == ("sys", [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("kind", ["json", "md"])
def test_a_chat_with_a_lone_surrogate_still_exports(kind, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    _export([{"role": "user", "content": "a\ud800b"}], "", kind)
    assert os.listdir(tmp_path) == [f"chat.{kind}"]  # the temporary file was renamed into place
    assert "a\ufffdb" in (tmp_path / f"chat.{kind}").read_bytes().decode("utf-8")


def test_lone_surrogates_and_missing_text_are_named(engine):
    with pytest.raises(ValueError, match="the message is not valid Unicode: character 3 is a lone surrogate"):
        engine.chat_prompt("", [], "hi \ud800 there", Sampling())
    with pytest.raises(ValueError, match="message 1 of the chat is not valid Unicode"):
        engine.chat_prompt("", [{"role": "user", "content": "\udfff"}], "hi", Sampling())
    counts, used = engine.chat_tokens("", [{"role": "user", "content": "a\ud800b"}])  # the meter still counts
    assert counts[0] > 0 and used > 0
    assert engine.chat_prompt("", [{"role": "assistant", "content": "  "}], "hi", Sampling()).text
    with pytest.raises(ValueError, match="seed .* is too large"):
        Sampling(seed=2**64).generate_kwargs()


def test_heads_take_none_as_no_text():
    engine = Engine.from_paths(None, [demo_path("sequence-classification"), demo_path("question-answering")])
    with pytest.raises(ValueError, match="Enter the text first"):
        engine.classify(None)
    with pytest.raises(ValueError, match="Enter the question first"):
        engine.answer(None, "context")
    with pytest.raises(ValueError, match="the text is not valid Unicode"):
        engine.classify("\ud800")


def test_a_damaged_hub_cache_still_offers_its_good_checkpoints(tmp_path):
    hub = tmp_path / "hub"
    good = hub / "models--org--good/snapshots/r1"
    good.mkdir(parents=True)
    (good / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    loop = hub / "models--org--loop/snapshots/r1"
    loop.parent.mkdir(parents=True)
    loop.symlink_to(loop)  # scanning this took the whole app down at start
    fifo = hub / "models--org--fifo/snapshots/r1"
    fifo.mkdir(parents=True)
    os.mkfifo(fifo / "config.json")
    (hub / "models--org--file").write_text("not a folder")
    (hub / "models--org--bare").mkdir()  # no snapshots/
    assert [c.name for c in models.cached_choices(hub)] == ["org/good"]
    assert models.cached_choices(hub / "models--org--file") == []  # a cache that is a file offers nothing


def test_a_message_sent_while_a_reply_streams_is_refused_not_lost(engine):
    """Sent while a reply streamed, a message was cleared from the box and then overwritten by that reply's
    updates (or cut the reply short): the tab now refuses it, text kept, until the reply ends or Stop."""
    import gradio as gr
    from neoxlite.app.ui import create_app

    fns = list(create_app(engine).fns.values())
    starts = [f for f in fns if f.name in ("take_message", "drop_last_reply", "edit_message")]
    assert sorted(f.name for f in starts) == ["drop_last_reply", "edit_message", "take_message", "take_message"]
    flag = starts[0].inputs[-1]
    assert isinstance(flag, gr.State) and all(f.inputs[-1] is flag and f.outputs[-1] is flag for f in starts)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for f in starts:
        args = {"take_message": ("next", history, "Markdown"), "drop_last_reply": (history, "Markdown"),
                "edit_message": (history, "Markdown")}[f.name]
        edit = [gr.EditData(None, {"index": 0, "value": "hey", "previous_value": "hi"})] if f.name == "edit_message" else []
        with pytest.raises(gr.Error, match="A reply is still coming"):
            f.fn(*args, True, *edit)
    took = next(f for f in starts if f.name == "take_message").fn("next", history, "Markdown", False)
    assert took[0] == "" and took[1][-1]["content"] == "next" and took[-1] is True  # sent: now streaming
    resets = [f for f in fns if f.name == "<lambda>" and not f.inputs and flag in f.outputs]
    stop = next(f for f in resets if isinstance(f.fn(), tuple) and "Stopped." in f.fn())
    assert stop.fn()[stop.outputs.index(flag)] is False  # Stop (and the reply's end, Clear) lets the next one go
    assert len(resets) >= 4 + 3
