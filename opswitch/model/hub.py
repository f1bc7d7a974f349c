"""From what a user types (`--model`) to a directory of model files.

A local directory always wins.  Anything else is a Hugging Face hub id,
resolved through ``huggingface_hub``'s cache (so ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and revisions work as users expect),
downloading only config, safetensors weights and tokenizer files: never
pickles.  ``None`` is the small demo model shipped inside the package.

The cache is always asked first, with ``local_files_only=True``: a model
that is there loads without a single network request, even when the hub
is unreachable.  What huggingface_hub 2.x does in that mode, and what we
add on top:

* repo or revision not cached -> ``LocalEntryNotFoundError``;
* snapshot folder present and a tree listing (``trees/<commit>.json``) cached
  that shows requested files missing -> ``IncompleteSnapshotError`` (a subclass);
* snapshot folder present but no tree listing -> the folder is returned as
  it is, whatever it holds, so ``_check_snapshot`` verifies config.json and
  safetensors weights are really there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from opswitch.core.errors import ModelNotFoundError, WeightsError
from opswitch.core.files import TOKENIZER_FILES, not_a_file
from opswitch.model.safetensors import PICKLE_SUFFIXES, refuse_pickle
from opswitch.model.weights import weight_files

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
    *TOKENIZER_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
]
# The files opswitch reads from a snapshot (besides *.safetensors).
_READ = ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES)
# A name ending like a model file is a path the user mistyped, never a hub id.
_FILE_SUFFIXES = (".safetensors", ".json", *PICKLE_SUFFIXES)
_SHORT_HASH = re.compile(r"[0-9a-f]{7,39}")


def hub_id(name: str) -> str:
    """The full ``org/name`` for a short alias (the cache is keyed by the full id)."""
    return ALIASES.get(name, name)


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith("/")
        or "\\" in name
        or name.lower().endswith(_FILE_SUFFIXES)
    )


def resolve_model(name: str | Path | None, revision: str | None = None) -> Path:
    """The local directory holding ``name``'s files: local path, hub cache, or a download."""
    if name is None:
        if revision:
            raise ModelNotFoundError("--revision applies to Hugging Face hub ids: give --model too")
        return DEMO_MODEL
    path = Path(str(name)).expanduser()
    if path.exists():
        if revision:  # silently ignoring a pin would load something the user did not ask for
            full = hub_id(str(name))
            raise ModelNotFoundError(
                f"{name} is a local path, which has no revisions: --revision applies to Hugging Face hub ids;"
                + (f" pass --model {full} to use the hub," if full != str(name) else "")
                + " or drop --revision"
            )
        return _local(path)
    if isinstance(name, Path) or looks_like_path(str(name)):
        raise ModelNotFoundError(f"no such model directory: {name} (check the path)")
    return _from_hub(str(name), revision)


def download(name: str, revision: str | None = None) -> Path:
    """Fetch ``name`` into the hub cache now (progress bars on a terminal's stderr), return its folder.

    Unlike ``resolve_model`` this asks the hub first, so a moved branch is
    updated; huggingface_hub falls back to the cache by itself when the hub
    cannot be reached.  With HF_HUB_OFFLINE set, a cached model is reported
    as present and anything else is an error.
    """
    checked_hub_id(name)
    if not offline_mode():
        return _fetch(name, revision)
    folder, incomplete = _cached(name, revision)
    if folder is None or incomplete:
        state = "not in" if folder is None else f"incomplete (missing {incomplete}) in"
        raise ModelNotFoundError(
            f"HF_HUB_OFFLINE is set and {_where(name, revision)} is {state} the Hugging Face cache"
            f" ({cache_dir()}): unset HF_HUB_OFFLINE to download it"
        )
    return _check_snapshot(folder, name, revision)


def cache_dir() -> str:
    """The hub cache, read at call time: huggingface_hub reads HF_HOME / HF_HUB_CACHE once, at import."""
    home = _env_path("HF_HOME") or os.path.join(
        _env_path("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return _env_path("HF_HUB_CACHE") or _env_path("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")


def _env_path(var: str) -> str | None:
    value = os.environ.get(var)
    return os.path.expandvars(os.path.expanduser(value)) if value else None


def _local(path: Path) -> Path:
    """A model directory, or the one holding a config/safetensors file the user pointed at.

    A weights file stands for its directory only when it is the file (or a shard)
    that loading the directory reads: ``DIR/other.safetensors`` must never load
    ``DIR/model.safetensors`` instead.
    """
    if path.is_dir():
        return path
    refuse_pickle(path)
    kind = not_a_file(path)
    if kind is not None:
        raise ModelNotFoundError(f"{path} is {kind}, not a model directory or file; check the path")
    if path.name == "config.json":
        return path.parent
    if path.suffix == ".safetensors":
        try:
            loads = weight_files(path.parent)
        except WeightsError:
            loads = []
        if any(os.path.samefile(path, p) for p in loads if p.exists()):
            return path.parent
        raise ModelNotFoundError(
            f"{path} is not the weights file of its directory (loading {path.parent} reads "
            f"{loads[0].name if loads else 'model.safetensors'}); pass the directory to load that, or move "
            f"{path.name} into a directory of its own as model.safetensors, with its config.json"
        )
    raise ModelNotFoundError(f"{path} is a file: pass the model directory (config.json + *.safetensors)")


def _from_hub(name: str, revision: str | None) -> Path:
    """Cache first; then, unless HF_HUB_OFFLINE is set, download."""
    folder, incomplete = _cached(name, revision)
    if folder is not None and not incomplete:
        return _check_snapshot(folder, name, revision)
    if not offline_mode():
        return _fetch(name, revision)
    if folder is not None:
        raise ModelNotFoundError(
            f"the cached snapshot of {_where(name, revision)} ({folder}) is incomplete, missing {incomplete},"
            f" and HF_HUB_OFFLINE is set: {_download_hint(name, revision)} with network access to complete it"
        )
    raise ModelNotFoundError(_not_cached(name, revision))


def _cached(name: str, revision: str | None) -> tuple[Path | None, str]:
    """(snapshot folder or None, what huggingface_hub says is missing from it or "")."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    repo = checked_hub_id(name)
    try:
        folder = snapshot_download(repo, local_files_only=True, **_options(repo, revision))
    except IncompleteSnapshotError as exc:
        missing = re.search(r"are missing \((.*?)\)\. ", str(exc))
        return Path(exc.snapshot_path), missing.group(1) if missing else "some files"
    except LocalEntryNotFoundError:
        return None, ""
    return Path(folder), ""


def _fetch(name: str, revision: str | None) -> Path:
    """Download from the hub; every failure becomes one line saying what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = checked_hub_id(name)
    where = _where(name, revision)
    try:
        folder = snapshot_download(repo, **_options(repo, revision))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is gated on the Hugging Face hub: accept its terms on https://huggingface.co/{repo}"
            " and log in (`hf auth login` or HF_TOKEN), then try again"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo} does not exist on the Hugging Face hub (or is private: log in with `hf auth login`"
            " or set HF_TOKEN); check the name"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"{repo} has no revision {revision!r} on the Hugging Face hub: give a branch, tag or commit hash"
        ) from None
    except IncompleteSnapshotError as exc:  # hub unreachable, cached snapshot known to be partial
        raise ModelNotFoundError(
            f"the cached snapshot of {where} ({exc.snapshot_path}) is incomplete and the hub could not be"
            f" reached{_cause(exc)}: check the network (HF_ENDPOINT, proxies) and try again"
        ) from None
    except LocalEntryNotFoundError as exc:  # hub unreachable and nothing usable cached
        raise ModelNotFoundError(_unreachable(name, revision, exc)) from None
    except Exception as exc:  # proxies, timeouts, disk full, a hub error page: one line, not a traceback
        raise ModelNotFoundError(
            f"downloading {where} into {cache_dir()} failed: {_first_line(exc)}; check the network"
            " (HF_ENDPOINT, proxies) and try again, or pass a local model directory"
        ) from None
    return _check_snapshot(Path(folder), name, revision, fresh=True)


def _options(repo: str, revision: str | None) -> dict:
    """What every snapshot_download call shares: no pickles, the cache of *now*, a safe revision."""
    return {
        "revision": _checked_revision(repo, revision),
        "allow_patterns": ALLOW_PATTERNS,
        "cache_dir": cache_dir(),
    }


def _check_snapshot(folder: Path, name: str, revision: str | None, fresh: bool = False) -> Path:
    """A snapshot can be partial or pickle-only; say so here rather than deep in the loader.

    ``fresh``: the folder was just downloaded, so what is missing is missing on the hub too.
    """
    where = _where(name, revision)
    # A cached file is a link to a blob; a missing blob leaves a dangling link, which is no file.
    broken = sorted(
        p.name for p in folder.iterdir()
        if (p.name in _READ or p.suffix == ".safetensors") and not_a_file(p) is not None
    )
    if broken:
        raise WeightsError(
            f"the cached snapshot of {where} ({folder}) is damaged: {', '.join(broken[:4])}"
            f"{' ...' if len(broken) > 4 else ''} {'is' if len(broken) == 1 else 'are'} not a file"
            f" (a blob is missing): {_download_hint(name, revision)} with network access to repair it"
        )
    has_config = (folder / "config.json").is_file()
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if not has_weights and (pickles or (fresh and has_config)):
        out = f"./{hub_id(name).rsplit('/', 1)[-1]}-safetensors"
        rev = f", revision={revision!r}" if revision else ""
        found = f"only pickled weights ({', '.join(pickles)}) in the cache ({folder})" if pickles else (
            "no safetensors weights on the Hugging Face hub (pickled ones are never downloaded)")
        raise WeightsError(
            f"{where} has {found}; opswitch refuses to load pickles because unpickling can run arbitrary"
            " code: if you trust them, convert once to safetensors: python -c \"from transformers import"
            f" AutoModelForCausalLM as M; M.from_pretrained({hub_id(name)!r}{rev}).save_pretrained("
            f"{out!r}, safe_serialization=True)\" and pass --model {out}"
        )
    if fresh and not has_config:
        raise ModelNotFoundError(
            f"{where} has no config.json on the Hugging Face hub: not a transformers model"
        )
    wanted = (("config.json", has_config), ("*.safetensors weights", has_weights))
    missing = [what for what, ok in wanted if not ok]
    if missing:
        raise WeightsError(
            f"the cached snapshot of {where} ({folder}) has no {' and no '.join(missing)}:"
            f" {_download_hint(name, revision)} to complete it, or pass a local model directory"
        )
    return folder


def checked_hub_id(name: str) -> str:
    """The full hub id for ``name``, or a ModelNotFoundError before anything slow happens."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if looks_like_path(name):
        raise ModelNotFoundError(f"{name} looks like a path, not a Hugging Face model id (name or org/name)")
    repo = hub_id(name)
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ModelNotFoundError(_invalid_id(name)) from None
    return repo


def _checked_revision(repo: str, revision: str | None) -> str | None:
    """Refuse revisions that would escape the cache folder; expand a cached short commit hash."""
    if revision is None:
        return None
    if not revision or revision.startswith("/") or ".." in revision.split("/"):
        raise ModelNotFoundError(f"invalid revision {revision!r}: give a branch, tag or commit hash")
    if _SHORT_HASH.fullmatch(revision):  # huggingface_hub only looks up full hashes offline
        snapshots = Path(cache_dir()) / _repo_folder(repo) / "snapshots"
        matches = [p.name for p in snapshots.glob(f"{revision}*")] if snapshots.is_dir() else []
        refs = Path(cache_dir()) / _repo_folder(repo) / "refs" / revision
        if len(matches) == 1 and not refs.exists():
            return matches[0]
    return revision


def _repo_folder(repo: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=repo, repo_type="model")


def _cached_refs(repo: str) -> list[str]:
    refs = Path(cache_dir()) / _repo_folder(repo) / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file())


def _not_cached(name: str, revision: str | None) -> str:
    repo = hub_id(name)
    if revision and (Path(cache_dir()) / _repo_folder(repo)).is_dir():
        has = ", ".join(_cached_refs(repo)) or "none by name"
        what = f"revision {revision!r} of {repo} is not in the Hugging Face cache ({cache_dir()}; has: {has})"
    else:
        what = f"{_where(name, revision)} is not in the Hugging Face cache ({cache_dir()})"
    return (
        f"{what}{_offline_note()}: {_download_hint(name, revision)} with network access,"
        " or pass a local model directory"
    )


def _unreachable(name: str, revision: str | None, exc: Exception) -> str:
    return (
        f"{_where(name, revision)} is not in the Hugging Face cache ({cache_dir()}) and the hub could not"
        f" be reached{_cause(exc)}: check the network (HF_ENDPOINT, proxies) and try again, or pass a local"
        " model directory"
    )


def _cause(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__
    return f" ({type(cause).__name__})" if cause is not None else ""


def _invalid_id(name: str) -> str:
    return (
        f"{name!r} is neither a local directory nor a valid Hugging Face model id"
        " (`name` or `org/name`: letters, digits, '-', '_', '.', no '--' or '..')"
    )


def _where(name: str, revision: str | None) -> str:
    return hub_id(name) + (f"@{revision}" if revision else "")


def _download_hint(name: str, revision: str | None) -> str:
    return f"run `opswitch download {name}" + (f" --revision {revision}" if revision else "") + "`"


def _offline_note() -> str:
    return " and HF_HUB_OFFLINE is set" if offline_mode() else ""


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def offline_mode() -> bool:
    """As huggingface_hub decides it (TRANSFORMERS_OFFLINE too), but read now, not at its import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")
