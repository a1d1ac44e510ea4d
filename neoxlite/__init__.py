"""neoxlite: the GPT-NeoX family on one ordinary machine."""

from neoxlite.config import GPTNeoXConfig
from neoxlite.generation_config import GenerationConfig
from neoxlite.model import (
    GPTNeoXForCausalLM,
    GPTNeoXForQuestionAnswering,
    GPTNeoXForSequenceClassification,
    GPTNeoXForTokenClassification,
    GPTNeoXModel,
)


def __getattr__(name: str):
    # The tokenizer and the demo load on first use, so `import neoxlite` stays light.
    if name == "GPTNeoXTokenizerFast":
        from neoxlite.tokenizer import GPTNeoXTokenizerFast

        return GPTNeoXTokenizerFast
    if name == "load_demo":
        from neoxlite.api import load_demo

        return load_demo
    raise AttributeError(f"module 'neoxlite' has no attribute {name!r}")


__all__ = [
    "GenerationConfig",
    "GPTNeoXConfig",
    "GPTNeoXForCausalLM",
    "GPTNeoXForQuestionAnswering",
    "GPTNeoXForSequenceClassification",
    "GPTNeoXForTokenClassification",
    "GPTNeoXModel",
    "GPTNeoXTokenizerFast",
    "load_demo",
]
