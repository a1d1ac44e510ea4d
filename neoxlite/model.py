"""GPT-NeoX in one file: attention with partial rotary, MLP, block, the base model and its four heads.

Module names equal the Hugging Face state-dict keys (gpt_neox.layers.0.attention.query_key_value.weight, ...),
so hub checkpoints load by name. The base model owns its block loop: `self.scheduler.fetch(i)` hands it layer i
ready on the compute device, which is where the offload scheduler plugs in.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neoxlite import cpu_step
from neoxlite.cache import RowStep, StaticCache
from neoxlite.config import GPTNeoXConfig
from neoxlite.generation import GenerationMixin, context_limit
from neoxlite.linear import Linear
from neoxlite.outputs import ModelOutput

_ACT = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
}


# ----------------------------------------------------------------------------------------------- rotary
def rotary_inv_freq(config: GPTNeoXConfig, seq_len: int) -> torch.Tensor:
    """Inverse frequencies for the rotary dims; dynamic NTK scaling grows the base past the trained context."""
    dim = config.rotary_ndims
    base = config.rotary_emb_base
    if config.rope_type == "dynamic" and seq_len > config.max_position_embeddings:
        factor = config.rope_factor
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    return inv_freq


def rotary_cos_sin(
    config: GPTNeoXConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, rotary_ndims), computed in fp32 then cast, as the reference does."""
    seq_len = int(position_ids.max()) + 1 if config.rope_type == "dynamic" else 0
    inv_freq = rotary_inv_freq(config, seq_len).to(position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, rot/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


class RotaryTable:
    """cos and sin of every position, computed once per (device, dtype) by rotary_cos_sin itself (so a lookup
    gives the numbers the per-call computation gives) and then gathered: a decode step computes no rotary math
    and reads no Python number, so it can be captured as a CUDA graph.

    Dynamic NTK scaling changes the base once a sequence runs past the trained context, so the table only covers
    the positions before it; a step that reaches further computes per call (rotary_cos_sin), as before.
    """

    def __init__(self, config: GPTNeoXConfig) -> None:
        self.config = config
        self.limit = config.max_position_embeddings if config.rope_type == "dynamic" else context_limit(config)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions, all in [0, end) -> cos, sin (B, 1, T, rotary_ndims)."""
        if end > self.limit:
            return rotary_cos_sin(self.config, position_ids, dtype)
        key = (position_ids.device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < end:
            # grown by doubling up to what is asked (a config's context may be huge): each entry's numbers do not
            # depend on the table's length
            size = min(self.limit, max(256, 1 << (end - 1).bit_length()))
            cos, sin = rotary_cos_sin(self.config, torch.arange(size, device=position_ids.device)[None], dtype)
            table = self._tables[key] = (cos[0, 0], sin[0, 0])  # (size, rotary_ndims)
        return table[0][position_ids][:, None], table[1][position_ids][:, None]

    def clear(self) -> None:
        """Drops the tables (the model moved or changed dtype)."""
        self._tables.clear()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


# ----------------------------------------------------------------------------------------------- blocks
class GPTNeoXAttention(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.dropout = config.attention_dropout
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                kv: tuple[StaticCache | RowStep, int] | None) -> torch.Tensor:
        return self.dense(self.attend(self.query_key_value(x), rope, mask, kv))

    def attend(self, fused: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
               kv: tuple[StaticCache | RowStep, int] | None) -> torch.Tensor:
        """(B, T, 3C) fused q/k/v projections -> (B, T, C) attention output, before the output projection."""
        B, T, _ = fused.shape
        C = self.num_heads * self.head_size
        if T == 1 and mask is None and kv is not None:
            fast = cpu_step.decode_attention(fused, rope, kv, self.num_heads)
            if fast is not None:
                return fast
        cos, sin = rope
        # NeoX interleaves per head: each head's slice of the fused output is [q | k | v].
        qkv = fused.view(B, T, self.num_heads, 3 * self.head_size).transpose(1, 2)  # (B, nh, T, 3hs)
        hs = self.head_size
        # q and k rotated in one pass (half the small ops per layer, which matter at batch 1).
        qk = _apply_rotary(qkv[..., : 2 * hs].unflatten(-1, (2, hs)), cos[..., None, :], sin[..., None, :])
        q, k = qk.unbind(-2)  # (B, nh, T, hs) each
        v = qkv[..., 2 * hs:]
        if kv is not None and isinstance(kv[0], RowStep):
            # independent sequences: each row attends to its own slot up to its own position, the same call
            # a batch of one makes (so the same bits)
            rows = kv[0].update(kv[1], k, v)  # per row (1, nh, position + 1, hs)
            y = torch.cat([F.scaled_dot_product_attention(q[b:b + 1], rk, rv) for b, (rk, rv) in enumerate(rows)])
            return y.transpose(1, 2).reshape(B, T, C)
        if kv is not None:
            cache, layer_idx = kv
            k, v = cache.update(layer_idx, k, v)  # (B, nh, past + T, hs)
        is_causal = mask is None and T > 1 and k.shape[2] == T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        return y.transpose(1, 2).reshape(B, T, C)


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACT[config.hidden_act]
        self.exact_gelu = config.hidden_act == "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.dense_h_to_4h
        if self.exact_gelu and type(up) is Linear:  # (a quantized layer is a bitsandbytes class instead)
            return self.dense_4h_to_h(up.forward_gelu(x))
        return self.dense_4h_to_h(self.act(up(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_dropout = nn.Dropout(config.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(config.hidden_dropout)
        self.attention = GPTNeoXAttention(config)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                kv: tuple[StaticCache | RowStep, int] | None = None) -> torch.Tensor:
        if x.shape[1] == 1 and mask is None and kv is not None and not self.training:
            kernel = cpu_step.decode_kernel(self, x, kv)
            if kernel is not None:  # the CPU kernels' direct step: the same operations, the same bits
                return cpu_step.decode_step(self, kernel, x, rope, kv)
        # (dropout is called only when training: at batch 1 each module call is a measurable share of a step)
        attn = self.attention(self.input_layernorm(x), rope, mask, kv)
        if self.training:
            attn = self.post_attention_dropout(attn)
        if self.use_parallel_residual:
            mlp = self.mlp(self.post_attention_layernorm(x))
            # Summed in the reference's order: in bf16, (a + b) + c and (c + b) + a round differently.
            return (self.post_mlp_dropout(mlp) if self.training else mlp) + attn + x
        x = x + attn
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.post_mlp_dropout(mlp) if self.training else mlp)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module's own signature
        self.release_cached_tensors()  # .to()/.half() change the tensors' data in place: look again
        return super()._apply(fn, *args, **kwargs)

    def release_cached_tensors(self) -> None:
        """Drops the references the decode fast path keeps to this layer's tensors. The offload scheduler calls it
        when it unbinds a layer, so a file mapping the tensors view is released (and leaves RSS) at once."""
        cpu_step.release(self)


class ResidentScheduler:
    """Every layer already lives on the compute device: fetching is a lookup."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers

    def fetch(self, i: int) -> nn.Module:
        return self.layers[i]

    def done(self, i: int) -> None:
        pass


def build_attention_mask(
    attention_mask: torch.Tensor | None, past: int, T: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B, 1, T, past + T) mask, True where a query may attend; None when plain causal suffices.

    Every query may always see itself, so rows of padding never become all-masked (which would give NaN).
    """
    if attention_mask is None or bool(attention_mask.all()):
        if T == 1 or past == 0:
            return None  # one query sees the whole cache; or SDPA's is_causal covers it
        attention_mask = None
    L = past + T
    q_pos = torch.arange(past, L, device=device)[:, None]
    k_pos = torch.arange(L, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, L)
    if attention_mask is not None:
        if attention_mask.shape[-1] != L:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache plus input hold {L}; "
                "pass the mask for the whole sequence so far"
            )
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


# ----------------------------------------------------------------------------------------------- models
class GPTNeoXPreTrainedModel(nn.Module):
    base_model_prefix = "gpt_neox"

    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> GPTNeoXPreTrainedModel:
        """Loads a hub id or local folder; see neoxlite.loading.load_pretrained for every keyword."""
        from neoxlite.loading import load_pretrained

        return load_pretrained(cls, path_or_id, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike, max_shard_size: int | str = "2GiB") -> None:
        from neoxlite.saving import save_pretrained

        save_pretrained(self, folder, max_shard_size=max_shard_size)

    @property
    def device(self) -> torch.device:
        return self.base_model.compute_device

    def block_sizes(self) -> dict[str, int]:
        """Bytes each block holds now ('embed_in', 'layers.i', 'head'); quantized layers count their packed
        weights and quant state; a tensor shared by two blocks counts once."""
        from neoxlite.checkpoint import block_of
        from neoxlite.quant.model import block_sizes

        return block_sizes(self, block_of)

    def memory_footprint(self) -> int:
        """Bytes of all weights and buffers (quant state included), each storage counted once."""
        return sum(self.block_sizes().values())

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def base_model(self) -> GPTNeoXModel:
        return self if isinstance(self, GPTNeoXModel) else self.gpt_neox

    def init_weights(self, std: float = 0.02) -> None:
        """Random init as the reference does it (normal(0, std), zero bias, unit LayerNorm); used for training."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


class GPTNeoXModel(GPTNeoXPreTrainedModel):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.scheduler = ResidentScheduler(self.layers)
        self.rotary = RotaryTable(config)
        self._compute_device: torch.device | None = None

    @property
    def compute_device(self) -> torch.device:
        """Where the layers run: set by the loader; otherwise wherever the first layer's weights are."""
        if self._compute_device is not None:
            return self._compute_device
        return next(self.layers.parameters(), self.embed_in.weight).device

    @compute_device.setter
    def compute_device(self, device: torch.device | str | None) -> None:
        self._compute_device = torch.device(device) if device is not None else None

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module's own signature
        if getattr(self.scheduler, "sources", None):
            raise RuntimeError(
                "this model is offloaded (some layers live in RAM or the offload dir, in the form they were loaded "
                "in), so .to()/.cuda()/.half() cannot move or cast it; load it again with the dtype, device and "
                "budgets you want: from_pretrained(..., dtype=..., device=..., gpu_memory=..., cpu_memory=...)"
            )
        # .to()/.cuda()/.half() move everything to one device: the explicit compute device no longer holds.
        self._compute_device = None
        self.rotary.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: StaticCache | None = None,
        output_hidden_states: bool = False,
        **_: Any,
    ) -> ModelOutput:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, T = input_ids.shape
        device = self.compute_device
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_length:
            raise ValueError(f"{past + T} tokens do not fit the cache of {cache.max_length}; allocate a longer cache")
        x = self.embed_in(input_ids.to(self.embed_in.weight.device)).to(device)
        x = self.emb_dropout(x)
        if position_ids is None:
            end = past + T
            position_ids = torch.arange(past, end, device=device)[None].expand(B, T)
        else:
            position_ids = position_ids.to(device)
            # positions a caller chose: the table covers them only when they are in [0, its limit) (one read-back)
            lowest, highest = torch.stack(torch.aminmax(position_ids)).tolist()
            end = highest + 1 if lowest >= 0 else self.rotary.limit + 1
        rope = self.rotary.rope(position_ids, x.dtype, end)
        mask = build_attention_mask(attention_mask, past, T, device)
        if cache is not None:
            cache.begin(torch.arange(past, past + T, device=device), past + T)
        x, hidden_states = self.run_blocks(x, rope, mask, cache, output_hidden_states)
        if cache is not None:
            cache.length = past + T
        return ModelOutput(last_hidden_state=x, hidden_states=hidden_states)

    def run_blocks(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                   cache: StaticCache | RowStep | None, output_hidden_states: bool = False
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The block loop, fetched through the scheduler, and the final norm: (B, T, C) -> (B, T, C), and every
        block's output when asked. A StaticCache's `begin` says where this forward writes and what it reads; a
        RowStep says it per row."""
        hidden_states = [x] if output_hidden_states else None
        # one new token of a resident model on the CPU kernels: the layers' checks made at once (cpu_step.decode_plan)
        plan = (cpu_step.decode_plan(self.layers, x, cache)
                if cache is not None and mask is None and not output_hidden_states
                and isinstance(self.scheduler, ResidentScheduler) else None)
        if plan is not None:
            for i, (layer, kernel) in enumerate(plan):
                x = cpu_step.decode_step(layer, kernel, x, rope, (cache, i))
        else:
            for i in range(len(self.layers)):
                layer = self.scheduler.fetch(i)
                x = layer(x, rope, mask, (cache, i) if cache is not None else None)
                self.scheduler.done(i)
                if hidden_states is not None:
                    hidden_states.append(x)
        x = self.final_layer_norm(x.to(self.final_layer_norm.weight.device))
        if hidden_states is not None:
            hidden_states[-1] = x  # the reference reports the normed output as the last hidden state
        return x, tuple(hidden_states) if hidden_states else None

    def decode_one_token(self, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                         mask: torch.Tensor | None, cache: StaticCache) -> torch.Tensor:
        """One new token per row, tensors in and out: (B, 1) ids written at cache position input_pos ((1,) int64),
        rotated by position_ids (B, 1), attending under `mask` -> (B, 1, C) normed hidden states.

        With a fixed-shape cache every step reads the whole buffer under a (B, 1, 1, max_length) mask and reads
        no Python number (what a CUDA graph captures); otherwise it reads the first length + 1 positions, the CPU
        step (its kernels take the length as a number, which costs no synchronisation on the CPU).
        """
        device = self.compute_device
        x = self.embed_in(tokens.to(self.embed_in.weight.device)).to(device)
        rope = self.rotary.rope(position_ids, x.dtype, cache.max_length)
        if cache.fixed_shape:
            cache.begin(input_pos, None)
            return self.run_blocks(x, rope, mask, cache)[0]
        cache.begin(input_pos, cache.length + 1)
        x = self.run_blocks(x, rope, mask, cache)[0]
        cache.length += 1
        return x

    def decode_rows(self, tokens: torch.Tensor, step: RowStep) -> torch.Tensor:
        """One new token for each of B independent sequences (continuous batching): (B,) ids, each at its own
        position in its own cache slot (`step`) -> (B, 1, C) normed hidden states. The same blocks, fetched through
        the same scheduler loop, as forward(); each row gets the bits a batch of one gets."""
        device = self.compute_device
        x = self.embed_in(tokens[:, None].to(self.embed_in.weight.device)).to(device)  # (B, 1, C)
        positions = step.positions_tensor[:, None]  # (B, 1)
        if self.config.rope_type == "dynamic":  # the base follows each row's own length
            pairs = [self.rotary.rope(positions[b:b + 1], x.dtype, p + 1) for b, p in enumerate(step.positions)]
            rope = (torch.cat([c for c, _ in pairs]), torch.cat([s for _, s in pairs]))
        else:
            rope = self.rotary.rope(positions, x.dtype, max(step.positions) + 1)
        return self.run_blocks(x, rope, None, step)[0]


class GPTNeoXForCausalLM(GenerationMixin, GPTNeoXPreTrainedModel):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: StaticCache | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> ModelOutput:
        out = self.gpt_neox(input_ids, attention_mask, position_ids, cache, output_hidden_states)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.embed_out(h.to(self.embed_out.weight.device))
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift, labels[:, 1:].reshape(-1).to(shift.device), ignore_index=-100)
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)

    def decode_one_token(self, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                         mask: torch.Tensor | None, cache: StaticCache) -> torch.Tensor:
        """GPTNeoXModel.decode_one_token, then the head: (B, V) next-token logits. Tensors only (see there)."""
        h = self.gpt_neox.decode_one_token(tokens, input_pos, position_ids, mask, cache)
        return self.embed_out(h.to(self.embed_out.weight.device))[:, -1]

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module's own signature
        from neoxlite import cuda_graphs

        cuda_graphs.release(self)  # captured steps hold the old tensors' addresses
        return super()._apply(fn, *args, **kwargs)

    def decode_rows(self, tokens: torch.Tensor, step: RowStep) -> torch.Tensor:
        """(B,) ids of independent sequences, each at its own position and slot -> (B, V) next-token logits."""
        h = self.gpt_neox.decode_rows(tokens, step)
        return self.embed_out.forward_rows(h.to(self.embed_out.weight.device))[:, -1]


def sequence_classification_loss(pooled: torch.Tensor, labels: torch.Tensor, config: GPTNeoXConfig) -> torch.Tensor:
    """transformers' ForSequenceClassificationLoss: config.problem_type picks MSE, cross entropy or BCE-with-logits;
    when unset it is inferred (one label: regression; integer labels: single-label; else multi-label) and, as
    transformers does, recorded in the config, so later calls and save_pretrained keep it."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    scores = pooled.float()  # the loss in fp32 whatever the weights' dtype
    labels = labels.to(scores.device)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(scores.view(-1, num_labels), labels.view(-1), ignore_index=-100)
    if not labels.is_floating_point():
        labels = labels.to(scores.dtype)  # integer targets for MSE or BCE
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(scores.squeeze(), labels.squeeze())
        return F.mse_loss(scores, labels)
    return F.binary_cross_entropy_with_logits(scores, labels)


class GPTNeoXForSequenceClassification(GPTNeoXPreTrainedModel):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.gpt_neox = GPTNeoXModel(config)
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **_: Any,
    ) -> ModelOutput:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        out = self.gpt_neox(input_ids, attention_mask, position_ids, None, output_hidden_states)
        logits = self.score(out.last_hidden_state.to(self.score.weight.device))
        B, T = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:
                raise ValueError(
                    "sequence classification of a batch needs config.pad_token_id to find each row's last token; "
                    "set model.config.pad_token_id = tokenizer.pad_token_id"
                )
            last = torch.full((B,), T - 1, device=logits.device)
        else:
            # Last non-pad position; works for left and right padding alike.
            not_pad = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(T, device=logits.device, dtype=torch.int32) * not_pad).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]
        loss = sequence_classification_loss(pooled, labels, self.config) if labels is not None else None
        return ModelOutput(loss=loss, logits=pooled, hidden_states=out.hidden_states)


class GPTNeoXForTokenClassification(GPTNeoXPreTrainedModel):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.gpt_neox = GPTNeoXModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **_: Any,
    ) -> ModelOutput:
        out = self.gpt_neox(input_ids, attention_mask, position_ids, None, output_hidden_states)
        h = self.dropout(out.last_hidden_state.to(self.classifier.weight.device))
        logits = self.classifier(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, self.num_labels), labels.reshape(-1).to(logits.device))
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class GPTNeoXForQuestionAnswering(GPTNeoXPreTrainedModel):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.qa_outputs = Linear(config.hidden_size, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **_: Any,
    ) -> ModelOutput:
        out = self.gpt_neox(input_ids, attention_mask, position_ids, None, output_hidden_states)
        logits = self.qa_outputs(out.last_hidden_state.to(self.qa_outputs.weight.device))
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start_logits.shape[1]
            s = start_positions.to(start_logits.device).clamp(0, T)
            e = end_positions.to(end_logits.device).clamp(0, T)
            loss = (F.cross_entropy(start_logits.float(), s, ignore_index=T)
                    + F.cross_entropy(end_logits.float(), e, ignore_index=T)) / 2
        return ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states)


ARCHITECTURES: dict[str, type[GPTNeoXPreTrainedModel]] = {
    cls.__name__: cls
    for cls in (GPTNeoXModel, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification,
                GPTNeoXForTokenClassification, GPTNeoXForQuestionAnswering)
}

