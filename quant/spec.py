"""QuantSpec: which bitsandbytes quantization a model uses, and its transformers config form.

This module does not import bitsandbytes, so reading or validating a spec costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("none", "int8", "nf4", "fp4")

# Blockwise 4-bit quantization: transformers never changes bitsandbytes' default block size, so neither do we.
BLOCKSIZE_4BIT = 64

# Modules kept in full precision by default: the embeddings and every output head (the lm head is what
# transformers keeps too; the others are tiny and quantizing them hurts the result most). GPT-NeoX's lm head is
# `embed_out` in checkpoints and transformers 4, `lm_head` in transformers 5: both names are listed so the
# quantization_config we write means the same to either.
DEFAULT_SKIP_MODULES = ("embed_in", "embed_out", "lm_head", "score", "classifier", "qa_outputs")
_HEAD_ALIASES = {"embed_out": "lm_head", "lm_head": "embed_out"}

# dtypes bitsandbytes' 4-bit matmul can compute in, by the names transformers writes to config.json.
COMPUTE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}

# Storage dtypes transformers accepts for packed 4-bit weights (bnb_4bit_quant_storage).
QUANT_STORAGE_DTYPES = {
    name: getattr(torch, name) for name in ("uint8", "int8", "float16", "bfloat16", "float32", "float64")
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_compute_dtype(value: torch.dtype | str) -> torch.dtype:
    """A compute dtype from a torch.dtype or a name ("float16", "fp16", "bfloat16", "bf16", "float32", "fp32")."""
    if isinstance(value, torch.dtype):
        name = _dtype_name(value)
    elif isinstance(value, str):
        name = _DTYPE_ALIASES.get(value.strip().lower(), value.strip().lower()).removeprefix("torch.")
    else:
        raise TypeError(f"compute_dtype must be a torch.dtype or a string, got {type(value).__name__} {value!r}")
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype={value!r} cannot be used by bitsandbytes; use one of {', '.join(COMPUTE_DTYPES)}"
        )
    return COMPUTE_DTYPES[name]


def _parse_mode(quant: str | None) -> str:
    if quant is None:
        return "none"
    if not isinstance(quant, str):
        raise TypeError(f"quant must be a string or None, got {type(quant).__name__} {quant!r}")
    mode = quant.strip().lower()
    if mode not in MODES:
        raise ValueError(f"unknown quant mode {quant!r}; use one of None, 'int8', 'nf4', 'fp4'")
    return mode


def matches_module(name: str, patterns: Iterable[str]) -> bool:
    """True when a module name is matched by one of the patterns, the way transformers matches
    llm_int8_skip_modules: from the start up to a module boundary, as a regex with that boundary, or as a
    suffix ("embed_out" matches "embed_out"; "layers.1" matches "gpt_neox.layers.1.mlp" but not "layers.11")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


@dataclass(frozen=True)
class QuantSpec:
    """How the linear layers of a model are quantized.

    compute_dtype applies to the 4-bit matmuls (transformers' bnb_4bit_compute_dtype); int8 layers compute in
    their input's dtype. skip_modules are module-name patterns kept in full precision.
    """

    mode: str = "none"  # none | int8 | nf4 | fp4
    compute_dtype: torch.dtype = torch.float16  # 4-bit matmul dtype (bnb_4bit_compute_dtype)
    double_quant: bool = True  # 4-bit: quantize the per-block scales again (bnb_4bit_use_double_quant)
    int8_threshold: float = 6.0  # int8: activation outlier threshold of LLM.int8() (llm_int8_threshold)
    skip_modules: tuple[str, ...] = field(default=DEFAULT_SKIP_MODULES)  # kept in full precision
    quant_storage: torch.dtype = torch.uint8  # 4-bit: dtype the packed nibbles are stored in

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _parse_mode(self.mode))
        object.__setattr__(self, "compute_dtype", parse_compute_dtype(self.compute_dtype))
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be True or False, got {self.double_quant!r}")
        if isinstance(self.int8_threshold, bool) or not isinstance(self.int8_threshold, (int, float)):
            raise TypeError(f"int8_threshold must be a number, got {self.int8_threshold!r}")
        if self.int8_threshold < 0:
            raise ValueError(f"int8_threshold must be >= 0 (0 turns outlier handling off), got {self.int8_threshold}")
        object.__setattr__(self, "int8_threshold", float(self.int8_threshold))
        if isinstance(self.skip_modules, str) or not all(isinstance(s, str) for s in self.skip_modules):
            raise TypeError(f"skip_modules must be a list of module names, got {self.skip_modules!r}")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if self.quant_storage not in QUANT_STORAGE_DTYPES.values():
            raise ValueError(
                f"quant_storage={self.quant_storage} is not a bitsandbytes storage dtype; use one of "
                f"{', '.join(QUANT_STORAGE_DTYPES)}"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_4bit(self) -> bool:
        return self.mode in ("nf4", "fp4")

    def quantizes(self, module_name: str) -> bool:
        """Whether the nn.Linear with this (full, dotted) name is quantized under this spec (the lm head
        matches under either of its names, embed_out and lm_head)."""
        head, dot, rest = module_name.partition(".")
        names = [module_name] + ([_HEAD_ALIASES[head] + dot + rest] if head in _HEAD_ALIASES else [])
        return self.enabled and not any(matches_module(name, self.skip_modules) for name in names)

    @classmethod
    def from_kwargs(
        cls,
        quant: str | None = None,
        compute_dtype: torch.dtype | str | None = None,
        double_quant: bool = True,
        int8_threshold: float = 6.0,
        skip_modules: Iterable[str] | None = None,
    ) -> QuantSpec:
        """The spec for from_pretrained / CLI keywords. None means the default for that field."""
        return cls(
            mode=_parse_mode(quant),
            compute_dtype=torch.float16 if compute_dtype is None else compute_dtype,
            double_quant=double_quant,
            int8_threshold=int8_threshold,
            skip_modules=DEFAULT_SKIP_MODULES if skip_modules is None else tuple(skip_modules),
        )

    @classmethod
    def from_config(cls, quantization_config: Mapping[str, Any]) -> QuantSpec:
        """The spec of a pre-quantized checkpoint, from the quantization_config dict in its config.json
        (what transformers' BitsAndBytesConfig.to_dict() writes)."""
        if not isinstance(quantization_config, Mapping):
            raise TypeError(f"quantization_config must be a dict, got {type(quantization_config).__name__}")
        qc = dict(quantization_config)
        method = qc.get("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            raise ValueError(
                f"quantization_config has quant_method={method!r}; neoxlite reads only 'bitsandbytes' "
                "checkpoints (8-bit or 4-bit). Load the unquantized checkpoint and pass quant= instead."
            )
        in8 = bool(qc.get("load_in_8bit", qc.get("_load_in_8bit", False)))
        in4 = bool(qc.get("load_in_4bit", qc.get("_load_in_4bit", False)))
        if in8 and in4:
            raise ValueError("quantization_config has both load_in_8bit and load_in_4bit set; it must be one")
        if not (in8 or in4):
            raise ValueError("quantization_config sets neither load_in_8bit nor load_in_4bit; nothing is quantized")
        if qc.get("llm_int8_has_fp16_weight", False):
            raise ValueError("quantization_config has llm_int8_has_fp16_weight=True (training mode); not supported")
        if in4:
            quant_type = qc.get("bnb_4bit_quant_type", "fp4")
            if quant_type not in ("nf4", "fp4"):
                raise ValueError(f"quantization_config has bnb_4bit_quant_type={quant_type!r}; expected 'nf4' or 'fp4'")
            mode = quant_type
        else:
            mode = "int8"
        storage = qc.get("bnb_4bit_quant_storage") or "uint8"
        if storage not in QUANT_STORAGE_DTYPES:
            raise ValueError(
                f"quantization_config has bnb_4bit_quant_storage={storage!r}; expected one of "
                f"{', '.join(QUANT_STORAGE_DTYPES)}"
            )
        skip = qc.get("llm_int8_skip_modules")
        return cls(
            mode=mode,
            # transformers' BitsAndBytesConfig defaults to float32 when the field is absent
            compute_dtype=qc.get("bnb_4bit_compute_dtype") or "float32",
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            int8_threshold=float(qc.get("llm_int8_threshold", 6.0)),
            skip_modules=DEFAULT_SKIP_MODULES if skip is None else tuple(skip),
            quant_storage=QUANT_STORAGE_DTYPES[storage],
        )

    def to_config(self) -> dict[str, Any]:
        """transformers' BitsAndBytesConfig(...).to_dict() for this spec: the quantization_config of config.json."""
        if not self.enabled:
            raise ValueError("QuantSpec(mode='none') has no quantization_config; only quantized models have one")
        in4, in8 = self.is_4bit, self.mode == "int8"
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": in8,
            "_load_in_4bit": in4,
            "llm_int8_threshold": self.int8_threshold,
            "llm_int8_skip_modules": list(self.skip_modules),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": self.mode if in4 else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": _dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": _dtype_name(self.quant_storage),
            "load_in_4bit": in4,
            "load_in_8bit": in8,
        }

    def describe(self) -> str:
        """A short human-readable form, e.g. 'nf4 (double quant, compute float16)'."""
        if self.mode == "none":
            return "none"
        if self.mode == "int8":
            return f"int8 (outlier threshold {self.int8_threshold:g})"
        dq = "double quant, " if self.double_quant else ""
        return f"{self.mode} ({dq}compute {_dtype_name(self.compute_dtype)})"
