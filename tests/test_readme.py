"""Every code block in README.md, run as a user would run it: shell lines through bash with the installed
`neoxlite` console script first on PATH, Python blocks in a fresh interpreter, each block in an empty folder with
its own HOME (so `~/.cache/...` stays in it). The blocks are read from the README, so a command added later is
run too.

What the test changes, and only this (SAMPLE_ARGUMENTS): a hub id becomes the demo checkpoint's folder (no
network), `.venv/bin/` is this interpreter's bin folder, `neoxlite app` gets a free port and is stopped once it
has answered a chat message, and `neoxlite chat` gets its keyboard input from stdin. What it does not run is
listed in EXEMPT with the reason. The lines naming a hub id also run as written with the hub unreachable and an
empty cache (the one-line error README promises), and each command's --help is checked against the flags README
lists.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from neoxlite.demo import demo_path

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent
# Commands not run here, with the reason. Keep this list tiny.
EXEMPT = {
    "scripts/setup.sh": "creates the virtualenv this test runs in; CI runs it",
    "scripts/test.sh": "runs this test suite; CI runs it",
}
# Sections whose code blocks are output, not commands.
OUTPUT_SECTIONS = {"The demo model": "sampled completions, shown as code"}
# Sections another test runs as written, because their commands need a running server beside them.
RUN_ELSEWHERE = {"Server": "tests/test_serve.py::test_the_readme_server_section_runs_as_written starts `neoxlite "
                           "serve` as shown and runs the section's Python, curl and editor config against it"}
HUB_ID = re.compile(r"EleutherAI/pythia-[\w.-]+")
CHAT_INPUT = "/set max_new_tokens 16\ndef add(a, b):\n/bye\n"
USELESS_WARNINGS = ("Failed to load CPU gemm_4bit_forward",)


@dataclass(frozen=True)
class Block:
    section: str
    language: str  # "python" or "sh"
    code: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.section})"


def code_blocks(text: str) -> list[Block]:
    """Fenced blocks (```python, ```sh, ```) and indented blocks (four spaces after a blank line)."""
    blocks, section = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            language = line[3:].strip() or "sh"
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(section, "python" if language == "python" else "sh", "\n".join(lines[i + 1:end]),
                                i + 1))
            i = end + 1
            continue
        if line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append(Block(section, "sh", "\n".join(x[4:] for x in lines[i:end]).strip(), i + 1))
            i = end
            continue
        i += 1
    return [b for b in blocks if b.section not in OUTPUT_SECTIONS and b.section not in RUN_ELSEWHERE]


BLOCKS = code_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_the_blocks_this_test_expects():
    languages = [b.language for b in BLOCKS]
    assert languages.count("python") >= 1 and languages.count("sh") >= 3, BLOCKS
    commands = " ".join(b.code for b in BLOCKS)
    for word in ("neoxlite generate", "neoxlite chat", "neoxlite plan", "neoxlite quantize", "neoxlite app"):
        assert word in commands


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXLITE_")}
    env.update(HOME=str(tmp_path), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.pop("XDG_CACHE_HOME", None)
    return env


def sample_arguments(command: str) -> str:
    return HUB_ID.sub(str(demo_path()), command).replace(".venv/bin/", f"{BIN}/")


def check_output(command: str, result: subprocess.CompletedProcess) -> None:
    where = f"{command}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    assert result.returncode == 0, where
    assert "Traceback" not in result.stderr, where
    for warning in USELESS_WARNINGS:
        assert warning not in result.stderr, where


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_app(command: str, env: dict[str, str], cwd: Path) -> None:
    """Starts the app, waits for its address on stderr, has it answer a chat message, stops it."""
    gradio_client = pytest.importorskip("gradio_client")
    port = free_port()
    command = re.sub(r"--port \d+", f"--port {port}", command)
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(f"127.0.0.1:{port}" in line for line in err):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)
            time.sleep(0.2)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        reply = client.predict("def add(a, b):", temperature=0, max_new_tokens=8, api_name="/chat")
        assert reply, reply
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in "".join(err), "".join(err)


def run_shell_line(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess | None:
    if any(command.startswith(prefix) for prefix in EXEMPT):
        return None
    if command.startswith("neoxlite app"):
        run_app(command, env, cwd)
        return None
    stdin = CHAT_INPUT if command.startswith("neoxlite chat") else ""
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                            timeout=300)
    check_output(command, result)
    return result


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "sh"], ids=str)
def test_shell_block_runs_as_written(block: Block, home: dict[str, str], tmp_path: Path):
    ran = 0
    for line in block.code.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for command in (part.strip() for part in line.split("&&")):  # `a && b`: each part, in order
            result = run_shell_line(sample_arguments(command), home, tmp_path)
            ran += 1
            if command.startswith("neoxlite --version"):
                from importlib.metadata import version

                assert result.stdout.strip() == f"neoxlite {version('neoxlite')}"
            if command.startswith("neoxlite chat"):
                assert "tok/s]" in result.stderr and "model> " in result.stderr, result.stderr
    assert ran


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "python"], ids=str)
def test_python_block_runs_as_written(block: Block, home: dict[str, str], tmp_path: Path):
    script = tmp_path / "example.py"
    script.write_text(sample_arguments(block.code))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=home, capture_output=True, text=True,
                            timeout=300)
    check_output(block.code, result)
    assert result.stdout.strip(), result.stderr
    if "offload_dir=" in block.code:
        assert (tmp_path / ".cache" / "neoxlite" / "offload").is_dir()  # created when missing
    if "gpu_memory=" in block.code and not torch.cuda.is_available():
        notices = [line for line in result.stderr.splitlines() if "gpu_memory=" in line]
        assert len(notices) == 1 and re.fullmatch(
            r"neoxlite: gpu_memory='\w+' ignored: this machine has no CUDA device; the model runs on the CPU",
            notices[0]), result.stderr


def test_hub_id_commands_end_in_a_one_line_error_offline(home: dict[str, str], tmp_path: Path):
    """README's shell lines that name a hub id, as written, where the hub cannot be reached and the model is not
    in the Hugging Face cache: status 2, no traceback, and a last line that says how to get the model (what the
    Command line section says they do)."""
    lines = [line.strip() for b in BLOCKS if b.language == "sh" for line in b.code.splitlines()
             if line.startswith("neoxlite ") and HUB_ID.search(line)]
    assert lines
    env = dict(home, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    for command in lines:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120)
        where = f"{command}\nstderr: {result.stderr[-2000:]}"
        assert result.returncode == 2 and "Traceback" not in result.stderr, where
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("neoxlite ") and "error:" in last and "Hugging Face cache" in last, where
        assert "network" in last, where


def test_each_command_help_lists_the_flags_readme_names(home: dict[str, str], tmp_path: Path):
    """`python -m neoxlite COMMAND --help` (README: the same command as `neoxlite`; `neoxlite COMMAND --help` lists
    the flags) for each command README says takes the loading flags, and for the sampling flags of generate/chat."""
    section = README.read_text(encoding="utf-8").split("## Command line\n", 1)[1].split("\n## ", 1)[0]
    loading = re.search(r"((?:`\w+`(?:,|\s+and)?\s+)+)take `(--[^`]+)`", section)
    sampling = re.search(r"`generate` and\s+`chat` take the sampling flags `(--[^`]+)`", section)
    assert loading and sampling, section[:2000]
    commands = {name: set(loading.group(2).split()) for name in re.findall(r"`(\w+)`", loading.group(1))}
    assert {"generate", "chat", "plan", "app", "serve"} <= commands.keys(), commands
    for name in ("generate", "chat"):
        commands[name] |= set(sampling.group(1).split())
    for name, flags in commands.items():
        result = subprocess.run([sys.executable, "-m", "neoxlite", name, "--help"], cwd=tmp_path, env=home,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        missing = [flag for flag in sorted(flags) if not re.search(rf"{re.escape(flag)}\b", result.stdout)]
        assert not missing, (name, missing)
