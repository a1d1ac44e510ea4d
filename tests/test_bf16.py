"""bf16 on the CPU: the same bits as transformers, not merely close (sums are done in the reference's order)."""

from __future__ import annotations

import pytest
import torch

from neoxlite import GPTNeoXForCausalLM


@pytest.mark.parametrize("parallel", [True, False])
def test_bf16_logits_and_greedy_tokens_equal_the_reference(checkpoint, parallel):
    folder, _ = checkpoint(use_parallel_residual=parallel, hidden_size=128, intermediate_size=512, vocab_size=512)
    import transformers

    ref = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    prompt = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(prompt).logits, ref(prompt).logits)
    expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=32, eos_token_id=[]), expected)
