"""`neoxlite serve` through the official `openai` client: completions and chat, streaming, errors, batching."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from neoxlite.app.prompting import cut_at_stop  # noqa: E402

from neoxlite.api import load  # noqa: E402
from neoxlite.batching import Batcher  # noqa: E402
from neoxlite.batching import Request as BatchRequest  # noqa: E402
from neoxlite.generation import GREEDY_BELOW_TEMPERATURE  # noqa: E402
from neoxlite.serve import api as serve_api  # noqa: E402
from neoxlite.serve.api import Server, create_app, own_batcher  # noqa: E402

NAME = "demo"
KEY = "sk-test-key"
PROMPT = "Once upon a time"


def start(server: Server) -> tuple[str, uvicorn.Server]:
    """The app on a free 127.0.0.1 port, uvicorn on a thread; returns the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    http = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not http.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", http


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 60
    while server.state == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state == "ready", server.error


@pytest.fixture(scope="module")
def served():
    """The demo model in fp32 (the CPU kernels' path), up to 16 rows, one server for the module."""
    loaded = load(None, dtype=torch.float32)
    server = Server(NAME, own_batcher(lambda: loaded, max_batch_size=16, max_waiting=32))
    server.start_loading()
    wait_ready(server)
    url, http = start(server)
    yield url, server
    http.should_exit = True
    server.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI error object of a response that must have `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def completion(client, **kwargs):
    return client.completions.create(model=NAME, **{"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **kwargs})


def streamed(client, chat: bool = False, **kwargs) -> tuple[str, list]:
    """(the text, the chunks) of a streamed request."""
    if chat:
        chunks = list(client.chat.completions.create(model=NAME, stream=True, **kwargs))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks
    chunks = list(client.completions.create(model=NAME, stream=True, **kwargs))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


# ------------------------------------------------------------------------------------------- happy paths
def test_models_health_and_metrics(served, client):
    url, _ = served
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(url + "/health").json()["status"] == "ready"
    metrics = httpx.get(url + "/metrics").json()
    assert metrics["running"] == 0 and metrics["waiting"] == 0 and metrics["max_batch_size"] == 16
    assert metrics["memory"]["ram"] > 0 and metrics["memory"]["kv_cache"] > 0


def test_completion_is_generate_greedy_with_the_tokenizers_usage(served, client):
    server = served[1]
    ids = server.tokenizer.encode(PROMPT)
    want = server.model.generate(torch.tensor([ids]), max_new_tokens=12)[0, len(ids):].tolist()
    want = want[:want.index(0)] if 0 in want else want  # the demo's eos
    result = completion(client)
    assert result.choices[0].text == server.tokenizer.decode(want, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == len(want)
    assert result.usage.total_tokens == len(ids) + len(want)
    assert result.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
    text, chunks = streamed(client, prompt=PROMPT, max_tokens=12, temperature=0,
                            stream_options={"include_usage": True})
    assert text == result.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(want) and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == result.choices[0].finish_reason


def test_chat_streaming_and_not_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    text, chunks = streamed(client, chat=True, messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.role == "assistant" and text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert whole.usage.completion_tokens >= 1 and whole.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text(client):
    full = completion(client, max_tokens=20).choices[0].text
    stop = full[5:8]
    assert len(stop) == 3 and full.index(stop) < len(full)
    for stops in (stop, [stop, "never appears"]):
        result = completion(client, max_tokens=20, stop=stops)
        assert result.choices[0].text == full[:full.index(stop)] and result.choices[0].finish_reason == "stop"
        assert streamed(client, prompt=PROMPT, max_tokens=20, temperature=0, stop=stops)[0] == full[:full.index(stop)]


def test_seeds_repeat_and_logprobs_and_penalties(client):
    runs = [completion(client, temperature=1.0, top_p=0.9, seed=5, max_tokens=16).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]
    result = completion(client, logprobs=2)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == result.usage.completion_tokens == len(logprobs.token_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert "".join(logprobs.tokens).strip() == result.choices[0].text.strip()
    penalized = completion(client, presence_penalty=2.0, frequency_penalty=2.0, max_tokens=16)
    assert penalized.usage.completion_tokens >= 1


# -------------------------------------------------------------------------------------------- batching
def test_sixteen_concurrent_streams_get_what_each_gets_alone(served, client):
    def ask(i: int) -> str:
        return streamed(client, prompt=f"{PROMPT} {i}", max_tokens=24, temperature=0.8, seed=i)[0]

    alone = [ask(i) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone
    assert completion(client).choices[0].text  # and it keeps answering


def test_a_client_that_disconnects_frees_its_row(served, client):
    url, server = served
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the first chunk: the row is running
        assert server.batcher.metrics()["running"] == 1
    deadline = time.monotonic() + 20
    while server.batcher.metrics()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.batcher.metrics()["running"] == 0
    assert completion(client).choices[0].text


def test_a_non_streaming_client_that_disconnects_is_cancelled(served, monkeypatch):
    """The batcher is driven by hand here: the request waits until the client has gone, so the next turn must
    drop it instead of admitting it (the handler is not cancelled by uvicorn; it watches for the disconnect)."""
    loaded = (served[1].model, served[1].tokenizer)
    batcher = Batcher(*loaded, max_batch_size=2, start=False)
    idle = Server(NAME, lambda: batcher)
    idle.start_loading()
    wait_ready(idle)
    submitted: list[BatchRequest] = []
    monkeypatch.setattr(batcher, "submit", lambda job: submitted.append(job) or Batcher.submit(batcher, job))
    url, http = start(idle)
    try:
        body = json.dumps({"model": NAME, "prompt": PROMPT, "max_tokens": 50}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 20
            while not submitted and time.monotonic() < deadline:
                time.sleep(0.01)
            assert submitted and not submitted[0].cancelled.is_set()
        while not submitted[0].cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert submitted[0].cancelled.is_set()
        batcher.turn()  # the cancelled request is dropped, not admitted
        assert batcher.metrics()["running"] == 0 and batcher.metrics()["waiting"] == 0
    finally:
        http.should_exit = True


# ---------------------------------------------------------------------------------------------- errors
def test_bad_requests_get_openai_errors(served, client):
    url = served[0] + "/v1"
    post = lambda path, body: httpx.post(url + path, json=body, timeout=30)  # noqa: E731
    base = {"model": NAME, "prompt": PROMPT}
    bad = httpx.post(url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert error_of(bad, 400)["type"] == "invalid_request_error"
    assert error_of(post("/completions", {**base, "max_tokens": "ten"}), 400)["param"] == "max_tokens"
    assert error_of(post("/completions", {**base, "temperature": -0.5}), 400)["param"] == "temperature"
    assert error_of(post("/completions", {**base, "n": 2}), 400)["param"] == "n"
    assert error_of(post("/completions", {**base, "stop": 5}), 400)["param"] == "stop"
    assert error_of(post("/completions", {"model": NAME, "prompt": 3}), 400)["param"] == "prompt"
    assert error_of(post("/chat/completions", {"model": NAME, "messages": "hi"}), 400)["param"] == "messages"
    assert error_of(post("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                               "logprobs": True}), 400)["param"] == "logprobs"
    assert error_of(post("/completions", {**base, "max_tokens": 512}), 400)["code"] == "context_length_exceeded"
    huge = post("/completions", {**base, "prompt": "word " * 200_000})
    assert error_of(huge, 400)["code"] == "context_length_exceeded"
    assert error_of(post("/completions", {**base, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    assert error_of(httpx.get(url + "/nothing-here"), 404)
    with pytest.raises(openai.BadRequestError):
        completion(client, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert completion(client).choices[0].text  # the server keeps answering


def raw_post(url: str, path: str, body: str) -> httpx.Response:
    return httpx.post(url + "/v1" + path, content=body.encode(), headers={"content-type": "application/json"},
                      timeout=30)


def test_bad_values_get_400s_naming_the_field_never_500s(served, client):
    """What used to answer 500 with a traceback: a chat message too long for the context, lone surrogates,
    numbers with hundreds of digits, seeds torch refuses, JSON nested too deeply; and a token-id prompt too long
    for the context was blamed on max_tokens."""
    url = served[0]
    chat = lambda content: json.dumps({"model": NAME, "max_tokens": 4,  # noqa: E731
                                       "messages": [{"role": "user", "content": content}]})
    cases = [
        ("/chat/completions", chat("word " * 200_000), "messages", "context_length_exceeded"),
        ("/chat/completions", chat("hi").replace("hi", "hi \\ud800"), "messages", "invalid_unicode"),
        ("/completions", json.dumps({"model": NAME, "prompt": "hi"}).replace('"hi"', '"hi \\ud800"'), "prompt",
         "invalid_unicode"),
        ("/completions", f'{{"model": "{NAME}", "prompt": "hi", "temperature": 1{"0" * 400}}}', "temperature", None),
        ("/completions", f'{{"model": "{NAME}", "prompt": "hi", "top_p": 1{"0" * 400}}}', "top_p", None),
        ("/completions", f'{{"model": "{NAME}", "prompt": "hi", "presence_penalty": -1{"0" * 400}}}',
         "presence_penalty", None),
        ("/completions", json.dumps({"model": NAME, "prompt": "hi", "seed": 2**64}), "seed", None),
        ("/completions", json.dumps({"model": NAME, "prompt": "hi", "seed": -2**63 - 1}), "seed", None),
        ("/completions", json.dumps({"model": NAME, "prompt": "hi", "stop": "ab" * 501}), "stop", None),
        ("/completions", json.dumps({"model": NAME, "prompt": [5] * 600}), "prompt", "context_length_exceeded"),
        ("/completions", "[" * 30_000 + "]" * 30_000, None, None),
    ]
    for path, body, param, code in cases:
        error = error_of(raw_post(url, path, body), 400)
        assert (error["param"], error["code"]) == (param, code), (body[:80], error)
    assert "1000 characters" in error_of(raw_post(url, "/completions", cases[8][1]), 400)["message"]
    assert "[-2**63, 2**64 - 1]" in error_of(raw_post(url, "/completions", cases[6][1]), 400)["message"]
    # a lone surrogate quoted back in an error message is escaped, not a failure to encode the answer
    unknown = raw_post(url, "/completions", '{"model": "x\\ud800", "prompt": "hi"}')
    assert error_of(unknown, 404)["param"] == "model"
    within = completion(client, seed=2**64 - 1, temperature=1.0).choices[0].text  # the largest seed torch takes
    assert within == completion(client, seed=-1, temperature=1.0).choices[0].text  # the same seed to torch


def test_bodies_past_the_limit_answer_413(served):
    url = served[0] + "/v1/completions"
    big = json.dumps({"model": NAME, "prompt": "word " * 1_000_000})
    assert len(big) > serve_api.MAX_BODY_BYTES
    assert error_of(httpx.post(url, content=big, headers={"content-type": "application/json"}), 413)
    chunked = httpx.post(url, content=iter([big.encode()[i:i + 2**20] for i in range(0, len(big), 2**20)]),
                         headers={"content-type": "application/json"})
    assert error_of(chunked, 413)["code"] == "request_too_large"


def test_a_tiny_temperature_is_greedy_there_and_in_generate(served, client):
    """1e-300 used to make logits / temperature inf, NaN probabilities, and a sampler error that failed every
    running row; below GREEDY_BELOW_TEMPERATURE sampling is greedy, in the server and in generate() alike."""
    server = served[1]
    greedy = completion(client, max_tokens=12).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # beside a greedy row, which must not be disturbed
        beside = pool.submit(lambda: streamed(client, prompt=PROMPT, max_tokens=12, temperature=0)[0])
        assert completion(client, max_tokens=12, temperature=1e-300, seed=3).choices[0].text == greedy
        assert beside.result() == greedy
    assert completion(client, max_tokens=12, temperature=GREEDY_BELOW_TEMPERATURE / 2).choices[0].text == greedy
    ids = torch.tensor([server.tokenizer.encode(PROMPT)])
    plain = server.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(server.model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1e-300, seed=3),
                       plain)


def test_stop_strings_are_matched_in_the_completion_only(served, client):
    """A stop string that begins in the prompt ("Hello\n") and ends in the completion does not stop it."""
    free = completion(client, prompt="Hello\n", max_tokens=8).choices[0]
    spanning = "\n" + free.text[:1]
    assert spanning not in free.text and free.finish_reason == "length"
    stopped = completion(client, prompt="Hello\n", max_tokens=8, stop=spanning).choices[0]
    assert (stopped.text, stopped.finish_reason) == (free.text, "length")


def test_cut_at_stop_holds_back_the_start_of_a_stop_string():
    import random

    def naive(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - hold], False

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 10)))
        stops = tuple("".join(rng.choice("ab\n") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        assert cut_at_stop(text, stops) == naive(text, stops), (text, stops)


def test_logit_bias_bans_and_forces_tokens(served, client):
    url, server = served
    plain = completion(client, max_tokens=6, logprobs=0).choices[0]
    first = server.tokenizer.encode(plain.logprobs.tokens[0])[0]
    banned = completion(client, max_tokens=6, logprobs=0, logit_bias={str(first): -100}).choices[0]
    assert server.tokenizer.encode(banned.logprobs.tokens[0])[0] != first
    forced = completion(client, max_tokens=6, logit_bias={"42": 100})
    assert forced.choices[0].text == server.tokenizer.decode([42] * 6)
    sampled = completion(client, max_tokens=6, temperature=1.0, seed=1, logit_bias={"42": 100})
    assert sampled.choices[0].text == forced.choices[0].text
    assert completion(client, max_tokens=6).choices[0].text == plain.text  # the bias was that request's only
    vocab = server.model.config.vocab_size
    for bias in ("not an object", {"x": 1}, {"-1": 1}, {"5": 101}, {"5": "1"}, {"5": True}, {str(vocab): 1}):
        response = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "logit_bias": bias})
        assert error_of(response, 400)["param"] == "logit_bias", bias


def test_full_queue_answers_429(served):
    url, server = served
    loaded = (server.model, server.tokenizer)
    idle = Server(NAME, lambda: Batcher(*loaded, max_batch_size=1, max_waiting=1, start=False))  # the queue fills
    idle.start_loading()
    wait_ready(idle)
    idle.batcher.submit(BatchRequest([5, 6], 3))
    idle_url, http = start(idle)
    try:
        response = httpx.post(idle_url + "/v1/completions", json={"model": NAME, "prompt": PROMPT})
        assert error_of(response, 429)["type"] == "rate_limit_error"
    finally:
        http.should_exit = True


def test_loading_answers_503_then_the_key_is_enforced(served):
    server = served[1]
    go = threading.Event()

    def slow_load():
        go.wait(30)
        return server.model, server.tokenizer

    keyed = Server(NAME, own_batcher(slow_load, max_batch_size=2), api_key=KEY)
    keyed.start_loading()
    url, http = start(keyed)
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/health").status_code == 503
        loading = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": PROMPT}, headers=headers)
        assert error_of(loading, 503)["code"] == "model_loading"
        go.set()
        wait_ready(keyed)
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert error_of(httpx.get(url + "/v1/models"), 401)["code"] == "invalid_api_key"  # no key at all
        assert httpx.get(url + "/metrics").status_code == 401
        keyed_client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert completion(keyed_client).choices[0].text
    finally:
        http.should_exit = True
        keyed.close()


# ------------------------------------------------------------------------------------------ the command
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console(command: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """`command` started in a shell, as a user types it, the installed console script on its PATH."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    return process, env


def wait_healthy(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become ready")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)  # the shell and the server it started
    process.wait(30)


def test_serve_ui_serves_the_api_and_the_app_on_one_port_with_one_batcher():
    """README's `neoxlite serve --ui` as written: the Gradio app under /ui beside /v1; a chat through the app runs on the batcher the
    API reports on (its tokens show in /metrics), and the API answers on the same port."""
    gradio_client = pytest.importorskip("gradio_client")
    port = free_port()
    process, _ = console(readme_server_section(port)[0][2])  # README's `neoxlite serve --ui`
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url)
        page = httpx.get(url + "/ui/", follow_redirects=True)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        app = gradio_client.Client(url + "/ui/", verbose=False)
        assert app.predict("Hello", temperature=0, max_new_tokens=8, api_name="/chat")
        metrics = httpx.get(url + "/metrics").json()
        assert metrics["tokens_per_second"] > 0  # the app's chat ran on the batcher the API reports on
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="neoxlite-demo", max_tokens=8,
                                               messages=[{"role": "user", "content": "Hello"}])
        assert reply.usage.completion_tokens >= 1
    finally:
        stop(process)


def test_serve_ui_with_an_api_key_keeps_the_app_behind_it():
    """With --api-key the app at /ui (the page, its Gradio API: chat, and unload, which would take the keyed /v1
    API down) needs the key too: as the password of the browser's login prompt, or as a Bearer token."""
    gradio_client = pytest.importorskip("gradio_client")
    port = free_port()
    process, _ = console(f"neoxlite serve --ui --api-key {KEY} --port {port}")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url)
        for path in ("/ui", "/ui/", "/ui/config", "/ui/gradio_api/info"):
            refused = httpx.get(url + path)
            assert error_of(refused, 401)["code"] == "invalid_api_key", path
            assert refused.headers["www-authenticate"].startswith("Basic"), path  # the browser's login prompt
        unload = httpx.post(url + "/ui/gradio_api/call/unload", json={"data": ["chat"]})
        assert unload.status_code == 401
        with pytest.raises(gradio_client.exceptions.AuthenticationError):
            gradio_client.Client(url + "/ui/", verbose=False)
        assert httpx.get(url + "/ui/", auth=("anyone", "wrong")).status_code == 401
        assert httpx.get(url + "/ui/", auth=("anyone", KEY), follow_redirects=True).status_code == 200
        app = gradio_client.Client(url + "/ui/", verbose=False, headers={"Authorization": f"Bearer {KEY}"})
        assert app.predict("Hello", temperature=0, max_new_tokens=8, api_name="/chat")
        keyed = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        reply = keyed.completions.create(model="neoxlite-demo", prompt=PROMPT, max_tokens=4)
        assert reply.choices[0].text  # the model is still there
    finally:
        stop(process)


def readme_server_section(port: int) -> tuple[list[str], str, str]:
    """(shell commands, the Python snippet, the Continue config) of README's "## Server" section, with its
    port 8000 replaced by a free one (a shared machine may have 8000 taken)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Server\n"):].split("\n## ", 1)[0].replace("8000", str(port))
    commands = [line[4:] for line in section.splitlines() if line.startswith("    ") and not line.startswith("     ")
                and line.split()[0] in ("neoxlite", "curl")]
    python = section.split("```python\n", 1)[1].split("```", 1)[0]
    config = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return commands, python, config


def test_the_readme_server_section_runs_as_written():
    """`neoxlite serve` started as the README shows, answering its Python, curl and editor-config examples."""
    import yaml

    port = free_port()
    commands, python, config = readme_server_section(port)
    assert [c.split()[0] for c in commands] == ["neoxlite", "curl", "neoxlite"]  # the last: --ui, tested above
    process, env = console(commands[0])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(process, url)
        ran = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120, env=env)
        assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr
        curl = subprocess.run(commands[1], shell=True, capture_output=True, text=True, timeout=120, env=env)
        reply = json.loads(curl.stdout)
        assert reply["usage"]["completion_tokens"] >= 1 and reply["choices"][0]["text"], curl.stdout
        editor = yaml.safe_load(config)["models"][0]
        client = openai.OpenAI(base_url=editor["apiBase"], api_key=editor["apiKey"], max_retries=0)
        assert [m.id for m in client.models.list()] == [editor["model"]]
        wrong = openai.OpenAI(base_url=editor["apiBase"], api_key="not-the-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    finally:
        stop(process)
