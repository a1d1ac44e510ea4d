"""Drive the running app in headless chromium: send a chat message, watch the reply stream, screenshot.

    python -m neoxlite.app.screenshot [-m MODEL] [--head PATH ...] [--out docs/app.png] [--message TEXT]

starts the app on a free port, does that, and writes the screenshot (the README's picture). The browser
test calls `chat_in_browser` the same way. Needs playwright (a test extra) and Debian's chromium at
/usr/bin/chromium; never downloads a browser.
"""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> int:
    from neoxlite.app.cli import launch

    from neoxlite.options import add_load_options, load_kwargs

    parser = argparse.ArgumentParser(prog="python -m neoxlite.app.screenshot", description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--head", action="append", default=[], metavar="PATH")
    parser.add_argument("--out", type=Path, default=Path("docs/app.png"))
    parser.add_argument("--message", default="def reverse(text):")
    parser.add_argument("--format", choices=["chat", "continue"], default="continue",
                        help="prompt format to pick in the settings (default: continue, for base models)")
    add_load_options(parser)
    args = parser.parse_args(argv)
    demo, url = launch(args.model, args.head, port=free_port(), block=False, **load_kwargs(args))
    try:
        result = chat_in_browser(url, args.message, args.out, prompt_format=args.format)
    finally:
        demo.close()
    print(f"{result.screenshot}: {result.status}; the reply streamed in {len(result.seen)} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
