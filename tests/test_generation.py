"""generate(): token-identical to transformers (greedy and seeded sampling), cache and batching invariants,
eos / pad / stop-string / length semantics, and clear errors."""

from __future__ import annotations

import pytest
import torch

import neoxlite

PAD = 1
FREE = dict(eos_token_id=None)  # no eos in the config: generation runs its full length unless told otherwise
CONFIGS = {
    "pythia": {},
    "sequential-nobias-tied": dict(use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True,
                                   rotary_pct=1.0, hidden_act="gelu_new"),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # 7 + 40 tokens cross max_position_embeddings while decoding: the base grows step by step.
    "rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32),
}


def prompt(n: int = 7, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(2, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9, 6 and 3 real tokens, left-padded with PAD."""
    ids = prompt(9, seed=1, batch=3)
    mask = torch.ones_like(ids)
    for row, n in ((1, 3), (2, 6)):
        ids[row, :n], mask[row, :n] = PAD, 0
    return ids, mask


def rows(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [ids[r][mask[r].bool()][None] for r in range(ids.shape[0])]


def hf_generate(ref, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    kwargs.setdefault("pad_token_id", PAD)
    kwargs.setdefault("do_sample", False)
    mask = torch.ones_like(ids) if mask is None else mask
    return ref.generate(ids, attention_mask=mask, **kwargs)


@pytest.fixture(scope="module")
def free(checkpoint):
    """(neoxlite model, reference) without eos in the config."""
    folder, ref = checkpoint(**FREE)
    return neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False), ref


def uncached_greedy(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Recomputes the whole sequence every step, no cache: the definition generate() must reproduce."""
    with torch.no_grad():
        for _ in range(steps):
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            nxt = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return ids


# ----------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_is_token_identical_to_reference(checkpoint, name):
    folder, ref = checkpoint(**FREE, **CONFIGS[name])
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    ids = prompt()
    got = model.generate(ids, max_new_tokens=40)
    want = hf_generate(ref, ids, max_new_tokens=40)
    assert got.shape == (1, 47)
    assert torch.equal(got, want)
    assert len(set(got[0, 7:].tolist())) > 3  # a real sequence, not one token repeated


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_uncached(checkpoint, name):
    folder, _ = checkpoint(**FREE, **CONFIGS[name])
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    ids = prompt()
    assert torch.equal(model.generate(ids, max_new_tokens=40), uncached_greedy(model, ids, torch.ones_like(ids), 40))


def test_left_padded_batch_equals_row_by_row_and_reference(free):
    model, ref = free
    ids, mask = left_padded()
    got = model.generate(ids, attention_mask=mask, max_new_tokens=32, pad_token_id=PAD)
    assert got.shape == (3, 9 + 32)
    assert torch.equal(got[:, :9], ids)
    for r, row in enumerate(rows(ids, mask)):
        assert torch.equal(got[r, 9:], model.generate(row, max_new_tokens=32)[0, row.shape[1]:]), f"row {r}"
    assert torch.equal(got, hf_generate(ref, ids, mask, max_new_tokens=32))
    assert torch.equal(got, uncached_greedy(model, ids, mask, 32))


def test_stream_generate_yields_the_new_tokens_step_by_step(free):
    model, _ = free
    ids, mask = left_padded()
    steps = list(model.stream_generate(ids, mask, max_new_tokens=10))
    assert len(steps) == 10 and all(s.shape == (3,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), model.generate(ids, mask, max_new_tokens=10)[:, 9:])


# ----------------------------------------------------------------------------------------------- eos and pad
def expected_with_stop(free_rows: list[list[int]], stops: set[int], pad: int) -> torch.Tensor:
    """What a batch must give: each row's free-running tokens up to its first stop id, then pad; the batch
    ends when every row has stopped."""
    cut = [next((i + 1 for i, t in enumerate(r) if t in stops), len(r)) for r in free_rows]
    width = max(cut)
    return torch.tensor([r[:c] + [pad] * (width - c) for r, c in zip(free_rows, cut, strict=True)])


@pytest.fixture(scope="module")
def free_runs(free):
    """Each left-padded prompt generated alone for 24 tokens without eos."""
    model, _ = free
    ids, mask = left_padded()
    return [model.generate(row, max_new_tokens=24)[0, row.shape[1]:].tolist() for row in rows(ids, mask)]


def early_eos(free_runs: list[list[int]]) -> int:
    """A token row 0 generates before row 1 does (or that row 1 never generates): row 0 then waits, padded."""
    first = [{t: r.index(t) for t in reversed(r)} for r in free_runs]
    for t in free_runs[0][1:]:
        if first[0][t] < first[1].get(t, 99) - 2:
            return t
    raise AssertionError("no usable eos token in these runs; change the prompt seed")


@pytest.mark.parametrize("pad_token_id", [PAD, None], ids=["pad-given", "pad-defaults-to-eos"])
def test_finished_rows_are_padded(free, free_runs, pad_token_id):
    model, ref = free
    ids, mask = left_padded()
    eos = early_eos(free_runs)
    got = model.generate(ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=pad_token_id)
    want = expected_with_stop(free_runs, {eos}, PAD if pad_token_id is not None else eos)
    assert torch.equal(got[:, 9:], want)
    assert (want[0] == (PAD if pad_token_id is not None else eos)).any()  # padding really happened
    assert torch.equal(got, hf_generate(ref, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=pad_token_id))


def test_several_eos_ids(free, free_runs):
    model, ref = free
    ids, mask = left_padded()
    eos = [free_runs[1][4], free_runs[2][6]]
    got = model.generate(ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got[:, 9:], expected_with_stop(free_runs, set(eos), PAD))
    assert torch.equal(got, hf_generate(ref, ids, mask, max_new_tokens=24, eos_token_id=eos))
    assert torch.equal(got, model.generate(ids, mask, max_new_tokens=24, eos_token_id=torch.tensor(eos), pad_token_id=PAD))


def test_eos_and_pad_come_from_the_config(checkpoint, free_runs):
    eos = free_runs[0][5]
    folder, ref = checkpoint(eos_token_id=eos, pad_token_id=PAD)  # same seed: same weights as `free`
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    ids, mask = left_padded()
    got = model.generate(ids, mask, max_new_tokens=24)
    assert torch.equal(got[:, 9:], expected_with_stop(free_runs, {eos}, PAD))
    assert torch.equal(got, hf_generate(ref, ids, mask, max_new_tokens=24))


# ----------------------------------------------------------------------------------------------- lengths
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
@pytest.mark.parametrize("kwargs,new", [
    ({}, 20),  # transformers' default: 20 new tokens
    (dict(max_length=20), 13),
    (dict(max_new_tokens=5), 5),
    (dict(max_length=20, max_new_tokens=5), 5),  # max_new_tokens wins
    (dict(max_length=8), 1),
])
def test_max_length_and_max_new_tokens_as_transformers(free, kwargs, new):
    model, ref = free
    ids = prompt(7)
    got = model.generate(ids, **kwargs)
    assert got.shape == (1, 7 + new)
    assert torch.equal(got, hf_generate(ref, ids, **kwargs))


@pytest.mark.parametrize("max_length", [7, 3])
def test_max_length_not_above_prompt_is_an_error(free, max_length):
    model, ref = free
    with pytest.raises(ValueError, match="max_length"):
        model.generate(prompt(7), max_length=max_length)
    with pytest.raises(ValueError):  # transformers refuses too
        hf_generate(ref, prompt(7), max_length=max_length)


def test_prompt_longer_than_context_is_a_clear_error(free):
    model, _ = free
    with pytest.raises(ValueError, match=r"129 tokens.*context is 128"):
        model.generate(prompt(129), max_new_tokens=1)


def test_generation_stops_at_the_context(free):
    model, _ = free
    assert model.generate(prompt(120), max_new_tokens=50).shape == (1, 128)


# ----------------------------------------------------------------------------------------------- stop strings
class CharTokenizer:
    """Duck-typed tokenizer: token i is the one character chr(0x100 + i)."""

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s) for s in sequences]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(0x100 + int(i)) for i in ids)


def stop_cut(prompt_text: str, new_text: str, stops: list[str]) -> int:
    """Tokens (= characters here) generated until a stop string ends inside the reply."""
    text = prompt_text + new_text
    ends = [text.find(s, i) + len(s) for s in stops for i in range(len(text)) if text.find(s, i) >= 0]
    ends = [e for e in ends if e > len(prompt_text)]
    return min(ends, default=len(text)) - len(prompt_text)


def test_stop_strings(free, free_runs):
    model, _ = free
    tok = CharTokenizer()
    ids, mask = left_padded()
    prompts = [tok.decode(r) for r in ids.tolist()]  # padding included, as transformers sees it
    text = [tok.decode(r) for r in free_runs]
    # Row 1 stops at a two-token string, row 2 at a single token; row 0 runs on unless it meets either.
    stops = [text[1][5:7], text[2][8]]
    got = model.generate(ids, mask, max_new_tokens=24, stop_strings=stops, tokenizer=tok, pad_token_id=PAD)
    cut = [stop_cut(p, t, stops) for p, t in zip(prompts, text, strict=True)]
    assert cut[1] <= 7 and cut[2] <= 9
    width = max(cut)
    want = torch.tensor([r[:c] + [PAD] * (width - c) for r, c in zip(free_runs, cut, strict=True)])
    assert torch.equal(got[:, 9:], want)
    one = model.generate(rows(ids, mask)[1], max_new_tokens=24, stop_strings=stops[0], tokenizer=tok)
    assert tok.decode(one[0, 6:].tolist()).endswith(stops[0])


def test_stop_string_may_begin_in_the_prompt_but_must_end_in_the_reply(free, free_runs):
    model, _ = free
    tok = CharTokenizer()
    row = rows(*left_padded())[0]
    prompt_text, text = tok.decode(row[0].tolist()), tok.decode(free_runs[0])
    spanning = prompt_text[-2:] + text[:2]
    got = model.generate(row, max_new_tokens=24, stop_strings=[spanning], tokenizer=tok)
    assert got.shape[1] == row.shape[1] + stop_cut(prompt_text, text, [spanning]) == row.shape[1] + 2
    in_prompt = prompt_text[-3:-1]  # already in the prompt: no reason to stop
    got = model.generate(row, max_new_tokens=24, stop_strings=[in_prompt], tokenizer=tok)
    assert got.shape[1] == row.shape[1] + stop_cut(prompt_text, text, [in_prompt])
    assert stop_cut(prompt_text, text, [in_prompt]) > 1


def test_stop_strings_need_a_tokenizer(free):
    model, _ = free
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(prompt(), max_new_tokens=4, stop_strings=["x"])


# ----------------------------------------------------------------------------------------------- sampling
def test_seed_and_generator_reproduce(free):
    model, _ = free
    ids = prompt()
    state = torch.get_rng_state()
    a = model.generate(ids, do_sample=True, max_new_tokens=30, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # a seed leaves the global RNG alone
    assert torch.equal(a, model.generate(ids, do_sample=True, max_new_tokens=30, seed=3))
    assert torch.equal(a, model.generate(ids, do_sample=True, max_new_tokens=30, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, model.generate(ids, do_sample=True, max_new_tokens=30, seed=4))
    torch.manual_seed(7)
    b = model.generate(ids, do_sample=True, max_new_tokens=30)
    torch.manual_seed(7)
    assert torch.equal(b, model.generate(ids, do_sample=True, max_new_tokens=30))


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.7),  # transformers' default top_k=50 applies
    dict(top_k=5),
    dict(top_k=0, top_p=0.8),
    dict(top_p=0.9, temperature=1.3),
    dict(repetition_penalty=1.3),
    dict(temperature=1.5, top_k=10, top_p=0.9, repetition_penalty=1.2),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sampling_with_same_torch_seed_equals_reference(free, kwargs):
    model, ref = free
    ids, mask = left_padded()
    torch.manual_seed(11)
    got = model.generate(ids, mask, do_sample=True, max_new_tokens=30, pad_token_id=PAD, **kwargs)
    torch.manual_seed(11)
    want = hf_generate(ref, ids, mask, do_sample=True, max_new_tokens=30, **kwargs)
    assert torch.equal(got, want)


def test_greedy_repetition_penalty_equals_reference(free):
    model, ref = free
    ids = prompt()
    got = model.generate(ids, max_new_tokens=32, repetition_penalty=1.5)
    assert torch.equal(got, hf_generate(ref, ids, max_new_tokens=32, repetition_penalty=1.5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(num_beams=2), "beam"),
])
def test_bad_sampling_arguments_are_value_errors(free, kwargs, match):
    model, _ = free
    with pytest.raises(ValueError, match=match):
        model.generate(prompt(), max_new_tokens=4, **kwargs)


def test_bad_inputs_are_clear_errors(free):
    model, _ = free
    with pytest.raises(TypeError, match="no_such_option"):
        model.generate(prompt(), max_new_tokens=4, no_such_option=True)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(1, 3), max_new_tokens=4)
