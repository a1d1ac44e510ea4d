"""Where a model lives: a local folder, or a hub id fetched through huggingface_hub (weights as safetensors only)."""

from __future__ import annotations

import os
from pathlib import Path

# Only what neoxlite reads: never pickled weights, never other frameworks' files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """Returns a local folder for `path_or_id`, downloading from the hub when it is not a folder.

    Honours HF_HUB_OFFLINE and the usual HF cache; huggingface_hub shows a progress bar while downloading.
    """
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"the model must be a folder path or a hub id (str), got {path_or_id!r:.60}")
    text = os.fspath(path_or_id)
    if isinstance(text, bytes) or not text.strip():  # Path("") is ".": an empty name would load the cwd
        raise ValueError(f"the model name is empty ({text!r}); pass a checkpoint folder or a hub id like "
                         "'EleutherAI/pythia-70m'")
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{text} is a file; pass the checkpoint folder that holds config.json and the weights")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text.strip():
        raise FileNotFoundError(f"model folder {text!r} does not exist; pass an existing folder or a hub id like 'EleutherAI/pythia-70m'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{text!r} is neither a local folder nor in the Hugging Face cache, and the hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1). Download it once with network access, or pass a local folder."
        ) from err
    except HFValidationError:
        raise FileNotFoundError(f"model {text!r} is neither an existing folder nor a valid hub id (owner/name, of "
                                "letters, digits, '-', '_' and '.'); check the spelling or the folder") from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"could not fetch {text!r} from the Hugging Face hub: {err}") from err
