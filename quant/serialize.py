"""Pre-quantized checkpoints: `neoxlite quantize SRC DST --quant nf4|fp4|int8`.

DST is a hub-layout folder in transformers' bitsandbytes serialization (each quantized layer's weight with its
quant-state tensors, and `quantization_config` in config.json), so transformers loads it as it is, and neoxlite
loads it without quantizing again. The folder appears whole or not at all: it is written to a temporary
sibling and renamed into place (leftovers of a killed run are removed by the next one: neoxlite.fileio).
DST may not be, contain or lie inside SRC or a folder SRC's weights come from: `--overwrite` replaces DST whole.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

# Files of a checkpoint folder that are weights or written anew; everything else (tokenizer, generation config)
# is copied as it is.
_REWRITTEN = ("config.json", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    quant: str,
    compute_dtype: torch.dtype | str | None = None,
    double_quant: bool = True,
    int8_threshold: float = 6.0,
    skip_modules: list[str] | tuple[str, ...] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    max_shard_size: int | str = "2GiB",
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """Quantizes the checkpoint SRC (folder or hub id) block by block and writes DST; returns the loaded
    quantized model. dtype: the dtype of the layers kept in full precision and the one the weights are cast to
    before quantizing (default: SRC's). device: where quantization runs (default cpu; transformers quantizes on
    the device the model loads to, and the CUDA and CPU kernels may round differently)."""
    from neoxlite.config import GPTNeoXConfig
    from neoxlite.fileio import atomic_folder
    from neoxlite.hub import resolve
    from neoxlite.loading import parse_dtype
    from neoxlite.model import ARCHITECTURES, GPTNeoXForCausalLM
    from neoxlite.saving import save_pretrained

    from .spec import _parse_mode

    if _parse_mode(quant) == "none":
        raise ValueError("neoxlite quantize needs --quant int8, nf4 or fp4")
    shard_limit = _shard_limit(max_shard_size)
    folder = resolve(src)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; choose another destination or remove it first")
    _check_apart(folder, dst)
    config = GPTNeoXConfig.from_json_file(folder / "config.json")
    if config.quantization_config:
        raise ValueError(
            f"{src} is already quantized ({config.quantization_config.get('quant_method', '?')}); "
            "quantize the unquantized checkpoint instead"
        )
    arch = (config.architectures or ["GPTNeoXForCausalLM"])[0]
    cls = ARCHITECTURES.get(arch, GPTNeoXForCausalLM)
    model = cls.from_pretrained(
        folder,
        dtype=dtype,
        device=device,
        quant=quant,
        compute_dtype=compute_dtype,
        double_quant=double_quant,
        int8_threshold=int8_threshold,
        skip_modules=skip_modules,
        progress=progress,
    )
    target = parse_dtype(dtype)
    if target is not None:
        model.config.torch_dtype = str(target).removeprefix("torch.")
    _check_space(model, dst)
    with atomic_folder(dst, overwrite=overwrite) as tmp:
        try:
            save_pretrained(model, tmp, max_shard_size=shard_limit)
        except Exception as err:  # safetensors' writer reports a full disk as a SafetensorError, not an OSError
            if "os error 28" in str(err):
                raise OSError(errno.ENOSPC, f"no space left on the disk holding {dst} while writing the weights; "
                                            "free some space or choose another destination") from None
            raise
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in _REWRITTEN and not path.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copyfile(path, tmp / path.name)
    return model


def _shard_limit(max_shard_size: int | str) -> int:
    from neoxlite.saving import parse_size

    try:
        limit = parse_size(max_shard_size)
    except (OverflowError, ValueError):  # "inf" overflows int(); "nan" cannot convert
        limit = 0
    if limit <= 0:
        raise ValueError(f"max shard size {max_shard_size!r} is not a positive, finite size; write it like 2GiB "
                         "or 500MB (--max-shard-size)")
    return limit


def _check_apart(src: Path, dst: Path) -> None:
    """Refuses a DST that is, holds or sits inside SRC or a folder its weights come from: writing DST (and
    replacing it with --overwrite) would then change or delete the source while it is read."""
    from neoxlite.checkpoint import weight_files

    sources = {src.resolve(), *(path.parent for path in weight_files(src).values())}
    target = dst.resolve()
    for source in sorted(sources):
        if target == source or target in source.parents or source in target.parents:
            raise ValueError(f"DST {dst} overlaps the source folder {source} (the same folder, a parent of it, or "
                             "inside it); write the quantized checkpoint to a separate folder")


def _check_space(model: Any, dst: Path) -> None:
    """A clear ENOSPC before writing weights that the disk holding DST cannot take."""
    need = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values()
               if isinstance(t, torch.Tensor))
    parent = next(p for p in (dst.resolve(), *dst.resolve().parents) if p.exists())
    free = shutil.disk_usage(parent).free
    if need > free:
        raise OSError(errno.ENOSPC, f"{dst} needs about {need:,} bytes of weights but its disk has {free:,} free; "
                                    "free some space or choose another destination")
