"""Quantized models offload in quantized form: packed 4-bit weights and their scales are what is stored and read."""

from __future__ import annotations

import pytest
import torch

from neoxlite.model import GPTNeoXForCausalLM
from neoxlite.offload.planner import BudgetTooSmall

PROMPTS = torch.tensor([[5, 17, 3, 44, 9, 12], [0, 0, 7, 8, 91, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def generate(model: GPTNeoXForCausalLM) -> torch.Tensor:
    return model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=10)


def test_quantized_layers_travel_quantized(checkpoint, tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = checkpoint(hidden_size=128, intermediate_size=256, num_hidden_layers=3)[0]
    resident = GPTNeoXForCausalLM.from_pretrained(folder, quant="nf4", compute_dtype=torch.float32, progress=False)
    want = generate(resident)
    with pytest.raises(BudgetTooSmall) as info:
        GPTNeoXForCausalLM.from_pretrained(folder, quant="nf4", compute_dtype=torch.float32, progress=False,
                                           cpu_memory=1, offload_dir=tmp_path, max_context=32, max_batch_size=2)
    model = GPTNeoXForCausalLM.from_pretrained(folder, quant="nf4", compute_dtype=torch.float32, progress=False,
                                               cpu_memory=info.value.minimum, offload_dir=tmp_path, max_context=32,
                                               max_batch_size=2)
    assert all(model.offload_plan.homes[f"layers.{i}"] == "disk" for i in range(3))
    assert torch.equal(generate(model), want)
    # on disk: the packed 4-bit weights and their scales, about a quarter of the float32 bytes
    entry = model.gpt_neox.scheduler.sources[0].entry
    assert sorted(entry.quantized) == ["attention.dense", "attention.query_key_value", "mlp.dense_4h_to_h",
                                      "mlp.dense_h_to_4h"]
    assert entry.tensors["attention.dense.weight"].dtype == torch.uint8
    planned = model.offload_plan.block_bytes["layers.0"]
    assert entry.data_bytes <= planned < entry.data_bytes + 4 * 256  # the estimate bounds the quant-state JSON
    # saved from the store as it is (packed 4-bit), it loads back pre-quantized and generates the same tokens
    model.save_pretrained(tmp_path / "saved")
    again = GPTNeoXForCausalLM.from_pretrained(tmp_path / "saved", progress=False)
    assert torch.equal(generate(again), want)
    assert torch.equal(again.state_dict()["gpt_neox.layers.1.attention.dense.weight"].cpu(),
                       resident.state_dict()["gpt_neox.layers.1.attention.dense.weight"].cpu())
