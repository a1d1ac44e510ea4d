"""The decode step shaped for capture (issue 17) gives exactly the logits and tokens of the step as it was.

What changed: the rotary cos/sin come from a table computed once (the per-call computation, rotary_cos_sin, is
what the table is built by and what a model falls back to past it); the cache is written with index_copy_ at a
position tensor; a padded batch's mask is a slice of one preallocated buffer; generation runs `prefill` and
`decode_one_token`, reading its stop flags back every few steps on a GPU. The reference below is the loop as it
was: forward() per step with a mask grown by a column, rotary computed per call."""

from __future__ import annotations

import pytest
import torch

import neoxlite
import neoxlite.cpu_kernels
from neoxlite import GPTNeoXForCausalLM, cuda_graphs, generation
from neoxlite.cache import StaticCache
from neoxlite.config import GPTNeoXConfig
from neoxlite.model import rotary_cos_sin
from neoxlite.offload.planner import BudgetTooSmall

PROMPTS = torch.tensor([[5, 17, 3, 44, 9, 12], [0, 0, 7, 8, 91, 2]])
PADDED = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
NEW_TOKENS = 8
SHAPE = dict(hidden_size=128, intermediate_size=512, vocab_size=512)


@torch.no_grad()  # as generate() runs: the CPU kernels take no autograd
def grown_mask_decode(model: GPTNeoXForCausalLM, mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The generate loop before the restructuring, greedy, rotary computed per call: every step's logits and
    the chosen tokens."""
    model.gpt_neox.rotary.limit = 0  # every position past the table: rotary_cos_sin per call, as before
    try:
        B, T = PROMPTS.shape
        cache = StaticCache(model.config, B, T + NEW_TOKENS, model.dtype, "cpu")
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = [model(PROMPTS, mask, positions, cache=cache, logits_to_keep=1).logits[:, -1]]
        chosen = []
        for _ in range(NEW_TOKENS - 1):
            chosen.append(logits[-1].argmax(-1))
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits.append(model(chosen[-1][:, None], mask, positions, cache=cache).logits[:, -1])
        chosen.append(logits[-1].argmax(-1))
    finally:
        model.gpt_neox.rotary = type(model.gpt_neox.rotary)(model.config)
    return logits, torch.stack(chosen, 1)


def generated_logits(model: GPTNeoXForCausalLM, padded: bool, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """generate()'s tokens and the logits of each of its steps (prefill and decode_one_token both end in
    embed_out)."""
    seen: list[torch.Tensor] = []
    hook = model.embed_out.register_forward_hook(lambda _m, _args, out: seen.append(out[:, -1]))
    tokens = model.generate(PROMPTS, attention_mask=PADDED if padded else None, max_new_tokens=NEW_TOKENS,
                            eos_token_id=[], do_sample=False, **kwargs)
    hook.remove()
    return seen, tokens[:, PROMPTS.shape[1]:]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_generate_gives_the_grown_mask_loops_logits_and_tokens(checkpoint, monkeypatch, kernels, dtype, padded):
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", kernels)
    folder, _ = checkpoint(**SHAPE)
    model = GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype, progress=False)
    expected_logits, expected_tokens = grown_mask_decode(model, PADDED if padded else torch.ones_like(PROMPTS))
    seen, tokens = generated_logits(model, padded)
    assert torch.equal(tokens, expected_tokens)
    assert len(seen) == NEW_TOKENS
    for step, (got, want) in enumerate(zip(seen, expected_logits, strict=True)):
        assert torch.equal(got, want), f"step {step}"


def test_an_offloaded_model_gives_the_grown_mask_loops_logits(checkpoint, tmp_path):
    """Layers streamed from the offload dir through the scheduler: the same step, the same bits."""
    folder, _ = checkpoint(**SHAPE)
    def load(cpu_memory: int) -> GPTNeoXForCausalLM:
        return GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False, cpu_memory=cpu_memory,
                                                  offload_dir=tmp_path, max_context=16, max_batch_size=2)

    with pytest.raises(BudgetTooSmall) as too_small:
        load(1)
    model = load(too_small.value.minimum)  # the least RAM that fits: the layers stream from disk
    assert model.gpt_neox.scheduler.sources  # offloaded indeed
    expected_logits, expected_tokens = grown_mask_decode(model, PADDED)
    seen, tokens = generated_logits(model, padded=True)
    assert torch.equal(tokens, expected_tokens)
    assert all(torch.equal(got, want) for got, want in zip(seen, expected_logits, strict=True))


@pytest.mark.parametrize("arch", ["GPTNeoXForSequenceClassification", "GPTNeoXForTokenClassification",
                                  "GPTNeoXForQuestionAnswering", "GPTNeoXModel"])
def test_every_head_gives_the_per_call_rotarys_outputs(checkpoint, arch):
    folder, _ = checkpoint(arch, **SHAPE, pad_token_id=0)
    model = getattr(neoxlite, arch).from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        table = model(PROMPTS, attention_mask=PADDED)
        model.base_model.rotary.limit = 0
        per_call = model(PROMPTS, attention_mask=PADDED)
    for name, value in table.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, per_call[name]), name


@pytest.mark.parametrize("rope_scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}],
                         ids=["default", "linear", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_rotary_table_holds_the_per_call_numbers(rope_scaling, dtype):
    config = GPTNeoXConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                           vocab_size=32, max_position_embeddings=64, rotary_pct=0.5, rope_scaling=rope_scaling)
    rotary = neoxlite.model.RotaryTable(config)
    positions = torch.tensor([[0, 5, 63], [1, 2, 40]])
    for got, want in zip(rotary.rope(positions, dtype, 64), rotary_cos_sin(config, positions, dtype), strict=True):
        assert torch.equal(got, want)
    # dynamic NTK past the trained context: the base grows with the sequence, so it is computed per call
    late = torch.tensor([[90, 99]])
    for got, want in zip(rotary.rope(late, dtype, 100), rotary_cos_sin(config, late, dtype), strict=True):
        assert torch.equal(got, want)


def test_the_fixed_shape_step_matches_the_filled_part_step(checkpoint, monkeypatch):
    """The step a CUDA graph captures (whole cache read under a position mask), run eagerly on the CPU: the same
    tokens and logits to rounding (it sums over more, masked, keys)."""
    folder, _ = checkpoint(**SHAPE)
    model = GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    want_logits, want_tokens = generated_logits(model, padded=True)
    monkeypatch.setattr(cuda_graphs, "fixed_shape", lambda _model: True)
    got_logits, got_tokens = generated_logits(model, padded=True, cuda_graphs=False)
    assert torch.equal(got_tokens, want_tokens)
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_reading_flags_back_every_few_steps_changes_no_output(checkpoint, monkeypatch):
    """Tokens held between read-backs: a row's eos, all rows done mid-chunk, and a non-finite step end the
    output exactly where reading back every step ends it."""
    folder, _ = checkpoint(**SHAPE)
    model = GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    kwargs = dict(max_new_tokens=12, do_sample=True, seed=3, top_k=0)  # a seed's generator reads back every step

    def run(every: int, **more) -> torch.Tensor:
        monkeypatch.setattr(generation, "readback_interval", lambda *_: every)
        return model.generate(PROMPTS, attention_mask=PADDED, **{**kwargs, **more})

    free = run(1, eos_token_id=[])
    eos = [int(free[0, 9]), int(free[1, 8])]  # row 0 stops at its 4th new token at the latest, row 1 at its 3rd
    for every in (3, 5):
        assert torch.equal(run(every, eos_token_id=[]), free)
        assert torch.equal(run(every, eos_token_id=eos), run(1, eos_token_id=eos))
    calls = []

    def nan_from_the_fourth_step(_module, _args, out):
        calls.append(1)
        return out if len(calls) < 4 else out.nan_to_num() * float("nan")

    model.embed_out.register_forward_hook(nan_from_the_fourth_step)
    for every in (1, 3, 5):
        calls.clear()
        monkeypatch.setattr(generation, "readback_interval", lambda *_, every=every: every)
        stream = model.stream_generate(PROMPTS, PADDED, max_new_tokens=12, eos_token_id=[], do_sample=True, top_k=0)
        assert [next(stream) is not None for _ in range(3)] == [True] * 3  # the three finite steps' tokens
        with pytest.raises(ValueError, match="non-finite logits"):
            next(stream)
