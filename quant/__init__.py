"""neoxlite.quant (the repository's top-level `quant/` folder): the only package that knows bitsandbytes.

`QuantSpec` says how a model is quantized (none | int8 | nf4 | fp4, compute dtype, double quant, int8 outlier
threshold, modules kept in full precision); the layer functions turn a float weight into a bitsandbytes layer on a
device, load and save it in transformers' checkpoint format, move it and measure it. bitsandbytes is imported on
first use of a layer function, so code that only reads a spec does not pay for it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from .spec import BLOCKSIZE_4BIT, DEFAULT_SKIP_MODULES, MODES, QuantSpec, matches_module, parse_compute_dtype

# On CPUs with AVX512-BF16, bitsandbytes logs at import that the optional `kernels` package (not a dependency)
# could not give it a 4-bit kernel, then uses its own: nothing for the user to do, so that message is dropped at
# its logger; everything else bitsandbytes logs still shows.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))

_LAYER_NAMES = (
    "Linear4bit",
    "is_quantized",
    "load_quantized_linear",
    "move",
    "nbytes",
    "quantize_linear",
    "quantized_state",
    "serialized_keys",
)

__all__ = [
    "BLOCKSIZE_4BIT",
    "DEFAULT_SKIP_MODULES",
    "MODES",
    "QuantSpec",
    "matches_module",
    "parse_compute_dtype",
    *_LAYER_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _LAYER_NAMES:
        return getattr(importlib.import_module(".layers", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
