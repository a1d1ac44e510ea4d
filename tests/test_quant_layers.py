"""quant/: QuantSpec validation and config form, and bitsandbytes layers equal to the ones transformers builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import neoxlite.quant as quant
import pytest
import torch
from neoxlite.quant import QuantSpec
from safetensors.torch import load_file, save_file

import neoxlite.cpu_kernels

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from transformers import BitsAndBytesConfig  # noqa: E402
from transformers.integrations.bitsandbytes import replace_with_bnb_linear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT, IN = 96, 128  # out_features % 32 == 0 and in_features % 64 == 0: bitsandbytes' AVX512 CPU path applies
MODES_4BIT = ("nf4", "fp4")


def bnb_config(spec: QuantSpec) -> BitsAndBytesConfig:
    """transformers' config for the same settings."""
    return BitsAndBytesConfig(
        load_in_4bit=spec.is_4bit,
        load_in_8bit=spec.mode == "int8",
        llm_int8_threshold=spec.int8_threshold,
        llm_int8_skip_modules=list(spec.skip_modules),
        bnb_4bit_quant_type=spec.mode if spec.is_4bit else "fp4",
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=spec.compute_dtype,
    )


def transformers_layer(weight, bias, spec: QuantSpec) -> torch.nn.Module:
    """A bitsandbytes layer built the way transformers builds it: replace_with_bnb_linear on the meta device,
    then the weight set as in Bnb4bitQuantize / Bnb8bitQuantize.convert (integrations/bitsandbytes.py)."""
    holder = torch.nn.Module()
    with torch.device("meta"):
        holder.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    holder = replace_with_bnb_linear(holder, modules_to_not_convert=[], quantization_config=bnb_config(spec))
    layer = holder.lin
    old = layer.weight
    if spec.is_4bit:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **old.__dict__).to(weight.device)
    else:
        kwargs = dict(old.__dict__)
        kwargs.pop("SCB", None)
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, **kwargs).to(weight.device)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer.eval()


def weights(dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(OUT, IN, generator=g) * 0.05).to(dtype)
    b = (torch.randn(OUT, generator=g) * 0.1).to(dtype)
    x = torch.randn(3, 5, IN, generator=g).to(dtype)
    x[..., 7] *= 20  # an outlier feature column above the int8 threshold
    return w, b, x


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dim() else torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------- QuantSpec


def test_spec_defaults():
    spec = QuantSpec()
    assert spec.mode == "none" and not spec.enabled
    assert spec.compute_dtype == torch.float16 and spec.double_quant and spec.int8_threshold == 6.0
    assert spec.skip_modules == ("embed_in", "embed_out", "lm_head", "score", "classifier", "qa_outputs")
    assert QuantSpec.from_kwargs() == spec
    assert QuantSpec.from_kwargs(quant=None).mode == "none"


def test_spec_from_kwargs_normalizes():
    spec = QuantSpec.from_kwargs(quant="NF4", compute_dtype="bf16", double_quant=False, skip_modules=["embed_out"])
    assert (spec.mode, spec.compute_dtype, spec.double_quant, spec.skip_modules) == (
        "nf4",
        torch.bfloat16,
        False,
        ("embed_out",),
    )
    assert QuantSpec.from_kwargs(quant="int8", compute_dtype=torch.float32).compute_dtype == torch.float32


def test_spec_quantizes_module_names():
    spec = QuantSpec("nf4")
    assert spec.quantizes("gpt_neox.layers.0.attention.query_key_value")
    assert spec.quantizes("gpt_neox.layers.11.mlp.dense_4h_to_h")
    for name in ("embed_out", "lm_head", "score", "classifier", "qa_outputs"):
        assert not spec.quantizes(name)
    assert not QuantSpec("nf4", skip_modules=("lm_head",)).quantizes("embed_out")  # transformers 5's name for it
    assert not QuantSpec("nf4", skip_modules=("embed_out",)).quantizes("lm_head")
    only_layer1 = QuantSpec("nf4", skip_modules=("gpt_neox.layers.1",))
    assert not only_layer1.quantizes("gpt_neox.layers.1.mlp.dense_h_to_4h")
    assert only_layer1.quantizes("gpt_neox.layers.11.mlp.dense_h_to_4h")
    assert not QuantSpec().quantizes("gpt_neox.layers.0.attention.dense")


@pytest.mark.parametrize("bad", ["nf5", "int4", "8bit", ""])
def test_spec_unknown_mode(bad):
    with pytest.raises(ValueError, match=rf"unknown quant mode {bad!r}.*'int8', 'nf4', 'fp4'"):
        QuantSpec.from_kwargs(quant=bad)


@pytest.mark.parametrize("bad", [torch.float64, torch.int8, torch.float8_e4m3fn, "float64", "fp8"])
def test_spec_compute_dtype_bnb_cannot_use(bad):
    with pytest.raises(ValueError, match=r"cannot be used by bitsandbytes; use one of float16, bfloat16, float32"):
        QuantSpec.from_kwargs(quant="nf4", compute_dtype=bad)


def test_spec_type_errors():
    with pytest.raises(TypeError, match="compute_dtype"):
        QuantSpec.from_kwargs(quant="nf4", compute_dtype=16)
    with pytest.raises(TypeError, match="quant must be"):
        QuantSpec.from_kwargs(quant=4)
    with pytest.raises(TypeError, match="double_quant"):
        QuantSpec.from_kwargs(quant="nf4", double_quant="yes")
    with pytest.raises(ValueError, match="int8_threshold"):
        QuantSpec.from_kwargs(quant="int8", int8_threshold=-1)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("nf4"),
        QuantSpec("fp4", compute_dtype=torch.bfloat16, double_quant=False),
        QuantSpec("nf4", compute_dtype=torch.float32, skip_modules=("embed_out", "gpt_neox.layers.0")),
        QuantSpec("int8"),
        QuantSpec("int8", int8_threshold=0.0, double_quant=False, compute_dtype=torch.float32),
    ],
    ids=str,
)
def test_spec_to_config_is_transformers_dict(spec):
    config = spec.to_config()
    assert config == bnb_config(spec).to_dict()
    assert QuantSpec.from_config(config) == spec
    # what transformers reads back from config.json
    assert BitsAndBytesConfig.from_dict(config).to_dict() == config


def test_spec_from_transformers_defaults():
    spec = QuantSpec.from_config(BitsAndBytesConfig(load_in_4bit=True).to_dict())
    assert (spec.mode, spec.compute_dtype, spec.double_quant) == ("fp4", torch.float32, False)
    minimal = QuantSpec.from_config({"quant_method": "bitsandbytes", "load_in_8bit": True})
    assert minimal.mode == "int8" and minimal.skip_modules == quant.DEFAULT_SKIP_MODULES


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
        ({"quant_method": "bitsandbytes"}, "neither load_in_8bit nor load_in_4bit"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": True}, "both"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf3"}, "'nf3'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"}, "int8"),
    ],
)
def test_spec_from_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec.from_config(config)


def test_import_quant_does_not_import_bitsandbytes():
    code = "import sys, neoxlite.quant as quant; quant.QuantSpec('nf4'); assert 'bitsandbytes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------------------------- layers

LAYER_CASES = [
    (mode, dq, dtype)
    for mode in ("nf4", "fp4", "int8")
    for dq in ((True, False) if mode != "int8" else (True,))
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
]


@pytest.mark.parametrize("cpu_kernel", ["avx512", "generic"])
@pytest.mark.parametrize(("mode", "double_quant", "dtype"), LAYER_CASES, ids=str)
def test_layer_equals_transformers_layer(mode, double_quant, dtype, cpu_kernel, monkeypatch):
    if cpu_kernel == "avx512" and (mode == "int8" or not bnb.functional.has_avx512bf16()):
        pytest.skip("the AVX512-BF16 CPU path exists for 4-bit layers on CPUs that have it")
    # bitsandbytes' own forward, bit for bit (neoxlite's kernels, which sum in another order, are compared with it
    # in tests/test_quant_kernels.py)
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", False)
    spec = QuantSpec(mode, double_quant=double_quant)
    w, b, x = weights(dtype)
    ours = quant.quantize_linear(w, b, spec, "cpu")
    ref = transformers_layer(w, b, spec)
    assert isinstance(ours, type(ref))
    if cpu_kernel == "generic" and spec.is_4bit:
        ours.support_avx512bf16_for_cpu = ref.support_avx512bf16_for_cpu = False
    assert_same_tensors(quant.quantized_state(ours), ref.state_dict())
    with torch.no_grad():
        y, y_ref = ours(x), ref(x)
        assert y.dtype == dtype and torch.equal(y, y_ref)
        assert torch.equal(ours(x[:, :1]), ref(x[:, :1]))  # decode-shaped input


@pytest.mark.parametrize("shape", [(OUT, IN), (5, 50), (3, 64)], ids=str)
@pytest.mark.parametrize(("mode", "double_quant"), [("nf4", True), ("fp4", False), ("int8", True)])
def test_sliced_cpu_quantization_is_exact(mode, double_quant, shape, monkeypatch):
    """quant quantizes big CPU weights slice by slice (bounded memory); the bits equal one bitsandbytes call."""
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", False)  # PyTorch's slices; bitsandbytes' forward below
    monkeypatch.setattr(quant.layers, "CHUNK_ELEMENTS", 130)  # int8: 2 rows per slice
    monkeypatch.setattr(quant.layers, "_FAST_CHUNK", 128)  # 4-bit: 2 blocks per step
    spec = QuantSpec(mode, double_quant=double_quant)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g).to(torch.bfloat16)
    w[1] = 0  # an all-zero row / block
    ours = quant.quantize_linear(w, None, spec, "cpu")
    ref = transformers_layer(w, None, spec)
    assert_same_tensors(quant.quantized_state(ours), ref.state_dict())
    if spec.is_4bit:
        # the generic kernel: bitsandbytes' AVX512 repacking cannot take the odd shapes (quant skips it for them)
        ours.support_avx512bf16_for_cpu = ref.support_avx512bf16_for_cpu = False
    x = torch.randn(2, shape[1], generator=g).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", MODES_4BIT)
def test_cpu_4bit_quantizer_equals_bitsandbytes_kernel(mode, dtype):
    """quant's CPU 4-bit quantizer (lookup tables instead of bucketize) against bitsandbytes' kernel, on values
    that sit exactly on the decision bounds, next to them, zero blocks, tiny and huge blocks."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, _ = _get_4bit_quantize_bounds(mode, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    on = torch.cat([bounds, -bounds, torch.tensor([1.0, -1.0, 0.0, -0.0])])
    near = torch.cat([torch.nextafter(on, torch.full_like(on, 2.0)), torch.nextafter(on, torch.full_like(on, -2.0))])
    values = torch.cat([on, near, torch.rand(4096 - 3 * on.numel(), generator=g) * 2 - 1])
    values = values.view(-1, 64)
    values[:, 0] = 1.0  # absmax 1: the values are the scaled ones, so exact bound hits survive
    blocks = torch.cat([
        values,
        torch.zeros(2, 64),
        torch.randn(4, 64, generator=g) * 1e-30,
        torch.randn(4, 64, generator=g) * 1e4,
        torch.randn(50, 64, generator=g),
    ]).to(dtype)
    spec = QuantSpec(mode, double_quant=False)
    data, state = quant.layers._quantize_4bit_cpu(blocks, spec)
    want_data, want_absmax = torch.ops.bitsandbytes.quantize_4bit.default(blocks, 64, mode, torch.uint8)
    assert torch.equal(data, want_data) and torch.equal(state.absmax, want_absmax)


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_bit_exact(mode, double_quant, tmp_path):
    spec = QuantSpec(mode, double_quant=double_quant)
    w, b, x = weights(torch.float16)
    layer = quant.quantize_linear(w, b, spec, "cpu")
    before = {k: v.clone() for k, v in quant.quantized_state(layer).items()}
    assert sorted(before) == sorted(quant.serialized_keys(spec, bias=True))
    with torch.no_grad():
        y = layer(x)  # on AVX512-BF16 CPUs bitsandbytes repacks the 4-bit weight here
    state = quant.quantized_state(layer)
    assert_same_tensors(state, before)
    assert_same_tensors(layer.state_dict(), before)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "layer.safetensors")
    loaded = quant.load_quantized_linear(
        load_file(tmp_path / "layer.safetensors"), spec, "cpu", shape=(OUT, IN), name="lin"
    )
    assert_same_tensors(quant.quantized_state(loaded), before)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert_same_tensors(quant.quantized_state(loaded), before)


@pytest.mark.parametrize("mode", MODES_4BIT)
def test_transformers_layer_loads_our_state(mode, monkeypatch):
    """What we serialize is what transformers' Bnb4bitDeserialize turns back into its layer."""
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", False)  # both layers: bitsandbytes' forward, bit for bit
    spec = QuantSpec(mode)
    w, b, x = weights(torch.float16)
    ours = quant.quantize_linear(w, b, spec, "cpu")
    state = quant.quantized_state(ours)
    ref = transformers_layer(torch.zeros_like(w), b, spec)
    stats = {k: v for k, v in state.items() if k.startswith("weight.")}
    ref.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=ref)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_move_keeps_layer_exact(mode):
    spec = QuantSpec(mode)
    w, b, x = weights(torch.bfloat16)  # compute dtype float16: bitsandbytes would cast the bias in place
    layer = quant.quantize_linear(w, b, spec, "cpu")
    before = {k: v.clone() for k, v in quant.quantized_state(layer).items()}
    with torch.no_grad():
        y = layer(x)
        assert quant.move(layer, "cpu") is layer
        if spec.is_4bit:
            assert not layer.cpu_packed  # a move starts from the checkpoint layout
        assert_same_tensors(quant.quantized_state(layer), before)
        assert torch.equal(layer(x), y)


def test_nbytes():
    w, b, _ = weights(torch.float16)
    int8 = quant.quantize_linear(w, b, QuantSpec("int8"), "cpu")
    assert quant.nbytes(int8) == OUT * IN + 4 * OUT + 2 * OUT  # int8 weight + float32 row scales + fp16 bias
    nf4 = quant.quantize_linear(w, None, QuantSpec("nf4", double_quant=False), "cpu")
    blocks = OUT * IN // 64
    assert quant.nbytes(nf4) == OUT * IN // 2 + 4 * blocks + 16 * 4  # nibbles + float32 absmax + code
    dq = quant.quantize_linear(w, None, QuantSpec("nf4"), "cpu")
    # nibbles + uint8 absmax + float32 nested absmax per 256 blocks + nested code + code + offset
    assert quant.nbytes(dq) == OUT * IN // 2 + blocks + 4 * -(-blocks // 256) + 256 * 4 + 16 * 4 + 4
    assert quant.nbytes(torch.nn.Linear(IN, OUT, bias=False)) == OUT * IN * 4


# ----------------------------------------------------------------------------------------------- bad input


def test_quantize_linear_bad_input():
    w, b, _ = weights()
    with pytest.raises(ValueError, match="quantizes nothing"):
        quant.quantize_linear(w, b, QuantSpec(), "cpu")
    with pytest.raises(ValueError, match="2-D float16/bfloat16/float32 weight"):
        quant.quantize_linear(w.to(torch.int8), b, QuantSpec("nf4"), "cpu")
    with pytest.raises(TypeError, match="QuantSpec"):
        quant.quantize_linear(w, b, "nf4", "cpu")
    with pytest.raises(TypeError, match="bitsandbytes linear layer"):
        quant.quantized_state(torch.nn.Linear(4, 4))


def quantized(mode: str, double_quant: bool = True) -> dict[str, torch.Tensor]:
    w, b, _ = weights(torch.float16)
    return dict(quant.quantized_state(quant.quantize_linear(w, b, QuantSpec(mode, double_quant=double_quant), "cpu")))


def test_load_missing_quant_state():
    tensors = quantized("nf4")
    del tensors["weight.absmax"]
    with pytest.raises(ValueError, match=r"for gpt_neox.layers.0.mlp.dense_h_to_4h: missing \['weight.absmax'\]"):
        quant.load_quantized_linear(tensors, QuantSpec("nf4"), "cpu", name="gpt_neox.layers.0.mlp.dense_h_to_4h")
    tensors = quantized("int8")
    del tensors["SCB"]
    with pytest.raises(ValueError, match=r"missing \['SCB'\]"):
        quant.load_quantized_linear(tensors, QuantSpec("int8"), "cpu")


def test_load_float_weight_as_quantized():
    w, b, _ = weights(torch.float16)
    with pytest.raises(ValueError, match=r"missing \['weight.absmax'"):
        quant.load_quantized_linear({"weight": w, "bias": b}, QuantSpec("nf4"), "cpu")
    with pytest.raises(ValueError, match="int8 weight expected"):
        quant.load_quantized_linear({"weight": w, "SCB": torch.ones(OUT)}, QuantSpec("int8"), "cpu")


@pytest.mark.parametrize(
    ("stored", "config", "message"),
    [
        (("nf4", True), ("fp4", True), r"missing \['weight.quant_state.bitsandbytes__fp4'\].*unexpected"),
        (("nf4", True), ("nf4", False), r"unexpected \['weight.nested_absmax', 'weight.nested_quant_map'\]"),
        (("fp4", False), ("fp4", True), r"missing \['weight.nested_absmax', 'weight.nested_quant_map'\]"),
        (("int8", True), ("nf4", True), r"missing .*weight.absmax"),
        (("nf4", True), ("int8", True), r"missing \['SCB'\]"),
    ],
)
def test_load_mismatched_quant_state(stored, config, message):
    tensors = quantized(*stored)
    with pytest.raises(ValueError, match=message):
        quant.load_quantized_linear(tensors, QuantSpec(config[0], double_quant=config[1]), "cpu")


def test_load_inconsistent_tensors():
    spec = QuantSpec("nf4")
    with pytest.raises(ValueError, match=r"quant state shape \[96, 128\] != layer shape \[128, 96\]"):
        quant.load_quantized_linear(quantized("nf4"), spec, "cpu", shape=(IN, OUT))
    tensors = quantized("nf4")
    tensors["weight"] = tensors["weight"][: OUT * IN // 4]
    with pytest.raises(ValueError, match="packed weight holds"):
        quant.load_quantized_linear(tensors, spec, "cpu")
    tensors = quantized("nf4")
    tensors["weight.absmax"] = tensors["weight.absmax"][:-1]
    with pytest.raises(ValueError, match="block scales"):
        quant.load_quantized_linear(tensors, spec, "cpu")
    tensors = quantized("nf4")
    tensors["weight.quant_state.bitsandbytes__nf4"] = quantized("fp4")["weight.quant_state.bitsandbytes__fp4"]
    with pytest.raises(ValueError, match="quant_type='fp4'"):
        quant.load_quantized_linear(tensors, spec, "cpu")
    tensors = quantized("int8")
    tensors["SCB"] = tensors["SCB"][:-1]
    with pytest.raises(ValueError, match=r"SCB must be float32 of shape \(96,\)"):
        quant.load_quantized_linear(tensors, QuantSpec("int8"), "cpu")
    tensors = quantized("int8")
    tensors["weight_format"] = torch.tensor(1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="weight_format=1"):
        quant.load_quantized_linear(tensors, QuantSpec("int8"), "cpu")
