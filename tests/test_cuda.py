"""neoxlite on a CUDA GPU against transformers: fp32 numbers, fp16/bf16 noise, quantized layers against
transformers + bitsandbytes on the same GPU, heads, batched and seeded generation, moving a model.
Skipped without a GPU (tests/conftest.py); bench/gpu_check.sh runs them on a lent one."""

from __future__ import annotations

import neoxlite.quant as quant
import pytest
import torch

import neoxlite
from neoxlite import GPTNeoXForCausalLM

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.cuda

SHAPE = dict(hidden_size=128, intermediate_size=512, vocab_size=512)
PROMPT = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(PROMPT)
MASK[1, :3] = 0  # the second row is left-padded


def load(folder, arch: str = "GPTNeoXForCausalLM", **kwargs):
    return getattr(neoxlite, arch).from_pretrained(folder, device="cuda", progress=False, **kwargs)


def reference(folder, arch: str = "GPTNeoXForCausalLM", **kwargs):
    return getattr(transformers, arch).from_pretrained(folder, **kwargs).eval()


@pytest.mark.parametrize("overrides", [
    dict(use_parallel_residual=True, rotary_pct=0.25),
    dict(use_parallel_residual=False, rotary_pct=1.0, attention_bias=False, tie_word_embeddings=True),
    dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
], ids=["parallel", "sequential-tied", "dynamic-rope"])
def test_fp32_logits_and_hidden_states_equal_the_reference(checkpoint, overrides):
    folder, ref = checkpoint(**SHAPE, **overrides)
    ours = load(folder)
    assert ours.device.type == "cuda"
    with torch.no_grad():
        got = ours(PROMPT.cuda(), attention_mask=MASK.cuda(), output_hidden_states=True)
        want = ref(PROMPT, attention_mask=MASK, output_hidden_states=True)
    keep = MASK.bool()  # padded positions are not compared: what they hold is undefined in both
    for mine, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(mine.cpu()[keep], theirs[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits.cpu()[keep], want.logits[keep], atol=1e-4, rtol=0)


def test_fp32_greedy_batched_generation_equals_the_reference_and_row_by_row(checkpoint):
    folder, ref = checkpoint(**SHAPE)
    ours = load(folder)
    tokens = ours.generate(PROMPT.cuda(), attention_mask=MASK.cuda(), max_new_tokens=32, eos_token_id=[]).cpu()
    expected = ref.generate(PROMPT, attention_mask=MASK, max_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert torch.equal(tokens, expected)
    row = ours.generate(PROMPT[1:, 3:].cuda(), max_new_tokens=32, eos_token_id=[]).cpu()
    assert torch.equal(row[0], tokens[1, 3:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_is_as_accurate_as_the_reference_and_greedy_tokens_are_its_choices(checkpoint, dtype):
    folder, _ = checkpoint(**SHAPE)
    ours = load(folder, dtype=dtype)
    ref = reference(folder, dtype=dtype).cuda()
    ref32 = reference(folder, dtype=torch.float32).cuda()
    ids = PROMPT.cuda()
    with torch.no_grad():
        exact = ref32(ids).logits
        our_error = (ours(ids).logits.float() - exact).abs()
        ref_error = (ref(ids).logits.float() - exact).abs()
        assert our_error.mean() <= 1.5 * ref_error.mean(), (our_error.mean(), ref_error.mean())
        assert our_error.max() <= 2 * ref_error.max(), (our_error.max(), ref_error.max())
        tokens = ours.generate(ids, max_new_tokens=32, eos_token_id=[])
        ref_logits = ref(tokens).logits[:, ids.shape[1] - 1:-1].float()  # the reference, teacher-forced
    chosen = tokens[:, ids.shape[1]:]
    shortfall = ref_logits.amax(-1) - ref_logits.gather(-1, chosen[..., None])[..., 0]
    assert shortfall.max() <= 2 * ref_error.max()  # never worse than the reference's own rounding noise
    assert (shortfall == 0).float().mean() >= 0.9  # and almost always its exact argmax


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_quantized_layers_equal_transformers_bitsandbytes_on_the_gpu(checkpoint, mode):
    pytest.importorskip("bitsandbytes")
    from neoxlite.quant import QuantSpec

    folder, _ = checkpoint(**SHAPE)
    spec = QuantSpec.from_kwargs(quant=mode, compute_dtype=torch.float16)
    config = spec.to_config()
    bnb = transformers.BitsAndBytesConfig(**{k: v for k, v in config.items()
                                             if not k.startswith("_") and k != "quant_method"})
    ours = load(folder, dtype=torch.float16, quant=mode, compute_dtype=torch.float16)
    ref = reference(folder, dtype=torch.float16, quantization_config=bnb, device_map={"": "cuda"})
    names = sorted(n for n, m in ours.named_modules() if quant.is_quantized(m))
    assert names and names == sorted(n for n, m in ref.named_modules() if quant.is_quantized(m))
    theirs = {k: v for k, v in ref.state_dict().items() if ".layers." in k}
    mine = {k: v for k, v in ours.state_dict().items() if ".layers." in k}
    for key, value in theirs.items():  # quantized on the GPU by the same bitsandbytes calls: the same bits
        if key in mine and value.dtype in (torch.uint8, torch.int8):
            assert torch.equal(mine[key].cpu(), value.cpu()), key
    ids = PROMPT.cuda()
    with torch.no_grad():
        got, want = ours(ids).logits.float(), ref(ids).logits.float()
    span = float(want.max() - want.min())
    assert float((got - want).abs().max()) <= 0.01 * span, (float((got - want).abs().max()), span)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    tokens = ours.generate(ids, max_new_tokens=16, eos_token_id=[])
    assert tokens.shape == (2, 28) and tokens.device.type == "cuda"


@pytest.mark.parametrize("arch,field", [
    ("GPTNeoXForSequenceClassification", "logits"),
    ("GPTNeoXForTokenClassification", "logits"),
    ("GPTNeoXForQuestionAnswering", "start_logits"),
])
def test_heads_on_the_gpu_equal_the_reference(checkpoint, arch, field):
    folder, ref = checkpoint(arch, **SHAPE, pad_token_id=0)
    ours = load(folder, arch)
    ids = PROMPT.clone()
    ids[1, :3] = 0  # left padding with the pad id, where the sequence head pools the last real token
    with torch.no_grad():
        got = getattr(ours(ids.cuda(), attention_mask=MASK.cuda()), field).cpu()
        want = getattr(ref(ids, attention_mask=MASK), field)
    if arch == "GPTNeoXForSequenceClassification":
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    else:
        keep = MASK.bool()
        torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=0)


def test_seeded_sampling_on_the_gpu_repeats_and_equals_the_cpu(checkpoint):
    folder, _ = checkpoint(**SHAPE)
    gpu, cpu = load(folder), GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    kwargs = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=24, seed=7, eos_token_id=[])
    first = gpu.generate(PROMPT, **kwargs)
    assert first.device.type == "cpu"  # returned where the prompt was, as transformers does
    assert torch.equal(gpu.generate(PROMPT, **kwargs), first)
    # the seed's generator draws on the CPU, so the same probabilities give the same tokens on both devices
    assert torch.equal(cpu.generate(PROMPT, **kwargs), first)
    unseeded = gpu.generate(PROMPT.cuda(), **{**kwargs, "seed": None})
    assert unseeded.device.type == "cuda" and unseeded.shape == first.shape


def test_moving_a_model_to_the_gpu_and_back(checkpoint):
    folder, ref = checkpoint(**SHAPE)
    model = GPTNeoXForCausalLM.from_pretrained(folder, progress=False).cuda()
    assert model.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT.cuda()).logits.cpu(), ref(PROMPT).logits, atol=1e-4, rtol=0)
    half = load(folder, dtype="fp16")
    assert half.device.type == "cuda" and half.dtype == torch.float16
    assert half.generate(PROMPT, max_new_tokens=4).shape == (2, 16)
    back = model.to("cpu")
    with torch.no_grad():
        torch.testing.assert_close(back(PROMPT).logits, ref(PROMPT).logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ captured decode (issue 17)
SAMPLING = {
    "greedy": dict(do_sample=False),
    "seeded": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=5),
}


@pytest.mark.parametrize("mode", [None, "nf4", "int8"], ids=["fp16", "nf4", "int8"])
@pytest.mark.parametrize("batch", [1, 4])
def test_the_captured_step_gives_the_eager_steps_tokens(checkpoint, mode, batch):
    from neoxlite import cuda_graphs

    folder, _ = checkpoint(**SHAPE, max_position_embeddings=1024)
    # int8 without an outlier threshold: with one, bitsandbytes reads back and the step stays eager (below)
    quant_kwargs = dict(quant=mode, compute_dtype=torch.float16, int8_threshold=0.0) if mode else {}
    model = load(folder, dtype=torch.float16, **quant_kwargs)
    ids, mask = PROMPT.repeat(2, 1)[:batch].cuda(), MASK.repeat(2, 1)[:batch].cuda()
    # a second length (250 new tokens): another cache length, another capture
    for name, new in (("greedy", 20), ("seeded", 20), ("greedy", 250)):
        run = dict(attention_mask=mask, max_new_tokens=new, eos_token_id=[], **SAMPLING[name])
        eager = model.generate(ids, cuda_graphs=False, **run)
        assert torch.equal(model.generate(ids, **run), eager), (name, new)
        assert torch.equal(model.generate(ids, **run), eager), (name, new)  # reused, its cache emptied
    status = cuda_graphs.describe(model)
    assert status.count("captured in") == 2, status  # lengths 32 and 262: caches of 256 and 512


def test_int8_with_an_outlier_threshold_runs_eagerly_and_says_why(checkpoint):
    from neoxlite import cuda_graphs

    folder, _ = checkpoint(**SHAPE)
    model = load(folder, dtype=torch.float16, quant="int8", compute_dtype=torch.float16)
    eager = model.generate(PROMPT.cuda(), max_new_tokens=12, eos_token_id=[], cuda_graphs=False)
    assert torch.equal(model.generate(PROMPT.cuda(), max_new_tokens=12, eos_token_id=[]), eager)
    assert "argwhere" in cuda_graphs.describe(model)


def test_the_keyword_and_the_environment_turn_capture_off(checkpoint, monkeypatch):
    from neoxlite import cuda_graphs

    folder, _ = checkpoint(**SHAPE)
    model = load(folder, dtype=torch.float16)
    model.generate(PROMPT.cuda(), max_new_tokens=4, cuda_graphs=False)
    monkeypatch.setenv("NEOXLITE_CUDA_GRAPHS", "0")
    model.generate(PROMPT.cuda(), max_new_tokens=4)
    assert cuda_graphs.describe(model) == "no decode step captured"
    monkeypatch.delenv("NEOXLITE_CUDA_GRAPHS")
    model.generate(PROMPT.cuda(), max_new_tokens=4)
    assert "captured in" in cuda_graphs.describe(model)


def test_captured_steps_free_their_memory_with_the_model(checkpoint):
    import gc

    from neoxlite import cuda_graphs

    folder, _ = checkpoint(**SHAPE)

    def load_capture_and_drop() -> None:
        model = load(folder, dtype=torch.float16)
        model.generate(PROMPT.cuda(), max_new_tokens=8)
        assert "captured in" in cuda_graphs.describe(model)
        half = model.to(torch.float32)  # moving a model drops its captured steps (they hold the old addresses)
        assert cuda_graphs.describe(half) == "no decode step captured"
        half.generate(PROMPT.cuda(), max_new_tokens=8)
        del model, half

    load_capture_and_drop()  # the first round leaves what stays for good (cuBLAS workspaces of the streams used)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    load_capture_and_drop()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
