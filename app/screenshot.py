"""Drive the running app in headless chromium: chat, reload, export, try each tab, screenshot every tab.

    python -m neoxlite.app.screenshot [-m MODEL] [--head PATH ...] [--load CHECKPOINT] [--out docs]

starts the app on a free port, takes the tour (`tour`) and writes docs/app.png (the chat tab, the README's
picture) and docs/app-<tab>.png. The browser tests call `chat_in_browser` and `tour` the same way. Needs playwright (a test extra) and Debian's chromium at
/usr/bin/chromium; never downloads a browser.
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]

# Records every text the newest bot message shows, so the caller can tell a streamed reply from one
# that appeared whole.
_WATCH_REPLY = """() => {
  window.__replies = [];
  const record = () => {
    const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && window.__replies[window.__replies.length - 1] !== text) window.__replies.push(text);
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@dataclass
class BrowserChat:
    seen: list[str]  # each distinct text of the reply while it streamed, last = final
    status: str  # the line under the chat: "Done: N tokens in S s, R tokens/s"
    screenshot: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_in_browser(url: str, message: str, screenshot: Path, *, prompt_format: str | None = None,
                    timeout_s: float = 60.0, width: int = 1200, height: int = 900) -> BrowserChat:
    """Opens `url`, sends `message` in the chat tab, waits for the reply to finish, saves a screenshot.

    prompt_format picks the Settings' "Prompt format" first ("chat" or "continue"; None leaves the default).
    """
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url)
            box = page.locator("#chat-input textarea")
            box.wait_for()
            if prompt_format is not None:
                page.get_by_text("Settings", exact=True).first.click()
                page.locator("#chat-format").get_by_text(prompt_format, exact=True).click()
                page.get_by_text("Settings", exact=True).first.click()
            page.evaluate(_WATCH_REPLY)
            box.fill(message)
            box.press("Enter")
            page.locator("#chat-status").get_by_text("Done:").wait_for()
            seen = page.evaluate("() => window.__replies")
            status = page.locator("#chat-status").inner_text().strip()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return BrowserChat(seen=seen, status=status, screenshot=screenshot)


TABS = {"chat": "Chat", "classify": "Sequence classification", "tag": "Token classification",
        "answer": "Question answering", "models": "Models", "memory": "Memory"}


@dataclass
class Tour:
    loaded: str  # the Models tab's line after loading the second checkpoint ("" when none was asked for)
    reply: str  # the chat's last reply as shown
    after_reload: list[str]  # the chat's messages as shown after reloading the page
    exported: str  # the chat exported as JSON
    after_edit: list[str]  # the chat's messages after editing the first one ([] when no edit was asked for)
    after_import: list[str]  # the chat's messages after importing the exported JSON back
    checkpoint_field: str  # the Models tab's checkpoint field after loading
    screenshots: dict[str, Path]  # tab id -> screenshot


def _open_tab(page, tab: str) -> None:
    page.get_by_role("tab", name=TABS[tab], exact=True).click()


def _messages(page) -> list[str]:
    """The chat's messages as shown, read at once (the list may be re-rendered between two reads)."""
    return page.evaluate("() => [...document.querySelectorAll('#chatbot .message-content')]"
                         ".map(m => m.innerText.trim())")


def tour(url: str, out: Path, *, message: str, load: str | None = None, edit: str | None = None,
         prompt_format: str | None = None, timeout_s: float = 120.0, width: int = 1200, height: int = 900,
         prefix: str = "app") -> Tour:
    """The page as a visitor uses it: loads `load` from the Models tab (when given), chats, reloads the page
    (the chat must come back), exports the chat as JSON, edits the first message to `edit` (when given; the
    reply is regenerated), tries each head on its first example, and saves a screenshot of every tab as
    out/{prefix}-{tab}.png (the chat tab: out/{prefix}.png)."""
    from neoxlite.app.models import display_name
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    shots: dict[str, Path] = {}

    def shoot(page, tab: str) -> None:
        shots[tab] = out / (f"{prefix}.png" if tab == "chat" else f"{prefix}-{tab}.png")
        page.screenshot(path=str(shots[tab]), full_page=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url)
            page.locator("#chat-input textarea").wait_for()
            loaded = ""
            if load is not None:
                _open_tab(page, "models")
                box = page.locator("#models-checkpoint input")
                box.fill(load)
                box.press("Enter")
                page.locator("#models-plan").click()
                page.locator("#models-plan-text").get_by_text("compute on").wait_for()
                page.locator("#models-load").click()
                page.locator("#models-status").get_by_text("Loaded").wait_for()
                loaded = page.locator("#models-status").inner_text().strip()
                page.wait_for_function("name => document.querySelector('#models-checkpoint input').value == name",
                                       arg=display_name(load))
            checkpoint_field = page.locator("#models-checkpoint input").input_value() if load is not None else ""
            _open_tab(page, "chat")
            if prompt_format is not None:
                page.get_by_text("Settings", exact=True).first.click()
                page.locator("#chat-format").get_by_text(prompt_format, exact=True).click()
                page.get_by_text("Settings", exact=True).first.click()
            box = page.locator("#chat-input textarea")
            box.fill(message)
            box.press("Enter")
            page.locator("#chat-status").get_by_text("Done:").wait_for()
            page.locator("#chat-meter").get_by_text("tokens per message").wait_for()
            reply = _messages(page)[-1]
            shoot(page, "chat")
            page.reload()
            page.locator("#chatbot .message-content").first.wait_for()
            after_reload = _messages(page)
            with page.expect_download() as download:
                page.locator("#chat-export-json").click()
                page.locator("#chat-exported a").first.click()
            exported = Path(download.value.path()).read_text(encoding="utf-8")
            after_edit = []
            if edit is not None:
                page.locator("#chatbot [data-testid=user]").first.hover()
                page.locator("#chatbot button[aria-label='Edit']").first.click()
                page.locator("#chatbot textarea").first.fill(edit)
                page.locator("#chatbot button[aria-label='Submit']").first.click()
                page.locator("#chat-status").get_by_text("Done:").wait_for()
                after_edit = _messages(page)
            with page.expect_file_chooser() as chooser:
                page.locator("#chat-import").click()
            chooser.value.set_files({"name": "chat.json", "mimeType": "application/json",
                                     "buffer": exported.encode("utf-8")})
            first = next(m["content"] for m in json.loads(exported) if m["role"] == "user").strip()
            page.wait_for_function("text => { const m = document.querySelector('#chatbot .message-content');"
                                   " return m && m.innerText.trim() == text; }", arg=first)
            after_import = _messages(page)
            for tab, run in (("classify", "Classify"), ("tag", "Tag"), ("answer", "Answer")):
                tab_button = page.get_by_role("tab", name=TABS[tab], exact=True)
                if not tab_button.is_visible():
                    continue
                tab_button.click()
                examples = page.locator(f"#{tab}-examples")
                if examples.is_visible():
                    examples.locator("button, tr.tr-body").first.click()
                page.get_by_role("button", name=run, exact=True).click()
                page.wait_for_timeout(1500)
                shoot(page, tab)
            _open_tab(page, "models")
            page.locator("#models-plan").click()
            page.locator("#models-plan-text").get_by_text("compute on").wait_for()
            shoot(page, "models")
            _open_tab(page, "memory")
            page.locator("#memory-chart-bars").wait_for()
            shoot(page, "memory")
        finally:
            browser.close()
    return Tour(loaded, reply, after_reload, exported, after_edit, after_import, checkpoint_field, shots)


def main(argv: Sequence[str] | None = None) -> int:
    from neoxlite.app.cli import launch

    from neoxlite.options import add_load_options, load_kwargs

    parser = argparse.ArgumentParser(prog="python -m neoxlite.app.screenshot", description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--head", action="append", default=[], metavar="PATH")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the screenshots (default: docs)")
    parser.add_argument("--message", default="def reverse(text):")
    parser.add_argument("--load", default=None, metavar="CHECKPOINT",
                        help="a checkpoint to load from the Models tab first (a name the page lists, a folder or "
                             "a hub id)")
    parser.add_argument("--format", choices=["chat", "continue"], default="continue",
                        help="prompt format to pick in the settings (default: continue, for base models)")
    add_load_options(parser)
    args = parser.parse_args(argv)
    demo, url = launch(args.model, args.head, port=free_port(), block=False, **load_kwargs(args))
    try:
        result = tour(url, args.out, message=args.message, load=args.load, prompt_format=args.format)
    finally:
        demo.close()
    for tab, path in result.screenshots.items():
        print(f"{tab}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
