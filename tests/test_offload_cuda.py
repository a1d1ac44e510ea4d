"""Offloading on a CUDA machine: GPU + pinned RAM + disk give the tokens resident GPU weights give, and the GPU
budget holds. Skipped without a GPU (tests/conftest.py); bench/gpu_check.sh runs them on a lent one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neoxlite.model import GPTNeoXForCausalLM
from neoxlite.offload.placement import Workload, plan_model

pytestmark = pytest.mark.cuda

PROMPTS = torch.tensor([[5, 17, 3, 44, 9, 12], [0, 0, 7, 8, 91, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
CONTEXT = 32


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    # A head (4096 x 128) bigger than a layer, so "no room for the head" is a real case.
    return checkpoint(num_hidden_layers=8, hidden_size=128, intermediate_size=512, vocab_size=4096)[0]


def generate(model) -> torch.Tensor:
    return model.generate(PROMPTS.cuda(), attention_mask=MASK.cuda(), max_new_tokens=10).cpu()


def load(folder: Path, dtype: torch.dtype, **kw) -> GPTNeoXForCausalLM:
    return GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype, device="cuda", progress=False,
                                              max_batch_size=2, max_context=CONTEXT, **kw)


def budgets(folder: Path, dtype: torch.dtype, gpu_layers: int, cpu_layers: int, spec=None,
            head_on_gpu: bool = True) -> tuple[int, int]:
    """(gpu_memory, cpu_memory) that hold the KV cache, workspace, 2 slots, the head and `gpu_layers` layers on the
    GPU, and 2 staging buffers and `cpu_layers` layers in RAM; the rest, and the embedding (read by rows), go to
    disk. head_on_gpu=False moves the head's room from the GPU budget to the CPU one."""
    from neoxlite.config import GPTNeoXConfig
    from neoxlite.offload.placement import quantized_layer_names

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig.from_json_file(folder / "config.json"))
    quantized = quantized_layer_names(model, spec) if spec is not None else ()
    p = plan_model(model, dtype=dtype, device="cpu", spec=spec, quantized=quantized, cpu_memory=1 << 40,
                   workload=Workload(2, CONTEXT))
    layer, head = p.block_bytes["layers.0"], p.block_bytes["head"]
    reserved = p.reserved["cpu"]["kv_cache"] + p.reserved["cpu"]["workspace"]
    gpu = reserved + (head if head_on_gpu else 0) + (2 + gpu_layers) * layer + layer // 4
    cpu = (0 if head_on_gpu else head) + (2 + cpu_layers) * layer + layer // 4
    return gpu, cpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_ram_and_disk_give_the_resident_tokens(ckpt, tmp_path, dtype):
    want = generate(load(ckpt, dtype))
    gpu, cpu = budgets(ckpt, dtype, gpu_layers=2, cpu_layers=2)
    model = load(ckpt, dtype, gpu_memory=gpu, cpu_memory=cpu, offload_dir=tmp_path)
    homes = [model.offload_plan.homes[f"layers.{i}"] for i in range(8)]
    assert homes == ["gpu"] * 2 + ["cpu"] * 2 + ["disk"] * 4, model.offload_plan.explain()
    assert list(model.gpt_neox.scheduler.describe().values()) == ["resident"] * 2 + ["ram"] * 2 + ["disk"] * 4
    assert torch.equal(generate(model), want)
    assert torch.equal(generate(model), want)


def test_gpu_budget_holds(ckpt, tmp_path):
    torch.cuda.empty_cache()
    gpu, cpu = budgets(ckpt, torch.float16, gpu_layers=1, cpu_layers=1)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = load(ckpt, torch.float16, gpu_memory=gpu, cpu_memory=cpu, offload_dir=tmp_path)
    generate(model)
    assert torch.cuda.max_memory_allocated() - base <= gpu, (torch.cuda.max_memory_allocated() - base, gpu)


def test_head_in_ram_when_the_gpu_is_small(ckpt, tmp_path):
    want = generate(load(ckpt, torch.float16))
    gpu, cpu = budgets(ckpt, torch.float16, gpu_layers=0, cpu_layers=1, head_on_gpu=False)
    model = load(ckpt, torch.float16, gpu_memory=gpu, cpu_memory=cpu, offload_dir=tmp_path)
    assert model.offload_plan.homes["head"] == "cpu", model.offload_plan.explain()
    assert torch.equal(generate(model), want)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_layers_stream_quantized(ckpt, tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    from neoxlite.quant import QuantSpec

    kw = dict(quant=mode, compute_dtype=torch.float16)
    want = generate(load(ckpt, torch.float16, **kw))
    gpu, cpu = budgets(ckpt, torch.float16, gpu_layers=1, cpu_layers=2, spec=QuantSpec.from_kwargs(**kw))
    model = load(ckpt, torch.float16, gpu_memory=gpu, cpu_memory=cpu, offload_dir=tmp_path, **kw)
    described = model.gpt_neox.scheduler.describe()
    assert "ram" in described.values() and "disk" in described.values()
    assert torch.equal(generate(model), want)
    entry = next(s.entry for s in model.gpt_neox.scheduler.sources.values() if hasattr(s, "entry"))
    assert entry.quantized and entry.tensors["attention.dense.weight"].dtype in (torch.uint8, torch.int8)


def test_budgets_default_to_free_gpu_memory(ckpt, tmp_path):
    from neoxlite.offload.budget import default_gpu_budget, free_gpu_memory

    assert 0 < default_gpu_budget("cuda") < free_gpu_memory("cuda") <= torch.cuda.get_device_properties(0).total_memory
    want = generate(load(ckpt, torch.float16))
    model = load(ckpt, torch.float16, offload_dir=tmp_path)  # no budgets given: measured free memory, all fits
    assert set(model.offload_plan.homes.values()) == {"gpu"}, model.offload_plan.explain()
    assert torch.equal(generate(model), want)
