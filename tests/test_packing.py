"""Packed bf16 CPU linears: the same bits as nn.Linear, no extra memory, plain tensors wherever one is asked for."""

from __future__ import annotations

import pytest
import torch

from neoxlite import GPTNeoXForCausalLM
from neoxlite.packing import PackedLinear, packing_available

pytestmark = pytest.mark.skipif(not packing_available(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU/torch has no oneDNN bf16 path")


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint(hidden_size=128, intermediate_size=512, vocab_size=512)[0]


def test_bf16_cpu_load_packs_and_matches_plain_linears(folder):
    packed = GPTNeoXForCausalLM.from_pretrained(folder, dtype="bf16", progress=False)
    assert isinstance(packed.gpt_neox.layers[0].mlp.dense_h_to_4h, PackedLinear)
    assert isinstance(packed.embed_out, PackedLinear)
    plain = GPTNeoXForCausalLM.from_pretrained(folder, dtype="bf16", progress=False)
    plain.float().to(torch.bfloat16)  # .to() unpacks every layer
    assert not any(isinstance(m, PackedLinear) and m.weight_packed is not None for m in plain.modules())
    prompt = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(prompt).logits, plain(prompt).logits)
    assert torch.equal(packed.generate(prompt, max_new_tokens=12), plain.generate(prompt, max_new_tokens=12))


def test_state_dict_save_and_footprint_see_plain_weights(folder, tmp_path):
    model = GPTNeoXForCausalLM.from_pretrained(folder, dtype="bf16", progress=False)
    state = model.state_dict()
    key = "gpt_neox.layers.1.attention.query_key_value.weight"
    assert state[key].layout == torch.strided and state[key].shape == (384, 128)
    model.save_pretrained(tmp_path / "copy")
    again = GPTNeoXForCausalLM.from_pretrained(tmp_path / "copy", progress=False)
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.state_dict()[key], state[key])
    plain_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert model.memory_footprint() == plain_bytes


def test_fp32_and_training_loads_stay_plain(folder):
    fp32 = GPTNeoXForCausalLM.from_pretrained(folder, dtype="fp32", progress=False)
    assert type(fp32.embed_out) is torch.nn.Linear
    from neoxlite import GPTNeoXForSequenceClassification

    trainable = GPTNeoXForSequenceClassification.from_pretrained(folder, dtype="bf16", progress=False,
                                                                 init_new_heads=True)
    assert not any(isinstance(m, PackedLinear) for m in trainable.modules())
