"""Continuous batching: rows join and leave at any step, and every row gets exactly the tokens it gets alone."""

from __future__ import annotations

import pytest
import torch
from test_offload_run import layer_budget

from neoxlite import batching, cpu_kernels
from neoxlite.batching import Batcher, Finish, QueueFull, Request, Token
from neoxlite.cache import SlotCache
from neoxlite.generation import SamplingSettings
from neoxlite.model import GPTNeoXForCausalLM

EOS = 0  # the tiny checkpoints' eos token
PROMPTS = [[5, 17, 3, 44], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7], [60, 61, 62], [3, 4],
           [88, 1, 50, 50, 2, 9, 33], [12], [40, 41]]


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint(num_hidden_layers=2)[0]


def load(folder, dtype, **kwargs) -> GPTNeoXForCausalLM:
    return GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype, progress=False, **kwargs)


def request(i: int, prompt: list[int], max_new_tokens: int, eos: int = EOS) -> Request:
    """Request i: greedy for even i, seeded sampling for odd i."""
    sampling = SamplingSettings(do_sample=i % 2 == 1, temperature=0.9, top_k=20, top_p=0.9)
    return Request(prompt, max_new_tokens, sampling, seed=100 + i, eos_token_ids=[eos])


def alone(model, i: int, prompt: list[int], max_new_tokens: int, eos: int = EOS) -> list[int]:
    """What generate() gives request i alone, the eos token left out (the batcher ends the stream there)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=i % 2 == 1,
                         temperature=0.9, top_k=20, top_p=0.9, seed=100 + i, eos_token_id=eos)[0, len(prompt):]
    tokens = out.tolist()
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def drain(batcher: Batcher, pending: list[Request]) -> list[int]:
    """Submits one request per turn and turns until every request finished; returns the rows running per turn."""
    submitted, running = list(pending), []
    while submitted or batcher.metrics()["running"] or batcher.metrics()["waiting"]:
        if submitted:
            batcher.submit(submitted.pop(0))
        batcher.turn()
        running.append(batcher.metrics()["running"])
    return running


def tokens_of(req: Request) -> tuple[list[int], Finish]:
    events = list(req.events())
    assert isinstance(events[-1], Finish) and all(isinstance(e, Token) for e in events[:-1])
    return [e.id for e in events[:-1]], events[-1]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pytorch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_join_and_leave_at_every_step_with_their_own_tokens(ckpt, dtype, kernels, monkeypatch):
    if kernels and cpu_kernels.bf16_kernel() is None:
        pytest.skip(cpu_kernels.kernel_status())
    monkeypatch.setattr(cpu_kernels, "enabled", kernels)
    model = load(ckpt, dtype)
    batcher = Batcher(model, max_batch_size=4, max_context=64, start=False)
    lengths = [9, 3, 12, 5, 2, 8, 11, 4, 6]  # rows leave at different steps
    # rows 2 and 3 meet their eos token mid-way: the one each picks at its 5th (3rd) step alone
    eos = [EOS] * len(PROMPTS)
    eos[2] = alone(model, 2, PROMPTS[2], 5, eos=-1)[4]
    eos[3] = alone(model, 3, PROMPTS[3], 3, eos=-1)[2]
    requests = [request(i, p, n, e) for i, (p, n, e) in enumerate(zip(PROMPTS, lengths, eos, strict=True))]
    running = drain(batcher, requests)
    assert max(running) == 4 and {1, 2, 3} <= set(running)  # the batch grew, filled and shrank
    reasons = []
    for i, (req, n) in enumerate(zip(requests, lengths, strict=True)):
        got, finish = tokens_of(req)
        assert got == alone(model, i, PROMPTS[i], n, eos[i]), i
        assert finish.completion_tokens == len(got) and finish.prompt_tokens == len(PROMPTS[i])
        reasons.append(finish.reason)
        assert finish.reason == ("length" if len(got) == n else "stop")
    assert "stop" in reasons and "length" in reasons  # some rows met eos while others ran on


def test_the_cache_is_never_written_past_its_end(ckpt):
    model = load(ckpt, torch.float32)
    batcher = Batcher(model, max_batch_size=2, max_context=16, start=False)
    long, short = request(0, list(range(1, 13)), 50), request(2, [5, 6], 3)
    long.eos_token_ids = short.eos_token_ids = []  # run to the end of the slot
    drain(batcher, [long, short])
    got, finish = tokens_of(long)
    assert finish.reason == "length" and len(got) == 16 - 12  # the slot's room, not the 50 asked for
    assert got == model.generate(torch.tensor([list(range(1, 13))]), max_new_tokens=4, eos_token_id=[])[0, 12:].tolist()
    assert tokens_of(short)[1].reason == "length"
    cache = SlotCache(model.config, 2, 16, torch.float32, "cpu")
    with pytest.raises(IndexError, match="outside the cache"):
        cache.step([0, 1], [3, 16])
    with pytest.raises(IndexError, match="outside the cache"):
        cache.step([2], [0])
    with pytest.raises(ValueError, match="own slot"):
        cache.step([1, 1], [0, 0])
    with pytest.raises(ValueError, match="a row holds 16"):
        batcher.submit(request(0, list(range(16)), 1))


def test_offloaded_models_batch_too(checkpoint, tmp_path):
    """Layers on disk, fetched through the scheduler's fetch(i)/done(i) loop, batched."""
    ckpt, dtype = checkpoint(num_hidden_layers=6)[0], torch.bfloat16
    resident = load(ckpt, dtype)
    model = load(ckpt, dtype, cpu_memory=layer_budget(ckpt, dtype, 0), offload_dir=tmp_path, max_context=32,
                 max_batch_size=2)
    assert set(model.offload_plan.homes[f"layers.{i}"] for i in range(6)) == {"disk"}
    with pytest.raises(ValueError, match="max_batch_size=3"):
        Batcher(model, max_batch_size=3, max_context=32, start=False)
    batcher = Batcher(model, max_batch_size=2, max_context=32, start=False)
    requests = [request(i, PROMPTS[i], 8) for i in range(4)]
    drain(batcher, requests)
    for i, req in enumerate(requests):
        assert tokens_of(req)[0] == alone(resident, i, PROMPTS[i], 8), i


def test_cancelled_rows_free_their_slot_and_the_queue_is_bounded(ckpt):
    model = load(ckpt, torch.float32)
    batcher = Batcher(model, max_batch_size=1, max_context=64, max_waiting=1, start=False)
    first = batcher.submit(request(0, [5, 6], 40))
    batcher.turn()
    second = batcher.submit(request(1, [7], 3))
    with pytest.raises(QueueFull):
        batcher.submit(request(2, [8], 3))
    first.cancel()
    batcher.turn()  # the cancelled row leaves, the waiting one takes its slot
    events = list(first.events())
    assert events[-1].reason == "cancelled" and len(events) < 10
    while batcher.metrics()["running"]:
        batcher.turn()
    assert tokens_of(second)[0] == alone(model, 1, [7], 3)


def test_the_thread_serves_requests_submitted_from_many_threads(ckpt):
    import concurrent.futures

    model = load(ckpt, torch.bfloat16)
    batcher = Batcher(model, max_batch_size=4, max_context=64)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: tokens_of(batcher.submit(request(i, PROMPTS[i], 10)))[0], range(8)))
    finally:
        batcher.close()
    assert got == [alone(model, i, PROMPTS[i], 10) for i in range(8)]


def test_long_prompts_are_prefilled_in_chunks_while_the_others_decode(ckpt, monkeypatch):
    monkeypatch.setattr(batching, "PREFILL_CHUNK", 4)
    model = load(ckpt, torch.float32)
    batcher = Batcher(model, max_batch_size=2, max_context=64, start=False)
    seen: dict[str, list] = {"running": [], "long": []}
    running = request(0, [5, 6], 30, eos=-1)
    running.sink = seen["running"].append
    batcher.submit(running)
    batcher.turn()
    prompt = list(range(1, 12))  # 11 tokens: chunks of 4, 4 and 3
    long = request(2, prompt, 6, eos=-1)
    long.sink = seen["long"].append
    batcher.submit(long)
    for turn in range(3):
        before = len(seen["running"])
        batcher.turn()
        assert len(seen["running"]) == before + 1  # a decode step every turn, prefill or not
        # nothing until the last chunk; then its first token, and the decode step of that same turn
        assert len(seen["long"]) == (2 if turn == 2 else 0)
    while batcher.metrics()["running"]:
        batcher.turn()
    assert [e.id for e in seen["long"][:-1]] == alone(model, 2, prompt, 6, eos=-1)
    assert [e.id for e in seen["running"][:-1]] == alone(model, 0, [5, 6], 30, eos=-1)


def test_closing_ends_running_and_waiting_requests_with_an_error(ckpt):
    model = load(ckpt, torch.float32)
    batcher = Batcher(model, max_batch_size=1, max_context=64, start=False)
    running = batcher.submit(request(0, [5, 6], 40))
    batcher.turn()
    waiting = batcher.submit(request(1, [7], 3))
    batcher.close()  # what the app does when its chat model is unloaded
    for req in (running, waiting):
        finish = list(req.events())[-1]  # would block forever if close() left it behind
        assert finish.reason == "error" and "unloaded" in finish.error


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_rows_get_the_tokens_they_get_alone_in_the_batcher(ckpt, mode, monkeypatch):
    """Quantized layers in bf16 take one engine at every batch of independent rows (on AMX CPUs the tiles, where
    generate() keeps the vector kernel for one or two rows), so a request decoded among others gets the tokens it
    gets as the batcher's only row."""
    pytest.importorskip("bitsandbytes")
    if cpu_kernels.quant_kernel() is None:
        pytest.skip(cpu_kernels.kernel_status())
    bound = []  # any_rows of each 4-bit layer's bound call: the batcher's steps ask for one engine at any batch
    real = cpu_kernels.QuantKernel.bind_4bit
    monkeypatch.setattr(cpu_kernels.QuantKernel, "bind_4bit",
                        lambda self, *a, any_rows=False, **kw: bound.append(any_rows) or real(self, *a, any_rows=any_rows,
                                                                                              **kw))
    model = load(ckpt, torch.bfloat16, quant=mode, compute_dtype=torch.bfloat16)
    lengths = [6, 3, 8, 5]
    solo = []
    for i, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=False)):
        batcher = Batcher(model, max_batch_size=1, max_context=32, start=False)
        req = request(i, prompt, n, eos=-1)
        drain(batcher, [req])
        solo.append(tokens_of(req)[0])
    batcher = Batcher(model, max_batch_size=4, max_context=32, start=False)
    requests = [request(i, p, n, eos=-1) for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=False))]
    assert max(drain(batcher, requests)) > 1
    assert [tokens_of(r)[0] for r in requests] == solo
    assert (True in bound) is (mode == "nf4")


class _Broken(SamplingSettings):
    """Settings whose choice raises, as a bug or a bad value would on the batcher's thread."""

    def next_tokens(self, logits, seen, generator):
        raise RuntimeError("this row's sampling broke")


def test_one_requests_failure_ends_that_request_alone(ckpt, monkeypatch):
    """A seed torch refuses (at admission), a token id outside the vocabulary (at prefill), a sampler that raises and
    non-finite logits in one row (at a decode step) each end their own request with an error Finish; the rows
    beside them get the tokens they get alone."""
    model = load(ckpt, torch.float32)
    batcher = Batcher(model, max_batch_size=4, max_context=64, start=False)
    bad_seed = Request([5, 6], 4, SamplingSettings(do_sample=True), seed=2**64)
    bad_token = Request([5, model.config.vocab_size + 3], 4)
    broken = Request([7, 8], 4, _Broken(do_sample=True))
    real = model.decode_rows
    poisoned = Request([9, 10], 4)

    def decode_rows(tokens, step):  # NaN logits for `poisoned`'s row only, decoded beside good[0]
        logits = real(tokens, step)
        rows = [r.request for r in batcher._rows if r.prefilled == r.prompt_len and r.generated > 0]
        if poisoned in rows:
            logits[rows.index(poisoned)] = float("nan")
        return logits

    monkeypatch.setattr(model, "decode_rows", decode_rows)
    good = [request(i, PROMPTS[i], 8, eos=-1) for i in range(2)]
    drain(batcher, [good[0], bad_seed, bad_token, broken, poisoned, good[1]])
    for req, why in ((bad_seed, "Overflow"), (bad_token, "index"), (broken, "broke"), (poisoned, "non-finite")):
        finish = list(req.events())[-1]
        assert finish.reason == "error" and why in finish.error, (why, finish)
    for i, req in enumerate(good):
        assert tokens_of(req)[0] == alone(model, i, PROMPTS[i], 8, eos=-1), i


def test_stop_strings_match_the_generated_text_only(ckpt):
    """OpenAI's rule: a stop string that begins in the prompt and ends in the reply does not stop it."""

    class Chars:  # token id i is the character chr(32 + i % 90)
        @staticmethod
        def batch_decode(rows):
            return ["".join(chr(32 + i % 90) for i in row) for row in rows]

    model = load(ckpt, torch.float32)
    prompt = [5, 17, 3, 44]
    free = alone(model, 0, prompt, 8, eos=-1)
    spanning = Chars.batch_decode([[prompt[-1], free[0]]])[0]
    assert spanning not in Chars.batch_decode([free])[0]
    inside = Chars.batch_decode([free[2:4]])[0]
    batcher = Batcher(model, Chars(), max_batch_size=2, max_context=64, start=False)
    runs = [request(0, prompt, 8, eos=-1) for _ in range(2)]
    runs[0].stop_strings, runs[1].stop_strings = [spanning], [inside]
    drain(batcher, runs)
    assert tokens_of(runs[0]) == (free, Finish("length", 4, 8))
    cut = Chars.batch_decode([free])[0].find(inside) + len(inside)  # a token per character
    assert tokens_of(runs[1]) == (free[:cut], Finish("stop", 4, cut))
