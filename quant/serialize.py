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
    from neoxlite.checkpoint import open_regular
    from neoxlite.config import GPTNeoXConfig
    from neoxlite.fileio import atomic_folder
    from neoxlite.hub import resolve
    from neoxlite.loading import parse_dtype
    from neoxlite.model import ARCHITECTURES, GPTNeoXForCausalLM
    from neoxlite.saving import save_pretrained, shard_limit

    from .spec import _parse_mode

    if _parse_mode(quant) == "none":
        raise ValueError("neoxlite quantize needs --quant int8, nf4 or fp4")
    max_shard_bytes = shard_limit(max_shard_size)
    folder = resolve(src)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; choose another destination or remove it first")
    _check_apart(folder, dst)
    if os.path.lexists(dst) and not dst.is_dir():
        raise ValueError(f"{dst} exists and is not a folder; DST is the folder the quantized checkpoint goes to")
    if overwrite and dst.is_dir() and any(dst.iterdir()) and not (dst / "config.json").is_file():
        raise ValueError(f"{dst} is a folder but not a checkpoint (it has no config.json): --overwrite replaces "
                         "a checkpoint folder whole and would delete everything in it; choose another DST")
    extra_files = _extra_files(folder)  # checked before the long part
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
            save_pretrained(model, tmp, max_shard_size=max_shard_bytes)
        except Exception as err:  # safetensors' writer reports a full disk as a SafetensorError, not an OSError
            if "os error 28" in str(err):
                raise OSError(errno.ENOSPC, f"no space left on the disk holding {dst} while writing the weights; "
                                            "free some space or choose another destination") from None
            raise
        for name, path in extra_files.items():
            with open(open_regular(path, "SRC file"), "rb") as source, open(tmp / name, "wb") as copy:
                shutil.copyfileobj(source, copy)
    return model


def _extra_files(folder: Path) -> dict[str, Path]:
    """SRC's files that DST gets as they are (tokenizer, README, ...): name -> the file it is or links to. Only
    files inside SRC, or for a hub snapshot in its repository's blobs, are copied: a link out of those is
    refused (copying it would carry a file from elsewhere, a private key say, into DST)."""
    base = folder.resolve()
    roots = [base] + ([base.parent.parent / "blobs"] if base.parent.name == "snapshots" else [])
    extra = {}
    for path in sorted(folder.iterdir()):
        if path.name in _REWRITTEN or path.name.endswith(_WEIGHT_SUFFIXES) or not path.is_file():
            continue
        target = path.resolve()
        if not any(root in target.parents for root in roots):
            raise ValueError(f"{path} is a link to {target}, outside the checkpoint folder {folder}; quantize copies "
                             "only files that lie in SRC: put a copy of the file itself there, or remove the link")
        extra[path.name] = target
    return extra


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
