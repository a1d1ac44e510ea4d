"""Hostile input to the command line and the Python API: each refused with one clear line (status 2) or a
ValueError/TypeError naming the argument, never a traceback, torch's own message or an "internal error"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NEOXLITE = str(Path(sys.executable).parent / "neoxlite")
DEMO = str(Path(__file__).resolve().parents[1] / "neoxlite" / "demo" / "model")


def run(*args: str | bytes, stdin: bytes = b"", timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([NEOXLITE, *args], input=stdin, capture_output=True, timeout=timeout, **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a command that failed with status 2 (progress lines aside)."""
    err = result.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("loading ", "["))]
    assert result.returncode == 2 and len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize(("args", "stdin", "expected"), [
    (["generate", "x", "--seed", str(2**64)], b"", "neoxlite generate: error: --seed must be an integer within [-2**63, 2**64 - 1]"),
    (["chat", "--seed", str(-2**70)], b"", "neoxlite chat: error: --seed must be an integer within [-2**63, 2**64 - 1]"),
    (["generate", ""], b"", "neoxlite generate: error: the prompt is empty"),
    (["generate", "-"], b"", "neoxlite generate: error: the prompt is empty"),
    (["generate", "-"], b"\xff\xfeab", "neoxlite generate: error: stdin is not UTF-8 text (byte 0xff at offset 0)"),
    (["generate", b"a\xffb"], b"", "neoxlite generate: error: PROMPT is not valid UTF-8 text (byte 0xff at character 1)"),
    (["chat", "--system", b"\xff"], b"", "neoxlite chat: error: --system is not valid UTF-8 text"),
    (["generate", "--file", ""], b"", "neoxlite generate: error: --file needs a path"),
    (["generate", "--file", "/no/such/file"], b"",
     "neoxlite generate: error: --file /no/such/file: cannot read it: No such file or directory"),
    (["plan", "-m", ""], b"", "neoxlite plan: error: the model name is empty"),
    (["generate", "x", "-m", "not a hub id"], b"",
     "neoxlite generate: error: model 'not a hub id' is neither an existing folder nor a valid hub id"),
    (["plan", "--disk-gbps", "nan"], b"", "neoxlite plan: error: --disk-gbps must be a positive number of GB/s"),
    (["plan", "--pcie-gbps", "-5"], b"", "neoxlite plan: error: --pcie-gbps must be a positive number of GB/s"),
    (["offload", "list", "--offload-dir", ""], b"", "neoxlite offload: error: --offload-dir is empty"),
    (["quantize", DEMO, "never-written", "--quant", "int8", "--int8-threshold", "nan"], b"",
     "neoxlite quantize: error: --int8-threshold must be a finite number"),
    (["quantize", DEMO, "never-written", "--quant", "nf4", "--skip-modules", ""], b"",
     "neoxlite quantize: error: --skip-modules takes layer names, got an empty one"),
])
def test_hostile_values_are_one_line_before_the_load(args, stdin, expected, tmp_path):
    result = run(*args, stdin=stdin, cwd=tmp_path)
    line = error_line(result)
    assert line.startswith(expected), line
    assert b"[loaded" not in result.stderr  # refused before minutes of loading a real model
    assert not (tmp_path / "never-written").exists()


def test_a_file_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    line = error_line(run("generate", "--file", str(tmp_path / "latin1.txt")))
    assert f"--file {tmp_path / 'latin1.txt'} is not UTF-8 text (byte 0xe9 at offset 3)" in line, line


def test_a_closed_stdin_is_a_user_error():
    result = subprocess.run(["bash", "-c", 'exec 0<&-; exec "$0" generate -', NEOXLITE], capture_output=True,
                            timeout=300)
    assert "stdin is closed" in error_line(result)


def test_the_reserved_context_caps_the_reply_as_the_models_does():
    result = run("generate", "hi", "--cpu-memory", "1GiB", "--max-context", "20", "--temperature", "0")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "capped at 19" in err and "--max-context reserved 20-token context" in err


def test_a_flag_is_named_once_in_an_error():
    line = error_line(run("generate", "hi", "--cpu-memory=0"))
    assert "(--offload-dir)" in line and "--offload-dir  /" not in line, line


def test_chat_refuses_a_bad_message_and_keeps_the_conversation(tmp_path):
    script = b"h\xffi\n" + b"x" * 3_000_000 + b"\n/set seed 99999999999999999999999\nhello\n/save chat.json\n"
    result = run("chat", "--max-new-tokens", "3", "--temperature", "0", stdin=script, cwd=tmp_path)
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err, err
    assert "[error: the message is not valid UTF-8 text (byte 0xff at character 1)" in err
    assert "[error: the message is too long: 3,000,000 bytes" in err
    assert "[error: seed must be an integer within [-2**63, 2**64 - 1]" in err
    assert err.count(" tok/s]") == 1 and (tmp_path / "chat.json").exists()  # "hello" was still answered


# ------------------------------------------------------------------------------------------ Python API
@pytest.fixture(scope="module")
def demo():
    from neoxlite.api import load_demo

    return load_demo()


def ids_of(tokenizer) -> torch.Tensor:
    return tokenizer("def f():", return_tensors="pt").input_ids


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(do_sample=True, seed=2**64), ValueError, r"seed must be an integer within \[-2\*\*63, 2\*\*64 - 1\]"),
    (dict(do_sample=True, seed=-2**64), ValueError, r"seed must be an integer"),
    (dict(do_sample=True, seed=1.5), TypeError, "seed must be an int"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens="3"), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be at least 1, got 0"),
    (dict(max_length=20.5), TypeError, "max_length must be an int"),
    (dict(do_sample=True, top_k=2.5), TypeError, "top_k must be an int"),
    (dict(do_sample=True, temperature="0.5"), TypeError, "temperature must be a number"),
    (dict(do_sample="no"), TypeError, "do_sample must be True or False"),
    (dict(eos_token_id="x"), TypeError, "eos_token_id must be a token id"),
    (dict(eos_token_id=1.5), TypeError, "eos_token_id must be a token id"),
    (dict(pad_token_id="x"), TypeError, "pad_token_id must be an int"),
    (dict(pad_token_id=10**30), ValueError, "pad_token_id must be a token id"),
    (dict(stop_strings=5), TypeError, "stop_strings must be a str or a list of str"),
    (dict(stop_strings=[5]), TypeError, "stop_strings must be a str or a list of str"),
    (dict(stop_strings=["x"], tokenizer="no"), TypeError, "tokenizer must be a tokenizer"),
    (dict(stop_strings=["x", ""]), ValueError, "stop_strings holds an empty string"),
    (dict(stop_strings=""), ValueError, "stop_strings holds an empty string"),
    (dict(do_sample=True, generator="x"), TypeError, "generator must be a torch.Generator"),
])
def test_generate_names_a_bad_argument(demo, kwargs, error, match):
    model, tokenizer = demo
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(ids_of(tokenizer), **kwargs)


@pytest.mark.parametrize(("input_ids", "mask", "error", "match"), [
    (torch.zeros(1, 1, 3, dtype=torch.long), None, ValueError, r"input_ids must have shape .* got \(1, 1, 3\)"),
    (torch.tensor(5), None, ValueError, r"input_ids must have shape .* got \(\)"),
    (torch.ones(1, 3, dtype=torch.bool), None, ValueError, "input_ids must hold integer token ids"),
    ("hello", None, TypeError, "input_ids must be a tensor"),
    (None, None, TypeError, "input_ids must be a tensor"),
    ([[1, 2, 3], [1]], None, TypeError, "input_ids must be a tensor"),
    (torch.tensor([[-1, 5]]), None, ValueError, "input_ids hold token id -1"),
    (torch.tensor([[1, 2, 3]]), torch.ones(2, 3), ValueError, r"attention_mask has shape \(2, 3\) but input_ids has"),
])
def test_generate_names_bad_inputs(demo, input_ids, mask, error, match):
    model, _ = demo
    with pytest.raises(error, match=match):
        model.generate(input_ids, attention_mask=mask, max_new_tokens=2)


def test_any_integer_dtype_and_a_list_mask_are_accepted(demo):
    model, tokenizer = demo
    ids = ids_of(tokenizer)
    want = model.generate(ids, max_new_tokens=4)
    assert torch.equal(model.generate(ids.to(torch.int16), max_new_tokens=4), want)
    assert torch.equal(model.generate(ids, attention_mask=[[1] * ids.shape[1]], max_new_tokens=4), want)
    assert torch.equal(model.generate(ids, do_sample=True, seed=2**64 - 1, max_new_tokens=4),
                       model.generate(ids, do_sample=True, seed=2**64 - 1, max_new_tokens=4))


@pytest.mark.parametrize(("name", "error", "match"), [
    ("", ValueError, "the model name is empty"),
    ("   ", ValueError, "the model name is empty"),
    (None, TypeError, "must be a folder path or a hub id"),
    ("a\x00b", FileNotFoundError, "neither an existing folder nor a valid hub id"),
])
def test_from_pretrained_refuses_a_bad_name_and_never_loads_the_cwd(name, error, match, tmp_path, monkeypatch):
    from neoxlite import GPTNeoXForCausalLM, GPTNeoXTokenizerFast

    monkeypatch.chdir(DEMO)  # "" used to mean "." and load whatever checkpoint the cwd holds
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for cls in (GPTNeoXForCausalLM, GPTNeoXTokenizerFast):
        with pytest.raises(error, match=match):
            cls.from_pretrained(name)
    assert os.getcwd() == DEMO


# ------------------------------------------------------------------------------------------ the tokenizer's inputs
@pytest.mark.parametrize("ids,error,message", [
    ([-1], ValueError, "-1 is not a token id"), ([10**30], ValueError, "is not a token id"),
    ([1.5], TypeError, "must be integers, got 1.5"), ([True], TypeError, "got True"),
    (torch.tensor([1.0]), TypeError, "tensor of torch.float32"), (torch.tensor([3, -2]), ValueError, "from -2 to 3"),
    ("abc", TypeError, "an int, a sequence of ints or a tensor"),
])
def test_decode_refuses_what_is_not_a_token_id(ids, error, message):
    from neoxlite.api import load_demo

    _, tokenizer = load_demo(progress=False)
    with pytest.raises(error, match=message):
        tokenizer.decode(ids)
    assert tokenizer.decode([len(tokenizer) + 5]) == ""  # past the vocabulary: nothing, as in transformers


@pytest.mark.parametrize("text", ["a\ud800b", ["ok", "x\udfff"]])
def test_text_with_a_lone_surrogate_is_one_clear_error(text):
    from neoxlite.api import load_demo

    _, tokenizer = load_demo(progress=False)
    with pytest.raises(ValueError, match="lone surrogate .* at character 1, which is not Unicode text"):
        tokenizer(text)
    with pytest.raises(ValueError, match="lone surrogate"):
        tokenizer.tokenize("\ud800")
