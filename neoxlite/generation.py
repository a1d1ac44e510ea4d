"""Text generation: logits processing, greedy and sampled decoding over a static KV cache, as a token stream.

`stream_generate` is the one decoding loop; `generate` collects it into the Hugging Face return shape
(prompt plus new tokens), and `stream_text` turns it into text deltas for the CLI and the app.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from neoxlite.cache import StaticCache
from neoxlite.generation_config import GenerationConfig


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


# A keyword left at UNSET takes the model's generation_config value, else transformers' global default.
UNSET: Any = _Unset()
# transformers' global defaults (GenerationConfig._get_default_generation_params) for what neoxlite implements.
GLOBAL_DEFAULTS: dict[str, Any] = dict(do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)
# Sampling below this temperature picks the most likely token, as greedy does (vLLM's threshold too): that is the
# limit sampling tends to, while logits / such a temperature can overflow float32 to inf (1e-300 even rounds to 0),
# whose softmax is NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingSettings:
    """What turns logits into the next token; validated once, shared by every entry point."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is picked: not sampling, or sampling so cold that it comes to the same."""
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE

    def __post_init__(self) -> None:
        # None turns a setting off, as it does in transformers (no warper, no penalty).
        if isinstance(self.do_sample, (str, bytes)):  # bool("no") is True
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        self.do_sample = bool(self.do_sample)
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _real(name, value))
        if self.top_k is not None:
            self.top_k = _integer("top_k", self.top_k)
        self.temperature = 1.0 if self.temperature is None else self.temperature
        self.repetition_penalty = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # NaN slips through every comparison below
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty}")

    def next_tokens(self, logits: torch.Tensor, seen: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, V) logits of the last position and (B, L) ids so far -> (B,) chosen ids. Same order as the reference:
        repetition penalty, then temperature, top-k, top-p."""
        if not bool(all_finite(logits)):
            raise non_finite_error(logits.dtype)
        return self.choose(logits, seen, generator)

    def choose(self, logits: torch.Tensor, seen: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """next_tokens without the finiteness check (which reads back): the caller checks, now or a few steps on."""
        scores = logits.float()
        if self.repetition_penalty != 1.0:
            picked = scores.gather(1, seen)
            picked = torch.where(picked < 0, picked * self.repetition_penalty, picked / self.repetition_penalty)
            scores = scores.scatter(1, seen, picked)
        if self.greedy:
            return scores.argmax(-1)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cum <= (1 - self.top_p)
            drop_sorted[:, -1] = False  # always keep the most likely token
            scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
        probs = scores.softmax(-1)
        if generator is not None and generator.device != probs.device:
            # A seed makes a CPU generator: draw on its device, so a seed gives the same tokens on every device.
            return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def all_finite(logits: torch.Tensor) -> torch.Tensor:
    """Whether every logit is finite, as a 0-dim bool tensor (no read-back). The smallest and largest of a tensor
    are finite exactly when all of it is (NaN propagates through both): one vectorized pass, about 17x faster on
    the CPU than isfinite().all() for a (16, 50304) bf16 step; float16 on the CPU has no vectorized min/max."""
    if logits.dtype is torch.float16 and logits.device.type == "cpu":
        return torch.isfinite(logits).all()
    low, high = torch.aminmax(logits)
    return torch.isfinite(low) & torch.isfinite(high)


def non_finite_error(dtype: torch.dtype) -> ValueError:
    # NaN would make argmax pick token 0 (often end of text: an empty reply) and multinomial fail deep in torch.
    return ValueError(f"the model produced non-finite logits (NaN or inf) for the next token: its weights hold "
                      f"NaN/inf or overflow in {dtype}; check the checkpoint, or load it in float32 (--dtype float32)")


def _as_list(ids: int | Sequence[int] | torch.Tensor | None, name: str = "eos_token_id") -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype is torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got a tensor of {ids.dtype}")
        return [int(i) for i in ids.flatten()]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) and not hasattr(ids, "__index__"):
        raise TypeError(f"{name} must be a token id (int) or a list of them, got {ids!r}")
    return [_integer(name, i) for i in (ids if isinstance(ids, Sequence) else [ids])]


def _integer(name: str, value: Any) -> int:
    """`value` as an int (an int, a numpy or 0-dim tensor integer); a float, str or bool-like text is refused."""
    if isinstance(value, (str, bytes, float)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return int(value.__index__())
    except (AttributeError, TypeError, RuntimeError):
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _real(name: str, value: Any) -> float:
    """`value` as a float (int, float, numpy or 0-dim tensor number); text and other objects are refused."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


# torch.Generator.manual_seed takes a seed in [-2**63, 2**64): below or above it fails with "Overflow when
# unpacking long long", which names neither the argument nor the range.
SEED_RANGE = (-2**63, 2**64 - 1)


def check_seed(seed: Any) -> int:
    """`seed` as an int, refused (naming the range) when torch's generator cannot take it."""
    seed = _integer("seed", seed)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"seed must be an integer within [-2**63, 2**64 - 1] (what torch takes), got {seed}")
    return seed


def _check_inputs(input_ids: Any, attention_mask: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, P) token ids and their (B, P) attention mask (or None), refused with the argument named when they cannot
    be: a wrong type, dtype or shape, no tokens, ids outside the vocabulary."""
    input_ids = _as_tensor("input_ids", input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, tokens) or (tokens,), got {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype is torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}; use "
                         "tokenizer(text, return_tensors='pt').input_ids")
    if input_ids.numel() == 0:
        raise ValueError("input_ids must be a non-empty tensor of token ids (got no tokens), e.g. "
                         "tokenizer(text, return_tensors='pt').input_ids")
    input_ids = input_ids.long()
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids hold token id {low if low < 0 else high} but the model's vocabulary has ids "
                         f"0 to {vocab_size - 1}; use the tokenizer that belongs to this model")
    if attention_mask is None:
        return input_ids, None
    attention_mask = _as_tensor("attention_mask", attention_mask)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids")
    return input_ids, attention_mask


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be a tensor (or nested list) of token ids, got {value!r:.60}")
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor (or nested list of equal-length rows) of ints: {err}") from None


def _check_stops(stop_strings: Any, tokenizer: Any) -> list[str]:
    stops = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if stops is not None and (isinstance(stops, bytes) or not isinstance(stops, (list, tuple))
                              or not all(isinstance(s, str) for s in stops)):
        raise TypeError(f"stop_strings must be a str or a list of str, got {stop_strings!r:.80}")
    stops = list(stops or [])
    if "" in stops:
        raise ValueError("stop_strings holds an empty string, which every text ends with (generation would stop "
                         "after one token); remove it")
    if stops and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer to read the text: pass tokenizer=... to generate()")
    if stops and not callable(getattr(tokenizer, "batch_decode", None)):
        raise TypeError(f"tokenizer must be a tokenizer (with batch_decode), got {tokenizer!r:.60}")
    return stops


def context_limit(config: Any) -> int:
    """Longest sequence the model may see: the trained context, stretched by rope scaling when configured."""
    if config.rope_type != "default":
        return int(config.max_position_embeddings * config.rope_factor)
    return config.max_position_embeddings


class DecodeStep:
    """The tensors one decode step reads, allocated once per generation and updated in place between steps (a
    captured CUDA graph reads them at fixed addresses)."""

    def __init__(self, cache: StaticCache) -> None:
        B, L, device = cache.keys[0].shape[0], cache.max_length, cache.keys[0].device
        self.cache = cache
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)  # the newest token of each row
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # the cache position it is written at
        self.position_ids = torch.zeros(B, 1, dtype=torch.long, device=device)  # its rotary position per row
        self.visible = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)  # False at each row's padding
        self.key_positions = torch.arange(L, device=device)
        self.padded = False

    def start(self, attention_mask: torch.Tensor, position_ids: torch.Tensor, padded: bool) -> None:
        """After prefill of a (B, P) prompt: the first step writes at P, one position past each row's last."""
        P = attention_mask.shape[1]
        self.visible.fill_(True)
        self.visible[:, 0, 0, :P] = attention_mask.bool()
        self.padded = padded
        self.input_pos.fill_(P)
        self.position_ids.copy_(position_ids[:, -1:] + 1)

    def advance(self) -> None:
        self.input_pos += 1
        self.position_ids += 1

    def mask(self) -> torch.Tensor | None:
        """What the step's queries may attend: with a fixed-shape cache every key up to input_pos that is not
        padding (B, 1, 1, max_length); else the filled part's padding mask, or None without padding (plain
        causal attention, which is what an all-ones mask gives too, and what lets the CPU kernels run)."""
        if self.cache.fixed_shape:
            return (self.key_positions <= self.input_pos) & self.visible
        return self.visible[..., :self.cache.length + 1] if self.padded else None


def readback_interval(device: torch.device, stops: list[str], generator: torch.Generator | None) -> int:
    """Steps between read-backs of the stop and finiteness flags. Reading a flag waits for the device: on a GPU
    they are read every few steps (the tokens of the steps between are held, so the output is the same); on the
    CPU, or when the choice is made on the host anyway (stop strings, a CPU generator), every step."""
    if device.type == "cpu" or stops or (generator is not None and generator.device != device):
        return 1
    return 8


def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
            cache: StaticCache) -> torch.Tensor:
    """The prompt (B, P) through the model into the empty cache -> (B, V) logits of its last position."""
    return model(input_ids, attention_mask, position_ids, cache=cache, logits_to_keep=1).logits[:, -1]


def decode_one_token(model: Any, step: DecodeStep) -> torch.Tensor:
    """step.tokens at step.input_pos -> (B, V) logits: tensors in, tensors out, no read-back (what a CUDA graph
    captures)."""
    return model.decode_one_token(step.tokens, step.input_pos, step.position_ids, step.mask(), step.cache)


@dataclass
class DecodeLoop:
    """What the decoding loop needs besides the logits: settled by stream_generate."""

    settings: SamplingSettings
    step: DecodeStep
    run: Callable[[], torch.Tensor]  # one decode step: step.tokens -> (B, V) logits
    device: torch.device
    every: int  # steps between read-backs of the stop and finiteness flags
    max_new_tokens: int
    pad_token_id: int
    eos: torch.Tensor | None
    stops: list[str]
    tokenizer: Any
    generator: torch.Generator | None


def _decode_loop(loop: DecodeLoop, logits: torch.Tensor, seen: torch.Tensor) -> Iterator[torch.Tensor]:
    """Chooses, yields and feeds back one token per row per step. Flags are read back every `loop.every` steps;
    the tokens in between are held, so a stop or a non-finite step ends the output exactly where it did when
    every step read back."""
    B = seen.shape[0]
    unfinished = torch.ones(B, dtype=torch.bool, device=loop.device)
    held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (tokens, finite, any row unfinished)
    for index in range(loop.max_new_tokens):
        logits = logits.to(loop.device)
        finite = all_finite(logits)
        if loop.settings.do_sample:
            # a non-finite step is reported after the choice (at the read-back): it must not crash the sampler
            logits = torch.where(finite, logits, torch.zeros_like(logits))
        chosen = loop.settings.choose(logits, seen, loop.generator).to(loop.device)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, loop.pad_token_id))
        if loop.eos is not None:
            unfinished &= ~torch.isin(chosen, loop.eos)
        if loop.stops:
            unfinished &= ~_hit_stop(loop.tokenizer, torch.cat([seen, chosen[:, None]], dim=1), loop.stops)
        held.append((chosen, finite, unfinished.any()))
        last = index == loop.max_new_tokens - 1
        if len(held) == loop.every or last:
            flags = torch.stack([torch.stack((f, a)) for _, f, a in held]).tolist()  # the one read-back
            for (tokens, _, _), (is_finite, any_unfinished) in zip(held, flags, strict=True):
                if not is_finite:
                    raise non_finite_error(logits.dtype)
                yield tokens
                if not any_unfinished:
                    return
            held.clear()
        if last:
            return
        seen = torch.cat([seen, chosen[:, None]], dim=1)
        loop.step.tokens.copy_(chosen[:, None])
        logits = loop.run()
        loop.step.advance()


class GenerationMixin:
    """generate() and stream_generate() for GPTNeoXForCausalLM."""

    # The checkpoint's generation_config.json, set by from_pretrained; None when the checkpoint has none, and
    # then the model config's eos_token_id and pad_token_id apply (what transformers builds from config.json).
    generation_config: GenerationConfig | None = None

    @torch.inference_mode()
    def stream_generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = UNSET,
        temperature: float = UNSET,
        top_k: int | None = UNSET,
        top_p: float | None = UNSET,
        repetition_penalty: float = UNSET,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        generation_config: GenerationConfig | None = None,
        cuda_graphs: bool | None = None,
        **unused: Any,
    ) -> Iterator[torch.Tensor]:
        """Yields the next token of every row, shape (B,), one decoding step at a time.

        Rows that have finished (eos or a stop string) yield `pad_token_id` until every row is done.
        Each setting comes, as in transformers, from the keyword when given, else from `generation_config`
        (when passed), else from the model's `generation_config` (the checkpoint's generation_config.json),
        else transformers' default: greedy; sampling keeps the 50 most likely tokens unless top_k says
        otherwise (0 or None: off), and a temperature below GREEDY_BELOW_TEMPERATURE (1e-5) is greedy; with neither
        max_length nor max_new_tokens, 20 new tokens. None for
        max_length, max_new_tokens, eos_token_id or pad_token_id means not given. Without a
        generation_config.json, eos and pad come from the model config. cuda_graphs: replay the decode step as a
        captured CUDA graph where it applies (resident CUDA models; default on, NEOXLITE_CUDA_GRAPHS=0 turns it off).
        """
        unknown = {k for k, v in unused.items() if v is not None} - {"use_cache", "num_beams", "streamer"}
        if unknown:
            raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unknown))}")
        if unused.get("num_beams", 1) not in (None, 1):
            raise ValueError("beam search is not supported; use num_beams=1 (greedy or sampling)")
        config = self.config
        # Where unset values come from, first to last; without generation_config.json the model config stands in
        # for the special tokens only, as transformers' generation config built from config.json does.
        layers: list[Any] = [c for c in (generation_config, self.generation_config) if c is not None]
        if self.generation_config is None:
            layers.append(SimpleNamespace(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id))

        def pick(name: str, given: Any) -> Any:
            if given is not UNSET and (given is not None or name in GLOBAL_DEFAULTS):
                return given  # for a sampling setting, an explicit None turns it off, as in transformers
            for layer in layers:
                value = getattr(layer, name, None)
                if value is not None:
                    return value
            return GLOBAL_DEFAULTS.get(name)

        settings = SamplingSettings(pick("do_sample", do_sample), pick("temperature", temperature),
                                    pick("top_k", top_k), pick("top_p", top_p),
                                    pick("repetition_penalty", repetition_penalty))
        length_given = max_length is not None
        if max_new_tokens is not None and _integer("max_new_tokens", max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        max_new_tokens = pick("max_new_tokens", max_new_tokens)  # given or configured, it wins over max_length
        max_length = pick("max_length", max_length)
        max_new_tokens = None if max_new_tokens is None else _integer("max_new_tokens", max_new_tokens)
        max_length = None if max_length is None else _integer("max_length", max_length)
        eos_ids = _as_list(pick("eos_token_id", eos_token_id), "eos_token_id")
        pad_token_id = pick("pad_token_id", pad_token_id)
        if pad_token_id is not None and not -2**63 <= _integer("pad_token_id", pad_token_id) < 2**63:
            raise ValueError(f"pad_token_id must be a token id, got {pad_token_id}")
        stops = _check_stops(stop_strings, tokenizer)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {generator!r:.60}; or pass seed=N")
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(check_seed(seed))
        input_ids, attention_mask = _check_inputs(input_ids, attention_mask, config.vocab_size)
        B, prompt_len = input_ids.shape
        limit = context_limit(config)
        if prompt_len > limit:
            raise ValueError(
                f"the prompt has {prompt_len} tokens but the model's context is {limit}; shorten the prompt "
                f"(keep its last {limit} tokens, or fewer to leave room for the reply)"
            )
        if max_new_tokens is None:
            max_new_tokens = max_length - prompt_len if max_length is not None else 20
        if max_new_tokens <= 0:
            where = "" if length_given else " (from the model's generation_config)"
            raise ValueError(
                f"nothing to generate: the prompt already has {prompt_len} tokens and max_length is {max_length}"
                f"{where}; raise max_length or pass max_new_tokens"
            )
        max_new_tokens = min(max_new_tokens, limit - prompt_len)
        reserved = getattr(self, "offload_workload", None)
        if reserved is not None and (B > reserved[0] or prompt_len + max_new_tokens > reserved[1]):
            raise ValueError(
                f"this generation needs room for {B} sequence(s) of {prompt_len + max_new_tokens} tokens, but the "
                f"memory plan reserved {reserved[0]} of {reserved[1]}; load with max_batch_size={max(B, reserved[0])} "
                f"and max_context={max(prompt_len + max_new_tokens, reserved[1])} (--max-batch-size/--max-context), "
                "or ask for less"
            )
        if max_new_tokens <= 0:
            return
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0

        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        # Positions count real tokens only, so a left-padded row is positioned as if it had no padding.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        padded = not bool(attention_mask.all())  # checked once here, not once a step
        step, run = self._decode_step(B, prompt_len + max_new_tokens, cuda_graphs)
        logits = prefill(self, input_ids, attention_mask if padded else None, position_ids, step.cache)
        step.start(attention_mask, position_ids, padded)
        every = readback_interval(device, stops, generator)
        yield from _decode_loop(DecodeLoop(settings, step, run, device, every, max_new_tokens, pad_token_id,
                                           torch.tensor(eos_ids, device=device) if eos_ids else None,
                                           stops, tokenizer, generator), logits, input_ids)

    def _decode_step(self, batch_size: int, length: int, cuda_graphs: bool | None
                     ) -> tuple[DecodeStep, Callable[[], torch.Tensor]]:
        """The step's tensors and the call that runs it: a replayed CUDA graph for resident CUDA models (unless
        cuda_graphs=False or NEOXLITE_CUDA_GRAPHS=0), else the step itself."""
        from neoxlite import cuda_graphs as graphs

        device = self.device
        dtype = self._cache_dtype()
        if not graphs.fixed_shape(self):  # the CPU step (and offloaded models): reads the filled part of the cache
            step = DecodeStep(StaticCache(self.config, batch_size, length, dtype, device))
            return step, functools.partial(decode_one_token, self, step)
        # one shape for all steps, rounded up so generations of nearby lengths share a captured graph
        length = min(-(-length // graphs.LENGTH_QUANTUM) * graphs.LENGTH_QUANTUM, max(length, context_limit(self.config)))
        if not graphs.wanted(cuda_graphs):
            step = DecodeStep(StaticCache(self.config, batch_size, length, dtype, device, fixed_shape=True))
            return step, functools.partial(decode_one_token, self, step)
        captured = graphs.captured_step(self, (batch_size, length, dtype), lambda: DecodeStep(
            StaticCache(self.config, batch_size, length, dtype, device, fixed_shape=True)))
        captured.step.cache.reset()
        return captured.step, functools.partial(captured.run, functools.partial(decode_one_token, self, captured.step))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Prompt plus new tokens, (B, prompt + new), as transformers' generate returns them."""
        input_ids, attention_mask = _check_inputs(input_ids, attention_mask, self.config.vocab_size)
        steps = list(self.stream_generate(input_ids, attention_mask, **kwargs))
        new = torch.stack(steps, 1).to(input_ids.device) if steps else input_ids[:, :0]
        return torch.cat([input_ids, new], dim=1)

    def _cache_dtype(self) -> torch.dtype:
        """Cache in the activations' dtype: the compute dtype for quantized layers, else the weights' dtype."""
        compute = getattr(self, "compute_dtype", None)
        if compute is not None:
            return compute
        return self.gpt_neox.embed_in.weight.dtype


def _hit_stop(tokenizer: Any, tokens: torch.Tensor, stops: list[str]) -> torch.Tensor:
    """True for rows where the newest token completes a stop string, as transformers' StopStringCriteria
    decides: the match may begin in earlier tokens (the prompt's included) and the newest token may run past
    its end. Only a short tail is decoded: a token is at least one character, so this many tokens suffice."""
    tail = tokens[:, -(max(len(s) for s in stops) + 8):].tolist()
    before = tokenizer.batch_decode([row[:-1] for row in tail])
    after = tokenizer.batch_decode(tail)
    hits = []
    for old, new in zip(before, after, strict=True):
        start = len(os.path.commonprefix([old, new]))  # where the newest token's text begins
        hits.append(any(s in new[max(0, start - len(s) + 1):] for s in stops))
    return torch.tensor(hits, device=tokens.device)


def stream_text(model: Any, tokenizer: Any, prompt: str | torch.Tensor, **kwargs: Any) -> Iterator[str]:
    """Yields the reply as text deltas; holds back bytes that do not form a whole character yet."""
    return (delta for delta in stream_tokens_as_text(model, tokenizer, prompt, **kwargs) if delta)


def stream_tokens_as_text(model: Any, tokenizer: Any, prompt: str | torch.Tensor, **kwargs: Any) -> Iterator[str]:
    """Yields, for every generated token (eos excluded), the text it adds: "" while a character is incomplete,
    so a caller counts tokens as tokens."""
    if isinstance(prompt, str):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        input_ids = prompt if prompt.dim() == 2 else prompt[None]
    # The checkpoint's generation_config.json (e.g. several eos ids) first, then the tokenizer's special tokens.
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    pad = getattr(generation_config, "pad_token_id", None)
    kwargs.setdefault("eos_token_id", eos if eos is not None else tokenizer.eos_token_id)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs.setdefault("pad_token_id", pad)
    eos_ids = set(_as_list(kwargs["eos_token_id"]))
    ids: list[int] = []
    shown = ""
    for token in model.stream_generate(input_ids, **kwargs, tokenizer=tokenizer):
        tid = int(token[0])
        if tid in eos_ids:
            break
        ids.append(tid)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(shown):
            yield ""
            continue
        yield text[len(shown):]
        shown = text
