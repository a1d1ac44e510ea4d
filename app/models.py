"""Which checkpoints the app can offer, how the page names them, and the plan for loading one.

A checkpoint is named by its hub id or its folder's name, never by an absolute path: the page is shown to
whoever opens it, and screenshots of it travel. The choices are the demo (the language model and its
heads), the GPT-NeoX checkpoints in the Hugging Face cache, and the ones the app was started with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_NAME = "demo"
GPT_NEOX = "gpt_neox"  # config.json model_type of every checkpoint the app can serve


@dataclass(frozen=True)
class Choice:
    """One checkpoint offered in the model panel."""

    name: str  # what the page shows: hub id, "demo[/head]" or folder name
    location: str  # what the loader gets: a hub id or a local folder
    where: str  # "demo", "hub cache" or "local"


def display_name(path_or_id: str | os.PathLike) -> str:
    """The name the page shows for a folder or hub id.

    A hub id stays as it is; a folder in the Hugging Face cache becomes its repository id; the demo's folders
    become "demo" and "demo/<head>"; any other folder its own name.
    """
    text = str(path_or_id)
    path = Path(os.path.expanduser(text))
    if not path.is_dir():
        return text  # a hub id (resolved later, with its own error if it is neither)
    path = path.resolve()
    demo = _demo_root()
    if demo is not None and path.parent == demo:
        return DEMO_NAME if path.name == "model" else f"{DEMO_NAME}/{path.name}"
    # hub cache layout: .../models--ORG--NAME/snapshots/REVISION
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    return path.name


def _demo_root() -> Path | None:
    from neoxlite.demo import demo_path

    try:
        return demo_path().parent
    except FileNotFoundError:  # an installation without the demo: nothing to offer from it
        return None


def demo_choices() -> list[Choice]:
    from neoxlite.demo import demo_head_paths, demo_path

    try:
        folders = [demo_path(), *demo_head_paths()]
    except FileNotFoundError:
        return []
    return [Choice(display_name(f), str(f), "demo") for f in folders]


def cached_choices(cache_dir: str | os.PathLike | None = None) -> list[Choice]:
    """GPT-NeoX checkpoints in the Hugging Face cache (their newest revision), by repository id.

    Reads only the cache's folder listings and each newest snapshot's config.json. The cache is untrusted: an
    entry that cannot be read (a link loop, a file where a folder belongs, no snapshot) is left out, never the
    rest; a cache that does not exist (or is not a folder) offers nothing.
    """
    from huggingface_hub.constants import HF_HUB_CACHE

    root = Path(os.path.expanduser(str(cache_dir if cache_dir is not None else HF_HUB_CACHE)))
    try:
        with os.scandir(root) as scan:
            repos = [e for e in scan if e.name.startswith("models--") and e.is_dir(follow_symlinks=False)]
    except OSError:  # missing, not a folder, unreadable
        return []
    found = []
    for entry in repos:
        repo_id = entry.name[len("models--"):].replace("--", "/")
        snapshot = _newest_snapshot(Path(entry.path) / "snapshots")
        if repo_id and snapshot is not None and _model_type(snapshot / "config.json") == GPT_NEOX:
            found.append(Choice(repo_id, repo_id, "hub cache"))
    return sorted(found, key=lambda c: c.name.lower())


def _newest_snapshot(snapshots: Path) -> Path | None:
    """The most recently written revision folder in a cached repository's snapshots/, None when there is none."""
    try:
        with os.scandir(snapshots) as scan:
            revisions = [(e.stat(follow_symlinks=False).st_mtime, e.path) for e in scan
                         if e.is_dir(follow_symlinks=False)]
    except OSError:
        return None
    return Path(max(revisions)[1]) if revisions else None


def _model_type(config: Path) -> str | None:
    from neoxlite.checkpoint import read_metadata_json

    try:
        data = read_metadata_json(config, "the config file")  # confined and size-checked like any load
    except ValueError:  # missing, unreadable, a link outside the snapshot, or not JSON: not ours
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def choices(started_with: list[str | os.PathLike] = (), cache_dir: str | os.PathLike | None = None) -> list[Choice]:
    """The checkpoints the model panel offers: what the app started with, the demo, then the hub cache.

    Each name appears once (the first source wins).
    """
    offered = [Choice(display_name(p), str(p), "local") for p in started_with] + demo_choices()
    offered += cached_choices(cache_dir)
    seen: set[str] = set()
    return [c for c in offered if not (c.name in seen or seen.add(c.name))]


def load_options(quant: str | None, gpu_memory: str | None, cpu_memory: str | None,
                 offload_dir: str | None, device: str | None = None) -> dict[str, Any]:
    """`from_pretrained` keywords from the model panel's fields ("" or "none": not set)."""
    import torch

    from neoxlite.offload.budget import parse_size

    kwargs: dict[str, Any] = {}
    if quant and quant != "none":
        kwargs["quant"] = quant
    for name, value in (("gpu_memory", gpu_memory), ("cpu_memory", cpu_memory)):
        if value and value.strip():
            parse_size(value.strip(), name=name)  # a bad size fails here, named, before anything loads
            kwargs[name] = value.strip()
    if offload_dir and offload_dir.strip():
        kwargs["offload_dir"] = offload_dir.strip()
    kwargs["device"] = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return kwargs


def plan_summary(location: str | os.PathLike, load_kwargs: dict[str, Any]) -> str:
    """`neoxlite plan`'s report for a checkpoint under the given options, headed by its page name."""
    from neoxlite.offload.cli import plan_checkpoint

    what, plan = plan_checkpoint(location, load_kwargs)
    name = display_name(location)
    return f"{name}{what[what.index(':'):]}\n{plan.explain()}"
