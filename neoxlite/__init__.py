"""neoxlite: the GPT-NeoX family on one ordinary machine."""

from importlib import import_module

# Public name -> the module that defines it. Everything loads on first use, so `import neoxlite` (and the
# `neoxlite` command, which must react to Ctrl-C from its first moment) does not wait for torch.
_EXPORTS = {
    "GPTNeoXConfig": "neoxlite.config",
    "GenerationConfig": "neoxlite.generation_config",
    "GPTNeoXForCausalLM": "neoxlite.model",
    "GPTNeoXForQuestionAnswering": "neoxlite.model",
    "GPTNeoXForSequenceClassification": "neoxlite.model",
    "GPTNeoXForTokenClassification": "neoxlite.model",
    "GPTNeoXModel": "neoxlite.model",
    "GPTNeoXTokenizerFast": "neoxlite.tokenizer",
    "load_demo": "neoxlite.api",
}


def __getattr__(name: str):
    if name == "__version__":  # looked up on first use: importlib.metadata alone takes a tenth of a second
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("neoxlite")  # pyproject.toml's version, the one source of truth
        except PackageNotFoundError:  # imported from a source tree that was never installed
            return "0+unknown"
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neoxlite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "__version__", *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
