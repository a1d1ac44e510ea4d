"""Small random GPT-NeoX checkpoints in hub layout, written by transformers (the reference) for the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY = dict(
    vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=160,
    max_position_embeddings=128, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
    attention_bias=True, tie_word_embeddings=False, hidden_act="gelu", eos_token_id=0, bos_token_id=0,
)


def hf_model(arch: str = "GPTNeoXForCausalLM", seed: int = 0, **overrides: Any):
    """A transformers model with random weights (and random LayerNorm/biases so nothing is trivially zero)."""
    import transformers

    cfg_kwargs = {**TINY, **overrides}
    cfg = transformers.GPTNeoXConfig(**cfg_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(std=0.02)
    return model


def make_checkpoint(folder: Path, arch: str = "GPTNeoXForCausalLM", seed: int = 0, shard_kb: int | None = 64,
                    classic: bool = True, dtype: torch.dtype = torch.float32, **overrides: Any):
    """Writes a hub-layout checkpoint (sharded safetensors + index, config.json) and returns the reference model.

    classic=True rewrites config.json in the form real hub checkpoints carry (rotary_pct, rotary_emb_base,
    rope_scaling); classic=False keeps the newer rope_parameters form that transformers 5 writes.
    """
    model = hf_model(arch, seed, **overrides).to(dtype)
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(folder, **kwargs)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    if classic:
        rope = config.pop("rope_parameters", None) or {}
        config["rotary_pct"] = rope.get("partial_rotary_factor", overrides.get("rotary_pct", 0.25))
        config["rotary_emb_base"] = rope.get("rope_theta", overrides.get("rotary_emb_base", 10000))
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
        config_path.write_text(json.dumps(config, indent=2))
    return model
