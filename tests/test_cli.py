"""The `neoxlite` command as a user meets it: the installed console script (next to this interpreter), run as a
subprocess on the demo model; a few checks that need no subprocess call `neoxlite.cli.main` in the process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from neoxlite.cli import main
from neoxlite.options import sampling_kwargs

NEOXLITE = str(Path(sys.executable).parent / "neoxlite")
GREEDY = ["--temperature", "0"]


def neoxlite(*args: str, stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([NEOXLITE, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def one_error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """The single stderr line of a failed command (progress bars aside)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith(("loading ", "["))]
    assert result.returncode == status and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ version, entry points
def test_version_everywhere_is_pyprojects():
    import neoxlite as package

    expected = f"neoxlite {version('neoxlite')}"
    assert package.__version__ == version("neoxlite")
    assert neoxlite("--version").stdout.strip() == expected
    as_module = subprocess.run([sys.executable, "-m", "neoxlite", "--version"], capture_output=True, text=True)
    assert as_module.stdout.strip() == expected and as_module.returncode == 0


# ------------------------------------------------------------------------------------------ generate
def test_generate_counts_tokens_and_json_matches_the_api(tmp_path):
    from neoxlite.api import load_demo

    result = neoxlite("generate", "def add(a, b):", "--json", "--max-new-tokens", "12", *GREEDY)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # one object, nothing else on stdout
    model, tokenizer = load_demo()
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    settings = sampling_kwargs({"temperature": 0, "max_new_tokens": 12}, model.generation_config)  # as the CLI
    new = model.generate(ids, **settings)[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    new = new[:new.index(eos)] if eos in new else new
    assert out["tokens"] == len(new) and out["text"] == tokenizer.decode(new, skip_special_tokens=True)
    assert out["prompt"] == "def add(a, b):" and out["prompt_tokens"] == ids.shape[1]
    assert set(out["timings"]) == {"first_token_s", "total_s", "decode_tokens_per_s"}
    assert f", {out['tokens']} tokens, " in result.stderr  # the speed line counts tokens, not text pieces


def test_generate_reads_stdin_and_files_and_announces_the_context_cap(tmp_path):
    from neoxlite.api import load_demo

    _, tokenizer = load_demo()
    piped = neoxlite("generate", "-", "--no-echo", "--max-new-tokens", "6", *GREEDY, stdin="class Stack:")
    prompt = tmp_path / "prompt.py"
    prompt.write_text("class Stack:")
    from_file = neoxlite("generate", "--file", str(prompt), "--max-new-tokens", "6", *GREEDY)
    assert piped.returncode == from_file.returncode == 0, piped.stderr + from_file.stderr
    assert from_file.stdout == "class Stack:" + piped.stdout  # --no-echo leaves the prompt out
    assert "capped" not in piped.stderr

    # A prompt that leaves 4 tokens of the 512-token context: the cap is said, once, on stderr.
    text = "x = 1\n" * 400
    while len(tokenizer(text).input_ids) > 508:
        text = text[6:]
    prompt.write_text(text)
    room = 512 - len(tokenizer(text).input_ids)
    capped = neoxlite("generate", "-f", str(prompt), "--no-echo", "--max-new-tokens", "50", *GREEDY)
    assert capped.returncode == 0, capped.stderr
    assert f"[--max-new-tokens 50 capped at {room}:" in capped.stderr

    # Over the 128 KiB a single argument may hold: only a file or stdin can carry it; too long for the context.
    prompt.write_text("y = 2\n" * 30_000)
    too_long = one_error_line(neoxlite("generate", "--file", str(prompt)))
    assert "the prompt has" in too_long and "context is 512" in too_long


def test_generate_into_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([NEOXLITE, "generate", "def f():", "--max-new-tokens", "300"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(10)  # `| head -c 10`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Broken pipe" not in err and "Error" not in err


@pytest.mark.parametrize(("flags", "expected"), [
    (["x", "--top-p", "2"], "neoxlite generate: error: --top-p must be within (0, 1], got 2.0"),
    (["x", "--temperature", "-1"], "neoxlite generate: error: --temperature must be a finite number >= 0"),
    (["x", "--gpu-memory", "lots"], "neoxlite generate: error: --gpu-memory 'lots' is not a size"),
    (["x", "--max-batch-size", "0"], "neoxlite generate: error: --max-batch-size must be at least 1, got 0"),
    ([], "neoxlite generate: error: no prompt: give PROMPT, - to read it from stdin, or --file PATH"),
    (["x", "-m", "/no/such/folder"], "neoxlite generate: error: model folder '/no/such/folder' does not exist"),
    (["x", "--quant", "int3"], "neoxlite generate: error: argument --quant: invalid choice"),
])
def test_user_errors_are_one_line_naming_the_flag(flags, expected):
    start = time.perf_counter()
    line = one_error_line(neoxlite("generate", *flags))
    assert line.startswith(expected), line
    if "-m" not in flags:  # flags are checked before the model loads
        assert "[loaded" not in line and time.perf_counter() - start < 60


def test_an_internal_error_is_one_line_with_how_to_see_the_traceback(monkeypatch, capsys):
    import neoxlite.offload.cli

    def broken(args):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(neoxlite.offload.cli, "cmd_plan", broken)
    monkeypatch.delenv("NEOXLITE_DEBUG", raising=False)
    assert main(["plan"]) == 1
    assert capsys.readouterr().err == ("neoxlite plan: internal error: RuntimeError: a bug over two lines "
                                       "(NEOXLITE_DEBUG=1 shows the traceback; please report it)\n")
    monkeypatch.setenv("NEOXLITE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        main(["plan"])


# ------------------------------------------------------------------------------------------ Ctrl-C
class Child:
    """A running `neoxlite` whose stderr is collected as it comes (progress bars end lines with \\r)."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        # Ctrl-C as in a terminal: a library in this test process (the app's server) may have left SIGINT
        # ignored, and an ignored signal stays ignored in a child.
        self.proc = subprocess.Popen([NEOXLITE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=cwd,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.err = b""
        self.out = b""
        threading.Thread(target=self._read, args=("err", self.proc.stderr), daemon=True).start()
        threading.Thread(target=self._read, args=("out", self.proc.stdout), daemon=True).start()

    def _read(self, name: str, stream) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            setattr(self, name, getattr(self, name) + chunk)

    def wait_for(self, text: str, timeout: float = 120, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.err[after:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError((text, self.err.decode()))
            time.sleep(0.01)

    def wait_for_output(self, after: int, timeout: float = 120) -> None:
        """Until stdout holds more than its first `after` bytes (the reply has begun)."""
        deadline = time.monotonic() + timeout
        while len(self.out) <= after:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.err.decode()
            time.sleep(0.002)

    def wait_for_library(self, name: str, timeout: float = 120) -> None:
        """Until the child has mapped a shared library whose path holds `name` (it is importing it)."""
        maps = Path(f"/proc/{self.proc.pid}/maps")
        if not maps.exists():
            pytest.skip("needs /proc to see the child's progress")
        deadline = time.monotonic() + timeout
        while name not in maps.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.err.decode()
            time.sleep(0.005)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # no child left behind by a failed test
            raise
        time.sleep(0.1)  # the readers drain the pipes
        return status, self.err.decode()


def assert_interrupted(status: int, err: str) -> None:
    assert status == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("interrupted"), err
    assert err.count("interrupted") == 1, err


# The demo model ends a greedy reply after about 70 tokens, a fifth of a second on a fast CPU: the interrupted
# runs sample near-uniformly instead (eos is 1 of 4096 tokens), and Ctrl-C comes as soon as the reply begins.
LONG_REPLY = ["--max-new-tokens", "400", "--temperature", "50", "--top-k", "0", "--top-p", "1",
              "--repetition-penalty", "1.0"]


@pytest.mark.parametrize("moment", ["importing", "loading", "generating"])
def test_ctrl_c_at_any_moment_is_one_line_and_status_130(moment):
    child = Child("generate", "def f():", "--no-echo", *LONG_REPLY)
    if moment == "importing":
        child.wait_for_library("numpy")  # torch is importing numpy: the moment torch would swallow a Ctrl-C
    elif moment == "loading":
        child.wait_for("loading")  # the loader's progress bar: weights are being read
    else:
        child.wait_for("[loaded")
        child.wait_for_output(after=0)
    child.interrupt()
    assert_interrupted(*child.finish())


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(tmp_path):
    child = Child("chat", *LONG_REPLY, cwd=tmp_path)
    child.wait_for("you> ")
    child.interrupt()  # at an empty prompt: a hint, the chat goes on
    child.wait_for("[to leave: Ctrl-D or /bye]")
    shown = len(child.out)
    child.send("def main():\n")
    child.wait_for("model> ")
    child.wait_for_output(after=shown)
    child.interrupt()  # during the reply: the reply stops
    child.wait_for("[stopped]")
    seen = len(child.err)
    child.wait_for("you> ", after=seen - 5)
    child.send("/save history.json\n/bye\n")
    status, err = child.finish()
    assert status == 0 and "Traceback" not in err, err
    messages = json.loads((tmp_path / "history.json").read_text())
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "def main():"
    assert messages[1]["content"] in child.out.decode()  # the part shown before Ctrl-C stays in the conversation


# ------------------------------------------------------------------------------------------ chat
def test_chat_commands_through_piped_stdin(tmp_path):
    saved = tmp_path / "chat.json"
    script = "\n".join([
        "/help",
        "",  # an empty line does not leave
        "/set top_p 7",
        "/set temperature 0",
        "/set top-k 5",
        "/set",
        "/system You write Python.",
        "def add(a, b):",
        '"""',
        "class A:",
        "    pass",
        '"""',
        f"/save {saved}",
        "/clear",
        f"/load {saved}",
        "/nonsense",
        "/bye",
        "this is never read",
    ]) + "\n"
    result = neoxlite("chat", "--max-new-tokens", "8", stdin=script, cwd=tmp_path)
    err = result.stderr
    assert result.returncode == 0 and "Traceback" not in err, err
    assert "/set NAME VALUE" in err  # /help answered by the chat, not the model
    assert "[error: --top-p" not in err and "[error: top_p must be within (0, 1], got 7.0]" in err
    assert "[top_k = 5]" in err and "temperature 0.0" in err
    assert err.count("model> ") == 2 and err.count(" tok/s]") == 2  # two replies, a speed line after each
    assert "you> " in err and "you> " not in result.stdout  # labels on stderr: stdout holds only the replies
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "You write Python." and messages[3]["content"] == "class A:\n    pass"
    assert all(m["content"] in result.stdout for m in messages[2::2]), result.stdout
    assert "[loaded 4 messages" in err and "unknown command" in err


def test_chat_load_refuses_a_file_that_is_not_a_conversation(tmp_path):
    (tmp_path / "bad.json").write_text('{"role": "user"}')
    result = neoxlite("chat", stdin="/load bad.json\n/bye\n", cwd=tmp_path)
    assert result.returncode == 0 and "is not a conversation" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------ quantize, plan
@pytest.fixture(scope="module")
def nf4_demo(tmp_path_factory) -> Path:
    from neoxlite.demo import demo_path

    dst = tmp_path_factory.mktemp("q") / "demo-nf4"
    result = neoxlite("quantize", str(demo_path()), str(dst), "--quant", "nf4", "--compute-dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in result.stderr
    return dst


@pytest.mark.parametrize("spelling", ["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"])
def test_quantize_accepts_every_dtype_spelling_it_offers(spelling, tmp_path, capsys):
    from neoxlite.demo import demo_path

    dst = tmp_path / "out"
    assert main(["quantize", str(demo_path()), str(dst), "--quant", "nf4", "--compute-dtype", spelling,
                 "--dtype", spelling]) == 0, capsys.readouterr().err
    config = json.loads((dst / "config.json").read_text())
    canonical = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(spelling, spelling)
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == canonical


def test_a_quantized_run_prints_no_useless_third_party_warning(nf4_demo):
    result = neoxlite("generate", "def f():", "-m", str(nf4_demo), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr and "Traceback" not in result.stderr


def test_the_kernels_community_message_is_dropped_at_bitsandbytes_logger(caplog):
    import neoxlite.quant  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level("WARNING"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "nope")
        logger.warning("something else bitsandbytes says")
    assert [r.getMessage() for r in caplog.records] == ["something else bitsandbytes says"]


def test_plan_uses_the_loaders_dtype_for_a_prequantized_checkpoint(nf4_demo, capsys):
    from neoxlite.checkpoint import Checkpoint
    from neoxlite.loading import stored_float_dtype
    from neoxlite.model import GPTNeoXForCausalLM

    assert main(["plan", "-m", str(nf4_demo), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    loaded = GPTNeoXForCausalLM.from_pretrained(nf4_demo, progress=False)
    assert stored_float_dtype(Checkpoint(nf4_demo)) == loaded.gpt_neox.embed_in.weight.dtype == torch.float16
    assert "in torch.float16 (nf4" in out, out


def test_plan_for_a_gpu_this_machine_may_lack_one_batch_bounds_with_bytes(capsys):
    assert main(["plan", "--gpu-memory", "1GiB", "--max-batch-size", "4", "--pcie-gbps", "8"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "compute on: GPU" in out and "PCIe 8 GB/s" in out
    assert "at batch 4" in out and "batch 1 " not in out and "batch 16" not in out
    bounds = [ln for ln in out.splitlines() if ln.strip().startswith("at most")]
    assert bounds and all(" read per step at " in ln and "GB/s (" in ln for ln in bounds), out
    if not torch.cuda.is_available():
        assert "[no CUDA device here: planning for one with --gpu-memory 1GiB, its host link at 8 GB/s" in captured.err
        assert main(["plan", "--device", "cuda"]) == 2
        assert "give the GPU's memory (--gpu-memory 24GiB)" in capsys.readouterr().err
