"""One call that gives a ready (model, tokenizer) pair: a named checkpoint, or the built-in demo."""

from __future__ import annotations

import os
from typing import Any

from neoxlite.config import GPTNeoXConfig
from neoxlite.hub import resolve
from neoxlite.model import GPTNeoXForCausalLM, GPTNeoXPreTrainedModel
from neoxlite.tokenizer import GPTNeoXTokenizerFast


def load(model: str | os.PathLike | None = None, cls: type[GPTNeoXPreTrainedModel] = GPTNeoXForCausalLM,
         **kwargs: Any) -> tuple[GPTNeoXPreTrainedModel, GPTNeoXTokenizerFast]:
    """(model, tokenizer) from a folder or hub id; with no model, the built-in demo. kwargs go to from_pretrained."""
    if model is None:
        from neoxlite.demo import demo_path

        model = demo_path()
    # The tokenizer first: a broken or mismatched one fails before minutes of loading weights.
    tokenizer = GPTNeoXTokenizerFast.from_pretrained(model, revision=kwargs.get("revision"))
    config = GPTNeoXConfig.from_json_file(resolve(model, revision=kwargs.get("revision")) / "config.json")
    if len(tokenizer) > config.vocab_size:  # its last ids would index past the embedding
        raise ValueError(f"the tokenizer of {model} has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{config.vocab_size} (config.json vocab_size); use the tokenizer that belongs "
                         "to this checkpoint")
    loaded = cls.from_pretrained(model, **kwargs)
    if loaded.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    return loaded, tokenizer


def load_demo(**kwargs: Any) -> tuple[GPTNeoXForCausalLM, GPTNeoXTokenizerFast]:
    """The demo model shipped inside the package (trained by tools/train_demo.py) and its tokenizer."""
    return load(None, **kwargs)
