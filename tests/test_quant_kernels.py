"""neoxlite's quantized CPU kernels (neoxlite/csrc/linear_quant.c) against bitsandbytes' own CPU path: each kernel
on many shapes, rows, dtypes, both ISAs and 1-2 threads; the layers that use them (decode rows only, prefill and
GELU, offload rebuilds); whole models' greedy tokens against transformers + bitsandbytes; the fallbacks."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import neoxlite.quant as quant
import pytest
import torch
import torch.nn.functional as F
from neoxlite.quant import QuantSpec

import neoxlite
import neoxlite.cpu_kernels
from neoxlite.cpu_kernels import QuantKernel, kernel_status, quant_kernel

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

KERNEL = quant_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no quantized CPU kernel here: {kernel_status()}")
ISA_NAMES = {1: "avx2", 2: "avx512"}
AMX = 3  # the AVX512 kernels with 4-bit layers in bf16 on AMX tiles (QuantKernel.amx_4bit)
ISAS = [pytest.param(isa, id=name, marks=pytest.mark.skipif(
    KERNEL is None or KERNEL.isa < isa, reason=f"this CPU lacks {name} (or has no kernel): {kernel_status()}"))
    for isa, name in ISA_NAMES.items()] + [pytest.param(AMX, id="amx", marks=pytest.mark.skipif(
        KERNEL is None or not KERNEL.amx_4bit, reason=f"no AMX kernel here: {kernel_status()}"))]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}  # one rounding, relative


def kernel(isa: int) -> QuantKernel:
    if isa == AMX:  # the tiles at every row count (int8: from two rows)
        return QuantKernel(KERNEL.library, 2, amx_4bit=True, vector_rows_4bit=0, amx_int8=KERNEL.amx_int8)
    return QuantKernel(KERNEL.library, isa)


def threads(n: int):
    """torch's (and so the kernel's OpenMP) thread count inside a with block."""
    class Threads:
        def __enter__(self):
            self.previous = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.previous)
    return Threads()


def assert_sum_order_only(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got differs from want only by the order of fp32 sums: within the fp32 error bound of both sums plus one
    rounding to the dtype, and in bf16/fp16 equal except where the sums straddle a rounding boundary."""
    slack = 2 * x.shape[-1] * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    allowed = want.double().abs() * 2 * ULP[got.dtype] + slack + 1e-30
    assert got.dtype == want.dtype and got.shape == want.shape
    assert ((got.double() - want.double()).abs() <= allowed).all()
    if got.dtype is not torch.float32:
        assert (got != want).float().mean() <= 0.05


def layer_4bit(mode: str, double_quant: bool, dtype: torch.dtype, n: int, k: int, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    spec = QuantSpec.from_kwargs(quant=mode, double_quant=double_quant, compute_dtype=dtype)
    return quant.quantize_linear(w, b, spec, "cpu")


# the last two: rows of 21 and 32 blocks (the AVX512 loop decodes double-quantized scales 16 blocks at a time, and
# takes blocks in pairs: 21 leaves a short run and a last odd block), and runs that cross a group of 256 blocks
SHAPES_4BIT = [(1, 13, 64), (3, 33, 192), (4, 8, 128), (5, 64, 64), (17, 7, 320), (32, 130, 256), (1, 262, 128),
               (2, 23, 1344), (3, 17, 2048)]


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n,k", SHAPES_4BIT)
def test_4bit_kernel_is_bitsandbytes_dequantize_and_matmul(isa, mode, double_quant, dtype, rows, n, k):
    layer = layer_4bit(mode, double_quant, dtype, n, k, bias=rows % 2 == 1, seed=rows + n + k)
    qs = layer.weight.quant_state
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    want = bnb.matmul_4bit(x, layer.weight, bias=layer.bias, quant_state=qs)  # bitsandbytes' generic CPU path
    weight = bnb.functional.dequantize_4bit(layer.weight.data, qs).to(dtype)
    assert torch.equal(F.linear(x, weight, layer.bias), want)  # which is: dequantize to the dtype, then matmul
    args = layer._prepare_kernel()
    for count in (1, 2):
        with threads(count):
            got = kernel(isa).linear_4bit(x, *args, layer.bias)
        assert_sum_order_only(got, want, x, weight)
    if dtype is not torch.float32:  # the dequantized weight itself is exact: bf16/fp16 products are exact in fp32
        eye = torch.eye(k, dtype=dtype)
        assert torch.equal(kernel(isa).linear_4bit(eye, *args, None), weight.T)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_4bit_weights_round_ties_to_even(isa, dtype):
    """Scales whose products with the codes 1.0 and -1.0 fall exactly halfway between two bf16 (and fp16) values,
    with an even and an odd lower neighbour: each weight is table * scale rounded to nearest even, as PyTorch's
    conversion (and so bitsandbytes' dequantize) rounds it."""
    table = bnb.functional.get_4bit_type("nf4", device="cpu").float()
    assert table[15] == 1.0 and table[0] == -1.0
    ulp = 2.0**-7 if dtype is torch.bfloat16 else 2.0**-10  # their spacing in [1, 2)
    absmax = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, 2 - ulp / 2, 0.75 + ulp / 4], dtype=torch.float32)
    codes = torch.full((len(absmax) * 32,), 0xF0, dtype=torch.uint8)  # each byte: 1.0 (high nibble), -1.0
    x = torch.eye(64, dtype=dtype)
    got = kernel(isa).linear_4bit(x, codes, len(absmax), table, absmax, None, None)
    signs = torch.tensor([1.0, -1.0]).repeat(32)
    want = (signs[None, :] * absmax[:, None]).to(dtype)  # (rows, 64): table[index] * scale in the dtype
    assert torch.equal(got, want.T)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_4bit_weights_keep_subnormal_products(isa, mode):
    """Scales whose products with the code are subnormal in fp32 (or at its edge), zero or huge, beside ordinary
    ones (one block per weight row): each weight is PyTorch's bf16 rounding of table * scale, subnormal weights
    included (bf16 conversion instructions, vcvtne2ps2bf16 for one, read subnormal inputs as zero and would differ).
    The AMX tiles read subnormal bf16 as zero: there those weights come out zero."""
    table = bnb.functional.get_4bit_type(mode, device="cpu").float()
    tiny = torch.finfo(torch.float32).tiny
    odd = [1e-39, 2.0**-140, tiny, tiny / table[table != 0].abs().min() * 1.01, 1e-30, 0.0, -0.0, 3e38, 1e-36]
    gen = torch.Generator().manual_seed(1)
    ordinary = (torch.rand(16 * 3, generator=gen) + 0.5).tolist()
    absmax = torch.tensor(ordinary[:16] + odd + ordinary[16:23] + ordinary[23:], dtype=torch.float32)
    codes = torch.randint(0, 256, (len(absmax) * 32,), dtype=torch.uint8, generator=gen)
    x = torch.eye(64, dtype=torch.bfloat16)
    got = kernel(isa).linear_4bit(x, codes, len(absmax), table, absmax, None, None)
    index = torch.stack([codes >> 4, codes & 15], -1).reshape(len(absmax), 64).long()
    want = (table[index] * absmax[:, None]).to(torch.bfloat16)  # (rows, 64): bitsandbytes' dequantized weight
    subnormal = (want != 0) & (want.float().abs() < tiny)
    assert subnormal.any()
    assert torch.equal(got.T, want.masked_fill(subnormal, 0) if isa == AMX else want)


def layer_int8(dtype: torch.dtype, n: int, k: int, bias: bool, threshold: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return quant.quantize_linear(w, b, QuantSpec.from_kwargs(quant="int8", int8_threshold=threshold), "cpu")


SHAPES_INT8 = [(1, 13, 7), (2, 33, 100), (4, 8, 64), (5, 64, 129), (9, 7, 1000), (32, 130, 96)]


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("rows,n,k", SHAPES_INT8)
def test_int8_kernel_is_bitsandbytes_forward_bit_for_bit(isa, dtype, threshold, rows, n, k, monkeypatch):
    layer = layer_int8(dtype, n, k, bias=rows % 2 == 0, threshold=threshold, seed=rows + n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k)).to(dtype) * 2
    x[0, k // 2] = 9.0  # an outlier column (threshold 6); other rows have values there too
    if rows > 2:
        x[2, k // 3] = -7.5
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", False)
    with torch.no_grad():
        want = layer(x)  # bitsandbytes' MatMul8bitLt: quantized activations, outliers in the input dtype
    weight, scb = layer.weight.data, layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    bias = None if layer.bias is None else layer.bias.data.to(dtype)
    for count in (1, 2):
        with threads(count):
            got = kernel(isa).linear_int8(x, weight, scb, threshold, bias)
        # the int8 sums are exact in both (bitsandbytes sums them in fp32, exact below 2^24); all else is the
        # same operations in the same order, except the fp32 sum of the outlier products (addmm's own order)
        assert got.dtype == dtype
        if dtype is torch.float32 and threshold:
            torch.testing.assert_close(got, want, rtol=2.0**-21, atol=1e-6)
        else:
            assert torch.equal(got, want)


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU in float64, rounded once to x's dtype: the reference both neoxlite's and PyTorch's GELU approach.
    (PyTorch's own GELU is no fixed reference: its erf polynomial and its handling of float32 subnormals differ
    between its AVX2 and AVX512 builds, so comparing bits with it passes on one CPU and fails on another.)"""
    wide = x.double()
    return (0.5 * wide * (1 + torch.special.erf(wide * 0.5**0.5))).to(x.dtype)


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in the order of their values, so neighbouring values differ by one."""
    bits = x.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_close_to_exact_gelu(got: torch.Tensor, x: torch.Tensor, flushes_subnormals: bool = False) -> None:
    want = exact_gelu(x)
    # float32's 1 + erf(x) loses erf's error times |x| where GELU(x) is tiny (x < -3), PyTorch's formula too
    cancelled = (got.float() - want.float()).abs() <= 2e-7 * x.float().abs()
    if x.dtype is torch.float32:
        close = (got - want).abs() <= 2.0**-22 * want.abs()
    else:  # one step of the 16-bit type at most
        close = (ordered_bits(got) - ordered_bits(want)).abs() <= 1
    if flushes_subnormals:  # bf16 conversions with FTZ (vcvtneps2bf16) write results below 2^-126 as zero
        close |= (got == 0) & (want.float().abs() <= torch.finfo(torch.float32).tiny)
    assert (close | cancelled).all(), x[~(close | cancelled)]


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_gelu_is_gelu_of_the_rounded_result(isa, dtype):
    layer4, layer8 = layer_4bit("nf4", True, dtype, 40, 128, True, 1), layer_int8(dtype, 40, 128, True, 6.0, 1)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    k = kernel(isa)
    scb = layer8.weight.SCB if layer8.weight.SCB is not None else layer8.state.SCB
    for run in (lambda gelu: k.linear_4bit(x, *layer4._prepare_kernel(), layer4.bias.data, gelu=gelu),
                lambda gelu: k.linear_int8(x, layer8.weight.data, scb, 6.0, layer8.bias.data.to(dtype), gelu=gelu)):
        plain, fused = run(False), run(True)
        assert_close_to_exact_gelu(fused, plain)


@needs_kernel
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_layers_use_the_kernel_for_decode_rows_only(mode, monkeypatch):
    layer = layer_4bit(mode, True, torch.bfloat16, 64, 128, True, 0) if mode != "int8" else \
        layer_int8(torch.bfloat16, 64, 128, True, 6.0, 0)
    calls = []
    name = "linear_int8" if mode == "int8" else "linear_4bit"
    original = getattr(QuantKernel, name)
    monkeypatch.setattr(QuantKernel, name, lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    limit = KERNEL.max_rows if mode == "int8" else KERNEL.rows_4bit(torch.bfloat16)
    x = torch.randn(2, limit // 2 + 4, 128).bfloat16()  # more rows than the kernel takes: a prefill
    with torch.no_grad():
        prefill = layer(x)
        assert not calls
        decode = layer(x[:, -1:])
        assert len(calls) == 1
        assert_sum_order_only(decode.float(), prefill[:, -1:].float(), x[:, -1:].float(), torch.ones(64, 128))
        gelu = layer.forward_gelu(x[:, -1:])
        assert len(calls) == 2
        assert_close_to_exact_gelu(gelu, decode)
    layer(x[:, -1:].requires_grad_())  # autograd: bitsandbytes' forward
    assert len(calls) == 2
    if mode != "int8":  # never repacked for bitsandbytes' AVX512-BF16 kernel: what is saved stays the input
        assert not layer.cpu_packed


@needs_kernel
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_decode_call_is_the_layers_forward_and_keeps_its_weight(mode):
    """decode_call binds the weight's pointers once: the bound call must give forward()'s bits, for any batch and
    a non-contiguous input, and keep the tensors it points into alive after the layer is gone."""
    layer = layer_4bit(mode, True, torch.bfloat16, 64, 128, True, 0) if mode != "int8" else \
        layer_int8(torch.bfloat16, 64, 128, True, 6.0, 0)
    call = layer.decode_call(torch.bfloat16, gelu=True)
    x = torch.randn(128, 3).bfloat16().T.unsqueeze(1)  # (3, 1, 128), not contiguous
    with torch.no_grad():
        want = layer.forward_gelu(x.contiguous())
    del layer
    gc.collect()
    torch.randn(64, 128).bfloat16()  # memory a freed weight would have given back
    assert torch.equal(call(x), want)
    assert torch.equal(call(x[1:2]), want[1:2])


@needs_kernel
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_offloaded_layers_are_rebuilt_with_the_kernel_forward(mode, monkeypatch):
    """The offload scheduler moves a quantized layer as quantized_state() and rebuilds it with
    load_quantized_linear (RAM and disk tiers alike): the rebuilt layer runs the same kernel."""
    layer = layer_4bit(mode, True, torch.bfloat16, 64, 128, True, 0) if mode != "int8" else \
        layer_int8(torch.bfloat16, 64, 128, True, 6.0, 0)
    spec = QuantSpec.from_kwargs(quant=mode, compute_dtype=torch.bfloat16)
    rebuilt = quant.load_quantized_linear(quant.quantized_state(layer), spec, "cpu")
    assert type(rebuilt) is type(layer)
    calls = []
    name = "linear_int8" if mode == "int8" else "linear_4bit"
    original = getattr(QuantKernel, name)
    monkeypatch.setattr(QuantKernel, name, lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    x = torch.randn(1, 1, 128).bfloat16()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), layer(x)) and len(calls) == 2


@pytest.fixture(scope="module", params=["nf4", "fp4", "int8"])
def quantized_models(request, checkpoint):
    """(mode, neoxlite bf16 model quantized by `mode`, transformers + bitsandbytes' with the same settings,
    transformers' fp32 model unquantized)."""
    folder, _ = checkpoint(hidden_size=128, intermediate_size=512, vocab_size=512)
    mode = request.param
    spec = QuantSpec.from_kwargs(quant=mode, compute_dtype=torch.bfloat16)
    config = {k: v for k, v in spec.to_config().items() if not k.startswith("_") and k != "quant_method"}
    ref = transformers.GPTNeoXForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(**config)
    ).eval()
    ref32 = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False, dtype=torch.bfloat16, quant=mode,
                                                       compute_dtype=torch.bfloat16)
    return mode, ours, ref, ref32


PROMPT = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(1))


@needs_kernel
def test_quantized_model_is_as_accurate_as_bitsandbytes_and_greedy_tokens_are_its_choices(quantized_models):
    """With the kernels only the order of fp32 sums changes (int8: not even that, the int8 sums are exact), so the
    logits are as far from the fp32 model as transformers + bitsandbytes' own, and each greedy token is its
    choice up to a near-tie (as in tests/test_bf16.py)."""
    mode, ours, ref, ref32 = quantized_models
    with torch.no_grad():
        exact = ref32(PROMPT).logits
        our_error = (ours(PROMPT).logits.float() - exact).abs()  # 24 rows: the kernels compute the prefill
        ref_error = (ref(PROMPT).logits.float() - exact).abs()
        assert our_error.mean() <= 1.1 * ref_error.mean()
        assert our_error.max() <= 1.25 * ref_error.max()
        tokens = ours.generate(PROMPT, max_new_tokens=16, eos_token_id=[])
        ref_logits = ref(tokens).logits[:, PROMPT.shape[1] - 1:-1].float()  # the reference, teacher-forced
        expected = ref.generate(PROMPT, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    chosen = tokens[:, PROMPT.shape[1]:]
    shortfall = ref_logits.amax(-1) - ref_logits.gather(-1, chosen[..., None])[..., 0]
    print(f"\n{mode}: logit error vs fp32 mean {our_error.mean():.4f} (transformers+bnb {ref_error.mean():.4f}), "
          f"max {our_error.max():.3f} ({ref_error.max():.3f}); greedy tokens equal: {torch.equal(tokens, expected)}")
    assert shortfall.max() <= 2 * ref_error.max()
    assert (shortfall == 0).float().mean() >= 0.9


@needs_kernel
def test_direct_decode_step_runs_quantized_layers_with_the_module_path_bits(quantized_models, monkeypatch):
    """neoxlite.cpu_step.decode_step calls the quantized kernels directly (no module calls): the same bits as
    forward()'s module path."""
    import neoxlite.cpu_step

    _, ours, _, _ = quantized_models
    direct = ours.generate(PROMPT[:1], max_new_tokens=8, eos_token_id=[])
    calls = []
    step = neoxlite.cpu_step.decode_step
    monkeypatch.setattr(neoxlite.cpu_step, "decode_step", lambda *a: calls.append(1) or step(*a))
    assert torch.equal(ours.generate(PROMPT[:1], max_new_tokens=8, eos_token_id=[]), direct)
    assert len(calls) == 7 * ours.config.num_hidden_layers
    monkeypatch.setattr(neoxlite.cpu_step, "decode_plan", lambda *a: None)  # each layer's forward() decides
    assert torch.equal(ours.generate(PROMPT[:1], max_new_tokens=8, eos_token_id=[]), direct)
    assert len(calls) == 2 * 7 * ours.config.num_hidden_layers
    monkeypatch.setattr(neoxlite.cpu_step, "decode_kernel", lambda self, x, kv: None)
    assert torch.equal(ours.generate(PROMPT[:1], max_new_tokens=8, eos_token_id=[]), direct)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_gelu_is_within_a_step_of_exact_on_every_16_bit_value(isa, dtype):
    """An nf4 identity weight (codes 1.0 and 0.0, scale 1) passes each bf16 or float16 value through exactly, so
    the fused GELU meets every value an activation can take: within one step of the exact GELU everywhere, and
    off it no more often than PyTorch's own GELU on this CPU. The AMX tiles read subnormal bf16 inputs as zero
    (below 1.2e-38, as every bf16 dot-product instruction does): there those inputs are zero."""
    eye = torch.eye(64)
    layer = quant.quantize_linear(eye.to(dtype), None, QuantSpec.from_kwargs(quant="nf4", double_quant=False,
                                                                            compute_dtype=dtype), "cpu")
    values = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 32, 64)
    values = values[~values.isnan().any(-1).any(-1)]  # NaN's payload is not kept bit for bit
    args = layer._prepare_kernel()
    ours_off = torchs_off = 0
    flushes = isa == AMX and dtype is torch.bfloat16
    for block in values:
        if flushes:
            block = torch.where(block.float().abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(block), block)
        assert torch.equal(kernel(isa).linear_4bit(block, *args, None), block)
        fused, want = kernel(isa).linear_4bit(block, *args, None, gelu=True), exact_gelu(block)
        assert_close_to_exact_gelu(fused, block, flushes)
        finite = want.isfinite()
        ours_off += int((fused != want)[finite].sum())
        torchs_off += int((F.gelu(block) != want)[finite].sum())
    assert ours_off <= torchs_off, (ours_off, torchs_off)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 50), (3, 64), (64, 1001), (130, 256)], ids=str)
def test_int8_quantizer_gives_bitsandbytes_bits(dtype, shape):
    """Loading quantizes int8 weights with neoxlite's kernel: the bits of bitsandbytes' own quantizer."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype) * 0.05
    w[1] = 0  # an all-zero row
    w[2, 7] = 3.0  # a row with one large value
    want, want_scales, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    got, got_scales = KERNEL.quantize_int8(w)
    assert torch.equal(got, want) and torch.equal(got_scales, want_scales)
    layer = quant.quantize_linear(w, None, QuantSpec("int8"), "cpu")
    assert torch.equal(layer.weight.data, want)
    if dtype is torch.float32:  # beyond float16's range: PyTorch's arithmetic, as bitsandbytes' (inf and NaN)
        w[0, 0] = 1e6
        assert KERNEL.quantize_int8(w) is None
        want, _, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        assert torch.equal(quant.quantize_linear(w, None, QuantSpec("int8"), "cpu").weight.data, want)


FALLBACK = """
import torch
from neoxlite.cpu_kernels import kernel_status, quant_kernel
from neoxlite.quant import QuantSpec, quantize_linear
print(kernel_status())
print(quant_kernel() is None)
layer = quantize_linear(torch.randn(8, 64).bfloat16(), None, QuantSpec.from_kwargs(quant="nf4"), "cpu")
with torch.no_grad():
    print(layer(torch.ones(1, 64).bfloat16()).shape)
"""


@pytest.mark.parametrize("env,reason", [
    ({"NEOXLITE_CPU_KERNELS": "0"}, "CPU kernels off (NEOXLITE_CPU_KERNELS=0)"),
    ({"CC": "/nonexistent/cc", "PATH": "/nonexistent"}, "no C compiler"),
])
def test_without_a_kernel_bitsandbytes_computes(tmp_path, env, reason):
    done = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NEOXLITE_CACHE": str(tmp_path / "cache"), **env})
    assert done.returncode == 0, done.stderr
    status, missing, shape = done.stdout.splitlines()
    assert reason in status and "bitsandbytes' quantized linears" in status
    assert missing == "True" and shape == "torch.Size([1, 8])"


@needs_kernel
@pytest.mark.skipif(KERNEL is None or not KERNEL.amx_4bit, reason=f"no AMX kernel here: {kernel_status()}")
def test_amx_takes_4bit_bf16_rows_above_the_vector_crossover_and_every_batch_of_independent_rows():
    """The vector kernel reads one row from memory faster; from vector_rows_4bit + 1 rows the tiles take over. Rows
    of independent sequences (any_rows) take the tiles at every batch, so a row gets the bits it gets alone."""
    # Each weight row is its first half twice and each input its first half then minus it: every sum is zero
    # exactly, and what is left is the rounding of the order in which an engine adds, different in each engine.
    gen = torch.Generator().manual_seed(3)
    half = torch.randn(96, 2048, generator=gen) * 0.1
    layer = quant.quantize_linear(torch.cat([half, half], 1).bfloat16(), None, QuantSpec.from_kwargs(
        quant="nf4", compute_dtype=torch.bfloat16), "cpu")
    args = layer._prepare_kernel()
    split = QuantKernel(KERNEL.library, 2, amx_4bit=True, vector_rows_4bit=2)
    vector, tiles = kernel(2).bind_4bit(*args, None, torch.bfloat16), kernel(AMX).bind_4bit(*args, None, torch.bfloat16)
    chosen, rows = split.bind_4bit(*args, None, torch.bfloat16), split.bind_4bit(*args, None, torch.bfloat16,
                                                                               any_rows=True)
    r = torch.randn(5, 2048, generator=gen)
    x = torch.cat([r, -r], 1).bfloat16()
    assert not torch.equal(vector(x), tiles(x))  # the engines tell apart
    assert torch.equal(chosen(x[:2]), vector(x[:2])) and torch.equal(chosen(x[:3]), tiles(x[:3]))
    batch = rows(x)
    assert torch.equal(batch, tiles(x)) and all(torch.equal(rows(x[i:i + 1])[0], batch[i]) for i in range(5))


@needs_kernel
@pytest.mark.skipif(KERNEL is None or not KERNEL.amx_int8, reason=f"no AMX-INT8 kernel here: {kernel_status()}")
@pytest.mark.parametrize("rows,n,k,threshold", [(2, 16, 64, 0.0), (3, 50, 128, 6.0), (17, 33, 256, 6.0),
                                                (40, 100, 192, 0.0), (33, 70, 1000, 6.0), (5, 2048, 1024, 6.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amx_int8_sums_are_the_vector_loops_bits(rows, n, k, threshold, dtype):
    """The tiles form the same exact int32 sums as the AVX512 loops, outlier columns and roundings included (k not a
    multiple of 64: the loops themselves)."""
    layer = layer_int8(dtype, n, k, True, threshold, 1)
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype) * 2
    x[:, 3] = 9.0  # an outlier column where the threshold is set
    args = (layer.weight.data, scb, threshold, layer.bias.data.to(dtype))
    for gelu in (False, True):
        assert torch.equal(kernel(AMX).linear_int8(x, *args, gelu=gelu), kernel(2).linear_int8(x, *args, gelu=gelu))


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_no_rows_give_an_empty_result(isa):
    """An empty batch computes nothing, in every engine (the AMX ones once divided by a tile width of zero rows)."""
    layer4, layer8 = layer_4bit("nf4", True, torch.bfloat16, 32, 128, True, 0), layer_int8(torch.bfloat16, 32, 128,
                                                                                             True, 6.0, 0)
    scb = layer8.weight.SCB if layer8.weight.SCB is not None else layer8.state.SCB
    x = torch.empty(0, 128).bfloat16()
    assert kernel(isa).linear_4bit(x, *layer4._prepare_kernel(), layer4.bias.data).shape == (0, 32)
    assert kernel(isa).linear_int8(x, layer8.weight.data, scb, 6.0, layer8.bias.data).shape == (0, 32)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_bound_calls_write_into_out(isa):
    """The bound calls the decode step makes (bind_4bit, bind_int8) write into `out` when given: the same bits as a
    call that allocates, in the tensor given, at one row (the vector loops) and at several (AMX tiles, if any)."""
    layer4, layer8 = layer_4bit("nf4", True, torch.bfloat16, 40, 128, True, 2), layer_int8(torch.bfloat16, 40, 128,
                                                                                             True, 6.0, 2)
    scb = layer8.weight.SCB if layer8.weight.SCB is not None else layer8.state.SCB
    k = kernel(isa)
    calls = (k.bind_4bit(*layer4._prepare_kernel(), layer4.bias.data, torch.bfloat16),
             k.bind_int8(layer8.weight.data, scb, 6.0, layer8.bias.data.to(torch.bfloat16), torch.bfloat16))
    for rows in (1, 6):
        x = torch.randn(rows, 1, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
        for call in calls:
            out = torch.empty(rows, 1, 40, dtype=torch.bfloat16)
            got = call(x, out=out)
            assert got is out and torch.equal(got, call(x))
