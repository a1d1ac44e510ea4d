"""The Gradio Blocks app: a tab per task, a Models tab to choose what is loaded, and a memory panel.

Named API endpoints (gradio_client): /chat, /classify, /tag, /answer, /memory, and for the model panel
/models, /plan, /load, /unload.
Chat replies run on the chat model's batcher (neoxlite.batching), which decodes people chatting at once
together, so chat events have a concurrency group of their own with no limit of Gradio's (the batcher bounds the
work: rows decoded together, then a bounded waiting queue). Every other event that touches a model shares one
concurrency group of size 1, so those requests queue on the model (loading a checkpoint included). The page's chat lives in the browser (gr.BrowserState, kept across
reloads); /chat's history lives in a per-session gr.State, so sessions never see each other's history.
The task tabs follow what is loaded: a tab shows while a checkpoint with its head is loaded.
"""

from __future__ import annotations

import functools
import html
import inspect
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from neoxlite.app import chats, models
from neoxlite.app.engine import TASK_TITLES, Engine, LoadError, Sampling, TierUse, memory_now, tier_usage
from neoxlite.app.heads import guide
from neoxlite.app.prompting import STYLES, Message

from neoxlite.options import QUANT_MODES

MODEL_QUEUE = {"concurrency_id": "model", "concurrency_limit": 1}
CHAT_QUEUE = {"concurrency_id": "chat", "concurrency_limit": None}
PRIVATE = {"api_visibility": "private"}
HEAD_TASKS = ("classify", "tag", "answer")
VIEWS = ("Markdown", "Python code", "Raw text")  # how the chat shows messages
CHAT_KEY = "neoxlite-chat"  # the browser's localStorage key for the page's chat
CSS = """
#neoxlite-header h1 { margin-bottom: 0; }
#chatbot.raw .message-content { white-space: pre-wrap; font-family: var(--font-mono); font-size: 0.9em; }
#chat-notice { color: var(--color-accent); }
.meter { display: flex; align-items: center; gap: 0.6em; font-size: 0.9em; }
.meter .bar { flex: 1; height: 0.7em; background: var(--neutral-200); border-radius: 4px; overflow: hidden;
              max-width: 24em; }
.meter .fill { height: 100%; background: var(--color-accent); }
.meter .counts { color: var(--body-text-color-subdued); }
.tiers { display: grid; grid-template-columns: 7em 1fr 22em; gap: 0.5em 0.8em; align-items: center; }
.tiers .track { position: relative; height: 1.3em; background: var(--neutral-100); border-radius: 4px;
                overflow: hidden; border: 1px solid var(--neutral-300); }
.tiers .used { position: absolute; left: 0; top: 0; bottom: 0; min-width: 2px; background: var(--color-accent); }
.tiers .budget { position: absolute; top: 0; bottom: 0; border-right: 2px dashed var(--neutral-700); }
.tiers .note { font-size: 0.85em; color: var(--body-text-color-subdued); }
"""


def user_errors(fn: Callable) -> Callable:
    """Shows exceptions as a message in the UI (gr.Error) instead of a traceback.

    ValueError/TypeError/OSError (the user's to fix) and LoadError are shown as they are; anything else is
    shown with its type, and its traceback goes to the server's stderr.
    """

    def convert(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if not isinstance(e, (ValueError, TypeError, OSError, LoadError)):
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


def header_markdown(engine: Engine, title: str) -> str:
    served = " · ".join(f"{TASK_TITLES[t].lower()}: `{s.name}`" for t, s in engine.sources.items())
    return f"# {title}\n{served or 'No model loaded: choose one in the Models tab.'}"


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
            for task, homes in totals.items() if task in engine.models]
    lines += ["", "#### Memory", "| | now | peak | total |", "|---|---|---|---|",
              f"| RAM (this process) | {_mib(stats['ram'])} | {_mib(stats['ram_peak'])} | {_mib(stats['ram_total'])} |"]
    if stats["vram_total"] is None:
        lines.append("| VRAM | no CUDA GPU | | |")
    else:
        lines.append(f"| VRAM (allocated; reserved {_mib(stats['vram_reserved'])}) | {_mib(stats['vram'])} | "
                     f"{_mib(stats['vram_peak'])} | {_mib(stats['vram_total'])} |")
    return "\n".join(lines)


def tier_chart_html(tiers: list[TierUse]) -> str:
    """A bar per tier: used (filled) against the budget (dashed line) on a scale of budget or used + free."""
    rows = []
    for t in tiers:
        scale = max(t.used + (t.free or 0), t.budget or 0, 1)
        note = f"{_size(t.used)} used"
        note += f" of {_size(t.budget)} budget" if t.budget else " (no budget set)"
        if t.free is not None:
            note += f" · {_size(t.free)} free"
        budget = (f'<div class="budget" style="width:{100 * t.budget / scale:.2f}%"></div>' if t.budget else "")
        rows.append(f'<div class="tier">{html.escape(t.tier)}</div>'
                    f'<div class="track" title="{html.escape(note)}"><div class="used" '
                    f'style="width:{100 * t.used / scale:.2f}%"></div>{budget}</div>'
                    f'<div class="note">{html.escape(note)}</div>')
    return f'<div class="tiers" id="memory-chart-bars">{"".join(rows)}</div>'


def placement_rows(engine: Engine) -> list[list[Any]]:
    return [[task, block, home, _size(size)] for task, block, home, size in engine.placement()]


def shown(history: list[Message], view: str = "Markdown") -> list[dict[str, Any]]:
    """History as the Chatbot shows it; text exactly as written (a plain string would be dedented by Gradio).

    "Python code" shows each message as a highlighted code block (what the demo writes has no fences).
    """
    def text(m: Message) -> str:
        if view == "Python code" and "```" not in m["content"]:
            return f"```python\n{m['content']}\n```"
        return m["content"]
    return [{"role": m["role"], "content": {"type": "text", "text": text(m)}} for m in history]


def _unfenced(text: str) -> str:
    """An edited message back from the "Python code" view: its fences taken off."""
    lines = text.strip("\n").split("\n")
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1] == "```":
        return "\n".join(lines[1:-1])
    return text


def meter_html(engine: Engine, system: str, history: list[Message], style: str) -> str:
    """The context meter: tokens the chat takes of the model's context, and each message's tokens."""
    if "chat" not in engine.sources or engine.loading:
        return '<div class="meter">Context: no chat model loaded yet</div>'
    counts, used = engine.chat_tokens(system, history, style)
    limit = engine.context_length("chat")
    share = 1.0 if used is None else min(used / limit, 1.0)
    each = " · ".join(f"{'you' if m['role'] == 'user' else 'model'} {'-' if n is None else n}"
                      for m, n in zip(history, counts, strict=True))
    total = (f"more than {limit:,} tokens (the oldest messages are left out of the next prompt)" if used is None
             else f"{used:,} of {limit:,} tokens")
    return (f'<div class="meter"><span>Context: {total}</span>'
            f'<div class="bar"><div class="fill" style="width:{100 * share:.1f}%"></div></div>'
            f'<span class="counts">{("tokens per message: " + each) if each else ""}</span></div>')


def _sampling(temperature: float, top_p: float, top_k: float, max_new_tokens: float,
              repetition_penalty: float, seed: float | None) -> Sampling:
    """The settings as the UI sends them (floats, seed may be None) -> Sampling."""
    return Sampling(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                    max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty),
                    seed=-1 if seed is None else int(seed))


class Page:
    """The components that follow what is loaded, and how to bring them up to date."""

    def __init__(self, engine: Engine, title: str):
        self.engine, self.title = engine, title
        self.header: gr.Markdown
        self.tabs: dict[str, gr.Tab] = {}
        self.max_new: gr.Slider
        self.guides: dict[str, tuple[gr.Markdown, gr.Dataset]] = {}
        self.loaded: gr.Dataframe

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [self.header, *self.tabs.values(), self.max_new, *(c for pair in self.guides.values() for c in pair),
                self.loaded]

    def loaded_rows(self) -> list[list[str]]:
        order = list(TASK_TITLES)
        return [[TASK_TITLES[task], name, state, f"{seconds:.1f} s"]
                for task, name, state, seconds, _ in sorted(self.engine.load_status(), key=lambda s: order.index(s[0]))]

    def update(self) -> list[Any]:
        engine = self.engine
        out: list[Any] = [header_markdown(engine, self.title)]
        out += [gr.Tab(visible=task in engine.sources) for task in self.tabs]
        if "chat" in engine.sources:
            context = engine.context_length("chat")
            out.append(gr.Slider(maximum=max(1, context - 1)))
        else:
            out.append(gr.skip())
        for task in self.guides:
            source = engine.sources.get(task)
            if source is None:
                out += [gr.skip(), gr.skip()]
                continue
            g = guide(source.folder, source.config.id2label, task)
            out += [g.labels, gr.Dataset(samples=g.examples or [[""] * (2 if task == "answer" else 1)],
                                         visible=bool(g.examples))]
        out.append(self.loaded_rows())
        return out


def create_app(engine: Engine, title: str = "neoxlite") -> gr.Blocks:
    """The Blocks app for `engine` (not launched). Every task has a tab; it shows while its model is loaded."""
    started_with = [str(s.folder) for s in engine.sources.values()]
    page = Page(engine, title)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        page.header = gr.Markdown(header_markdown(engine, title), elem_id="neoxlite-header")
        with gr.Tabs():
            _chat_tab(engine, page, demo)
            _classify_tab(engine, page)
            _tag_tab(engine, page)
            _answer_tab(engine, page)
            _models_tab(engine, page, started_with)
            _memory_tab(engine, demo)
        demo.load(page.update, None, page.outputs, show_progress="hidden", **PRIVATE)
    return demo


def _chat_tab(engine: Engine, page: Page, demo: gr.Blocks) -> None:
    context = engine.context_length("chat") if "chat" in engine.sources else 2048
    with gr.Tab(TASK_TITLES["chat"], id="chat", visible="chat" in engine.sources) as tab:
        page.tabs["chat"] = tab
        # list[Message]: this browser's chat, kept in its localStorage. The page hands the browser the key it
        # encrypts with, so a fixed one is no weaker than Gradio's random one, and the chat outlives a restart.
        history = gr.BrowserState([], storage_key=CHAT_KEY, secret=CHAT_KEY)
        chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot", buttons=["copy"], render_markdown=True,
                             feedback_options=None, editable="user",
                             placeholder="Ask something; replies stream in here. Edit a message of yours "
                                         "(pencil icon) to regenerate from there.")
        meter = gr.HTML('<div class="meter">Context: 0 tokens</div>', elem_id="chat-meter")
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
            export_json = gr.Button("Export JSON", size="sm", elem_id="chat-export-json")
            export_md = gr.Button("Export Markdown", size="sm", elem_id="chat-export-md")
            import_json = gr.UploadButton("Import JSON", size="sm", file_types=[".json"], type="filepath",
                                          elem_id="chat-import")
        exported = gr.File(label="Exported chat", visible=False, elem_id="chat-exported", interactive=False)
        d = Sampling()  # the CLI's defaults
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox("", label="System prompt", lines=2, placeholder="Optional instructions for the model")
            with gr.Row():
                style = gr.Radio(list(STYLES), value="chat", label="Prompt format", elem_id="chat-format",
                                 info="chat: the checkpoint's chat template, else a User:/Assistant: transcript; "
                                      "continue: the model continues the conversation as one text (base models)")
                view = gr.Radio(list(VIEWS), value="Markdown", label="Show messages as", elem_id="chat-view",
                                info="Markdown (code blocks highlighted), each message as Python code, or raw text")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature", info="0: greedy")
                top_p = gr.Slider(0.05, 1, value=d.top_p, step=0.01, label="Top-p", info="1: off")
                top_k = gr.Slider(0, 200, value=d.top_k, step=1, label="Top-k", info="0: off")
            with gr.Row():
                page.max_new = max_new = gr.Slider(1, max(1, context - 1), value=min(d.max_new_tokens, context - 1),
                                                   step=1, label="Max new tokens")
                rep = gr.Slider(1, 2, value=d.repetition_penalty, step=0.01, label="Repetition penalty",
                                info="1: off")
                seed = gr.Number(-1 if d.seed is None else d.seed, precision=0, label="Seed",
                                 info="-1: random each time")
        settings = [system, temperature, top_p, top_k, max_new, rep, seed, style]

        def show(past: list[Message], how: str):
            return gr.Chatbot(shown(past, how), render_markdown=how != "Raw text",
                              elem_classes=["raw"] if how == "Raw text" else [])

        # True while a reply streams in this tab: a second one started meanwhile would have its message overwritten
        # by the first reply's updates (lost, the input box already cleared), so it is refused until Stop or the end
        streaming = gr.State(False)

        def not_streaming(replying: bool) -> None:
            if replying:
                raise gr.Error("A reply is still coming: wait for it or press Stop, then send again.")

        def take_message(text: str, past: list[Message], how: str, replying: bool):
            not_streaming(replying)
            if not text.strip():
                gr.Warning("Type a message first.")
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            past = past + [{"role": "user", "content": text}]
            return "", past, shown(past, how), True

        @user_errors
        def reply(past: list[Message], how: str, system_prompt: str, temperature: float, top_p: float,
                  top_k: float, max_new_tokens: float, repetition_penalty: float, seed: float | None,
                  prompt_format: str):
            """Streams the assistant's answer to the last user message in `past` (none: nothing to do)."""
            if not past or past[-1]["role"] != "user":
                return
            if engine.loading:
                yield gr.skip(), gr.skip(), gr.skip(), "Waiting for the model to load (progress in the Memory tab)…"
            sampling = _sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
            prompt = engine.chat_prompt(system_prompt, past[:-1], past[-1]["content"], sampling, prompt_format)
            answer = {"role": "assistant", "content": ""}
            updated = past + [answer]
            yield shown(updated, how), updated, prompt.notice, "Generating…"
            for part in engine.stream_reply(prompt, sampling):
                answer["content"] = part.text or ("" if not part.done else "(the model ended its reply at once)")
                yield shown(updated, how), updated, prompt.notice, part.status

        def drop_last_reply(past: list[Message], how: str, replying: bool):
            not_streaming(replying)
            while past and past[-1]["role"] == "assistant":
                past = past[:-1]
            if not past:
                raise gr.Error("Nothing to regenerate yet: send a message first.")
            return past, shown(past, how), True

        def edit_message(past: list[Message], how: str, replying: bool, edit: gr.EditData):
            """An edited user message replaces the original and everything after it; the reply follows."""
            not_streaming(replying)
            index = edit.index if isinstance(edit.index, int) else edit.index[0]
            value = edit.value if isinstance(edit.value, str) else edit.value.get("text", "")
            if not 0 <= index < len(past) or past[index]["role"] != "user":
                raise gr.Error("Only your own messages can be edited.")
            text = _unfenced(value) if how == "Python code" else value
            past = past[:index] + [{"role": "user", "content": text}]
            return past, shown(past, how), True

        @user_errors
        def update_meter(past: list[Message], system_prompt: str, prompt_format: str) -> str:
            return meter_html(engine, system_prompt, past, prompt_format)

        reply_io = {"fn": reply, "inputs": [history, view, *settings], "outputs": [chatbot, history, notice, status]}
        meter_io = {"fn": update_meter, "inputs": [history, system, style], "outputs": meter,
                    "show_progress": "hidden", **PRIVATE}
        replying = []
        for trigger, first, inputs in ((message.submit, take_message, [message, history, view, streaming]),
                                       (send.click, take_message, [message, history, view, streaming]),
                                       (regenerate.click, drop_last_reply, [history, view, streaming]),
                                       (chatbot.edit, edit_message, [history, view, streaming])):
            outputs = ([message, history, chatbot] if first is take_message else [history, chatbot]) + [streaming]
            event = trigger(first, inputs, outputs, **PRIVATE).success(**reply_io, **CHAT_QUEUE, **PRIVATE)
            replying.append(event)
            event.then(lambda: False, None, streaming, queue=False, **PRIVATE).then(**meter_io)
        stop.click(lambda: ("Stopped.", False), None, [status, streaming], queue=False, cancels=replying,
                   **PRIVATE).then(**meter_io)
        clear.click(lambda: ([], [], "", "", False), None, [history, chatbot, notice, status, streaming], queue=False,
                    cancels=replying, **PRIVATE).then(**meter_io)
        chatbot.clear(lambda: ([], "", "", False), None, [history, notice, status, streaming], queue=False,
                      cancels=replying, **PRIVATE).then(**meter_io)
        view.change(show, [history, view], chatbot, show_progress="hidden", **PRIVATE)
        # "continue" treats the chat as one document (the demo writes Python): show it as code; a choice stays
        style.change(lambda fmt: "Python code" if fmt == "continue" else "Markdown", style, view, **PRIVATE)
        system.blur(**meter_io)
        # the chat kept in this browser comes back on load, as it was left
        demo.load(show, [history, view], chatbot, show_progress="hidden", **PRIVATE).then(**meter_io)

        export_json.click(lambda p, s: _export(p, s, "json"), [history, system], exported, **PRIVATE)
        export_md.click(lambda p, s: _export(p, s, "md"), [history, system], exported, **PRIVATE)

        import_json.upload(_import_chat, [import_json, view], [history, chatbot, system, status],
                           **PRIVATE).then(**meter_io)
        _chat_api(engine, settings)


@user_errors
def _export(past: list[Message], system_prompt: str, kind: str):
    """The chat as a file to download: JSON (OpenAI messages) or Markdown, written whole (a temporary file
    renamed into place). A lone surrogate, which UTF-8 cannot hold, is written as U+FFFD."""
    if not past:
        raise gr.Error("Nothing to export yet: send a message first.")
    folder = Path(tempfile.mkdtemp(prefix="neoxlite-chat-"))
    if kind == "json":
        path, text = folder / "chat.json", chats.to_json(system_prompt, past)
    else:
        path, text = folder / "chat.md", chats.to_markdown(system_prompt, past)
    partial = folder / f".{path.name}.partial"
    partial.write_bytes(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8"))
    partial.replace(path)
    return gr.File(str(path), visible=True)


@user_errors
def _import_chat(upload: str | None, how: str):
    """A chat from a JSON file (OpenAI messages): history, its view, the system prompt, and a cleared status.
    The upload is read only up to the largest chat file, so a huge one costs no memory."""
    if not isinstance(upload, str):
        raise ValueError("no chat file came with the upload: choose a .json file exported from this app")
    with open(upload, "rb") as file:
        system_prompt, past = chats.from_json(file.read(chats.MAX_CHAT_BYTES + 1))
    return past, shown(past, how), system_prompt, ""


def _chat_api(engine: Engine, settings: list[gr.components.Component]) -> None:
    """/chat for API clients: message in, reply text out (streamed); history kept per client session."""
    api_history = gr.State([])
    api_message = gr.Textbox(visible=False, label="Message")
    api_reply = gr.Textbox(visible=False, label="Reply")

    @user_errors
    def chat(message: str, past: list[Message], system_prompt: str, temperature: float, top_p: float,
             top_k: float, max_new_tokens: float, repetition_penalty: float, seed: float | None,
             prompt_format: str):
        """Streams the reply to `message`; the exchange joins this session's history when it completes."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message is empty: send some text")
        sampling = _sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
        prompt = engine.chat_prompt(system_prompt, past, message, sampling, prompt_format)
        for part in engine.stream_reply(prompt, sampling):
            if not part.done:
                yield part.text, past
        yield part.text, past + [{"role": "user", "content": message},
                                 {"role": "assistant", "content": part.text}]

    gr.Button(visible=False).click(chat, [api_message, api_history, *settings], [api_reply, api_history],
                                   api_name="chat", **CHAT_QUEUE)


def _guide(engine: Engine, page: Page, task: str, inputs: list[gr.components.Component]) -> None:
    """The tab's labels line and its clickable examples (filled in when its model is known)."""
    source = engine.sources.get(task)
    g = guide(source.folder, source.config.id2label, task) if source is not None else None
    labels = gr.Markdown(g.labels if g else "", elem_id=f"{task}-labels")
    examples = gr.Dataset(components=inputs, samples=(g.examples if g and g.examples else [[""] * len(inputs)]),
                          label="Examples (click one)", visible=bool(g and g.examples), elem_id=f"{task}-examples")
    examples.click(lambda row: row if len(inputs) > 1 else row[0], examples, inputs, **PRIVATE)
    page.guides[task] = (labels, examples)


def _classify_tab(engine: Engine, page: Page) -> None:
    with gr.Tab(TASK_TITLES["classify"], id="classify", visible="classify" in engine.sources) as tab:
        page.tabs["classify"] = tab
        text = gr.Textbox(label="Text", lines=4, elem_id="classify-text")
        _guide(engine, page, "classify", [text])
        run = gr.Button("Classify", variant="primary")
        labels = gr.Label(label="Labels", num_top_classes=10)
        run.click(user_errors(engine.classify), text, labels, api_name="classify", **MODEL_QUEUE)


def _tag_tab(engine: Engine, page: Page) -> None:
    with gr.Tab(TASK_TITLES["tag"], id="tag", visible="tag" in engine.sources) as tab:
        page.tabs["tag"] = tab
        text = gr.Textbox(label="Text", lines=4, elem_id="tag-text")
        _guide(engine, page, "tag", [text])
        run = gr.Button("Tag", variant="primary")
        tags = gr.HighlightedText(label="Tokens", show_legend=True, combine_adjacent=False)
        run.click(user_errors(engine.tag), text, tags, api_name="tag", **MODEL_QUEUE)


def _answer_tab(engine: Engine, page: Page) -> None:
    with gr.Tab(TASK_TITLES["answer"], id="answer", visible="answer" in engine.sources) as tab:
        page.tabs["answer"] = tab
        question = gr.Textbox(label="Question", elem_id="answer-question")
        context = gr.Textbox(label="Context", lines=6, elem_id="answer-context")
        _guide(engine, page, "answer", [question, context])
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


def _models_tab(engine: Engine, page: Page, started_with: list[str]) -> None:
    catalog: dict[str, str] = {}  # page name -> location (folder or hub id); never shown

    def rescan() -> list[str]:
        loaded = [str(source.folder) for source in engine.sources.values()]  # loaded from a typed folder too
        catalog.clear()
        catalog.update({c.name: c.location for c in models.choices(started_with + loaded)})
        return list(catalog)

    names = rescan()
    with gr.Tab("Models", id="models"):
        gr.Markdown("Choose a checkpoint (one from the list, a local folder or a hub id), its quantization and "
                    "memory budgets; **Plan** shows where each block would live, **Load** replaces the model "
                    "serving the same task (chat or a head), freeing the old one's memory first.")
        with gr.Row():
            checkpoint = gr.Dropdown(names, value=names[0] if names else None, label="Checkpoint",
                                     allow_custom_value=True, scale=3, elem_id="models-checkpoint",
                                     info="the demo, what the app started with, and GPT-NeoX models in the "
                                          "Hugging Face cache; or type a folder or hub id")
            rescan_button = gr.Button("Rescan", size="sm", scale=0, elem_id="models-rescan")
        with gr.Row():
            quant = gr.Radio(list(QUANT_MODES), value="none", label="Quantization", elem_id="models-quant",
                             info="bitsandbytes 8-bit or 4-bit (nf4, fp4) linear layers")
            gpu_memory = gr.Textbox("", label="GPU memory", placeholder="free GPU memory less a margin",
                                    elem_id="models-gpu")
            cpu_memory = gr.Textbox("", label="RAM", placeholder="free RAM less a margin", elem_id="models-cpu")
            offload_dir = gr.Textbox("", label="Offload folder", placeholder="none: no disk tier",
                                     elem_id="models-offload")
        with gr.Row():
            plan_button = gr.Button("Plan", elem_id="models-plan")
            load_button = gr.Button("Load", variant="primary", elem_id="models-load")
        load_status = gr.Markdown("", elem_id="models-status")
        plan_text = gr.Code("", label="Plan (neoxlite plan)", language=None, interactive=False, elem_id="models-plan-text")
        page.loaded = gr.Dataframe(page.loaded_rows(), headers=["task", "checkpoint", "state", "load time"],
                                   label="Loaded", interactive=False, elem_id="models-loaded")
        with gr.Row():
            unload_task = gr.Dropdown([(TASK_TITLES[t], t) for t in TASK_TITLES], value="chat", label="Unload",
                                      scale=3, elem_id="models-unload-task")
            unload_button = gr.Button("Unload", variant="stop", scale=1, elem_id="models-unload")
        # the same, for API clients (hidden)
        api_names = gr.JSON(visible=False, label="Checkpoints")
        api_text = gr.Textbox(visible=False, label="Result")
        api_buttons = [gr.Button(visible=False) for _ in range(4)]
    fields = [checkpoint, quant, gpu_memory, cpu_memory, offload_dir]

    def location(name: str | None) -> str:
        if not name or not name.strip():
            raise ValueError("Choose a checkpoint first.")
        return catalog.get(name, name.strip())

    @user_errors
    def plan_fn(name: str, quant_mode: str, gpu: str, cpu: str, offload: str) -> str:
        """`neoxlite plan` for the checkpoint under these settings, without loading anything."""
        return models.plan_summary(location(name), models.load_options(quant_mode, gpu, cpu, offload))

    @user_errors
    def load_fn(name: str, quant_mode: str, gpu: str, cpu: str, offload: str,
                progress=gr.Progress()):  # noqa: B008 (Gradio finds its progress bar by this default)
        """Loads the checkpoint in place of the model for its task; yields the progress line as blocks load."""
        where, kwargs = location(name), models.load_options(quant_mode, gpu, cpu, offload)
        done: dict[str, Any] = {}
        seen: list[tuple[str, int, int]] = []

        def work() -> None:
            try:
                done["step"] = engine.load_checkpoint(where, kwargs, on_block=lambda *p: seen.append(p))
            except Exception as e:  # handed to the event below, which shows it
                done["error"] = e

        worker = threading.Thread(target=work, name="neoxlite-app-load", daemon=True)
        worker.start()
        shown_name = models.display_name(where)
        while worker.is_alive():
            worker.join(0.2)
            if seen:
                block, n, total = seen[-1]
                progress((n, total), desc=f"loading {shown_name}: {block}", unit="blocks")
                yield f"Loading `{shown_name}`: block {n} of {total} ({block})"
        if "error" in done:
            raise done["error"]
        step = done["step"]
        yield (f"Loaded `{step.source.name}` for {TASK_TITLES[step.source.task].lower()} in {step.seconds:.1f} s "
               f"({step.blocks_total} blocks).")

    @user_errors
    def unload_fn(task: str) -> str:
        if not engine.unload(task):
            raise ValueError(f"no {TASK_TITLES[task].lower()} model is loaded")
        return f"Unloaded the {TASK_TITLES[task].lower()} model."

    rescan_button.click(lambda: gr.Dropdown(choices=rescan()), None, checkpoint, **PRIVATE)
    plan_button.click(plan_fn, fields, plan_text, **PRIVATE)
    loading = load_button.click(load_fn, fields, load_status, **MODEL_QUEUE, **PRIVATE)
    loading.then(page.update, None, page.outputs, show_progress="hidden", **PRIVATE)
    # a folder typed in full is listed by its name from now on
    loading.success(lambda name: gr.Dropdown(choices=rescan(), value=models.display_name(location(name))),
                    checkpoint, checkpoint, show_progress="hidden", **PRIVATE)
    unload_button.click(unload_fn, unload_task, load_status, **MODEL_QUEUE, **PRIVATE).then(
        page.update, None, page.outputs, show_progress="hidden", **PRIVATE)

    def load_api(name: str, quant_mode: str, gpu: str, cpu: str, offload: str) -> str:
        *_, last = load_fn(name, quant_mode, gpu, cpu, offload, progress=lambda *a, **k: None)
        return last

    api_buttons[0].click(lambda: rescan(), None, api_names, api_name="models")
    api_buttons[1].click(plan_fn, fields, api_text, api_name="plan")
    api_buttons[2].click(user_errors(load_api), fields, api_text, api_name="load", **MODEL_QUEUE)
    api_buttons[3].click(unload_fn, unload_task, api_text, api_name="unload", **MODEL_QUEUE)


def _memory_tab(engine: Engine, demo: gr.Blocks) -> None:
    with gr.Tab("Memory", id="memory"):
        chart = gr.HTML(tier_chart_html(tier_usage(list(engine.models.values()))), label="Memory by tier",
                        elem_id="memory-chart")
        status = gr.Markdown(memory_markdown(engine), elem_id="memory-status")
        table = gr.Dataframe(headers=["model", "block", "home", "size"], label="Where each block lives",
                             datatype="str", interactive=False, max_height=360)
        refresh = gr.Button("Refresh", size="sm")

    def update():
        return memory_markdown(engine), placement_rows(engine)

    def draw():
        return tier_chart_html(tier_usage(list(engine.models.values())))

    # ticks while a reply streams too: the timer is outside the model's queue
    timer = gr.Timer(2.0)
    for trigger in (timer.tick, demo.load, refresh.click):
        trigger(draw, None, chart, show_progress="hidden", **PRIVATE)
    timer.tick(update, None, [status, table], show_progress="hidden", **PRIVATE)
    refresh.click(update, None, [status, table], api_name="memory")
    demo.load(update, None, [status, table], show_progress="hidden", **PRIVATE)
