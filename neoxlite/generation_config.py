"""GenerationConfig: a checkpoint's generate() defaults, read from generation_config.json as transformers does.

Every field is optional (None: not set). generate() takes a value from its own keyword first, then from the
model's generation_config, then transformers' global default. Keys neoxlite does not use are kept in `extra`
and written back on save, so a round trip loses nothing.
"""

from __future__ import annotations

import json
import os
import reprlib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from neoxlite.config import is_int, is_number, is_token_id

FILE_NAME = "generation_config.json"


@dataclass
class GenerationConfig:
    # --- length
    max_length: int | None = None  # prompt + new tokens
    max_new_tokens: int | None = None  # wins over max_length when both are set
    # --- decoding
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    # --- special tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Keys we do not interpret, written back on save.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            # JSON files may say NaN or Infinity; a huge int is compared exactly, not converted
            if value is not None and not (is_number(value) and 0 <= value <= sys.float_info.max):
                raise ValueError(f"{name} must be a finite number >= 0, got {reprlib.repr(value)}")
        if self.top_k is not None and not (is_int(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {reprlib.repr(self.top_k)}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not is_token_id(value):
                raise ValueError(f"{name} must be a token id (an integer >= 0), got {reprlib.repr(value)}")
        eos = self.eos_token_id
        if not (eos is None or is_token_id(eos) or isinstance(eos, list) and all(map(is_token_id, eos))):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {reprlib.repr(eos)}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a generation config is a JSON object of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GenerationConfig:
        from neoxlite.checkpoint import read_metadata_json

        path = Path(path)
        data = read_metadata_json(path, "the generation config")  # confined, size-checked, parse errors named
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}; fix or delete the file") from None

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, revision: str | None = None) -> GenerationConfig:
        """The generation_config.json of a checkpoint folder or hub id; FileNotFoundError when it has none."""
        from neoxlite.hub import resolve

        path = resolve(path_or_id, revision=revision) / FILE_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {FILE_NAME} in {path.parent}")
        return cls.from_json_file(path)

    def to_dict(self) -> dict[str, Any]:
        """The settings that are set (None fields left out, as transformers writes its diff from the defaults)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in data.items() if v is not None}}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from neoxlite.fileio import atomic_write_text

        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(Path(folder) / FILE_NAME, text)


def read_generation_config(folder: str | os.PathLike) -> GenerationConfig | None:
    """The folder's generation_config.json, or None when it has none."""
    path = Path(folder) / FILE_NAME
    if not path.exists():  # present but not a regular file (a FIFO, a folder): refused by from_json_file
        return None
    return GenerationConfig.from_json_file(path)
