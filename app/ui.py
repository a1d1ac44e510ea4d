"""The Gradio Blocks app: a tab per task the engine serves, and a memory panel.

Named API endpoints (gradio_client): /chat, /classify, /tag, /answer, /memory.
Every event that touches a model shares one concurrency group of size 1, so requests queue on the
model; chat history lives in a per-session gr.State, so sessions never see each other's history.
"""

from __future__ import annotations

import functools
import inspect
import sys
import traceback
from collections.abc import Callable
from typing import Any

import gradio as gr
from neoxlite.app.engine import TASK_TITLES, Engine, LoadError, Sampling, memory_now
from neoxlite.app.prompting import STYLES, Message

MODEL_QUEUE = {"concurrency_id": "model", "concurrency_limit": 1}
PRIVATE = {"api_visibility": "private"}
# Replies are shown as the model wrote them (code keeps its indentation), not rendered as Markdown.
CSS = """
#neoxlite-header h1 { margin-bottom: 0; }
#chatbot .message-content { white-space: pre-wrap; font-family: var(--font-mono); font-size: 0.9em; }
#chat-notice { color: var(--color-accent); }
"""


def user_errors(fn: Callable) -> Callable:
    """Shows exceptions as a message in the UI (gr.Error) instead of a traceback.

    ValueError/TypeError (the user's to fix) and LoadError are shown as they are; anything else is shown
    with its type, and its traceback goes to the server's stderr.
    """

    def convert(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if not isinstance(e, (ValueError, TypeError, LoadError)):
            traceback.print_exc(file=sys.stderr)
            return gr.Error(f"{type(e).__name__}: {e}")
        return gr.Error(str(e))

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                raise convert(e) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise convert(e) from None
    return wrapper


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def memory_markdown(engine: Engine) -> str:
    stats = memory_now()
    lines = ["#### Loading"]
    for task, name, state, seconds, error in engine.load_status():
        line = f"- **{TASK_TITLES[task]}** `{name}`: {state}"
        if state != "waiting":
            line += f" ({seconds:.1f} s)"
        if error:
            line += f": {error}"
        lines.append(line)
    totals: dict[str, dict[str, int]] = {}
    for task, _, home, size in engine.placement():
        totals.setdefault(task, {}).setdefault(home, 0)
        totals[task][home] += size
    if totals:
        lines += ["", "#### Weights"] + [
            f"- **{TASK_TITLES[task]}** (computes on {engine.models[task].device}): "
            + ", ".join(f"{_size(n)} {'on' if home in ('GPU', 'disk') else 'in'} {home}" for home, n in homes.items())
            for task, homes in totals.items()]
    lines += ["", "#### Memory", "| | now | peak | total |", "|---|---|---|---|",
              f"| RAM (this process) | {_mib(stats['ram'])} | {_mib(stats['ram_peak'])} | {_mib(stats['ram_total'])} |"]
    if stats["vram_total"] is None:
        lines.append("| VRAM | no CUDA GPU | | |")
    else:
        lines.append(f"| VRAM (allocated; reserved {_mib(stats['vram_reserved'])}) | {_mib(stats['vram'])} | "
                     f"{_mib(stats['vram_peak'])} | {_mib(stats['vram_total'])} |")
    return "\n".join(lines)


def placement_rows(engine: Engine) -> list[list[Any]]:
    return [[task, block, home, _size(size)] for task, block, home, size in engine.placement()]


def shown(history: list[Message]) -> list[dict[str, Any]]:
    """History as the Chatbot shows it: text exactly as written (a plain string would be dedented by Gradio)."""
    return [{"role": m["role"], "content": {"type": "text", "text": m["content"]}} for m in history]


def _sampling(temperature: float, top_p: float, top_k: float, max_new_tokens: float,
              repetition_penalty: float, seed: float | None) -> Sampling:
    """The settings as the UI sends them (floats, seed may be None) -> Sampling."""
    return Sampling(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                    max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty),
                    seed=-1 if seed is None else int(seed))


def create_app(engine: Engine, title: str = "neoxlite") -> gr.Blocks:
    """The Blocks app for `engine` (not launched). Tabs exist for the tasks the engine serves."""
    tasks = engine.tasks
    names = ", ".join(f"{TASK_TITLES[t].lower()}: `{s.name}`" for t, s in engine.sources.items())
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n{names}", elem_id="neoxlite-header")
        with gr.Tabs():
            if "chat" in tasks:
                _chat_tab(engine)
            if "classify" in tasks:
                _classify_tab(engine)
            if "tag" in tasks:
                _tag_tab(engine)
            if "answer" in tasks:
                _answer_tab(engine)
            _memory_tab(engine, demo)
    return demo


def _chat_tab(engine: Engine) -> None:
    context = engine.context_length("chat")
    with gr.Tab(TASK_TITLES["chat"], id="chat"):
        history = gr.State([])  # list[Message], this session's only
        chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot", buttons=["copy"], render_markdown=False,
                             feedback_options=None, placeholder="Ask something; replies stream in here.")
        notice = gr.Markdown("", elem_id="chat-notice")
        status = gr.Markdown("", elem_id="chat-status")
        with gr.Row():
            message = gr.Textbox(label="Message", placeholder="Type a message and press Enter",
                                 show_label=False, scale=5, elem_id="chat-input", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
        with gr.Row():
            regenerate = gr.Button("Regenerate", size="sm", elem_id="chat-regenerate")
            clear = gr.Button("Clear", size="sm", elem_id="chat-clear")
        d = Sampling()  # the CLI's defaults
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox("", label="System prompt", lines=2, placeholder="Optional instructions for the model")
            style = gr.Radio(list(STYLES), value="chat", label="Prompt format", elem_id="chat-format",
                             info="chat: the checkpoint's chat template, else a User:/Assistant: transcript; "
                                  "continue: the model continues the conversation as one text (base models)")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature", info="0: greedy")
                top_p = gr.Slider(0.05, 1, value=d.top_p, step=0.01, label="Top-p", info="1: off")
                top_k = gr.Slider(0, 200, value=d.top_k, step=1, label="Top-k", info="0: off")
            with gr.Row():
                max_new = gr.Slider(1, max(1, context - 1), value=min(d.max_new_tokens, context - 1), step=1,
                                    label="Max new tokens")
                rep = gr.Slider(1, 2, value=d.repetition_penalty, step=0.01, label="Repetition penalty",
                                info="1: off")
                seed = gr.Number(-1 if d.seed is None else d.seed, precision=0, label="Seed",
                                 info="-1: random each time")
        settings = [system, temperature, top_p, top_k, max_new, rep, seed, style]

        def take_message(text: str, past: list[Message]):
            if not text.strip():
                gr.Warning("Type a message first.")
                return gr.skip(), gr.skip(), gr.skip()
            past = past + [{"role": "user", "content": text}]
            return "", past, shown(past)

        @user_errors
        def reply(past: list[Message], system_prompt: str, temperature: float, top_p: float, top_k: float,
                  max_new_tokens: float, repetition_penalty: float, seed: float | None, prompt_format: str):
            """Streams the assistant's answer to the last user message in `past` (none: nothing to do)."""
            if not past or past[-1]["role"] != "user":
                return
            if engine.loading:
                yield gr.skip(), gr.skip(), gr.skip(), "Waiting for the model to load (progress in the Memory tab)…"
            sampling = _sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
            prompt = engine.chat_prompt(system_prompt, past[:-1], past[-1]["content"], sampling, prompt_format)
            answer = {"role": "assistant", "content": ""}
            updated = past + [answer]
            yield shown(updated), updated, prompt.notice, "Generating…"
            for part in engine.stream_reply(prompt, sampling):
                answer["content"] = part.text or ("" if not part.done else "(the model ended its reply at once)")
                yield shown(updated), updated, prompt.notice, part.status

        def drop_last_reply(past: list[Message]):
            while past and past[-1]["role"] == "assistant":
                past = past[:-1]
            if not past:
                raise gr.Error("Nothing to regenerate yet: send a message first.")
            return past, shown(past)

        reply_io = {"fn": reply, "inputs": [history, *settings], "outputs": [chatbot, history, notice, status]}
        on_submit = message.submit(take_message, [message, history], [message, history, chatbot],
                                   **PRIVATE).success(**reply_io, **MODEL_QUEUE, **PRIVATE)
        on_send = send.click(take_message, [message, history], [message, history, chatbot],
                             **PRIVATE).success(**reply_io, **MODEL_QUEUE, **PRIVATE)
        on_regen = regenerate.click(drop_last_reply, history, [history, chatbot],
                                    **PRIVATE).success(**reply_io, **MODEL_QUEUE, **PRIVATE)
        replying = [on_submit, on_send, on_regen]
        stop.click(lambda: "Stopped.", None, status, queue=False, cancels=replying, **PRIVATE)
        clear.click(lambda: ([], [], "", ""), None, [history, chatbot, notice, status], queue=False,
                    cancels=replying, **PRIVATE)
        chatbot.clear(lambda: ([], "", ""), None, [history, notice, status], queue=False, cancels=replying,
                      **PRIVATE)

        # /chat for API clients: message in, reply text out (streamed); history kept per client session
        api_message = gr.Textbox(visible=False, label="Message")
        api_reply = gr.Textbox(visible=False, label="Reply")

        @user_errors
        def chat(message: str, past: list[Message], system_prompt: str, temperature: float, top_p: float,
                 top_k: float, max_new_tokens: float, repetition_penalty: float, seed: float | None,
                 prompt_format: str):
            """Streams the reply to `message`; the exchange joins this session's history when it completes."""
            if not message.strip():
                raise ValueError("message is empty: send some text")
            sampling = _sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
            prompt = engine.chat_prompt(system_prompt, past, message, sampling, prompt_format)
            for part in engine.stream_reply(prompt, sampling):
                if not part.done:
                    yield part.text, past
            yield part.text, past + [{"role": "user", "content": message},
                                     {"role": "assistant", "content": part.text}]

        gr.Button(visible=False).click(chat, [api_message, history, *settings], [api_reply, history],
                                       api_name="chat", **MODEL_QUEUE)


def _classify_tab(engine: Engine) -> None:
    with gr.Tab(TASK_TITLES["classify"], id="classify"):
        text = gr.Textbox(label="Text", lines=4, elem_id="classify-text")
        run = gr.Button("Classify", variant="primary")
        labels = gr.Label(label="Labels", num_top_classes=10)
        run.click(user_errors(engine.classify), text, labels, api_name="classify", **MODEL_QUEUE)


def _tag_tab(engine: Engine) -> None:
    with gr.Tab(TASK_TITLES["tag"], id="tag"):
        text = gr.Textbox(label="Text", lines=4, elem_id="tag-text")
        run = gr.Button("Tag", variant="primary")
        tags = gr.HighlightedText(label="Tokens", show_legend=True, combine_adjacent=False)
        run.click(user_errors(engine.tag), text, tags, api_name="tag", **MODEL_QUEUE)


def _answer_tab(engine: Engine) -> None:
    with gr.Tab(TASK_TITLES["answer"], id="answer"):
        question = gr.Textbox(label="Question", elem_id="answer-question")
        context = gr.Textbox(label="Context", lines=6, elem_id="answer-context")
        run = gr.Button("Answer", variant="primary")
        with gr.Row():
            answer = gr.Textbox(label="Answer", scale=3)
            score = gr.Number(label="Score", precision=4, scale=1)
        where = gr.HighlightedText(label="In the context", show_legend=False)

        @user_errors
        def answer_fn(question: str, context: str):
            found = engine.answer(question, context)
            spans = [(context[:found.start], None), (context[found.start:found.end], "answer"),
                     (context[found.end:], None)]
            return found.text, round(found.score, 4), [(t, label) for t, label in spans if t]

        run.click(answer_fn, [question, context], [answer, score, where], api_name="answer", **MODEL_QUEUE)


def _memory_tab(engine: Engine, demo: gr.Blocks) -> None:
    with gr.Tab("Memory", id="memory"):
        status = gr.Markdown(memory_markdown(engine), elem_id="memory-status")
        table = gr.Dataframe(headers=["model", "block", "home", "size"], label="Where each block lives",
                             datatype="str", interactive=False, max_height=360)
        refresh = gr.Button("Refresh", size="sm")

    def update():
        return memory_markdown(engine), placement_rows(engine)

    timer = gr.Timer(2.0)
    timer.tick(update, None, [status, table], show_progress="hidden", **PRIVATE)
    refresh.click(update, None, [status, table], api_name="memory")
    demo.load(update, None, [status, table], show_progress="hidden", **PRIVATE)
