"""from_pretrained / save_pretrained: config forms and errors, shard layouts, key validation, dtypes, hub
errors while offline, atomic sharded saves, and base/head class combinations."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import neoxlite
from neoxlite import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification, GPTNeoXModel

ATOL = 1e-4


def load(folder, cls=GPTNeoXForCausalLM, **kwargs):
    return cls.from_pretrained(folder, progress=False, **kwargs)


def copy_with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of a checkpoint folder with config.json edited (None deletes a key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def assert_same_logits(model, ref, T: int = 12) -> None:
    ids = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), ref(ids).logits.float(), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("classic", [True, False])
def test_config_reads_both_forms(checkpoint, classic):
    folder, _ = checkpoint(classic=classic, rotary_pct=0.5, rotary_emb_base=500.0,
                           rope_scaling={"rope_type": "linear", "factor": 4.0})
    config = GPTNeoXConfig.from_pretrained(folder)
    assert (config.rotary_pct, config.rotary_emb_base, config.rope_type, config.rope_factor) == (0.5, 500.0, "linear", 4.0)
    assert (config.hidden_size, config.num_attention_heads, config.head_size, config.rotary_ndims) == (64, 4, 16, 8)


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="llama"), r"model_type 'llama'.*gpt_neox"),
    (dict(hidden_size=66), r"hidden_size \(66\) must be divisible by num_attention_heads \(4\)"),
    (dict(rotary_pct=0.1875, partial_rotary_factor=None), r"3 rotary dims.*even"),  # 16 * 0.1875 = 3
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), r"'yarn'.*linear, dynamic"),
    (dict(hidden_act="swishy"), r"'swishy' is not supported"),
    (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive integer"),
])
def test_config_errors_are_clear_value_errors(checkpoint, tmp_path, changes, match):
    folder, _ = checkpoint()
    bad = copy_with_config(folder, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=match):
        GPTNeoXConfig.from_pretrained(bad)
    with pytest.raises(ValueError, match=match):
        load(bad)


def test_broken_config_json_is_a_clear_error(checkpoint, tmp_path):
    folder, _ = checkpoint()
    bad = copy_with_config(folder, tmp_path / "bad")
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(bad)
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(bad)


# ----------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("shard_kb", [None, 64], ids=["single-file", "sharded"])
def test_single_file_and_sharded_checkpoints(checkpoint, shard_kb):
    folder, ref = checkpoint(shard_kb=shard_kb)
    shards = list(folder.glob("*.safetensors"))
    if shard_kb is None:
        assert [p.name for p in shards] == ["model.safetensors"]
    else:
        assert len(shards) > 3 and (folder / "model.safetensors.index.json").exists()
    model = load(folder)
    assert_same_logits(model, ref)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_index_listing_a_missing_shard_is_a_clear_error(checkpoint, tmp_path):
    folder, _ = checkpoint()
    bad = copy_with_config(folder, tmp_path / "bad")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        load(bad)


def test_missing_unexpected_and_misshaped_tensors_in_one_error(checkpoint, tmp_path):
    folder, _ = checkpoint(shard_kb=None)
    state = load_file(folder / "model.safetensors")
    del state["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    state["gpt_neox.layers.1.mlp.extra.weight"] = torch.zeros(3)
    state["gpt_neox.layers.2.attention.dense.weight"] = torch.zeros(64, 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, bad / "model.safetensors")
    shutil.copy(folder / "config.json", bad / "config.json")
    with pytest.raises(ValueError) as err:
        load(bad)
    text = str(err.value)
    assert "missing (1): gpt_neox.layers.1.mlp.dense_4h_to_h.bias" in text
    assert "unexpected (1): gpt_neox.layers.1.mlp.extra.weight" in text
    assert "gpt_neox.layers.2.attention.dense.weight: checkpoint (64, 32), model (64, 64)" in text


def test_lm_head_key_is_read_as_embed_out(checkpoint, tmp_path):
    """transformers 5 names NeoX's output projection lm_head in memory; a file saved under that name loads."""
    folder, ref = checkpoint(shard_kb=None)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state.pop("embed_out.weight")
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "ckpt" / "config.json")
    assert_same_logits(load(tmp_path / "ckpt"), ref)


class _Boom:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_only_folder_is_refused_without_unpickling(checkpoint, tmp_path):
    folder, _ = checkpoint()
    bad = tmp_path / "bin"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    marker = tmp_path / "unpickled"
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(ValueError) as err:
        load(bad)
    text = str(err.value)
    assert "pytorch_model.bin" in text and "never unpickles" in text
    assert "save_pretrained" in text and "safe_serialization" in text  # says how to convert
    assert not marker.exists()


def test_missing_folder_is_file_not_found(tmp_path):
    for path in (tmp_path / "nope", "./nope-folder", "/no/such/dir"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load(path)


def test_hub_id_while_offline_is_file_not_found(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads these once at import; the test process imported it already.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError, match=r"EleutherAI/pythia-70m.*(offline|HF_HUB_OFFLINE)"):
        load("EleutherAI/pythia-70m")
    with pytest.raises(FileNotFoundError, match="EleutherAI/pythia-70m"):
        GPTNeoXConfig.from_pretrained("EleutherAI/pythia-70m")


def test_hub_id_served_from_the_cache_while_offline(checkpoint, tmp_path, monkeypatch):
    """A snapshot already in the HF cache loads offline, as huggingface_hub lays it out."""
    from huggingface_hub import constants

    folder, ref = checkpoint()
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-neox"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert_same_logits(load("acme/tiny-neox"), ref)


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("stored,asked,want", [
    (torch.float32, "bf16", torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.float32, None, torch.float32),
    (torch.bfloat16, None, torch.bfloat16),
    (torch.bfloat16, "auto", torch.bfloat16),
    (torch.float16, "float32", torch.float32),
])
def test_dtype(checkpoint, stored, asked, want):
    folder, ref = checkpoint(dtype=stored)
    model = load(folder, dtype=asked)
    assert model.dtype == want and all(p.dtype == want for p in model.parameters())
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.dtype == want
        if stored == want:  # the exact weights of the checkpoint
            torch.testing.assert_close(logits, ref(ids).logits, atol=ATOL if want == torch.float32 else 0.1, rtol=0)


def test_bad_dtype_device_and_keyword_are_clear_errors(checkpoint):
    folder, _ = checkpoint()
    with pytest.raises(ValueError, match="unknown dtype 'fp3'"):
        load(folder, dtype="fp3")
    with pytest.raises(ValueError, match="unknown device"):
        load(folder, device="tpu:9")
    with pytest.raises(TypeError, match="torch_dtypo"):
        load(folder, torch_dtypo="bf16")


# ----------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip_sharded(checkpoint, tmp_path, tied):
    import transformers

    folder, ref = checkpoint(tie_word_embeddings=tied)
    model = load(folder)
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size="40KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert ("embed_out.weight" in index["weight_map"]) != tied  # a tied head is stored once, as the hub does
    assert not [p for p in tmp_path.iterdir() if p.name != "saved"]  # no temporary folder left behind
    again = load(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert again.config.to_dict() == model.config.to_dict()
    assert_same_logits(again, ref)
    # and transformers reads what we wrote
    assert_same_logits(transformers.GPTNeoXForCausalLM.from_pretrained(out).eval(), ref)


def test_saved_config_names_the_saved_dtype(checkpoint, tmp_path):
    import transformers

    folder, _ = checkpoint()  # stored fp32
    model = load(folder, dtype="bf16")
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load(tmp_path / "bf16").dtype == torch.bfloat16
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert theirs.dtype == torch.bfloat16  # not silently upcast to the original checkpoint's fp32
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), theirs(ids).logits.float(), atol=0.05, rtol=0)


def test_save_pretrained_is_atomic(checkpoint, tmp_path, monkeypatch):
    import neoxlite.saving

    folder, _ = checkpoint()
    model = load(folder)
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(neoxlite.saving, "save_file", failing_save_file)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "new", max_shard_size="40KB")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one
    # overwriting an existing save: a failure leaves the old one intact
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "old", max_shard_size="40KB")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    calls.clear()
    monkeypatch.setattr(neoxlite.saving, "save_file", failing_save_file)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "old", max_shard_size="40KB")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


# ----------------------------------------------------------------------------------------------- classes
def test_base_model_from_causal_lm_checkpoint(checkpoint):
    folder, ref = checkpoint()
    model = load(folder, GPTNeoXModel)
    assert not hasattr(model, "embed_out")
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref.gpt_neox(ids).last_hidden_state, atol=ATOL, rtol=0)


def test_causal_lm_from_base_model_checkpoint_needs_its_head(checkpoint):
    folder, ref = checkpoint("GPTNeoXModel")  # keys without the gpt_neox. prefix
    with pytest.raises(ValueError, match=r"embed_out.*init_new_heads=True"):
        load(folder)
    model = load(folder, init_new_heads=True)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.gpt_neox(ids).last_hidden_state, ref(ids).last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls", [GPTNeoXForSequenceClassification, neoxlite.GPTNeoXForTokenClassification,
                                 neoxlite.GPTNeoXForQuestionAnswering])
def test_head_class_from_checkpoint_without_that_head(checkpoint, cls):
    folder, ref = checkpoint()
    with pytest.raises(ValueError, match="init_new_heads") as err:
        load(folder, cls)
    assert "missing" in str(err.value)
    model = load(folder, cls, init_new_heads=True)
    assert not model.training
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():  # the body is the checkpoint's, the new head random
        torch.testing.assert_close(model.gpt_neox(ids).last_hidden_state, ref.gpt_neox(ids).last_hidden_state,
                                   atol=ATOL, rtol=0)
