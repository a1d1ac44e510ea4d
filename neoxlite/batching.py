"""Continuous batching: requests join the running batch at any decode step and leave it when they finish.

One thread, the Batcher's, owns the model. Each turn it admits waiting requests into free cache slots, prefills
one chunk of one new prompt, runs one decode step over every running row (`model.decode_rows`: each row at its own
position in its own slot of a SlotCache, no padding), samples each row with its own settings and generator, streams
the token to its request and retires the rows that are done. Every row gets the tokens it would get alone:
prefill is the ordinary forward on the row's slot, the decode step computes each row as a batch of one would, and
sampling follows `stream_generate` row by row. A request whose admission or choice of a token fails ends with an
error Finish; the other rows run on.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neoxlite.cache import SlotCache
from neoxlite.generation import SamplingSettings, _hit_stop, context_limit
from neoxlite.offload.placement import Workload

# Prompt tokens prefilled per turn: a long prompt is prefilled in chunks, between decode steps of the running rows
# (a prompt up to this long is prefilled in one forward, exactly as generate() does).
PREFILL_CHUNK = 512


class QueueFull(RuntimeError):
    """The waiting queue is full: the caller should retry later (the server answers 429)."""


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None = None  # log-probability under the model's raw distribution, when asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely tokens and theirs


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" (eos or a stop string) | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str = ""


Event = Token | Finish


@dataclass
class Request:
    """One generation: prompt ids in, a stream of Token events out, then one Finish.

    Events go to `sink` when given (called from the batcher's thread: keep it short), else to a queue that
    `events()` reads. The eos token ends the stream without being sent; a stop string's last token is sent.
    Stop strings are matched in the generated text only, as OpenAI's API does (generate() follows transformers'
    stop_strings instead, where a match may begin in the prompt).
    """

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int | None = None
    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely tokens'
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit
    sink: Callable[[Event], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    _queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)

    def cancel(self) -> None:
        """Frees the request's row at the next step (a client that went away)."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        (self.sink or self._queue.put)(event)

    def events(self) -> Iterator[Event]:
        """The events as they come (without a sink), ending with the Finish."""
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, Finish):
                return


@dataclass
class _Row:
    """A running request: its cache slot, what it has seen and how far it got."""

    request: Request
    slot: int
    budget: int  # new tokens at most (the request's, capped by the room in the slot)
    generator: torch.Generator | None
    # (1, prompt + budget) ids, filled up to `length`: allocated once, so a new token is one write, not a copy
    buffer: torch.Tensor
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0
    counts: torch.Tensor | None = None  # (V,) times each token was generated, for OpenAI's penalties
    bias: torch.Tensor | None = None  # (V,) the request's logit_bias

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def length(self) -> int:
        return self.prompt_len + self.generated

    @property
    def seen(self) -> torch.Tensor:
        """(1, tokens so far) ids: prompt and generated, for the repetition penalty."""
        return self.buffer[:, :self.length]

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits first: picked with the other such rows in one argmax."""
        sampling = self.request.sampling
        return sampling.greedy and sampling.repetition_penalty == 1.0 and self.counts is None and self.bias is None

    def append(self, token_id: int) -> None:
        self.buffer[0, self.length] = token_id
        self.generated += 1


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a reply, as stream_text picks them: the checkpoint's generation_config.json, else the
    tokenizer's eos token."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


class Batcher:
    """Owns `model` on a thread of its own and runs every submitted request on it, batched.

    max_batch_size: rows decoded together (cache slots); max_context: tokens per slot (prompt + reply; default as
    the loaders': min(2048, the model's context)); max_waiting: requests queued beyond the running ones before submit() refuses more.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, max_batch_size: int = 8, max_context: int | None = None,
                 max_waiting: int = 64, start: bool = True) -> None:
        # the loaders' default context (min(2048, the model's)), never past what the model can position
        max_context = min(Workload(max_batch_size, max_context).context(model.config), context_limit(model.config))
        reserved = getattr(model, "offload_workload", None)
        if reserved is not None and (max_batch_size > reserved[0] or max_context > reserved[1]):
            raise ValueError(
                f"batching {max_batch_size} rows of {max_context} tokens needs more than the memory plan reserved "
                f"({reserved[0]} of {reserved[1]}); load with max_batch_size={max_batch_size} and "
                f"max_context={max_context} (--max-batch-size/--max-context), or batch less")
        if max_batch_size < 1 or max_waiting < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_waiting ({max_waiting}) must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.cache = SlotCache(model.config, max_batch_size, max_context, model._cache_dtype(), model.device)
        self._waiting: queue.Queue[Request] = queue.Queue(maxsize=max_waiting)
        self._rows: list[_Row] = []  # admitted: prefilling (first) or decoding
        self._free = list(range(max_batch_size))
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent turns, for tokens/s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neoxlite-batcher", daemon=True)
        if start:  # start=False: the caller drives turn() itself (the tests, step by step)
            self._thread.start()

    # ------------------------------------------------------------------------------------------- outside
    def submit(self, request: Request) -> Request:
        """Queues `request`; raises ValueError for one that cannot run, QueueFull when the queue is full."""
        prompt_len = len(request.prompt)
        if prompt_len == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if prompt_len >= self.max_context:
            raise ValueError(f"the prompt has {prompt_len} tokens but a row holds {self.max_context}; shorten it")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if self.closed:
            raise ValueError("this batcher was closed (its model was unloaded); submit to the new one")
        if request.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer: pass it to Batcher(model, tokenizer)")
        vocab = self.model.config.vocab_size
        if any(not 0 <= token < vocab or not math.isfinite(bias) for token, bias in request.logit_bias.items()):
            raise ValueError(f"logit_bias maps token ids in [0, {vocab}) to finite numbers, got {request.logit_bias}")
        try:
            self._waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are already waiting; retry later") from None
        return request

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def metrics(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= 10.0]
        span = now - recent[0][0] if recent else 0.0
        return {"running": len(self._rows), "waiting": self._waiting.qsize(), "max_batch_size": self.max_batch_size,
                "max_context": self.max_context,
                "tokens_per_second": round(sum(n for _, n in recent) / span, 2) if span > 0 else 0.0,
                "kv_cache_bytes": sum(t.nbytes for t in self.cache.keys + self.cache.values)}

    def close(self) -> None:
        """Stops the thread; requests still running or waiting end with an error Finish, so no reader waits forever."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        closed = "the model was unloaded or the server is stopping; send the request again"
        for row in self._rows:
            self._finish(row, "error", closed)
        self._rows = []
        while True:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                break
            request.emit(Finish("error", len(request.prompt), 0, closed))

    # -------------------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.turn()
            except Exception as error:  # noqa: BLE001 - one failed turn fails its rows, not the server
                traceback.print_exc(file=sys.stderr)
                for row in self._rows:
                    self._finish(row, "error", f"{type(error).__name__}: {error}")
                self._rows = []
                self._free = list(range(self.max_batch_size))

    def turn(self) -> None:
        """Admits waiting requests into free slots, prefills one chunk, decodes one step of every running row."""
        for row in [r for r in self._rows if r.request.cancelled.is_set()]:
            self._retire(row, "cancelled")
        self._admit(block=not self._rows and self._thread.is_alive())
        with torch.inference_mode():
            prefilling = next((r for r in self._rows if r.prefilled < r.prompt_len), None)
            if prefilling is not None:
                try:
                    self._prefill(prefilling)
                except Exception as error:  # noqa: BLE001 - one prompt's forward (e.g. out of memory) fails it alone
                    self._fail(prefilling, error)
            decoding = [r for r in self._rows if r.prefilled == r.prompt_len and r.generated > 0]
            if decoding:
                self._step(decoding)

    def _admit(self, block: bool) -> None:
        while self._free:
            try:
                request = self._waiting.get(timeout=0.5) if block else self._waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if request.cancelled.is_set():
                request.emit(Finish("cancelled", len(request.prompt), 0))
                continue
            try:
                self._rows.append(self._new_row(request, self._free[0]))
            except Exception as error:  # noqa: BLE001 - a request that cannot start ends alone, with its error
                traceback.print_exc(file=sys.stderr)
                request.emit(Finish("error", len(request.prompt), 0, f"{type(error).__name__}: {error}"))
                continue
            self._free.pop(0)

    def _new_row(self, request: Request, slot: int) -> _Row:
        generator = torch.Generator(device="cpu").manual_seed(request.seed) if request.seed is not None else None
        budget = min(request.max_new_tokens, self.max_context - len(request.prompt))
        device, vocab = self.model.device, self.model.config.vocab_size
        buffer = torch.empty(1, len(request.prompt) + budget, dtype=torch.long, device=device)
        buffer[0, :len(request.prompt)] = torch.tensor(list(request.prompt), dtype=torch.long)
        counts = torch.zeros(vocab, device=device) if request.presence_penalty or request.frequency_penalty else None
        bias = None
        if request.logit_bias:
            bias = torch.zeros(vocab, device=device)
            bias[torch.tensor(list(request.logit_bias), dtype=torch.long, device=device)] = torch.tensor(
                list(request.logit_bias.values()), dtype=torch.float, device=device)
        return _Row(request, slot, budget, generator, buffer, counts=counts, bias=bias)

    def _prefill(self, row: _Row) -> None:
        """The next chunk of the row's prompt into its slot; after the last, its first token."""
        end = min(row.prefilled + PREFILL_CHUNK, row.prompt_len)
        ids = row.seen[:, row.prefilled:end]
        out = self.model(ids, cache=self.cache.slot(row.slot, row.prefilled), logits_to_keep=1)
        row.prefilled = end
        if end == row.prompt_len:
            self._sample([row], out.logits[:, -1])

    def _step(self, rows: list[_Row]) -> None:
        tokens = torch.tensor([int(row.buffer[0, row.length - 1]) for row in rows], device=self.model.device)
        # the newest token of each row goes to the position after its cached ones
        step = self.cache.step([row.slot for row in rows], [row.length - 1 for row in rows])
        self._sample(rows, self.model.decode_rows(tokens, step))

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token from its row of (B, V) logits, as stream_generate picks it for a batch of one:
        plain greedy rows in one argmax, the others row by row with their own settings and generators."""
        logits = logits.to(self.model.device)
        choices = self._choose(rows, logits)
        kept = [b for b, choice in enumerate(choices) if not isinstance(choice, Exception)]
        if len(kept) < len(rows):  # the rows whose choice failed end with their error; the others go on
            for row, choice in zip(rows, choices, strict=True):
                if isinstance(choice, Exception):
                    self._fail(row, choice)
            rows, logits = [rows[b] for b in kept], logits[kept]
        chosen = [int(choices[b]) for b in kept]
        wanted = [b for b, row in enumerate(rows) if row.request.logprobs is not None]
        with_logprobs = dict(zip(wanted, self._with_logprobs(logits[wanted], [rows[b] for b in wanted],
                                                             [chosen[b] for b in wanted]), strict=True))
        for b, row in enumerate(rows):
            request, token_id = row.request, chosen[b]
            row.append(token_id)
            if row.counts is not None:
                row.counts[token_id] += 1
            if token_id in request.eos_token_ids:
                self._retire(row, "stop", counted=row.generated - 1)
                continue
            request.emit(with_logprobs.get(b) or Token(token_id))
            # the generated tokens only: a match may not begin in the prompt
            generated = row.buffer[:, row.prompt_len:row.length]
            if request.stop_strings and bool(_hit_stop(self.tokenizer, generated, list(request.stop_strings))[0]):
                self._retire(row, "stop")
            elif row.generated >= row.budget:
                self._retire(row, "length")
        self._recent.append((time.monotonic(), len(rows)))
        while len(self._recent) > 4096:
            self._recent.popleft()

    @staticmethod
    def _choose(rows: list[_Row], logits: torch.Tensor) -> list[int | Exception]:
        """The next token id of each row, or the error choosing it raised (that row's alone)."""
        chosen: dict[int, int | Exception] = {}
        greedy = [b for b, row in enumerate(rows) if row.plain_greedy]
        if greedy:  # the same checks and argmax as next_tokens, for all of them at once
            try:
                picks = SamplingSettings().next_tokens(logits[greedy], logits.new_empty(len(greedy), 0,
                                                                                        dtype=torch.long), None)
                chosen.update(zip(greedy, picks.tolist(), strict=True))
            except ValueError:  # a row's logits are not finite: row by row below, so that row alone fails
                pass
        for b, row in enumerate(rows):
            if b in chosen:
                continue
            request, scores = row.request, logits[b:b + 1]
            try:
                if row.bias is not None:
                    scores = scores.float() + row.bias
                if row.counts is not None:  # OpenAI's penalties, on the tokens generated so far
                    scores = scores.float() - (request.frequency_penalty * row.counts
                                               + request.presence_penalty * (row.counts > 0))
                chosen[b] = int(request.sampling.next_tokens(scores, row.seen, row.generator)[0])
            except Exception as error:  # noqa: BLE001 - ends this row with the error, the batch runs on
                chosen[b] = error
        return [chosen[b] for b in range(len(rows))]

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, rows: list[_Row], chosen: list[int]) -> list[Token]:
        """The token events of rows that ask for logprobs: one log_softmax and one top-k for all of them."""
        if not rows:
            return []
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = max(row.request.logprobs for row in rows)
        best = torch.topk(logprobs, min(top, logprobs.shape[-1])) if top else None
        picked = logprobs.gather(1, torch.tensor(chosen, device=logprobs.device)[:, None])[:, 0].tolist()
        indices = best.indices.tolist() if best is not None else [[] for _ in rows]
        values = best.values.tolist() if best is not None else [[] for _ in rows]
        return [Token(token_id, picked[i], tuple(zip(indices[i][:row.request.logprobs],
                                                     values[i][:row.request.logprobs], strict=True)))
                for i, (row, token_id) in enumerate(zip(rows, chosen, strict=True))]

    def _fail(self, row: _Row, error: Exception) -> None:
        """Ends one row with `error` (its traceback to stderr); the others run on."""
        traceback.print_exception(error, file=sys.stderr)
        self._retire(row, "error", error=f"{type(error).__name__}: {error}")

    def _retire(self, row: _Row, reason: str, counted: int | None = None, error: str = "") -> None:
        self._rows.remove(row)
        self._free.append(row.slot)
        self._finish(row, reason, error, counted)

    @staticmethod
    def _finish(row: _Row, reason: str, error: str = "", counted: int | None = None) -> None:
        completion = row.generated if counted is None else counted
        row.request.emit(Finish(reason, row.prompt_len, completion, error))
