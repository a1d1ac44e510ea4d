"""neoxlite's models against transformers on small random hub-layout checkpoints (fp32, within 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import neoxlite

ATOL = 1e-4

# Each config flips several switches at once, so a handful covers every field that changes the math.
CONFIGS = {
    "pythia": {},  # parallel residual, attention bias, rotary_pct 0.25, gelu, untied
    "sequential-nobias-tied": dict(use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True,
                                   rotary_pct=1.0, hidden_act="gelu_new"),
    "relu-half-rotary": dict(hidden_act="relu", rotary_pct=0.5, rotary_emb_base=500.0),
    "silu-sequential": dict(hidden_act="silu", use_parallel_residual=False, rotary_pct=0.125),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # 40 tokens > max_position_embeddings: dynamic NTK scaling grows the base.
    "rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
}
ARCHS = ["GPTNeoXModel", "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification",
         "GPTNeoXForTokenClassification", "GPTNeoXForQuestionAnswering"]
PAD = 1


def load(folder, arch: str = "GPTNeoXForCausalLM", **kwargs):
    return getattr(neoxlite, arch).from_pretrained(folder, progress=False, **kwargs)


def padded_batch(side: str, T: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: full, 4 pads, 7 pads, padded on `side`; real tokens never equal PAD."""
    ids = torch.randint(2, 96, (3, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, n in ((1, 4), (2, 7)):
        cols = slice(0, n) if side == "left" else slice(T - n, T)
        ids[row, cols], mask[row, cols] = PAD, 0
    return ids, mask


@pytest.mark.parametrize("classic", [True, False], ids=["classic-config", "rope_parameters-config"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_hidden_states_match_reference(checkpoint, name, classic):
    folder, ref = checkpoint(classic=classic, **CONFIGS[name])
    config = json.loads((folder / "config.json").read_text())
    assert ("rope_parameters" in config) != classic  # the form under test is the one on disk
    model = load(folder)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = model(ids, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == ref.config.num_hidden_layers + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m, i=i: f"hidden state {i}: {m}")


@pytest.mark.parametrize("name", ["rope-linear", "rope-dynamic"])
def test_rope_scaling_changes_the_result(checkpoint, name):
    """The scaled configs would pass the comparison above vacuously if scaling were ignored on both sides."""
    overrides = CONFIGS[name]
    plain_folder, _ = checkpoint(**{k: v for k, v in overrides.items() if k != "rope_scaling"})
    scaled_folder, _ = checkpoint(**overrides)  # same seed: same weights, only the rope differs
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, scaled = load(plain_folder)(ids).logits, load(scaled_folder)(ids).logits
    assert (plain - scaled).abs().max() > 1e-3
    if name == "rope-dynamic":  # within the trained context (16) dynamic scaling is the identity
        with torch.no_grad():
            short_plain, short_scaled = load(plain_folder)(ids[:, :16]).logits, load(scaled_folder)(ids[:, :16]).logits
        torch.testing.assert_close(short_plain, short_scaled, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_heads_match_reference_on_padded_batches(checkpoint, arch, side):
    folder, ref = checkpoint(arch, pad_token_id=PAD, num_labels=3)
    model = load(folder, arch)
    ids, mask = padded_batch(side)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask)
        got = model(ids, attention_mask=mask)
    keys = {"GPTNeoXModel": ["last_hidden_state"], "GPTNeoXForQuestionAnswering": ["start_logits", "end_logits"]}
    for key in keys.get(arch, ["logits"]):
        g, w = got[key], want[key]
        assert g.shape == w.shape, key
        if arch == "GPTNeoXForSequenceClassification":
            assert g.shape == (3, 3)  # pooled at each row's last real token
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
        else:  # what pad positions hold is unspecified; every real position must match
            torch.testing.assert_close(g[mask.bool()], w[mask.bool()], atol=ATOL, rtol=0, msg=key)


def test_sequence_classification_pools_last_real_token(checkpoint):
    folder, _ = checkpoint("GPTNeoXForSequenceClassification", pad_token_id=PAD, num_labels=3)
    model = load(folder, "GPTNeoXForSequenceClassification")
    ids, mask = padded_batch("right")
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for row in range(3):
            alone = model(ids[row][mask[row].bool()][None]).logits
            torch.testing.assert_close(batch[row], alone[0], atol=ATOL, rtol=0)


def test_sequence_classification_batch_without_pad_token_is_clear_error(checkpoint):
    folder, _ = checkpoint("GPTNeoXForSequenceClassification", num_labels=3)
    model = load(folder, "GPTNeoXForSequenceClassification")
    with pytest.raises(ValueError, match="pad_token_id"):
        model(torch.randint(2, 96, (2, 5)))
    assert model(torch.randint(2, 96, (1, 5))).logits.shape == (1, 3)  # one row needs no pad id


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_names_equal_hf_state_dict_keys(checkpoint, arch, tied):
    folder, ref = checkpoint(arch, tie_word_embeddings=tied)
    model = load(folder, arch)
    # transformers 5 calls NeoX's output projection lm_head in memory; hub checkpoints (and we) call it embed_out.
    want = {k.replace("lm_head.", "embed_out."): tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.named_parameters(remove_duplicate=False)}
    assert got == want
    assert set(model.state_dict()) == set(want)
    assert not list(model.buffers())  # rotary tables and masks are computed, never stored
    if tied and arch == "GPTNeoXForCausalLM":
        assert model.embed_out.weight is model.gpt_neox.embed_in.weight


def test_legacy_buffers_in_checkpoint_are_ignored(checkpoint, tmp_path):
    folder, ref = checkpoint(shard_kb=None)
    state = load_file(folder / "model.safetensors")
    for i in range(ref.config.num_hidden_layers):  # what old (transformers 4.x era) checkpoints carry
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, 128, 128, dtype=torch.bool))
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    state["gpt_neox.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model = load(tmp_path)
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)


def test_from_pretrained_returns_eval_mode(checkpoint):
    folder, _ = checkpoint("GPTNeoXForTokenClassification")
    model = load(folder, "GPTNeoXForTokenClassification")
    assert not model.training and not any(m.training for m in model.modules())
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)  # dropout is off


@pytest.mark.parametrize("convert,dtype", [
    (lambda m: m.half(), torch.float16),
    (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    (lambda m: m.to("cpu", torch.float64), torch.float64),
    (lambda m: m.half().float(), torch.float32),
], ids=["half", "to-bf16", "to-cpu-fp64", "half-then-float"])
def test_half_and_to_convert_and_still_run(checkpoint, convert, dtype):
    folder, ref = checkpoint()
    model = load(folder)
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        want = ref(ids).logits
        assert convert(model) is model
        assert model.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
        assert model.device == torch.device("cpu")
        logits = model(ids).logits
        assert logits.dtype == dtype
        tol = ATOL if dtype == torch.float64 else 0.05 * float(want.abs().max())
        torch.testing.assert_close(logits.float(), want, atol=tol, rtol=0)
        out = model.generate(ids, max_new_tokens=3)  # the KV cache follows the new dtype
    assert out.shape == (1, 19)


@pytest.mark.parametrize("arch,names", [
    ("GPTNeoXModel", ["last_hidden_state"]),
    ("GPTNeoXForCausalLM", ["logits"]),
    ("GPTNeoXForSequenceClassification", ["logits"]),
    ("GPTNeoXForTokenClassification", ["logits"]),
    ("GPTNeoXForQuestionAnswering", ["start_logits", "end_logits"]),
])
def test_outputs_read_as_attributes_keys_and_indices(checkpoint, arch, names):
    folder, _ = checkpoint(arch)
    model = load(folder, arch)
    with torch.no_grad():
        out = model(torch.randint(0, 96, (1, 6)))
    assert list(out.keys()) == names
    for i, name in enumerate(names):
        assert getattr(out, name) is out[name] is out[i]
        assert isinstance(out[name], torch.Tensor)
    assert out.loss is None and out.hidden_states is None
    with torch.no_grad():
        hs = model(torch.randint(0, 96, (1, 6)), output_hidden_states=True).hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("arch", ["GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification",
                                  "GPTNeoXForTokenClassification", "GPTNeoXForQuestionAnswering"])
def test_losses_match_reference(checkpoint, arch):
    folder, ref = checkpoint(arch, pad_token_id=PAD, num_labels=3)
    model = load(folder, arch)
    ids = torch.randint(2, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = {
        "GPTNeoXForCausalLM": dict(labels=ids),
        "GPTNeoXForSequenceClassification": dict(labels=torch.tensor([0, 2])),
        "GPTNeoXForTokenClassification": dict(labels=torch.randint(0, 3, (2, 10))),
        "GPTNeoXForQuestionAnswering": dict(start_positions=torch.tensor([1, 4]), end_positions=torch.tensor([3, 8])),
    }[arch]
    with torch.no_grad():
        want, got = ref(ids, **labels).loss, model(ids, **labels).loss
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
