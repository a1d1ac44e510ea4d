"""Metadata files a checkpoint folder holds (config.json, generation_config.json, the tokenizer files, the
pre-quantized quant state, shard names and header shapes) are untrusted: each may only be read from inside the
folder, within a size limit, and every wrong value is one ValueError naming the file, never a raw exception,
a hang or a read elsewhere."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import neoxlite.quant as quant
import pytest
import torch
from hostile import assert_one_line_error, run_neoxlite, write_safetensors
from neoxlite.quant import QuantSpec
from safetensors.torch import save_file

import neoxlite
import neoxlite.checkpoint as checkpoint_module
from neoxlite import GPTNeoXConfig, GPTNeoXTokenizerFast
from neoxlite.checkpoint import INDEX, Checkpoint
from neoxlite.demo import demo_path
from neoxlite.generation_config import read_generation_config

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def load(folder: Path) -> torch.nn.Module:
    return neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False)


def demo_copy(dst: Path) -> Path:
    """A copy of the shipped demo (tokenizer files, generation_config.json), with a chat_template.jinja."""
    shutil.copytree(demo_path(), dst)
    (dst / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return dst


def edit_json(path: Path, **changes) -> Path:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


# ------------------------------------------------------------------------------- links and sizes (5, 7)
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", *TOKENIZER_FILES])
def test_a_metadata_file_linking_outside_the_folder_is_refused(tmp_path, name):
    folder = demo_copy(tmp_path / "models" / "m")
    outside = tmp_path / "elsewhere" / name  # the same, valid content: only where it lies is wrong
    outside.parent.mkdir()
    shutil.move(folder / name, outside)
    os.symlink(outside, folder / name)
    model_file = name in ("config.json", "generation_config.json")
    loader = load if model_file else GPTNeoXTokenizerFast.from_pretrained
    with pytest.raises(ValueError, match=rf"{name} links to .*outside the checkpoint folder"):
        loader(folder)


def test_a_link_to_a_sibling_folder_is_refused_for_metadata(tmp_path):
    folder = demo_copy(tmp_path / "models" / "m")
    shutil.copytree(folder, tmp_path / "models" / "other")
    (folder / "tokenizer_config.json").unlink()
    # shards may lie in a sibling folder; metadata files may not
    os.symlink("../other/tokenizer_config.json", folder / "tokenizer_config.json")
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        GPTNeoXTokenizerFast.from_pretrained(folder)


def test_links_inside_the_folder_and_into_hub_blobs_load(checkpoint, tmp_path):
    folder, ref = checkpoint()
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):  # huggingface_hub's layout
        shutil.copyfile(path, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / path.name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo_path() / name, repo / "blobs" / name)
        os.symlink(f"../../blobs/{name}", snapshot / name)
    model = load(snapshot)
    assert model.config.num_hidden_layers == ref.config.num_hidden_layers
    assert len(GPTNeoXTokenizerFast.from_pretrained(snapshot)) > 0
    local = tmp_path / "local"
    shutil.copytree(folder, local)
    os.rename(local / "config.json", local / "config.real.json")
    os.symlink("config.real.json", local / "config.json")  # a link within the folder is fine
    assert load(local).config.hidden_size == ref.config.hidden_size


@pytest.mark.parametrize("name", ["generation_config.json", *TOKENIZER_FILES])
def test_tokenizer_and_generation_config_files_have_the_size_limit(tmp_path, monkeypatch, name):
    folder = demo_copy(tmp_path / "m")
    limit = max(p.stat().st_size for p in folder.iterdir() if p.suffix != ".safetensors")  # all others fit
    path = folder / name
    path.write_text(path.read_text() + " " * limit)  # still valid; only too large for the limit
    monkeypatch.setattr(checkpoint_module, "MAX_METADATA_BYTES", limit)
    generation = name == "generation_config.json"
    loader = read_generation_config if generation else GPTNeoXTokenizerFast.from_pretrained
    with pytest.raises(ValueError, match=rf"{name} is [\d,]+ bytes, more than any real one"):
        loader(folder)


# ------------------------------------------------------------------------------- config.json (6, 8)
BAD_CONFIGS = {
    "top-level list": [1, 2],
    "rotary_pct string": {"rotary_pct": "0.25"},
    "rotary_pct null": {"rotary_pct": None},
    "rope_scaling list": {"rope_scaling": ["linear", 2]},
    "rope_scaling factor null": {"rope_scaling": {"type": "linear", "factor": None}},
    "rope_parameters list": {"rope_parameters": [1]},
    "id2label list": {"id2label": ["a", "b"]},
    "id2label non-int key": {"id2label": {"x": "a"}},
    "id2label non-str label": {"id2label": {"0": 5}},
    "label2id str id": {"label2id": {"a": "0"}},
    "quantization_config list": {"quantization_config": ["nf4"]},
    "max_position_embeddings -5": {"max_position_embeddings": -5},
    "max_position_embeddings 0": {"max_position_embeddings": 0},
    "layer_norm_eps string": {"layer_norm_eps": "1e-5"},
    "layer_norm_eps NaN": {"layer_norm_eps": float("nan")},
    "rotary_emb_base string": {"rotary_emb_base": "10000"},
    "rotary_emb_base huge int": {"rotary_emb_base": 10**400},
    "eos_token_id string": {"eos_token_id": "0"},
    "pad_token_id negative": {"pad_token_id": -1},
    "hidden_size bool": {"hidden_size": True},
    "hidden_size float": {"hidden_size": 64.0},
    "use_parallel_residual string": {"use_parallel_residual": "yes"},
    "hidden_dropout 2": {"hidden_dropout": 2},
    "architectures string": {"architectures": "GPTNeoXForCausalLM"},
    "torch_dtype number": {"torch_dtype": 16},
    "hidden_act list": {"hidden_act": ["gelu"]},
    "rope factor huge": {"rope_scaling": {"type": "dynamic", "factor": 1e300}},
    "num_hidden_layers 10**9": {"num_hidden_layers": 10**9},
    "hidden_size 2**17": {"hidden_size": 2**17},
    "vocab_size 2**40": {"vocab_size": 2**40},
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_values_of_the_wrong_type_or_range_are_one_error_naming_the_file(checkpoint, tmp_path, case):
    folder, _ = checkpoint()
    base = json.loads((folder / "config.json").read_text())
    patch = BAD_CONFIGS[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, **patch} if isinstance(patch, dict) else patch))
    with pytest.raises(ValueError) as err:
        GPTNeoXConfig.from_json_file(path)
    assert type(err.value) is ValueError and str(path) in str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_cli_reports_a_bad_config_value_on_one_line(tmp_path):
    folder = demo_copy(tmp_path / "m")
    edit_json(folder / "config.json", rotary_pct="0.25")
    run = run_neoxlite("generate", "hi", "-m", str(folder), "--device", "cpu", "--max-new-tokens", "2")
    assert_one_line_error(run, "config.json", "rotary_pct", "'0.25'")


@pytest.mark.parametrize("layers", [2, 4])
def test_a_layer_count_other_than_the_checkpoints_is_refused_before_building(checkpoint, tmp_path, layers):
    from neoxlite.offload.cli import plan_checkpoint

    folder, _ = checkpoint()
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    edit_json(bad / "config.json", num_hidden_layers=layers)
    message = rf"num_hidden_layers={layers} but the weights hold 3 layers \(layers.0 to layers.2\)"
    with pytest.raises(ValueError, match=message):
        load(bad)
    with pytest.raises(ValueError, match=message):
        plan_checkpoint(bad, {})


# ------------------------------------------------------------------------------- generation_config.json (9)
@pytest.mark.parametrize("text,match", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"max_new_tokens": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"temperature": NaN}', "temperature must be a finite number"),
    ('{"top_k": -3}', "top_k must be an integer >= 0"),
    ('{"pad_token_id": -1}', "pad_token_id must be a token id"),
    ('{"eos_token_id": [1, 99999999999999999999999]}', "eos_token_id"),
])
def test_generation_config_parse_and_type_errors_name_the_file(tmp_path, text, match):
    folder = demo_copy(tmp_path / "m")
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load(folder)
    assert type(err.value) is ValueError and "generation_config.json" in str(err.value)


def test_cli_reports_a_deeply_nested_generation_config_on_one_line(tmp_path):
    folder = demo_copy(tmp_path / "m")
    (folder / "generation_config.json").write_text("[" * 100_000 + "]" * 100_000)
    run = run_neoxlite("generate", "hi", "-m", str(folder), "--device", "cpu", "--max-new-tokens", "2")
    assert_one_line_error(run, "generation_config.json", "not valid JSON")


# ------------------------------------------------------------------------------- tokenizer settings (10)
@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
@pytest.mark.parametrize("patch", [
    {"chat_template": [{"template": "x"}]},
    {"chat_template": ["{{ x }}"]},
    {"chat_template": 5},
    {"bos_token": 5},
    {"eos_token": {"content": 5}},
    {"additional_special_tokens": 5},
    {"additional_special_tokens": ["<a>", 7]},
    {"extra_special_tokens": "x"},
    {"model_max_length": "2048"},
    {"model_max_length": True},
    {"padding_side": "middle"},
    {"truncation_side": ["left"]},
    {"add_bos_token": "yes"},
    {"add_prefix_space": 1},
], ids=lambda patch: "-".join(f"{k}={v!r}" for k, v in patch.items()))
def test_tokenizer_settings_of_the_wrong_type_name_the_file(tmp_path, name, patch):
    folder = demo_copy(tmp_path / "m")
    edit_json(folder / name, **patch)
    with pytest.raises(ValueError, match=rf"{name}: {next(iter(patch))} must be") as err:
        tok = GPTNeoXTokenizerFast.from_pretrained(folder)
        tok("hello world", truncation=True)  # model_max_length is used when truncating
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert type(err.value) is ValueError


def test_tokenizer_settings_that_are_null_mean_not_set(tmp_path):
    folder = demo_copy(tmp_path / "m")
    edit_json(folder / "tokenizer_config.json", model_max_length=None, padding_side=None, add_bos_token=None,
              chat_template=[{"name": "default", "template": "{{ messages[0]['content'] }}"}])
    (folder / "chat_template.jinja").unlink()
    tok = GPTNeoXTokenizerFast.from_pretrained(folder)
    assert tok("hello world", truncation=True).input_ids
    assert tok.padding_side == "right"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_a_tokenizer_file_that_is_not_utf8_names_the_file(tmp_path):
    folder = demo_copy(tmp_path / "m")
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ValueError, match="chat_template.jinja is not UTF-8 text"):
        GPTNeoXTokenizerFast.from_pretrained(folder)


# -------------------------------------------------------------------------- pre-quantized quant state (11)
def quantized(double_quant: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = quant.quantize_linear(torch.randn(96, 128, dtype=torch.float16), None,
                                  QuantSpec("nf4", double_quant=double_quant), "cpu")
    return dict(quant.quantized_state(layer))


KEY = "weight.quant_state.bitsandbytes__nf4"


def with_state(tensors: dict[str, torch.Tensor], edit) -> dict[str, torch.Tensor]:
    info = json.loads(bytes(tensors[KEY].tolist()))
    raw = edit(info)
    raw = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return {**tensors, KEY: torch.tensor(list(raw), dtype=torch.uint8)}


@pytest.mark.parametrize("edit,match", [
    (lambda i: {**i, "blocksize": 0}, "blocksize is 0"),
    (lambda i: {**i, "blocksize": "64"}, "blocksize is '64'"),
    (lambda i: {**i, "blocksize": 3}, "blocksize is 3"),
    (lambda i: {**i, "nested_blocksize": -256}, "nested_blocksize is -256"),
    (lambda i: {k: v for k, v in i.items() if k != "nested_blocksize"},
     r"lacks fields \['nested_blocksize'\]"),
    (lambda i: {k: v for k, v in i.items() if k != "nested_offset"}, r"lacks fields \['nested_offset'\]"),
    (lambda i: {k: v for k, v in i.items() if k != "dtype"}, r"lacks fields \['dtype'\]"),
    (lambda i: {**i, "absmax": [1.0]}, r"unknown ones \['absmax'\]"),
    (lambda i: [i], "is a JSON list, not an object"),
    (lambda i: {**i, "shape": "ab"}, "no 2-D weight shape"),
    (lambda i: {**i, "nested_offset": "0.5"}, "nested_offset '0.5' is not a finite number"),
    (lambda i: {**i, "nested_dtype": "int8"}, "nested_dtype 'int8' is not a float dtype"),
    (lambda i: b"\xff{", "not valid JSON"),
    (lambda i: b"[" * 100_000, "not valid JSON"),
])
def test_a_bad_pre_quantized_state_is_the_loaders_value_error(edit, match):
    tensors = with_state(quantized(), edit)
    with pytest.raises(ValueError, match=rf"pre-quantized weights for layers.0.x: .*{match}") as err:
        quant.load_quantized_linear(tensors, QuantSpec("nf4"), "cpu", name="layers.0.x")
    assert type(err.value) is ValueError


def test_nested_fields_without_double_quant_are_refused():
    tensors = with_state(quantized(double_quant=False), lambda i: {**i, "nested_absmax": [1.0]})
    with pytest.raises(ValueError, match=r"unknown ones \['nested_absmax'\]"):
        quant.load_quantized_linear(tensors, QuantSpec("nf4", double_quant=False), "cpu")


# ------------------------------------------------------------------------------- shard names and shapes (12)
@pytest.mark.parametrize("name", ["a" * 300 + ".safetensors", "\ud800.safetensors",
                                  "/".join(["d" * 200] * 25) + "/x.safetensors"],
                         ids=["300 chars", "lone surrogate", "5000 chars deep"])
def test_shard_names_the_filesystem_cannot_take_name_the_index(tmp_path, name):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(ValueError, match=rf"{INDEX} names the shard .*cannot be a file name") as err:
        Checkpoint(tmp_path)
    assert type(err.value) is ValueError and len(str(err.value)) < 400


@pytest.mark.parametrize("shape", [[0, 2**64], [2**63], [0, 2**62, 2**62], [0, -1]])
def test_header_shapes_past_int64_are_refused(tmp_path, shape):
    write_safetensors(tmp_path / "model.safetensors",
                      {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}, b"")
    with pytest.raises(ValueError, match=r"model.safetensors: tensor w has shape") as err:
        Checkpoint(tmp_path).read("w")
    assert type(err.value) is ValueError


def test_an_empty_tensor_with_large_dims_still_loads(tmp_path):
    write_safetensors(tmp_path / "model.safetensors",
                      {"w": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}, b"")
    assert Checkpoint(tmp_path).read("w").shape == (0, 2**40)
