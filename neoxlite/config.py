"""GPTNeoXConfig: every field of a hub config.json that changes the math, nothing else."""

from __future__ import annotations

import json
import os
import reprlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")
_ROPE_TYPES = ("default", "linear", "dynamic")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# Upper bounds far above any real GPT-NeoX (20B: 44 layers, hidden 6144, 64 heads, vocab 50432, context 2048):
# they refuse a config.json that would take hours to build, or sizes whose arithmetic overflows, nothing real.
SIZE_LIMITS = {
    "vocab_size": 2**22,  # the largest real vocabularies are ~256k tokens
    "hidden_size": 2**16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 2**12,
    "intermediate_size": 2**18,
    "max_position_embeddings": 2**24,  # trained contexts reach a few million tokens at most
    "num_labels": 2**16,
}
MAX_ROPE_FACTOR = 1024  # rope scaling stretches contexts 2-32x; far larger factors overflow dynamic scaling


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_token_id(value: Any) -> bool:
    return is_int(value) and 0 <= value < 2**63  # torch holds ids as int64


def _positive_finite(value: Any) -> bool:
    return is_number(value) and 0 < value <= sys.float_info.max  # NaN fails; a huge int is compared exactly


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


# What each field read from config.json must be, as (check, description); sizes: SIZE_LIMITS.
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("use_parallel_residual", "attention_bias", "tie_word_embeddings"),
                    (lambda v: isinstance(v, bool), "true or false")),
    **dict.fromkeys(("rotary_pct", "hidden_dropout", "attention_dropout", "classifier_dropout"),
                    (lambda v: is_number(v) and 0 <= v <= 1, "a number within [0, 1]")),
    **dict.fromkeys(("rotary_emb_base", "layer_norm_eps"), (_positive_finite, "a finite positive number")),
    **dict.fromkeys(("rope_scaling", "id2label", "label2id", "quantization_config"),
                    (_or_null(lambda v: isinstance(v, dict)), "a JSON object or null")),
    **dict.fromkeys(("bos_token_id", "pad_token_id"),
                    (_or_null(is_token_id), "a token id (an integer >= 0) or null")),
    "eos_token_id": (_or_null(lambda v: is_token_id(v) or isinstance(v, list) and all(map(is_token_id, v))),
                     "a token id, a list of them, or null"),
    "architectures": (_or_null(lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v)),
                      "a list of class names or null"),
    "torch_dtype": (_or_null(lambda v: isinstance(v, str)), "a dtype name or null"),
}


def _show(value: Any) -> str:
    return reprlib.repr(value)  # config values can be megabytes long; messages show their start


@dataclass
class GPTNeoXConfig:
    # --- sizes
    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    max_position_embeddings: int = 2048  # rotary has no table, but dynamic scaling and our context check use it
    # --- math switches
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25  # share of each head's dims that get rotary (v5: partial_rotary_factor)
    rotary_emb_base: float = 10000.0  # v5: rope_theta
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"dynamic", "factor": f}
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True  # attention and MLP read the same input (Pythia, 20B)
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    # --- dropout: training only, kept so trained demo heads match HF behaviour
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.1
    # --- heads
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    # sequence classification loss: one of PROBLEM_TYPES; None: inferred from num_labels and the labels' dtype
    problem_type: str | None = None
    # --- special tokens
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None
    # --- checkpoint metadata
    architectures: list[str] | None = None
    torch_dtype: str | None = None
    quantization_config: dict[str, Any] | None = None
    # Keys we do not interpret, written back on save so a round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def rope_factor(self) -> float:
        return float((self.rope_scaling or {}).get("factor", 1.0))

    def _validate(self) -> None:
        """Every field's type and range, each failure one ValueError naming the field (from_json_file adds the
        file): config.json is untrusted input."""
        self._validate_types()
        if self.id2label is not None:
            try:
                self.id2label = {int(k): v for k, v in self.id2label.items()}
            except ValueError:
                raise ValueError(f"config.id2label keys must be label ids (integers), got "
                                 f"{_show(self.id2label)}") from None
            self.num_labels = len(self.id2label)
            self.label2id = self.label2id or {v: k for k, v in self.id2label.items()}
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not is_int(value) or not 1 <= value <= limit:
                raise ValueError(f"config.{name} must be a positive integer of at most {limit:,}, "
                                 f"got {_show(value)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): each head gets hidden_size / num_attention_heads dims"
            )
        if self.rotary_ndims % 2:
            raise ValueError(
                f"rotary_pct={self.rotary_pct} gives {self.rotary_ndims} rotary dims per head; rotary needs an even number"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {_show(self.hidden_act)} is not supported; use one of "
                             f"{', '.join(_ACTIVATIONS)}")
        self._validate_rope()
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {_show(self.problem_type)} is not known; use one of "
                             f"{', '.join(PROBLEM_TYPES)} or leave it unset to infer it from the labels")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError('problem_type="single_label_classification" needs num_labels > 1; for binary '
                             'classification use num_labels=2, or problem_type="regression" for one output')

    def _validate_types(self) -> None:
        for name, (check, wanted) in _FIELD_TYPES.items():
            if not check(getattr(self, name)):
                raise ValueError(f"config.{name} must be {wanted}, got {_show(getattr(self, name))}")
        if self.id2label is not None and not all(isinstance(v, str) for v in self.id2label.values()):
            raise ValueError(f"config.id2label values must be label names (strings), "
                             f"got {_show(self.id2label)}")
        if self.label2id is not None and not all(is_int(v) for v in self.label2id.values()):
            raise ValueError(f"config.label2id values must be label ids (integers), "
                             f"got {_show(self.label2id)}")

    def _validate_rope(self) -> None:
        if not isinstance(self.rope_type, str) or self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope scaling type {_show(self.rope_type)} is not supported for GPT-NeoX; "
                             f"use one of {', '.join(_ROPE_TYPES)}")
        if self.rope_type == "default":
            return
        factor = self.rope_scaling.get("factor", 1.0)
        if not (is_number(factor) and 1 <= factor <= MAX_ROPE_FACTOR):
            raise ValueError(f"rope scaling factor must be a number from 1 to {MAX_ROPE_FACTOR}, "
                             f"got {_show(factor)}")
        if self.rope_type == "dynamic" and self.rotary_ndims == 2:  # its base formula divides by (dims - 2)
            raise ValueError("dynamic rope scaling needs more than 2 rotary dims per head; raise rotary_pct")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTNeoXConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a config is a JSON object of settings, got {type(data).__name__}")
        data = dict(data)
        model_type = data.pop("model_type", "gpt_neox")
        if model_type != "gpt_neox":
            raise ValueError(
                f"config.json has model_type {_show(model_type)}; neoxlite runs GPT-NeoX checkpoints "
                "(model_type 'gpt_neox') only"
            )
        # Newer transformers write rope settings as rope_parameters; fold them into the classic fields.
        rope = data.pop("rope_parameters", None)
        for name, value in (("rope_parameters", rope), ("rope_scaling", data.get("rope_scaling"))):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"config.{name} must be a JSON object or null, got {_show(value)}")
        if rope:
            rope = dict(rope)
            data.setdefault("rotary_emb_base", rope.pop("rope_theta", 10000.0))
            data.setdefault("rotary_pct", rope.pop("partial_rotary_factor", 0.25))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                data.setdefault("rope_scaling", rope)
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if kwargs.get("rope_scaling"):
            rope_scaling = dict(kwargs["rope_scaling"])
            if "type" in rope_scaling and "rope_type" not in rope_scaling:
                rope_scaling["rope_type"] = rope_scaling.pop("type")
            kwargs["rope_scaling"] = rope_scaling if rope_scaling.get("rope_type") != "default" else None
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GPTNeoXConfig:
        from neoxlite.checkpoint import read_metadata_json

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}: a GPT-NeoX checkpoint folder needs one")
        data = read_metadata_json(path, "the config file")  # a FIFO, a device or a link outside is refused
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}; re-download or fix the file") from None

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, revision: str | None = None) -> GPTNeoXConfig:
        from neoxlite.hub import resolve

        return cls.from_json_file(resolve(path_or_id, revision=revision) / "config.json")

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "extra"}
        data = {**self.extra, "model_type": "gpt_neox", **data}
        if data["id2label"] is not None:
            data["id2label"] = {str(k): v for k, v in data["id2label"].items()}
        return {k: v for k, v in data.items() if v is not None or k == "pad_token_id"}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from neoxlite.fileio import atomic_write_text

        atomic_write_text(Path(folder) / "config.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
