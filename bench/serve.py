"""`neoxlite serve` under concurrent streaming clients: aggregate tokens/s, time to first token, memory.

    .venv/bin/python bench/serve.py [--shape pythia-410m] [--clients 1 8 16] [--tokens 32] [--prompt-words 8]
                                    [--threads N] [--arrivals 5]

Starts `neoxlite serve` (bf16 random weights of the shape, the GPT-NeoX-20B tokenizer, a RAM budget so the offload
plan reserves the KV cache for the batch) as a subprocess on 127.0.0.1, then for each client count runs that many
streaming /v1/completions clients at once and prints the aggregate tokens/s against one client's in the same run (goals: >= 5x at 8, >= 6x at 16), each
client's time to first token and tokens/s (p50/p95), the time to first token of a request arriving while 15 others
decode against the same request on an idle server (goal: <= 2x; medians over --arrivals requests, each sent after
a random pause, since an arrival waits for the decode step in progress), and the server's memory against its budget.

The load comes from this process (not the server's): light asyncio clients on one event loop (httpx.AsyncClient,
greedy, `max_tokens` each, a token per event via logprobs=0), so the clients take little of the CPU the server
decodes on (16 threads of the `openai` package would take a share of it that grows with the client count). One
request also goes through the official `openai` client, which must get the same text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_checkpoint  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[2] / "shared/tokenizers/gpt-neox-20b"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def start_server(folder: Path, port: int, batch: int, context: int, budget: str,
                 threads: int | None) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("neoxlite")
    command = [str(exe), "serve", "-m", str(folder), "--dtype", "bf16", "--port", str(port), "--max-batch-size",
               str(batch), "--max-context", str(context), "--cpu-memory", budget]
    print("server:", " ".join(command[1:]), file=sys.stderr)
    # On a shared machine OpenMP threads that spin while others hold the cores slow every step many times over:
    # --threads 1 keeps the comparison about batching.
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    # The server's output goes to a file: a pipe that nobody reads during the run would block the server once full.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stderr=subprocess.STDOUT, stdout=log, text=True, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health")
            if health.status_code == 200:
                return process
            if health.json().get("status") == "failed":  # the server answers, but its model will never load
                process.kill()
                raise SystemExit(f"the server could not load the model: {health.json().get('error')}")
        except (httpx.TransportError, ValueError):  # not listening yet, or not JSON
            pass
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited:\n{log.read()[-4000:]}")
        time.sleep(0.5)
    process.kill()
    log.seek(0)
    raise SystemExit(f"the server did not become ready in 10 minutes; its output:\n{log.read()[-4000:]}")


class Client:
    """One streaming request; records when each token arrived."""

    def __init__(self, url: str, model: str, prompt: str, tokens: int) -> None:
        self.body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                     "logprobs": 0}
        self.url = url
        self.sent = 0.0
        self.times: list[float] = []  # when each token arrived
        self.text = ""

    async def run(self, http: httpx.AsyncClient) -> None:
        self.sent = time.perf_counter()
        async with http.stream("POST", self.url + "/v1/completions", json=self.body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                self.text += choice["text"]
                self.times += [time.perf_counter()] * len((choice.get("logprobs") or {}).get("tokens", []))

    @property
    def count(self) -> int:
        return len(self.times)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def rate(self) -> float:
        """Decode tokens/s: after the first token."""
        span = self.times[-1] - self.times[0] if self.times else 0.0
        return (self.count - 1) / span if span > 0 else 0.0


def steady_rate(clients: list[Client]) -> float:
    """Aggregate tokens/s while every client decodes: tokens in [last first token, first last token] (prefills
    run one at a time, so this is the decode throughput of the full batch); 0 when that window is empty."""
    start, end = max(c.times[0] for c in clients), min(c.times[-1] for c in clients)
    if len(clients) == 1:
        start, end = clients[0].times[0], clients[0].times[-1]
    tokens = sum(sum(start < t <= end for t in c.times) for c in clients)
    return tokens / (end - start) if end > start else 0.0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_clients(clients: list[Client]) -> float:
    """Runs the clients at once; returns the aggregate tokens/s (all tokens over the wall time)."""
    async def run() -> float:
        async with httpx.AsyncClient(timeout=600) as http:
            start = time.perf_counter()
            await asyncio.gather(*(c.run(http) for c in clients))
            return sum(c.count for c in clients) / (time.perf_counter() - start)
    return asyncio.run(run())


def ttft_under_load(others: list[Client], arrivals: list[Client], seed: int = 0) -> None:
    """Once every one of `others` has its first token, sends `arrivals` one after another while they still
    decode, each after a random pause (seeded) so that arrivals fall at different points of a decode step."""
    pauses = random.Random(seed)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            running = [asyncio.create_task(c.run(http)) for c in others]
            while sum(c.count > 0 for c in others) < len(others):
                for task in running:  # a refused request (its error) ends the benchmark instead of a wait forever
                    if task.done() and task.exception() is not None:
                        raise task.exception()
                await asyncio.sleep(0.01)
            for client in arrivals:
                await asyncio.sleep(pauses.uniform(0.0, 0.3))
                await client.run(http)
            await asyncio.gather(*running)
    asyncio.run(run())


def openai_text(url: str, model: str, prompt: str, tokens: int) -> str:
    """The same greedy request through the official client (streaming), for the correctness check."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    chunks = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"p50 {statistics.median(values):7.3f}  p95 {p95:7.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="pythia-410m")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per client")
    parser.add_argument("--prompt-words", type=int, default=8)
    parser.add_argument("--context", type=int, default=256, help="--max-context of the server")
    parser.add_argument("--cpu-memory", default="4GiB", help="the server's RAM budget")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--arrivals", type=int, default=5, help="requests timed for the time to first token")
    parser.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: torch's)")
    args = parser.parse_args()

    folder = random_checkpoint(args.shape)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (args.tokenizer / name).exists() and not (folder / name).exists():
            shutil.copy(args.tokenizer / name, folder / name)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    batch = max(max(args.clients), 16)
    server = start_server(folder, port, batch, args.context, args.cpu_memory, args.threads)
    url, model = f"http://127.0.0.1:{port}", str(folder)
    try:
        prompt = lambda i: " ".join(WORDS[(i + j) % len(WORDS)] for j in range(args.prompt_words))  # noqa: E731
        run_clients([Client(url, model, prompt(99), 4)])  # warm-up
        print(f"{args.shape} bf16, {args.tokens} new tokens per client, prompt of {args.prompt_words} words, "
              f"server threads {args.threads or torch_threads()}, "
              f"load average {os.getloadavg()[0]:.1f} at start", file=sys.stderr)
        rates: dict[int, tuple[float, float]] = {}
        for n in args.clients:
            clients = [Client(url, model, prompt(i), args.tokens) for i in range(n)]
            rates[n] = (run_clients(clients), steady_rate(clients))
            wall, steady = (r / b for r, b in zip(rates[n], rates[args.clients[0]], strict=True))
            print(f"{n:3d} clients: aggregate {rates[n][0]:6.2f} tok/s over the wall time ({wall:.2f}x), "
                  f"{rates[n][1]:6.2f} tok/s while all decode ({steady:.2f}x {args.clients[0]} client); "
                  f"TTFT s {percentiles([c.ttft for c in clients])}; per-client tok/s "
                  f"{percentiles([c.rate for c in clients])}")
        # time to first token: alone on an idle server, then while 15 others decode
        # (median of several: an arrival waits for the step in progress, so one sample depends on its phase)
        alone = [Client(url, model, prompt(7), 1) for _ in range(args.arrivals)]
        for client in alone:
            run_clients([client])
        loaded = [Client(url, model, prompt(7), 1) for _ in range(args.arrivals)]
        # the others decode for four times a client's tokens, as far as a row of --context holds them
        background = min(args.tokens * 4, args.context - 4 * args.prompt_words - 8)
        ttft_under_load([Client(url, model, prompt(i), background) for i in range(15)], loaded)
        alone_s, loaded_s = (statistics.median(c.ttft for c in group) for group in (alone, loaded))
        print(f"TTFT alone {alone_s:.3f} s, while 15 decode {loaded_s:.3f} s (medians of {args.arrivals}; "
              f"{loaded_s / alone_s:.2f}x; goal <= 2x; while 15 decode min {min(c.ttft for c in loaded):.3f} "
              f"max {max(c.ttft for c in loaded):.3f} s)")
        check = Client(url, model, prompt(3), args.tokens)
        run_clients([check])
        same = openai_text(url, model, prompt(3), args.tokens) == check.text
        print(f"the openai client's text equals the bench client's: {same}")
        metrics = httpx.get(url + "/metrics").json()
        memory = metrics["memory"]
        print(f"memory: RSS peak {memory['ram_peak'] / 2**30:.2f} GiB, KV cache {memory['kv_cache'] / 2**30:.2f} GiB "
              f"for {metrics['max_batch_size']} rows of {metrics['max_context']}, budget "
              f"{memory.get('budgets', {}).get('cpu', 0) / 2**30:.2f} GiB; load average {os.getloadavg()[0]:.1f} at end")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
