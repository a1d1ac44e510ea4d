"""Model outputs readable the Hugging Face ways: out.logits, out["logits"], out[0]."""

from __future__ import annotations

from typing import Any


class ModelOutput(dict):
    """A dict of the non-None fields, in order, with attribute access; missing fields read as None."""

    def __init__(self, **fields: Any) -> None:
        super().__init__((k, v) for k, v in fields.items() if v is not None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())
