"""The Gradio app, driven through gradio_client against a running server on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
transformers = pytest.importorskip("transformers")

from helpers import make_checkpoint  # noqa: E402  (tests/ is on sys.path)
from neoxlite.app.cli import build_parser, launch  # noqa: E402
from neoxlite.app.engine import Engine, LoadError, Sampling  # noqa: E402
from neoxlite.app.prompting import build_prompt, cut_at_stop, render  # noqa: E402
from neoxlite.app.screenshot import CHROMIUM, chat_in_browser, free_port  # noqa: E402

from neoxlite.api import load  # noqa: E402
from neoxlite.generation import stream_text  # noqa: E402
from neoxlite.options import load_kwargs  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[2] / "shared/tokenizers/gpt-neox-20b"
CONTEXT = 256  # small, so history truncation is cheap to reach
SENTIMENT = {0: "negative", 1: "positive", 2: "neutral"}
TOKEN_TYPES = {0: "NAME", 1: "OP", 2: "NUMBER", 3: "STRING"}


def make_head_checkpoint(folder: Path, architecture: str, **config: object) -> Path:
    """A tiny random GPT-NeoX checkpoint with the given head, hub layout, real GPT-NeoX-20B tokenizer."""
    make_checkpoint(folder, architecture, vocab_size=50304, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=CONTEXT, pad_token_id=1,
                    **config)
    shutil.copy(TOKENIZER / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("app_checkpoints")
    return {
        "chat": make_head_checkpoint(root / "lm", "GPTNeoXForCausalLM"),
        "classify": make_head_checkpoint(root / "cls", "GPTNeoXForSequenceClassification", id2label=SENTIMENT),
        "tag": make_head_checkpoint(root / "tok", "GPTNeoXForTokenClassification", id2label=TOKEN_TYPES),
        "answer": make_head_checkpoint(root / "qa", "GPTNeoXForQuestionAnswering"),
    }


@pytest.fixture(scope="module")
def url(checkpoints) -> str:
    demo, url = launch(checkpoints["chat"], [checkpoints["classify"], checkpoints["tag"], checkpoints["answer"]],
                       port=free_port(), block=False)
    yield url
    demo.close()


def client(url: str):
    return gradio_client.Client(url, verbose=False)


GREEDY = {"temperature": 0, "max_new_tokens": 24}


# --- through the running app ------------------------------------------------------------------------------

def test_named_endpoints(url):
    endpoints = client(url).view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/chat", "/classify", "/tag", "/answer", "/memory"} <= set(endpoints)
    names = [p["parameter_name"] for p in endpoints["/chat"]["parameters"]]
    assert names == ["message", "system_prompt", "temperature", "top_p", "top_k", "max_new_tokens",
                     "repetition_penalty", "seed", "prompt_format"]
    assert all(p["parameter_has_default"] for p in endpoints["/chat"]["parameters"][1:])


def test_chat_reply_streams_and_completes(url):
    job = client(url).submit("Hello, who are you?", **GREEDY, api_name="/chat")
    parts = list(job)
    final = job.result()
    assert final and parts[-1] == final
    growing = [p for p in parts if p]
    assert len(set(growing)) > 3, f"the reply came in {len(set(growing))} pieces, expected a stream: {parts}"
    assert all(later.startswith(earlier) for earlier, later in pairwise(growing))


def test_sessions_keep_their_own_history_and_queue_concurrently(url):
    # references, one fresh session each: the greedy reply depends only on the session's own prompt
    first = client(url).predict("apples", **GREEDY, api_name="/chat")
    alone = client(url).predict("and then?", **GREEDY, api_name="/chat")
    a, b = client(url), client(url)
    assert a.predict("apples", **GREEDY, api_name="/chat") == first
    with ThreadPoolExecutor(2) as pool:  # both at once: decoded together on the chat model's batcher
        follow_up = pool.submit(a.predict, "and then?", **GREEDY, api_name="/chat")
        fresh = pool.submit(b.predict, "and then?", **GREEDY, api_name="/chat")
        follow_up, fresh = follow_up.result(timeout=60), fresh.result(timeout=60)
    assert fresh == alone  # b never saw a's "apples"
    assert follow_up != alone  # a's reply used a's history


def test_two_chats_at_once_are_decoded_in_one_batch(url, monkeypatch):
    from neoxlite.batching import Batcher

    rows_per_turn = []
    real_turn = Batcher.turn

    def turn(self):  # the app's batcher runs in this process: count the rows each of its turns decodes
        rows_per_turn.append(len(self._rows))
        return real_turn(self)

    monkeypatch.setattr(Batcher, "turn", turn)
    long = {"temperature": 0, "max_new_tokens": 150}
    with ThreadPoolExecutor(2) as pool:
        replies = [pool.submit(client(url).predict, f"chat {i}", **long, api_name="/chat") for i in range(2)]
        assert all(r.result(timeout=120) for r in replies)
    assert max(rows_per_turn) == 2, "the two chats were queued one after the other, not batched"


def test_a_cancelled_reply_frees_the_model(url):
    job = client(url).submit("Keep going.", temperature=0, max_new_tokens=200, api_name="/chat")
    deadline = time.monotonic() + 30
    while not job.outputs() and not job.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    job.cancel()
    assert client(url).predict("Still there?", **GREEDY, api_name="/chat")


def test_classify_returns_labelled_probabilities(url):
    out = client(url).predict("What a lovely afternoon.", api_name="/classify")
    confidences = {c["label"]: c["confidence"] for c in out["confidences"]}
    assert set(confidences) == set(SENTIMENT.values())
    assert out["label"] == max(confidences, key=confidences.get)
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-4)


def test_tag_labels_every_token(url):
    text = "total = price * 3 + tax  # naïve"
    out = client(url).predict(text, api_name="/tag")
    assert "".join(piece["token"] for piece in out) == text
    assert {piece["class_or_confidence"] for piece in out} <= set(TOKEN_TYPES.values())


def test_answer_is_a_span_of_the_context_with_a_score(url):
    context = "The meeting moved to Thursday at noon in the small room upstairs."
    answer, score, where = client(url).predict("When is the meeting?", context, api_name="/answer")
    assert answer and answer in context
    assert 0 < score <= 1
    assert "".join(piece["token"] for piece in where) == context
    assert [p["token"] for p in where if p["class_or_confidence"] == "answer"] == [answer]


def test_user_errors_come_back_as_messages(url):
    c = client(url)
    with pytest.raises(gradio_client.exceptions.AppError, match="Enter the text first"):
        c.predict("   ", api_name="/classify")
    with pytest.raises(gradio_client.exceptions.AppError, match="context holds 256"):
        c.predict("word " * 400, **GREEDY, api_name="/chat")
    with pytest.raises(gradio_client.exceptions.AppError, match="message is empty"):
        c.predict(None, **GREEDY, api_name="/chat")  # an API client's null, named like an empty message
    with pytest.raises(gradio_client.exceptions.AppError, match="Enter the text first"):
        c.predict(None, api_name="/classify")
    with pytest.raises(gradio_client.exceptions.AppError, match="seed .* is too large"):
        c.predict("hi", **GREEDY, seed=2**64, api_name="/chat")
    refused = r"Could not preprocess input component at index 3 \(a `slider`"
    with pytest.raises(gradio_client.exceptions.AppError, match=refused):
        c.predict("hi", temperature="hot", api_name="/chat")  # refused by Gradio itself, and named (show_error)


def test_memory_panel_shows_blocks_and_usage(url):
    client(url).predict("warm up", **GREEDY, api_name="/chat")  # waits for the load
    status, table = client(url).predict(api_name="/memory")
    assert "ready" in status and "RAM (this process)" in status and "VRAM" in status
    rows = table["data"]
    chat_blocks = [row[1] for row in rows if row[0] == "chat"]
    assert chat_blocks == ["embed_in", "layers.0", "layers.1", "head"]
    assert {row[0] for row in rows} == {"chat", "classify", "tag", "answer"}
    assert all(row[2] == "RAM" and row[3].endswith(("B", "KiB", "MiB")) for row in rows)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium "
                    "(scripts/test.sh installs it)")
def test_browser_chat_streams_a_reply(url, tmp_path):
    pytest.importorskip("playwright.sync_api")
    result = chat_in_browser(url, "Tell me about the weather.", tmp_path / "app.png")
    assert result.status.startswith("Done:"), result.status
    assert len(result.seen) > 3, f"the reply appeared in {len(result.seen)} steps, expected a stream: {result.seen}"
    assert len(result.seen[-1]) > len(result.seen[0])
    assert result.screenshot.stat().st_size > 10_000


# --- pieces without a server

def test_tabs_follow_the_checkpoints_heads(checkpoints):
    engine = Engine.from_paths(checkpoints["answer"], [checkpoints["classify"]])
    assert engine.tasks == ["classify", "answer"]  # tab order, whatever the flag order
    with pytest.raises(ValueError, match="no chat model is loaded; start the app with -m MODEL"):
        engine.chat_prompt("", [], "hi", Sampling())
    with pytest.raises(ValueError, match="one checkpoint per head"):
        Engine.from_paths(checkpoints["chat"], [checkpoints["tag"], checkpoints["tag"]])
    assert Engine.from_paths(checkpoints["chat"]).context_length("chat") == CONTEXT
    assert Engine.from_paths(checkpoints["chat"], max_context=64).context_length("chat") == 64  # reserved less


def test_a_failed_load_is_reported_on_every_request(checkpoints, capsys):
    engine = Engine.from_paths(checkpoints["classify"], dtype="float8")
    engine.load()  # in the foreground here; the app runs it in a thread
    assert "ValueError" in capsys.readouterr().err  # the traceback, once, on stderr
    assert engine.load_status()[0][2] == "failed"
    for _ in range(2):
        with pytest.raises(LoadError, match="unknown dtype 'float8'"):
            engine.classify("text")


class WordTokenizer:
    """One token per whitespace-separated word; enough to test prompt fitting."""

    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())


TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def real_tokenizer(tmp_path: Path, chat_template: str | None = None):
    from neoxlite import GPTNeoXTokenizerFast

    shutil.copy(TOKENIZER / "tokenizer.json", tmp_path / "tokenizer.json")
    if chat_template is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return GPTNeoXTokenizerFast.from_pretrained(tmp_path)


def history(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [m for user, bot in turns for m in ({"role": "user", "content": user},
                                                {"role": "assistant", "content": bot})]


def test_continue_style_is_one_text_and_keeps_the_reply_as_generated(url, checkpoints):
    text = "def add(a, b):\n    return"
    prompt = build_prompt(WordTokenizer(), "# utils\n", history(("x = 1\n", "y = 2\n")), text, max_new_tokens=4,
                          context_length=100, style="continue")
    assert prompt.text == "# utils\nx = 1\ny = 2\n" + text and prompt.stop_strings == ()
    reply = client(url).predict(text, **GREEDY, prompt_format="continue", api_name="/chat")
    model, tokenizer = load(checkpoints["chat"])
    settings = Sampling(**GREEDY).generate_kwargs()
    assert reply == "".join(stream_text(model, tokenizer, text, **settings))  # exactly the continuation
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):
        client(url).predict(text, **GREEDY, prompt_format="poem", api_name="/chat")


def test_plain_transcript_format():
    text = render(WordTokenizer(), "Be brief.", history(("hi", "hello")) + [{"role": "user", "content": "bye"}])
    assert text == "Be brief.\n\nUser: hi\nAssistant: hello\nUser: bye\nAssistant:"


def test_chat_template_is_used_when_present(tmp_path):
    tokenizer = real_tokenizer(tmp_path, TEMPLATE)
    prompt = build_prompt(tokenizer, "sys", history(("a", "b")), "c", max_new_tokens=4, context_length=100)
    assert prompt.text == ("<|system|> sys <|end|>\n<|user|> a <|end|>\n<|assistant|> b <|end|>\n"
                           "<|user|> c <|end|>\n<|assistant|>")
    assert prompt.n_tokens == len(tokenizer.encode(prompt.text))
    assert prompt.stop_strings == ("<|end|>",) and prompt.notice == ""


def test_plain_format_on_the_real_tokenizer_stops_at_the_next_user_turn(tmp_path):
    prompt = build_prompt(real_tokenizer(tmp_path), "", [], "hi", max_new_tokens=4, context_length=100)
    assert prompt.text == "User: hi\nAssistant:" and prompt.stop_strings == ("\nUser:",)


def test_history_is_cut_oldest_first_with_a_notice():
    turns = history(("one two three", "four five"), ("six seven", "eight"), ("nine", "ten"))
    full = build_prompt(WordTokenizer(), "", turns, "last", max_new_tokens=5, context_length=100)
    assert full.dropped_messages == 0 and full.notice == ""
    cut = build_prompt(WordTokenizer(), "", turns, "last", max_new_tokens=5, context_length=20)
    assert cut.dropped_messages == 2 and "six seven" in cut.text and "three" not in cut.text
    assert cut.n_tokens + cut.max_new_tokens <= 20
    assert "left out the 2 oldest messages" in cut.notice
    squeezed = build_prompt(WordTokenizer(), "", turns, "last", max_new_tokens=50, context_length=20)
    assert squeezed.dropped_messages == len(turns) and squeezed.max_new_tokens == 20 - squeezed.n_tokens
    assert "reply is limited to" in squeezed.notice
    with pytest.raises(ValueError, match="Shorten the message"):
        build_prompt(WordTokenizer(), "", [], "w " * 30, max_new_tokens=5, context_length=20)


def test_stop_strings_are_cut_and_never_flash():
    assert cut_at_stop("Sure.\nUser: more", ("\nUser:",)) == ("Sure.", True)
    assert cut_at_stop("Sure.\nUs", ("\nUser:",)) == ("Sure.", False)
    assert cut_at_stop("Sure.", ("\nUser:",)) == ("Sure.", False)


def test_cli_binds_localhost_without_share_by_default():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.model, args.head) == ("127.0.0.1", 7860, False, None, [])
    args = build_parser().parse_args(["-m", "m", "--head", "a", "--head", "b", "--quant", "nf4",
                                      "--cpu-memory", "2GiB", "--offload-dir", "/tmp/o", "--host", "0.0.0.0"])
    assert args.head == ["a", "b"] and args.host == "0.0.0.0"
    assert load_kwargs(args) | {"device": "cpu"} == {"quant": "nf4", "cpu_memory": "2GiB", "offload_dir": "/tmp/o",
                                                     "device": "cpu"}


def test_neoxlite_app_subcommand_has_the_same_flags():
    import argparse

    from neoxlite.app.cli import register, run

    parser = argparse.ArgumentParser(prog="neoxlite")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app", "-m", "m", "--head", "h", "--port", "9000", "--gpu-memory", "4GiB"])
    assert (args.func, args.model, args.head, args.port, args.host, args.share) == (run, "m", ["h"], 9000,
                                                                                   "127.0.0.1", False)
    assert load_kwargs(args)["gpu_memory"] == "4GiB"
