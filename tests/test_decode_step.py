"""The restructured decode step gives exactly the logits and tokens of the step as it was: generate() now passes
no mask to an unpadded batch and a slice of one preallocated mask to a padded one (no host check per step), where
it used to grow an all-ones-or-padded mask by a column every step."""

from __future__ import annotations

import pytest
import torch

import neoxlite.cpu_kernels
from neoxlite import GPTNeoXForCausalLM

PROMPTS = torch.tensor([[5, 17, 3, 44, 9, 12], [0, 0, 7, 8, 91, 2]])
PADDED = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
NEW_TOKENS = 8


@torch.no_grad()  # as generate() runs: the CPU kernels take no autograd
def grown_mask_decode(model: GPTNeoXForCausalLM, mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The generate loop before the restructuring, greedy: every step's logits and the chosen tokens."""
    from neoxlite.cache import StaticCache

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
    return logits, torch.stack(chosen, 1)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_generate_gives_the_grown_mask_loops_logits_and_tokens(checkpoint, monkeypatch, kernels, dtype, padded):
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", kernels)
    folder, _ = checkpoint(hidden_size=128, intermediate_size=512, vocab_size=512)
    model = GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype, progress=False)
    mask = PADDED if padded else torch.ones_like(PROMPTS)
    expected_logits, expected_tokens = grown_mask_decode(model, mask)
    seen = []
    model.register_forward_hook(lambda _module, _args, out: seen.append(out.logits[:, -1]))
    tokens = model.generate(PROMPTS, attention_mask=PADDED if padded else None, max_new_tokens=NEW_TOKENS,
                            eos_token_id=[], do_sample=False)
    assert torch.equal(tokens[:, PROMPTS.shape[1]:], expected_tokens)
    assert len(seen) == NEW_TOKENS
    for step, (got, want) in enumerate(zip(seen, expected_logits, strict=True)):
        assert torch.equal(got, want), f"step {step}"


def test_a_padded_batch_builds_its_mask_once(checkpoint, monkeypatch):
    """No per-step mask growth: every decode step gets a view of one preallocated buffer."""
    folder, _ = checkpoint(hidden_size=128, intermediate_size=512, vocab_size=512)
    model = GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    masks = []
    model.register_forward_pre_hook(lambda _module, args: masks.append(args[1]))
    model.generate(PROMPTS, attention_mask=PADDED, max_new_tokens=4, eos_token_id=[])
    assert len({m.untyped_storage().data_ptr() for m in masks[1:]}) == 1
    assert [m.shape[1] for m in masks] == [6, 7, 8, 9]
    model.generate(PROMPTS, max_new_tokens=2, eos_token_id=[])
    assert masks[-2:] == [None, None]  # unpadded: plain causal attention, no mask at all
