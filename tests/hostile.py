"""Helpers for the trust-boundary tests: hand-made safetensors files and the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

NEOXLITE = Path(sys.executable).parent / "neoxlite"  # the console script of this environment


def write_safetensors(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors-shaped file with any header (a JSON value, or raw bytes) and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if length is None else length
    path.write_bytes(size.to_bytes(8, "little") + raw + data)
    return path


def run_neoxlite(*args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run([str(NEOXLITE), *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with one line on stderr (after any progress lines), no traceback; returns that line."""
    assert run.returncode != 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
