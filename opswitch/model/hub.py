"""From what a user types (`--model`) to a directory of model files.

A local directory always wins.  Anything else is a Hugging Face hub id,
resolved through ``huggingface_hub``'s cache (so ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and revisions work as users expect),
downloading only config, safetensors weights and tokenizer files: never
pickles.  ``None`` is the small demo model shipped inside the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from opswitch.core.errors import ModelNotFoundError, WeightsError
from opswitch.model.safetensors import PICKLE_SUFFIXES, refuse_pickle

DEMO_MODEL = Path(__file__).resolve().parent.parent / "data" / "demo-model"

# Short names users type, as `transformers` and the hub accept them.
ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
# Everything a model directory may need; pickled weights are deliberately absent.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def hub_id(name: str) -> str:
    return ALIASES.get(name, name)


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def resolve_model(name: str | Path | None, revision: str | None = None) -> Path:
    """The local directory holding ``name``'s files (downloading if allowed)."""
    if name is None:
        return DEMO_MODEL
    path = Path(str(name)).expanduser()
    if path.exists():
        return _local(path)
    if isinstance(name, Path) or looks_like_path(str(name)):
        raise ModelNotFoundError(f"no such model directory: {name}")
    return _from_hub(str(name), revision, local_only=False)


def _local(path: Path) -> Path:
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix == ".safetensors" or path.name == "config.json":
            return path.parent
        raise ModelNotFoundError(f"{path} is a file: pass the model directory (config.json + *.safetensors)")
    return path


def _from_hub(name: str, revision: str | None, local_only: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - it is a dependency
        raise ModelNotFoundError(
            f"{name!r} is not a local directory, and huggingface_hub is not installed to fetch it"
        ) from None
    repo = hub_id(name)
    where = f"{repo}" + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=True,
            cache_dir=_cache_dir(),
        )
    except (LocalEntryNotFoundError, FileNotFoundError):
        folder = None
    except HFValidationError:
        raise ModelNotFoundError(
            f"{name!r} is neither a local directory nor a valid Hugging Face model id"
        ) from None
    if folder is None and not local_only and not _offline():
        try:
            folder = snapshot_download(
                repo, revision=revision, allow_patterns=ALLOW_PATTERNS, cache_dir=_cache_dir()
            )
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ModelNotFoundError(f"{where} does not exist on the Hugging Face hub: {exc}") from None
        except Exception as exc:  # network down, proxy, timeouts: say so in one line
            raise ModelNotFoundError(
                f"{where} is not in the local Hugging Face cache ({_cache_dir()}) and downloading it"
                f" failed ({type(exc).__name__}): check the network, or run `opswitch download {name}`"
                " where there is one, or pass a local directory"
            ) from None
    if folder is None:
        raise ModelNotFoundError(
            f"{where} is not in the local Hugging Face cache ({_cache_dir()})"
            + (" and HF_HUB_OFFLINE is set" if _offline() else "")
            + f": run `opswitch download {name}` with network access, or pass a local directory"
        )
    return _check_snapshot(Path(folder), where)


def _check_snapshot(folder: Path, where: str) -> Path:
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
        return folder
    raise WeightsError(
        f"{where} has no safetensors weights in the cache ({folder}); opswitch never loads pickled"
        " .bin/.pt weights: convert them with transformers' save_pretrained(safe_serialization=True)"
    )


def download(name: str, revision: str | None = None) -> Path:
    """Fetch ``name`` into the hub cache now (with progress bars), return its folder."""
    if _offline():
        raise ModelNotFoundError("HF_HUB_OFFLINE is set: unset it to download models")
    return _from_hub(name, revision, local_only=False)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str:
    """Read at call time (huggingface_hub reads HF_HOME once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")
