"""bf16 on the CPU against transformers.

With PyTorch's own matmul the logits are the same bits as the reference's (sums are done in its order). With
neoxlite's decode kernel (neoxlite/linear.py) only the order of the fp32 sums inside each dot product changes,
so the logits are as far from the fp32 model as the reference's own bf16 logits are, and each greedy token is
the reference's choice up to a near-tie (random small models have many: once one tips the other way, the two
continuations part, as the reference's own would on another CPU or thread count).
"""

from __future__ import annotations

import pytest
import torch

import neoxlite.cpu_kernels
from neoxlite import GPTNeoXForCausalLM
from neoxlite.cpu_kernels import bf16_kernel


@pytest.fixture(params=[True, False], ids=["parallel", "sequential"])
def models(request, checkpoint):
    folder, _ = checkpoint(use_parallel_residual=request.param, hidden_size=128, intermediate_size=512,
                           vocab_size=512)
    import transformers

    ref = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ref32 = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    return ours, ref, ref32


PROMPT = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def test_pytorch_matmul_gives_the_reference_bits(models, monkeypatch):
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", False)
    ours, ref, _ = models
    with torch.no_grad():
        assert torch.equal(ours(PROMPT).logits, ref(PROMPT).logits)
    expected = ref.generate(PROMPT, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(PROMPT, max_new_tokens=32, eos_token_id=[]), expected)


@pytest.mark.skipif(bf16_kernel() is None, reason="neoxlite's CPU kernel cannot run here")
def test_kernel_is_as_accurate_as_the_reference_and_greedy_tokens_are_its_choices(models):
    ours, ref, ref32 = models
    with torch.no_grad():
        exact = ref32(PROMPT).logits
        our_error = (ours(PROMPT).logits.float() - exact).abs()
        ref_error = (ref(PROMPT).logits.float() - exact).abs()
        assert our_error.mean() <= 1.25 * ref_error.mean()
        assert our_error.max() <= 1.5 * ref_error.max()

        tokens = ours.generate(PROMPT, max_new_tokens=32, eos_token_id=[])  # the kernel runs every decode step
        ref_logits = ref(tokens).logits[:, PROMPT.shape[1] - 1:-1].float()  # the reference, teacher-forced
    chosen = tokens[:, PROMPT.shape[1]:]
    shortfall = ref_logits.amax(-1) - ref_logits.gather(-1, chosen[..., None])[..., 0]
    assert shortfall.max() <= 2 * ref_error.max()  # never worse than the reference's own bf16 noise
    assert (shortfall == 0).float().mean() >= 0.9  # and almost always its exact argmax


@pytest.mark.skipif(bf16_kernel() is None, reason="neoxlite's CPU kernel cannot run here")
def test_direct_decode_step_gives_the_module_path_bits(models, monkeypatch):
    """neoxlite.cpu_step.decode_step (kernel calls without module calls) against forward()'s module path, both with
    the kernels: the same operations in the same order, so the same bits; whether the block loop plans every
    layer's step at once (decode_plan) or each layer's forward() checks its own."""
    import neoxlite.cpu_step

    ours, _, _ = models
    direct = ours.generate(PROMPT, max_new_tokens=24, eos_token_id=[])
    calls, plans = [], []
    step, plan = neoxlite.cpu_step.decode_step, neoxlite.cpu_step.decode_plan
    monkeypatch.setattr(neoxlite.cpu_step, "decode_step", lambda *a: calls.append(1) or step(*a))
    monkeypatch.setattr(neoxlite.cpu_step, "decode_plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    assert torch.equal(ours.generate(PROMPT, max_new_tokens=24, eos_token_id=[]), direct)
    assert len(calls) == 23 * ours.config.num_hidden_layers  # every decode step of every layer took it
    assert sum(p is not None for p in plans) == 23  # every decode step planned at once (the prefill did not)
    monkeypatch.setattr(neoxlite.cpu_step, "decode_plan", lambda *a: None)  # each layer's forward() decides
    assert torch.equal(ours.generate(PROMPT, max_new_tokens=24, eos_token_id=[]), direct)
    assert len(calls) == 2 * 23 * ours.config.num_hidden_layers
    monkeypatch.setattr(neoxlite.cpu_step, "decode_kernel", lambda self, x, kv: None)
    assert torch.equal(ours.generate(PROMPT, max_new_tokens=24, eos_token_id=[]), direct)


@pytest.mark.skipif(bf16_kernel() is None, reason="neoxlite's CPU kernel cannot run here")
@pytest.mark.parametrize("scope", ["layer", "pre-layer", "global"])
def test_forward_hooks_run_at_every_decode_step(checkpoint, scope):
    """The planned block loop calls decode_step without the layers' module calls: where a forward hook is
    registered (on a layer, or for every module) it steps aside, so the hook runs at every step, with the same
    tokens."""
    folder, _ = checkpoint(hidden_size=128, intermediate_size=512, vocab_size=512)
    model = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    expected = model.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    layer = model.gpt_neox.layers[1]
    calls = []
    if scope == "layer":
        handle = layer.register_forward_hook(lambda *_: calls.append(1))
    elif scope == "pre-layer":
        handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda module, *_: calls.append(1) if module is layer else None)
    try:
        assert torch.equal(model.generate(PROMPT, max_new_tokens=8, eos_token_id=[]), expected)
    finally:
        handle.remove()
    assert len(calls) == 8  # the prefill and the seven decode steps
    assert torch.equal(model.generate(PROMPT, max_new_tokens=8, eos_token_id=[]), expected)
    assert len(calls) == 8  # removed: not called again


@pytest.mark.skipif(bf16_kernel() is None, reason="neoxlite's CPU kernel cannot run here")
def test_a_replaced_or_overridden_layer_runs_at_every_decode_step(checkpoint):
    """A layer replaced by another module, or by a subclass with its own forward(), is called as a module at every
    step (the planned loop steps aside), and the others still take the kernels."""
    from neoxlite.model import GPTNeoXLayer

    folder, _ = checkpoint(hidden_size=128, intermediate_size=512, vocab_size=512)
    model = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    expected = model.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            calls.append(1)
            return self.inner(*args)

    class Counted(GPTNeoXLayer):
        def forward(self, *args):
            calls.append(1)
            return super().forward(*args)

    layers = model.gpt_neox.layers
    original = layers[1]
    layers[1] = Wrapper(original)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=8, eos_token_id=[]), expected)
    assert len(calls) == 8  # the prefill and the seven decode steps
    original.__class__ = Counted
    layers[1] = original
    assert torch.equal(model.generate(PROMPT, max_new_tokens=8, eos_token_id=[]), expected)
    assert len(calls) == 16


@pytest.mark.skipif(bf16_kernel() is None, reason="neoxlite's CPU kernel cannot run here")
def test_direct_decode_step_follows_changed_weights(checkpoint):
    folder, _ = checkpoint(hidden_size=128, intermediate_size=512, vocab_size=512)
    model = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    before = model.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    dense = model.gpt_neox.layers[0].attention.dense
    dense.weight = torch.nn.Parameter(dense.weight.detach() * 3)  # a new tensor object: the step looks again
    changed = model.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    fresh = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    fresh.gpt_neox.layers[0].attention.dense.weight.data.mul_(3)
    assert torch.equal(changed, fresh.generate(PROMPT, max_new_tokens=8, eos_token_id=[]))
    assert not torch.equal(changed, before)
    model.float()  # .to() changes the data under the same objects: the cached step is dropped
    assert model.generate(PROMPT, max_new_tokens=8, eos_token_id=[]).shape == before.shape
    assert torch.equal(model.bfloat16().generate(PROMPT, max_new_tokens=8, eos_token_id=[]), changed)


@pytest.mark.skipif(bf16_kernel() is None, reason="neoxlite's CPU kernel cannot run here")
def test_direct_decode_step_follows_a_replaced_module(checkpoint):
    folder, _ = checkpoint(hidden_size=128, intermediate_size=512, vocab_size=512)
    model = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    model.generate(PROMPT, max_new_tokens=4, eos_token_id=[])  # the layers' steps are cached now
    mlp = model.gpt_neox.layers[1].mlp
    replacement = torch.nn.Linear(512, 128).to(torch.bfloat16)  # a plain nn.Linear: only the module path runs it
    replacement.load_state_dict(mlp.dense_4h_to_h.state_dict())
    mlp.dense_4h_to_h = replacement
    calls = []
    replacement.register_forward_hook(lambda *_: calls.append(1))
    model.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    assert len(calls) == 8  # the prefill and every decode step used the new module, none the cached tensors


@pytest.mark.skipif(bf16_kernel() is None, reason="neoxlite's CPU kernel cannot run here")
def test_threads_decoding_one_model_at_once_get_their_own_tokens(models):
    """The direct step reuses its kernels' output tensors at batch 1, one set per thread: two threads decoding the
    same model at the same time (the kernels release the GIL, so their steps interleave) each get the tokens they
    get alone."""
    import threading

    ours, _, _ = models
    prompts = [PROMPT[:1], PROMPT[1:]]
    alone = [ours.generate(p, max_new_tokens=24, eos_token_id=[]) for p in prompts]
    for _ in range(3):
        results: list = [None, None]

        def run(i: int, results: list = results) -> None:
            results[i] = ours.generate(prompts[i], max_new_tokens=24, eos_token_id=[])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(torch.equal(got, want) for got, want in zip(results, alone, strict=True))
