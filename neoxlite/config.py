"""GPTNeoXConfig: every field of a hub config.json that changes the math, nothing else."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")
_ROPE_TYPES = ("default", "linear", "dynamic")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


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
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): each head gets hidden_size / num_attention_heads dims"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be within [0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            raise ValueError(
                f"rotary_pct={self.rotary_pct} gives {self.rotary_ndims} rotary dims per head; rotary needs an even number"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(_ACTIVATIONS)}")
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {self.rope_type!r} is not supported for GPT-NeoX; use one of {', '.join(_ROPE_TYPES)}"
            )
        if self.rope_type != "default" and self.rope_factor < 1.0:
            raise ValueError(f"rope scaling factor must be >= 1, got {self.rope_factor}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
            self.label2id = self.label2id or {v: k for k, v in self.id2label.items()}
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is not known; use one of {', '.join(PROBLEM_TYPES)} "
                             "or leave it unset to infer it from the labels")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError('problem_type="single_label_classification" needs num_labels > 1; for binary '
                             'classification use num_labels=2, or problem_type="regression" for one output')

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTNeoXConfig:
        data = dict(data)
        model_type = data.pop("model_type", "gpt_neox")
        if model_type != "gpt_neox":
            raise ValueError(
                f"config.json has model_type {model_type!r}; neoxlite runs GPT-NeoX checkpoints (model_type 'gpt_neox') only"
            )
        # Newer transformers write rope settings as rope_parameters; fold them into the classic fields.
        rope = data.pop("rope_parameters", None)
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
        from neoxlite.checkpoint import read_metadata_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}: a GPT-NeoX checkpoint folder needs one")
        raw = read_metadata_file(path, "the config file")  # a FIFO or a device is refused, never read
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path} is not valid JSON ({err}); re-download or fix the file") from None
        return cls.from_dict(data)

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
