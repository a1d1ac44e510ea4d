"""Quantized models against transformers + bitsandbytes with the same settings, and pre-quantized checkpoints."""

from __future__ import annotations

import json
import shutil

import neoxlite.quant as quant
import neoxlite.quant.layers
import neoxlite.quant.model
import pytest
import torch
from neoxlite.quant import QuantSpec
from neoxlite.quant.serialize import quantize_checkpoint
from safetensors.torch import load_file, save_file

import neoxlite
import neoxlite.cpu_kernels
from neoxlite.cli import main as cli_main

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

MODES = ("nf4", "fp4", "int8")
# intermediate_size a multiple of 64: bitsandbytes' AVX512-BF16 CPU path (which transformers takes on such CPUs)
# needs whole 64-blocks per row, and fails on other shapes.
SHAPE = dict(intermediate_size=256)
# Quantized layers are bit-identical to transformers'; the rest of the model differs by float rounding only.
ATOL = 1e-5


def hf_config(spec: QuantSpec):
    config = spec.to_config()
    return transformers.BitsAndBytesConfig(
        **{k: v for k, v in config.items() if not k.startswith("_") and k != "quant_method"}
    )


def hf_quantized(folder, spec: QuantSpec, **kwargs):
    return transformers.GPTNeoXForCausalLM.from_pretrained(
        folder, quantization_config=hf_config(spec), dtype=torch.float32, device_map="cpu", **kwargs
    ).eval()


def ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(0))


def load(folder, arch: str = "GPTNeoXForCausalLM", **kwargs):
    return getattr(neoxlite, arch).from_pretrained(folder, progress=False, **kwargs)


def quant_tensors(state: dict) -> dict:
    """The quantized layers' tensors of a state dict (whatever transformers calls the head)."""
    return {k: v for k, v in state.items() if ".layers." in k}


@pytest.fixture(scope="module")
def prequantized(checkpoint, tmp_path_factory):
    """mode -> (source folder, pre-quantized folder written by `neoxlite quantize`)."""
    src, _ = checkpoint(**SHAPE)
    out = {}
    for mode in MODES:
        dst = tmp_path_factory.mktemp("q") / mode
        quantize_checkpoint(src, dst, quant=mode, progress=False)
        out[mode] = (src, dst)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_logits_equal_transformers_bitsandbytes(checkpoint, mode, monkeypatch):
    # bitsandbytes' own forward, bit for bit; neoxlite's kernels (other fp32 sum order): tests/test_quant_kernels.py
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", False)
    folder, fp32 = checkpoint(**SHAPE)
    spec = QuantSpec(mode)
    ours = load(folder, quant=mode)
    ref = hf_quantized(folder, spec)
    assert sorted(n for n, m in ours.named_modules() if quant.is_quantized(m)) == sorted(
        n for n, m in ref.named_modules() if quant.is_quantized(m)
    )
    # every quantized tensor bit for bit
    theirs = quant_tensors(ref.state_dict())
    mine = quant_tensors(ours.state_dict())
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key
    x = ids()
    with torch.no_grad():
        got, want, full = ours(x).logits, ref(x).logits, fp32(x).logits
    diff = (got - want).abs().max().item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    error = (got - full).abs().max().item()
    print(f"\n{mode}: max |ours - transformers+bnb| = {diff:.2e}, top-1 agreement {top1:.0%}; "
          f"max |{mode} - fp32| = {error:.3f} (fp32 logits span {full.abs().max():.2f})")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert top1 == 1.0
    assert error > 0  # it really is quantized


def test_compute_dtype_and_double_quant_follow_the_keywords(checkpoint, monkeypatch):
    # bitsandbytes' own forward, bit for bit (where the CPU multiplies bf16 natively, neoxlite's many-row path
    # sums in another order than bitsandbytes' matmul, which bf16 rounding shows: tests/test_quant_matmul.py)
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", False)
    folder, _ = checkpoint(**SHAPE)
    spec = QuantSpec("nf4", compute_dtype=torch.bfloat16, double_quant=False)
    ours = load(folder, quant="nf4", compute_dtype="bf16", double_quant=False)
    layer = ours.gpt_neox.layers[0].mlp.dense_h_to_4h
    assert layer.compute_dtype == torch.bfloat16 and not layer.weight.quant_state.nested
    assert ours.quant_spec == spec and ours.config.quantization_config == spec.to_config()
    ref = hf_quantized(folder, spec)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, ref(ids()).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "arch", ["GPTNeoXModel", "GPTNeoXForSequenceClassification", "GPTNeoXForTokenClassification",
             "GPTNeoXForQuestionAnswering"]
)
def test_every_model_class_quantizes(checkpoint, arch, monkeypatch):
    monkeypatch.setattr(neoxlite.cpu_kernels, "enabled", False)  # bit for bit, as above
    folder, _ = checkpoint(arch, **SHAPE)
    model = load(folder, arch, quant="nf4")
    quantized = sorted(n for n, m in model.named_modules() if quant.is_quantized(m))
    assert len(quantized) == 4 * 3 and all("layers." in n for n in quantized)  # heads stay in full precision
    ref = getattr(transformers, arch).from_pretrained(
        folder, quantization_config=hf_config(QuantSpec("nf4")), dtype=torch.float32, device_map="cpu"
    ).eval()
    x = ids(1)  # one row: sequence classification of a batch needs a pad id
    with torch.no_grad():
        got, want = model(x), ref(x)
    for key in ("logits", "last_hidden_state", "start_logits", "end_logits"):
        if getattr(want, key, None) is not None:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=key)


def test_memory_footprint_and_block_table(checkpoint):
    folder, _ = checkpoint(**SHAPE)
    full = load(folder)
    nf4 = load(folder, quant="nf4")
    int8 = load(folder, quant="int8")
    sizes = nf4.block_sizes()
    assert list(sizes) == ["embed_in", "layers.0", "layers.1", "layers.2", "head"]
    assert nf4.memory_footprint() == sum(sizes.values())
    assert full.memory_footprint() == sum(p.numel() * p.element_size() for p in full.parameters())
    assert sizes["embed_in"] == full.block_sizes()["embed_in"] and sizes["head"] == full.block_sizes()["head"]
    layer = nf4.gpt_neox.layers[0]
    assert sizes["layers.0"] == quant.nbytes(layer)
    assert sizes["layers.0"] < int8.block_sizes()["layers.0"] < full.block_sizes()["layers.0"]
    table = quant.model.format_block_table(sizes)
    assert "layers.2" in table and f"{nf4.memory_footprint():,}" in table


# ----------------------------------------------------------------------------------------------- pre-quantized


@pytest.mark.parametrize("mode", MODES)
def test_prequantized_checkpoint_loads_in_transformers(prequantized, mode):
    src, dst = prequantized[mode]
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == QuantSpec(mode).to_config()
    ref = hf_quantized(src, QuantSpec(mode))
    # what transformers holds for its own quantized model is what we wrote, tensor for tensor (taken before a
    # forward, which casts biases to the compute dtype)
    theirs = quant_tensors(ref.state_dict())
    ours = quant_tensors({k: v for f in dst.glob("*.safetensors") for k, v in load_file(f).items()})
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    loaded = transformers.GPTNeoXForCausalLM.from_pretrained(dst, dtype=torch.float32, device_map="cpu").eval()
    assert quant.is_quantized(loaded.gpt_neox.layers[0].attention.dense)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, ref(ids()).logits)


@pytest.mark.parametrize("mode", MODES)
def test_prequantized_loads_without_quantizing(prequantized, mode, monkeypatch, tmp_path):
    src, dst = prequantized[mode]
    expected = load(src, quant=mode)

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a pre-quantized checkpoint must load without quantizing")

    monkeypatch.setattr(quant.layers, "quantize_linear", no_quantizing)
    model = load(dst)
    assert model.quant_spec == QuantSpec(mode)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, expected(ids()).logits)
        model(ids(1, 3))  # a CPU forward repacks 4-bit weights; the saved form must not change
    # save/load round trip, bit for bit
    model.save_pretrained(tmp_path / "again")
    first = {k: v for f in sorted(dst.glob("*.safetensors")) for k, v in load_file(f).items()}
    second = {k: v for f in sorted((tmp_path / "again").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(first) == sorted(second)
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key


def test_prequantized_keeps_its_mode(prequantized):
    _, dst = prequantized["nf4"]
    assert load(dst, quant="nf4").quant_spec.mode == "nf4"
    with pytest.raises(ValueError, match="already quantized as nf4"):
        load(dst, quant="int8")
    bf16 = load(dst, compute_dtype=torch.bfloat16)
    assert bf16.gpt_neox.layers[0].mlp.dense_4h_to_h.compute_dtype == torch.bfloat16


def test_prequantized_keeps_float16_layers_in_float16(checkpoint, tmp_path):
    """The full-precision layers load in the checkpoint's dtype, not the float32 of the quant-state tensors."""
    src, _ = checkpoint(dtype=torch.float16, **SHAPE)
    quantize_checkpoint(src, tmp_path / "nf4", quant="nf4", progress=False)
    model = load(tmp_path / "nf4")
    assert model.gpt_neox.embed_in.weight.dtype == model.embed_out.weight.dtype == torch.float16
    assert model.gpt_neox.layers[0].mlp.dense_h_to_4h.bias.dtype == torch.float16


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder, edit):
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        save_file(edit(tensors), path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():  # keep the index in step with the shards
        data = json.loads(index.read_text())
        keys = {k for p in folder.glob("*.safetensors") for k in load_file(p)}
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in keys}
        index.write_text(json.dumps(data))


def test_prequantized_missing_quant_state(prequantized, tmp_path):
    folder = copy_checkpoint(prequantized["nf4"][1], tmp_path / "broken")
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != "gpt_neox.layers.1.mlp.dense_4h_to_h.weight.absmax"})
    with pytest.raises(ValueError, match=r"missing.*gpt_neox.layers.1.mlp.dense_4h_to_h.weight.absmax"):
        load(folder)


def test_prequantized_mismatched_config(prequantized, tmp_path):
    folder = copy_checkpoint(prequantized["nf4"][1], tmp_path / "fp4-config")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bitsandbytes__fp4.*\n?.*unexpected|unexpected.*bitsandbytes__nf4|missing"):
        load(folder)
    folder = copy_checkpoint(prequantized["int8"][1], tmp_path / "bad-scb")
    edit_tensors(folder, lambda t: {k: (v[:-1] if k.endswith("layers.0.attention.dense.SCB") else v) for k, v in t.items()})
    with pytest.raises(ValueError, match="gpt_neox.layers.0.attention.dense"):
        load(folder)


def test_quantize_cli_is_atomic(checkpoint, tmp_path, monkeypatch, capsys):
    src, _ = checkpoint(**SHAPE)
    dst = tmp_path / "out" / "nf4"
    assert cli_main(["quantize", str(src), str(dst), "--quant", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "nf4" in out and "layers.0" in out and "total" in out
    assert (dst / "config.json").exists() and list(dst.glob("*.safetensors"))
    assert cli_main(["quantize", str(src), str(dst), "--quant", "nf4"]) == 2  # DST exists
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["quantize", str(dst), str(tmp_path / "again"), "--quant", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err

    import neoxlite.saving

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(neoxlite.saving, "save_file", disk_full)
    assert cli_main(["quantize", str(src), str(tmp_path / "out" / "int8"), "--quant", "int8"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nf4"]  # no half-written folder left
