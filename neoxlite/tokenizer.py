"""GPT-NeoX tokenizer: the `tokenizers` library behind an interface shaped like transformers' GPTNeoXTokenizerFast.

Ids, attention masks and decoded text equal transformers' for the same files. Decoding is the raw
byte-level decode: transformers 5.x never applies `clean_up_tokenization_spaces` to BPE tokenizers (4.45+ left it
off unless tokenizer_config.json turned it on; 4.44 and older turned it on), so we clean up only when a call asks.
"""

from __future__ import annotations

import json
import numbers
import os
import reprlib
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, pre_tokenizers

from neoxlite.checkpoint import read_metadata_file, read_metadata_json
from neoxlite.fileio import atomic_write_text
from neoxlite.hub import resolve
from neoxlite.limits import lone_surrogate

VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order for all_special_ids
CONFIG_KEYS = (*SPECIAL_TOKENS, "additional_special_tokens", "add_bos_token", "add_eos_token", "add_prefix_space",
               "model_max_length", "padding_side", "truncation_side", "chat_template")
PADDING = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
TRUNCATION = {False: False, "do_not_truncate": False, True: True, "longest_first": True, "only_first": True}


class BatchEncoding(dict):
    """A dict of model inputs, also readable as attributes: `enc.input_ids` is `enc["input_ids"]`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; it holds {list(self)}") from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


def _token_content(value: Any) -> str | None:
    """Special tokens in config files are strings, or dicts (AddedToken) with the string under "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _is_token(value: Any) -> bool:
    return isinstance(_token_content(value), str)


def _is_chat_template(value: Any) -> bool:
    """A template string, or named templates: {name: template} or [{"name": ..., "template": ...}, ...]."""
    if isinstance(value, list):
        return all(isinstance(t, dict) and isinstance(t.get("name"), str)
                   and isinstance(t.get("template"), str) for t in value)
    if isinstance(value, dict):
        return all(isinstance(t, str) for t in value.values())  # JSON keys are strings
    return isinstance(value, str)


# What each setting read from a config file must be (null always means "not set"), as (check, description).
_SETTING_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (_is_token, 'a token string or an object with a "content" string') for name in SPECIAL_TOKENS},
    **{name: (lambda v: isinstance(v, list) and all(map(_is_token, v)), "a list of token strings")
       for name in ("additional_special_tokens", "extra_special_tokens")},
    **{name: (lambda v: isinstance(v, bool), "true or false")
       for name in ("add_bos_token", "add_eos_token", "add_prefix_space")},
    "model_max_length": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                         "a positive integer"),
    **{name: (lambda v: v in ("left", "right"), '"left" or "right"')
       for name in ("padding_side", "truncation_side")},
    "chat_template": (_is_chat_template,
                      'a template string or a list of {"name": ..., "template": ...} objects'),
}


def _read_json(path: Path) -> dict:
    """A tokenizer settings file as a dict ({} when absent), its settings checked; ValueError naming it."""
    if not path.exists():
        return {}
    data = read_metadata_json(path, "tokenizer file")
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object of tokenizer settings; re-download it")
    for name, (check, wanted) in _SETTING_TYPES.items():
        value = data.get(name)
        # extra_special_tokens is a list in transformers 5.x; an object of named tokens there is not read
        named = name == "extra_special_tokens" and isinstance(value, dict)
        if value is not None and not check(value) and not named:
            raise ValueError(f"{path}: {name} must be {wanted}, got {reprlib.repr(value)}; re-download or "
                             "fix the file")
    return data


def _read_text(path: Path, what: str) -> str:
    """A checkpoint's text file, read by read_metadata_file (confined, size-checked), decoded as UTF-8."""
    try:
        return read_metadata_file(path, what).decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{err.reason} at byte {err.start}"
        raise ValueError(f"{path} is not UTF-8 text ({where}); re-download it") from None


@lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    """The same sandboxed jinja2 setup transformers uses for chat templates."""

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template error: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _special_token_property(name: str) -> property:
    def get(self: GPTNeoXTokenizerFast) -> str | None:
        return self._special[name]

    def set_(self: GPTNeoXTokenizerFast, value: str | None) -> None:
        if value is not None and self._tok.token_to_id(value) is None:
            raise ValueError(f"{name} {value!r} is not in the vocabulary; use an existing token, "
                             f"e.g. tokenizer.{name} = tokenizer.eos_token")
        self._special[name] = value

    return property(get, set_, doc=f"The {name.replace('_', ' ')} string, or None.")


def _special_id_property(name: str) -> property:
    def get(self: GPTNeoXTokenizerFast) -> int | None:
        token = self._special[name]
        return None if token is None else self._tok.token_to_id(token)

    def set_(self: GPTNeoXTokenizerFast, value: int | None) -> None:
        token = None if value is None else self._tok.id_to_token(value)
        if value is not None and token is None:
            raise ValueError(f"{name}_id {value} is outside the vocabulary (size {len(self)})")
        setattr(self, name, token)

    return property(get, set_, doc=f"The id of the {name.replace('_', ' ')}, or None.")


class GPTNeoXTokenizerFast:
    """Byte-level BPE tokenizer for GPT-NeoX checkpoints (tokenizer.json plus tokenizer_config.json)."""

    bos_token = _special_token_property("bos_token")
    eos_token = _special_token_property("eos_token")
    unk_token = _special_token_property("unk_token")
    pad_token = _special_token_property("pad_token")
    bos_token_id = _special_id_property("bos_token")
    eos_token_id = _special_id_property("eos_token")
    unk_token_id = _special_id_property("unk_token")
    pad_token_id = _special_id_property("pad_token")

    def __init__(
        self,
        tokenizer_file: str | os.PathLike | None = None,
        *,
        tokenizer_object: Tokenizer | None = None,
        bos_token: str | None = "<|endoftext|>",
        eos_token: str | None = "<|endoftext|>",
        unk_token: str | None = "<|endoftext|>",
        pad_token: str | None = "<|padding|>",
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        add_prefix_space: bool = False,
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
        chat_template: str | dict[str, str] | list[dict[str, str]] | None = None,
    ) -> None:
        if (tokenizer_file is None) == (tokenizer_object is None):
            raise ValueError("pass exactly one of tokenizer_file= (a tokenizer.json path) or tokenizer_object= "
                             "(a tokenizers.Tokenizer)")
        if tokenizer_file is not None:
            text = _read_text(Path(tokenizer_file), "tokenizer file")
            try:
                self._tok = Tokenizer.from_str(text)
            except Exception as err:  # the tokenizers library raises a bare Exception for every parse error
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ValueError(f"{tokenizer_file} is not a valid tokenizer.json ({reason}); re-download it") from None
        else:
            self._tok = Tokenizer.from_str(tokenizer_object.to_str())  # a copy: we change its settings below
        # Padding, truncation and bos/eos are done per call from our own settings, as transformers does.
        self._tok.no_padding()
        self._tok.no_truncation()
        if add_prefix_space:
            self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        self.additional_special_tokens = [_token_content(t) for t in additional_special_tokens]
        # Like transformers, special tokens named by the config but missing from tokenizer.json become new tokens.
        missing = [t for t in [*named.values(), *self.additional_special_tokens]
                   if t is not None and self._tok.token_to_id(t) is None]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        self._special: dict[str, str | None] = named
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        if isinstance(chat_template, list):
            chat_template = {t["name"]: t["template"] for t in chat_template}
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, revision: str | None = None,
                        **overrides: Any) -> GPTNeoXTokenizerFast:
        """Loads a local folder or a hub id. `overrides` are constructor keywords that win over the files."""
        folder = resolve(path_or_id, revision=revision)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ValueError(f"{folder} has no tokenizer.json; neoxlite reads only the fast-tokenizer file "
                             f"(save one with transformers' tokenizer.save_pretrained)")
        config = _read_json(folder / "tokenizer_config.json")
        config.update(_read_json(folder / "special_tokens_map.json"))  # transformers lets this file win
        if "additional_special_tokens" not in config and isinstance(config.get("extra_special_tokens"), list):
            config["additional_special_tokens"] = config["extra_special_tokens"]  # transformers 5.x name
        if (folder / "chat_template.jinja").exists():  # transformers 5.x saves the template on its own
            config["chat_template"] = _read_text(folder / "chat_template.jinja", "chat template")
        # null means "not set", except for a special token, where it means "none"
        kwargs = {key: config[key] for key in CONFIG_KEYS
                  if key in config and (config[key] is not None or key in SPECIAL_TOKENS)}
        for key in SPECIAL_TOKENS:
            if key in kwargs:
                kwargs[key] = _token_content(kwargs[key])
        return cls(tokenizer_file, **{**kwargs, **overrides})

    # ----- vocabulary -----
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Size of the base BPE vocabulary, without added tokens (transformers' meaning)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.additional_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tok.token_to_id(t) for t in self.all_special_tokens]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Unknown tokens map to unk_token_id, as in transformers."""
        if isinstance(tokens, str):
            token_id = self._tok.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int] | torch.Tensor,
                              skip_special_tokens: bool = False) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tok.id_to_token(_as_ids(ids)[0])
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tok.id_to_token(i) for i in _as_ids(ids) if i not in special]

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(_encodable([text])[0], add_special_tokens=False).tokens

    # ----- encoding -----
    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        padding_side: str | None = None,
    ) -> BatchEncoding:
        """Tokenizes one text or a batch, like transformers: `truncation=None` truncates only when `max_length`
        is given without padding; `padding=True`/"longest" pads to the longest row, "max_length" to max_length."""
        batched = not isinstance(text, str)
        texts = list(text) if isinstance(text, (list, tuple)) else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {reprlib.repr(text)}")
        pad_mode = _lookup(PADDING, padding, "padding")
        if truncation is None:  # transformers: max_length without padding means "truncate to it"
            truncation = max_length is not None and pad_mode is None
        truncate = _lookup(TRUNCATION, truncation, "truncation")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")
        head = [self._required_id("bos_token", "add_bos_token")] if add_special_tokens and self.add_bos_token else []
        tail = [self._required_id("eos_token", "add_eos_token")] if add_special_tokens and self.add_eos_token else []

        rows = [e.ids for e in self._tok.encode_batch(_encodable(texts), add_special_tokens=False)]
        if truncate:
            room = max((self.model_max_length if max_length is None else max_length) - len(head) - len(tail), 0)
            side = _side(self.truncation_side, "truncation_side")
            rows = [r[:room] if side == "right" else r[max(len(r) - room, 0):] for r in rows]
        rows = [head + r + tail for r in rows]
        masks = [[1] * len(r) for r in rows]

        if pad_mode is not None:
            if self.pad_token_id is None:
                raise ValueError("asking to pad but the tokenizer has no pad token; "
                                 "set `tokenizer.pad_token = tokenizer.eos_token` first")
            if pad_mode == "longest":
                target = max(map(len, rows), default=0)
            elif max_length is not None or self.model_max_length < VERY_LARGE_INTEGER:
                target = self.model_max_length if max_length is None else max_length
            else:
                raise ValueError("padding='max_length' needs max_length=... (this tokenizer has no model_max_length)")
            side = _side(self.padding_side if padding_side is None else padding_side, "padding_side")
            for i, row in enumerate(rows):
                n = max(target - len(row), 0)
                fill, zeros = [self.pad_token_id] * n, [0] * n
                rows[i], masks[i] = (row + fill, masks[i] + zeros) if side == "right" else (fill + row, zeros + masks[i])

        out = BatchEncoding(input_ids=rows, attention_mask=masks) if return_attention_mask else BatchEncoding(input_ids=rows)
        if return_tensors == "pt":
            if len(set(map(len, rows))) > 1:
                raise ValueError("cannot make one tensor from rows of different lengths; pass padding=True "
                                 "(and set tokenizer.pad_token if it is None)")
            return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        return out if batched else BatchEncoding({k: v[0] for k, v in out.items()})

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool | str | None = None,
               max_length: int | None = None, return_tensors: str | None = None) -> list[int] | torch.Tensor:
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
                    return_tensors=return_tensors, return_attention_mask=False)["input_ids"]

    def _required_id(self, name: str, flag: str) -> int:
        token_id = getattr(self, f"{name}_id")
        if token_id is None:
            raise ValueError(f"{flag} is on but {name} is None; set tokenizer.{name} or tokenizer.{flag} = False")
        return token_id

    # ----- decoding -----
    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        """Decodes one sequence (a list, a 1-D tensor, or a (1, T) tensor)."""
        ids = _as_ids(ids)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # ----- chat -----
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_tensors: str | None = None,
        return_dict: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str | list[int] | torch.Tensor | BatchEncoding:
        """Renders `messages` with the checkpoint's chat template (as transformers 5.x: a BatchEncoding by default,
        `return_dict=False` for the ids alone, `tokenize=False` for the text)."""
        template = self._chat_template(chat_template)
        text = _compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **template_kwargs})
        if not tokenize:
            return text
        enc = self(text, add_special_tokens=False, return_tensors=return_tensors)  # the template writes bos/eos
        return enc if return_dict else enc["input_ids"]

    def _chat_template(self, name_or_template: str | None) -> str:
        """The template to render: a name among the checkpoint's templates, a template string, or the default."""
        templates = self.chat_template
        if isinstance(templates, dict) and (name_or_template or "default") in templates:
            return templates[name_or_template or "default"]
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise ValueError("this tokenizer has no chat template (no chat_template in tokenizer_config.json or "
                             "chat_template.jinja); pass chat_template='...' or format the prompt yourself")
        if isinstance(templates, dict):
            raise ValueError(f"this tokenizer has several chat templates and none is named 'default'; pass "
                             f"chat_template= one of {sorted(templates)}")
        return templates

    # ----- saving -----
    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (each atomically)."""
        folder = Path(save_directory)
        template = self.chat_template
        if isinstance(template, dict):
            template = [{"name": name, "template": t} for name, t in template.items()]
        config = {
            "tokenizer_class": "GPTNeoXTokenizer",
            **self._special,
            "additional_special_tokens": self.additional_special_tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": False,
            **({"chat_template": template} if template is not None else {}),
        }
        special_map = {**self.special_tokens_map, "additional_special_tokens": self.additional_special_tokens}
        files = {
            "tokenizer.json": self._tok.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
        }
        for name, text in files.items():
            atomic_write_text(folder / name, text)
        return tuple(str(folder / name) for name in files)

    def __repr__(self) -> str:
        return (f"GPTNeoXTokenizerFast(vocab_size={self.vocab_size}, len={len(self)}, "
                f"special_tokens={self.special_tokens_map}, padding_side={self.padding_side!r})")


def _encodable(texts: list[str]) -> list[str]:
    """`texts`, refused with a ValueError when one holds a lone surrogate (not Unicode text: the tokenizers library
    would fail with a TypeError that does not say so); a type other than str is a TypeError."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {reprlib.repr(text)} ({type(text).__name__})")
        at = lone_surrogate(text)
        if at is not None:
            raise ValueError(f"text holds a lone surrogate {text[at]!r} at character {at}, which is "
                             "not Unicode text; remove it or decode the source with errors='replace'")
    return texts


def _as_ids(ids: int | Sequence[int] | torch.Tensor) -> list[int]:
    """One sequence of token ids as a list of ints, checked: integers from 0 to below 2**32 (the tokenizers
    library's range; ids past the vocabulary decode to nothing, as in transformers)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() > 1:
            raise ValueError(f"decode takes one sequence, got a tensor of shape {tuple(ids.shape)}; "
                             f"use batch_decode for a batch")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a tensor of {ids.dtype}")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < 2**32):
            raise ValueError(f"token ids run from {int(ids.min())} to {int(ids.max())}; a token id is an integer "
                             "from 0, below 2**32")
        return ids.reshape(-1).tolist()
    elif isinstance(ids, numbers.Integral):
        ids = [ids]
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"token ids must be an int, a sequence of ints or a tensor, got {reprlib.repr(ids)}")
    else:
        ids = list(ids)
    for i in ids:
        if not isinstance(i, numbers.Integral) or isinstance(i, bool):
            raise TypeError(f"token ids must be integers, got {reprlib.repr(i)} ({type(i).__name__})")
        if not 0 <= i < 2**32:
            raise ValueError(f"{reprlib.repr(i)} is not a token id (an integer from 0, below 2**32)")
    return [int(i) for i in ids]


def _lookup(table: dict, value: Any, name: str) -> Any:
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(table)}") from None


def _side(value: str, name: str) -> str:
    if value not in ("left", "right"):
        raise ValueError(f"{name}={value!r}; use 'left' or 'right'")
    return value


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (4.x): drops the space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
