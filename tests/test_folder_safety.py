"""Writing and copying folders never reaches outside them: save_pretrained keeps the other files of the folder it
saves into, quantize copies only files that lie in SRC, and --overwrite replaces only a checkpoint folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint
from neoxlite.quant.serialize import quantize_checkpoint

from neoxlite import GPTNeoXForCausalLM
from neoxlite.api import load_demo


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("folder-safety") / "src"
    make_checkpoint(folder)
    return folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(10)[None] % 96).logits


def test_save_pretrained_after_the_tokenizer_keeps_it_and_the_folders_other_files(tmp_path):
    """The transformers sequence `tokenizer.save_pretrained(out); model.save_pretrained(out)` leaves both."""
    model, tokenizer = load_demo(progress=False)
    out = tmp_path / "finetune"
    out.mkdir()
    (out / "NOTES.md").write_text("my notes")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}")
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "data" / "train.jsonl").exists()
    reloaded = GPTNeoXForCausalLM.from_pretrained(out, progress=False)
    assert torch.equal(logits(reloaded), logits(model))
    from neoxlite import GPTNeoXTokenizerFast

    assert GPTNeoXTokenizerFast.from_pretrained(out)("def f():").input_ids == tokenizer("def f():").input_ids
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_resaving_switches_between_sharded_and_single_and_drops_the_old_weights(source, tmp_path):
    model = GPTNeoXForCausalLM.from_pretrained(source, progress=False)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="100KB")
    first = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(first) > 1 and all(name.startswith("model-0") for name in first)
    model.save_pretrained(out, max_shard_size="100KB")  # the same names are taken: tagged ones, old ones removed
    second = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(second.values()).isdisjoint(first)
    assert sorted(p.name for p in out.glob("model*.safetensors")) == sorted(set(second.values()))
    model.save_pretrained(out)  # one file: the index and every shard go
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= names <= {"config.json", "generation_config.json", "model.safetensors"}
    assert torch.equal(logits(GPTNeoXForCausalLM.from_pretrained(out, progress=False)), logits(model))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        model.save_pretrained(out / "model.safetensors")


def test_quantize_refuses_a_link_out_of_src(source, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for path in source.iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    os.symlink(secret, src / "README.md")
    with pytest.raises(ValueError, match=r"README.md is a link to .*id_rsa, outside the checkpoint folder"):
        quantize_checkpoint(src, tmp_path / "out", quant="int8", progress=False)
    assert not (tmp_path / "out").exists()
    (src / "README.md").unlink()
    os.symlink("tokenizer_config.json", src / "README.md")  # a link inside SRC is copied as a file
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    quantize_checkpoint(src, tmp_path / "out", quant="int8", progress=False)
    copied = tmp_path / "out" / "README.md"
    assert not copied.is_symlink() and json.loads(copied.read_text()) == {"model_max_length": 64}


def test_quantize_overwrite_replaces_only_a_checkpoint_folder(source, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="not a checkpoint .*--overwrite replaces a checkpoint folder whole"):
        quantize_checkpoint(source, home, quant="int8", overwrite=True, progress=False)
    assert (home / "thesis.tex").read_text() == "mine"
    with pytest.raises(ValueError, match="exists and is not a folder"):
        quantize_checkpoint(source, home / "thesis.tex", quant="int8", overwrite=True, progress=False)
    assert (home / "thesis.tex").read_text() == "mine"
    quantize_checkpoint(source, tmp_path / "q", quant="int8", progress=False)
    quantize_checkpoint(source, tmp_path / "q", quant="nf4", overwrite=True, progress=False)  # a checkpoint: replaced
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
