"""generation_config.json: read at load, used by generate() as defaults under explicit keywords (token-identical to
transformers under the same torch seed), saved back, honoured by the CLI's sampling flags; clear errors."""

from __future__ import annotations

import argparse
import json
import shutil
from fnmatch import fnmatch

import pytest
import torch

import neoxlite
from neoxlite.generation import stream_text
from neoxlite.generation_config import GenerationConfig
from neoxlite.hub import HUB_PATTERNS
from neoxlite.options import DEFAULT_SAMPLING, add_sampling_options, sampling_kwargs

transformers = pytest.importorskip("transformers")

PAD = 1
FREE = dict(eos_token_id=None)  # config.json without eos: nothing stops a row unless told to
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 7, "top_p": 0.9, "repetition_penalty": 1.2}


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9, 6 and 3 real tokens, left-padded with PAD."""
    ids = torch.randint(2, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, n in ((1, 3), (2, 6)):
        ids[row, :n], mask[row, :n] = PAD, 0
    return ids, mask


def checkpoint_with(checkpoint, tmp_path, generation: dict | str | None, **config_changes):
    """A copy of the tiny causal checkpoint with this generation_config.json (None: none) and config.json edits."""
    src, _ = checkpoint(**FREE)
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    path = folder / "generation_config.json"
    path.unlink(missing_ok=True)
    if generation is not None:
        path.write_text(generation if isinstance(generation, str) else json.dumps(generation))
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def load_both(folder):
    ours = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    ref = transformers.GPTNeoXForCausalLM.from_pretrained(folder).eval()
    return ours, ref


def run_both(ours, ref, seed: int = 11, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = prompts()
    torch.manual_seed(seed)
    got = ours.generate(ids, mask, **kwargs)
    torch.manual_seed(seed)
    want = ref.generate(ids, attention_mask=mask, **kwargs)
    return got, want


@pytest.fixture(scope="module")
def sampled_run(checkpoint, tmp_path_factory):
    """What transformers samples (seed 11) under SAMPLING with 25 new tokens and no eos: rows to pick eos ids from."""
    folder = checkpoint_with(checkpoint, tmp_path_factory.mktemp("free"), {**SAMPLING, "max_new_tokens": 25})
    _, ref = load_both(folder)
    ids, mask = prompts()
    torch.manual_seed(11)
    return ref.generate(ids, attention_mask=mask)[:, 9:].tolist()


def eos_pair(rows: list[list[int]]) -> list[int]:
    """Two ids that end rows 1 and 2 early: each one's first appearance in its row."""
    return [rows[1][4], rows[2][8]]


# ----------------------------------------------------------------------------------------------- defaults
def test_file_settings_are_generate_defaults_as_in_transformers(checkpoint, tmp_path, sampled_run):
    eos = eos_pair(sampled_run)
    folder = checkpoint_with(checkpoint, tmp_path, {**SAMPLING, "max_new_tokens": 25, "eos_token_id": eos,
                                                    "pad_token_id": PAD, "bos_token_id": 0})
    ours, ref = load_both(folder)
    assert ours.generation_config == GenerationConfig(**SAMPLING, max_new_tokens=25, eos_token_id=eos,
                                                      pad_token_id=PAD, bos_token_id=0)
    assert ref.generation_config.eos_token_id == eos and ref.generation_config.do_sample  # the reference reads it too
    got, want = run_both(ours, ref)
    assert torch.equal(got, want)
    new = got[:, 9:]
    assert new.shape[1] <= 25 and (new[1:] == PAD).any()  # eos from the file ended rows, which were padded
    assert not torch.equal(got, ours.generate(*prompts(), do_sample=False))  # it sampled


def test_max_length_from_the_file(checkpoint, tmp_path):
    folder = checkpoint_with(checkpoint, tmp_path, {"max_length": 15})
    ours, ref = load_both(folder)
    got, want = run_both(ours, ref)
    assert got.shape == (3, 15) and torch.equal(got, want)
    got, want = run_both(ours, ref, max_new_tokens=4)  # max_new_tokens wins over the file's max_length
    assert got.shape == (3, 13) and torch.equal(got, want)
    with pytest.raises(ValueError, match="generation_config"):
        ours.generate(torch.randint(2, 96, (1, 15)))


def test_explicit_keywords_override_the_file(checkpoint, tmp_path, sampled_run):
    eos = eos_pair(sampled_run)
    folder = checkpoint_with(checkpoint, tmp_path, {**SAMPLING, "max_new_tokens": 25, "eos_token_id": eos,
                                                    "pad_token_id": PAD})
    ours, ref = load_both(folder)
    for kwargs in (dict(do_sample=False), dict(temperature=1.3, top_k=0, max_new_tokens=12),
                   dict(top_p=None, repetition_penalty=1.0, max_length=20), dict(eos_token_id=eos[0], pad_token_id=0)):
        got, want = run_both(ours, ref, **kwargs)
        assert torch.equal(got, want), kwargs
    # a passed GenerationConfig sits between the keywords and the model's, as transformers' does
    got = ours.generate(*prompts(), generation_config=GenerationConfig(do_sample=False, max_new_tokens=6))
    want = ref.generate(prompts()[0], attention_mask=prompts()[1],
                        generation_config=transformers.GenerationConfig(do_sample=False, max_new_tokens=6))
    assert got.shape == (3, 15) and torch.equal(got, want)


def test_file_without_eos_ignores_the_config_eos_as_transformers_does(checkpoint, tmp_path):
    free, _ = checkpoint(**FREE)
    stop = neoxlite.GPTNeoXForCausalLM.from_pretrained(free, progress=False).generate(
        prompts()[0][:1], max_new_tokens=20)[0, 9 + 3].item()
    with_file = checkpoint_with(checkpoint, tmp_path / "a", {"max_new_tokens": 20}, eos_token_id=stop)
    ours, ref = load_both(with_file)
    got, want = run_both(ours, ref)
    assert got.shape == (3, 29) and torch.equal(got, want)  # config.json's eos is not used
    without = checkpoint_with(checkpoint, tmp_path / "b", None, eos_token_id=stop)
    ours, ref = load_both(without)
    got, want = run_both(ours, ref, max_new_tokens=20)
    assert torch.equal(got, want) and (got[0, 9 + 3:] == stop).all()  # without the file it is (pad = eos)


# ----------------------------------------------------------------------------------------------- no file
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_missing_file_keeps_the_old_behaviour(checkpoint, tmp_path):
    folder = checkpoint_with(checkpoint, tmp_path, None, pad_token_id=PAD)
    ours, ref = load_both(folder)
    assert ours.generation_config is None
    got, want = run_both(ours, ref)  # greedy, 20 new tokens
    assert got.shape == (3, 29) and torch.equal(got, want)
    got, want = run_both(ours, ref, do_sample=True, max_new_tokens=15)  # top_k 50, temperature 1
    assert torch.equal(got, want)
    row = prompts()[0][:1]
    ours.config.eos_token_id = ours.generate(row, max_new_tokens=15)[0, 9 + 2].item()
    assert ours.generate(row, max_new_tokens=15).shape[1] <= 9 + 3  # the model config's eos, read at generate time


def test_other_heads_do_not_read_the_file(checkpoint, tmp_path):
    folder = checkpoint_with(checkpoint, tmp_path, "{broken")
    model = neoxlite.GPTNeoXModel.from_pretrained(folder, progress=False)
    assert not hasattr(model, "generation_config")


# ----------------------------------------------------------------------------------------------- save and load
def test_save_load_round_trip(checkpoint, tmp_path):
    settings = {**SAMPLING, "max_new_tokens": 25, "eos_token_id": [3, 4], "pad_token_id": PAD, "bos_token_id": 0,
                "min_new_tokens": 2, "transformers_version": "5.0.0"}  # keys neoxlite does not use are kept
    folder = checkpoint_with(checkpoint, tmp_path, settings)
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    assert model.generation_config.extra == {"min_new_tokens": 2, "transformers_version": "5.0.0"}
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text()) == settings
    again = neoxlite.GPTNeoXForCausalLM.from_pretrained(tmp_path / "saved", progress=False)
    assert again.generation_config == model.generation_config
    hf = transformers.GenerationConfig.from_pretrained(tmp_path / "saved")
    assert (hf.temperature, hf.top_k, hf.eos_token_id, hf.max_new_tokens) == (0.8, 7, [3, 4], 25)
    assert GenerationConfig.from_pretrained(tmp_path / "saved") == model.generation_config

    model.generation_config = None  # a model without one saves none
    model.save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / "generation_config.json").exists()


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"max_new_tokens": "ten"}', "max_new_tokens"),
    ('{"max_new_tokens": 0}', "max_new_tokens"),
    ('{"eos_token_id": "</s>"}', "eos_token_id"),
    ('{"do_sample": "yes"}', "do_sample"),
])
def test_malformed_file_is_a_clear_error(checkpoint, tmp_path, text, match):
    folder = checkpoint_with(checkpoint, tmp_path, text)
    with pytest.raises(ValueError, match=match) as err:
        neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    assert "generation_config.json" in str(err.value)


def test_hub_downloads_the_file():
    assert any(fnmatch("generation_config.json", pattern) for pattern in HUB_PATTERNS)


# ----------------------------------------------------------------------------------------------- CLI and text
def parse(*flags: str) -> argparse.Namespace:
    return add_sampling_options(argparse.ArgumentParser()).parse_args(list(flags))


def test_cli_flags_not_given_leave_the_file_alone():
    before = dict(max_new_tokens=128, repetition_penalty=1.1, do_sample=True, temperature=0.7, top_k=50, top_p=0.95)
    assert sampling_kwargs(parse()) == before  # no file: the CLI defaults, as before
    assert sampling_kwargs(parse(), None) == sampling_kwargs(DEFAULT_SAMPLING) == before
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=3, max_new_tokens=40)
    assert sampling_kwargs(parse(), config) == dict(before, temperature=0.5, top_k=3, max_new_tokens=40)
    assert sampling_kwargs(parse("--top-k", "9", "--max-new-tokens", "7"), config) == dict(
        before, temperature=0.5, top_k=9, max_new_tokens=7)
    greedy = GenerationConfig(do_sample=False, repetition_penalty=1.0)
    assert sampling_kwargs(parse(), greedy) == dict(max_new_tokens=128, repetition_penalty=1.0, do_sample=False)
    assert sampling_kwargs(parse("--temperature", "0.9"), greedy)["do_sample"]  # a temperature asks for sampling
    assert not sampling_kwargs(parse("--temperature", "0"), config)["do_sample"]
    assert sampling_kwargs(parse("--seed", "3"), config)["seed"] == 3
    with pytest.raises(ValueError, match="temperature"):
        sampling_kwargs(parse("--temperature", "-1"))


class CharTokenizer:
    """Token i is the character chr(0x100 + i); no special tokens of its own."""

    eos_token_id = None
    pad_token_id = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(0x100 + int(i)) for i in ids)


def test_stream_text_stops_at_the_files_eos_ids(checkpoint, tmp_path):
    folder = checkpoint_with(checkpoint, tmp_path, None)
    model = neoxlite.GPTNeoXForCausalLM.from_pretrained(folder, progress=False)
    row = prompts()[0][:1]
    free = model.generate(row, max_new_tokens=20)[0, 9:].tolist()
    eos = [free[6], 95]
    model.generation_config = GenerationConfig(eos_token_id=eos)
    text = "".join(stream_text(model, CharTokenizer(), row, max_new_tokens=20))
    cut = min(free.index(t) for t in eos if t in free)
    assert text == CharTokenizer().decode(free[:cut])
