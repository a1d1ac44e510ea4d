"""`neoxlite chat`: a terminal conversation that behaves like `ollama run`.

Line editing and history (readline, where Python has it); Ctrl-C stops a reply and keeps the conversation;
Ctrl-D or /bye leaves; slash commands change the system prompt and sampling settings and save or load the
conversation (JSON, OpenAI's messages format); a message between two \"\"\" lines may span several lines.
Replies go to stdout; labels, notices and the speed line go to stderr when stdout is not a terminal, so a
piped transcript holds only the replies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from neoxlite.fileio import atomic_write_text
from neoxlite.limits import check_text, check_text_fits
from neoxlite.options import sampling_kwargs

try:  # gives input() line editing and history; absent on some builds (Windows)
    import readline  # noqa: F401
except ImportError:
    pass

HELP = """commands:
  /help                 this list
  /clear                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt (/system alone shows it)
  /set NAME VALUE       a sampling setting: temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed
  /set                  show the settings
  /save FILE            write the conversation as JSON (OpenAI messages: role and content)
  /load FILE            read a conversation written by /save
  /bye                  leave (or Ctrl-D)
  \"\"\"                   on its own line: start (and end) a message of several lines
Ctrl-C stops a reply; the conversation stays."""
ROLES = ("system", "user", "assistant")


class Chat:
    """One terminal conversation with a loaded model."""

    SETTINGS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed")

    def __init__(self, model: Any, tokenizer: Any, *, system: str = "", settings: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.settings = dict(settings or {})  # what the user set (flags, /set); the rest comes from the checkpoint
        self.history: list[dict[str, str]] = []
        self.tty = sys.stdout.isatty()

    # ------------------------------------------------------------------ terminal
    def label(self, text: str) -> str:
        """A label for input() (stdout on a terminal), or written to stderr when stdout is piped."""
        if self.tty:
            return text
        sys.stderr.write(text)
        sys.stderr.flush()
        return ""

    def note(self, text: str) -> None:
        print(f"[{text}]", file=sys.stderr)

    def read_message(self) -> str | None:
        """The next message (a \"\"\" block joined), "" for nothing, None at end of input."""
        try:
            line = input(self.label("you> "))
        except EOFError:
            return None
        if not line.strip().startswith('"""'):
            return line.strip()
        lines = [line.strip()[3:]]
        while not lines[-1].endswith('"""'):
            try:
                lines.append(input(self.label("... ")))
            except EOFError:
                break
        if lines[-1].endswith('"""'):
            lines[-1] = lines[-1][:-3]
        return "\n".join(lines).strip()

    def run(self) -> int:
        self.note('chat: /help for commands, """ for several lines, Ctrl-C stops a reply, Ctrl-D or /bye leaves')
        while True:
            try:
                message = self.read_message()
            except KeyboardInterrupt:
                print(file=sys.stderr)
                self.note("to leave: Ctrl-D or /bye")
                continue
            if message is None:
                if not self.tty:
                    print(file=sys.stderr)
                return 0
            if not message:
                continue
            try:
                check_text(message, "the message")  # bytes that are not UTF-8 (a non-UTF-8 terminal)
            except ValueError as err:
                self.note(f"error: {err}; not sent")
                continue
            if message.startswith("/"):
                if self.command(message) == "bye":
                    return 0
                continue
            try:
                self.reply(message)
            except KeyboardInterrupt:  # before the reply began (reply() itself keeps a partial reply)
                print(file=sys.stderr)
                self.note("stopped")
            except ValueError as err:  # e.g. a message too long for the context: say so, keep the conversation
                self.note(f"error: {' '.join(str(err).split())}")

    # ------------------------------------------------------------------ commands
    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/bye", "/exit", "/quit"):
            return "bye"
        try:
            if name in ("/help", "/?"):
                print(HELP, file=sys.stderr)
            elif name == "/clear":
                self.history.clear()
                self.note("conversation cleared")
            elif name == "/system":
                if rest:
                    self.system = rest
                self.note(f"system prompt: {self.system!r}")
            elif name == "/set":
                self.set(rest)
            elif name == "/save" and rest:
                self.save(Path(rest).expanduser())
            elif name == "/load" and rest:
                self.load(Path(rest).expanduser())
            else:
                self.note(f"unknown command or missing argument: {line!r}; /help lists the commands")
        except (ValueError, OSError) as err:
            self.note(f"error: {' '.join(str(err).split())}")
        return None

    def set(self, text: str) -> None:
        if not text:
            shown = sampling_kwargs(self.settings, getattr(self.model, "generation_config", None))
            shown |= {k: v for k, v in self.settings.items() if k not in shown}  # e.g. top_k while greedy
            self.note(", ".join(f"{k} {v}" for k, v in shown.items()))
            return
        name, _, value = text.partition(" ")
        name = name.replace("-", "_")
        if name not in self.SETTINGS or not value.strip():
            raise ValueError(f"use /set NAME VALUE with NAME one of {', '.join(self.SETTINGS)}")
        kind = float if name in ("temperature", "top_p", "repetition_penalty") else int
        try:
            parsed = kind(value.strip())
        except ValueError:
            raise ValueError(f"{name} takes a{'n integer' if kind is int else ' number'}, got {value.strip()!r}") from None
        trial = {**self.settings, name: parsed}
        sampling_kwargs(trial)  # refused here, with generate()'s own checks, when out of range
        self.settings = trial
        self.note(f"{name} = {parsed}")

    def save(self, path: Path) -> None:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        atomic_write_text(path, json.dumps(messages, ensure_ascii=False, indent=1))  # written whole, then renamed
        self.note(f"saved {len(messages)} messages to {path}")

    def load(self, path: Path) -> None:
        try:
            messages = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err})") from None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"{path} is not a conversation: expected a JSON list of "
                             '{"role": "system"|"user"|"assistant", "content": "..."}, as /save writes')
        system = [m["content"] for m in messages if m["role"] == "system"]
        self.system = system[-1] if system else ""
        self.history = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        self.note(f"loaded {len(self.history)} messages from {path}")

    # ------------------------------------------------------------------ replies
    def reply(self, message: str) -> None:
        from neoxlite.app.prompting import build_prompt, cut_at_stop  # the app's chat format, shared
        from neoxlite.cli import Timer
        from neoxlite.generation import context_limit, stream_tokens_as_text

        sampling = sampling_kwargs(self.settings, getattr(self.model, "generation_config", None))
        # refused from its length alone: tokenizing megabytes takes seconds to find it does not fit
        check_text_fits(message, self.tokenizer, context_limit(self.model.config), "message")
        prompt = build_prompt(self.tokenizer, self.system, self.history, message,
                              max_new_tokens=sampling["max_new_tokens"], context_length=context_limit(self.model.config))
        if prompt.notice:
            self.note(prompt.notice)
        sys.stdout.write(self.label("model> "))
        reply, shown = "", ""
        timer = Timer()
        settings = {**sampling, "max_new_tokens": prompt.max_new_tokens}
        pieces = stream_tokens_as_text(self.model, self.tokenizer, prompt.text,
                                       stop_strings=list(prompt.stop_strings) or None, **settings)
        try:
            for piece in timer.count(pieces):
                reply += piece
                visible, stopped = cut_at_stop(reply, prompt.stop_strings)
                sys.stdout.write(visible[len(shown):])
                sys.stdout.flush()
                shown = visible
                if stopped:
                    break
            interrupted = False
        except KeyboardInterrupt:  # stop this reply; what was shown stays in the conversation
            pieces.close()
            interrupted = True
        timer.stop()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if interrupted:
            self.note("stopped")
        print(timer.line(prompt.n_tokens), file=sys.stderr)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": shown.strip()}]
