"""Hub ids through huggingface_hub's cache, offline: a cache laid out exactly as huggingface_hub writes it.

There is no network in CI, so the cache is built by hand the way
``huggingface_hub.file_download`` builds it (and checked with its own
``scan_cache_dir``)::

    HF_HOME/hub/models--openai-community--gpt2/
        blobs/<git blob sha1 for plain files, sha256 for LFS files (safetensors)>
        refs/main                      (holds the commit hash)
        snapshots/<commit>/<file> -> ../../blobs/<blob>
        trees/<commit>.json            (optional: the tree listing huggingface_hub 2.x caches)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import run_cli
from support import IN_CI, require

from opswitch.core.errors import ModelNotFoundError, WeightsError
from opswitch.model import hub
from opswitch.model.hub import resolve_model

huggingface_hub = require("huggingface_hub")

REPO = "openai-community/gpt2"
MAIN = hashlib.sha1(b"opswitch test main").hexdigest()
OLD = hashlib.sha1(b"opswitch test v1.0").hexdigest()
LFS_SUFFIXES = (".safetensors", ".bin")  # stored with Git LFS on the hub: blob named by sha256
ROOT = Path(__file__).resolve().parent.parent


# --- building a cache ---------------------------------------------------------------------------


def blob_id(data: bytes, lfs: bool) -> str:
    """The etag huggingface_hub names a blob by: LFS sha256, else the git blob id."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(
    cache: Path, repo: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",),
    tree: bool = False,
) -> Path:
    """Put ``files`` into ``cache`` as huggingface_hub's snapshot_download would; return the snapshot."""
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    entries = {}
    for name, source in files.items():
        data = source.read_bytes()
        lfs = name.endswith(LFS_SUFFIXES)
        blob = storage / "blobs" / blob_id(data, lfs)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))  # relative, like _create_symlink
        entries[name] = {"size": len(data), "blob_id": blob_id(data, False)}
        if lfs:
            entries[name].update(lfs_sha256=blob.name, lfs_size=len(data))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    if tree:
        write_tree(storage, commit, entries)
    return snapshot


def write_tree(storage: Path, commit: str, entries: dict[str, dict]) -> None:
    (storage / "trees").mkdir(exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": entries}))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, gpt2_tokenizer_dir) -> dict[str, Path]:
    """A tiny real GPT-2 as transformers saves it, with the real GPT-2 tokenizer files."""
    directory = tmp_path_factory.mktemp("tiny-hf-gpt2")
    try:
        import torch
        import transformers
    except ImportError:  # opswitch's own writer makes the same files (off CI only: CI has transformers)
        if IN_CI:
            require("torch")
            require("transformers")
        import numpy as np

        from opswitch.model.config import GPT2Config
        from opswitch.model.weights import nest_params, save_gpt2

        config = GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2)
        rng = np.random.default_rng(0)
        flat = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in config.param_shapes().items()}
        save_gpt2(directory, config, nest_params(flat, config.n_layer))
    else:
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257, n_positions=32)
        transformers.GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, directory / name)
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME, offline; the hub cache is HF_HOME/hub."""
    home = tmp_path / "hf-home"
    (home / "hub").mkdir(parents=True)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def cached(hf_home, model_files) -> dict[str, Path]:
    """gpt2 cached twice: main -> MAIN, tag v1.0 -> OLD; {revision: snapshot folder}."""
    cache = hf_home / "hub"
    return {
        "main": add_snapshot(cache, REPO, MAIN, model_files, refs=("main",)),
        "v1.0": add_snapshot(cache, REPO, OLD, model_files, refs=("v1.0",)),
    }


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m opswitch ARGS`` with no HF_* settings but ``env``'s."""
    hub_settings = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(hub_settings)}
    env = {"HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT), **env}
    return run_cli(*args, base=inherited, env=env, timeout=60)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("opswitch: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


# --- the cache itself -----------------------------------------------------------------------------


def test_the_test_cache_is_one_huggingface_hub_recognises(cached, hf_home):
    info = huggingface_hub.scan_cache_dir(hf_home / "hub")
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO
    refs = {rev.commit_hash: set(rev.refs) for rev in repo.revisions}
    assert refs == {MAIN: {"main"}, OLD: {"v1.0"}}
    for rev in repo.revisions:
        assert {f.file_name for f in rev.files} >= {"config.json", "model.safetensors", "vocab.json"}


# --- resolving hub ids from the cache -----------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", REPO])
def test_alias_and_full_id_resolve_to_the_cached_snapshot(cached, name):
    assert resolve_model(name) == cached["main"]


def test_hf_hub_cache_wins_over_hf_home(cached, hf_home, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelNotFoundError, match="elsewhere"):
        resolve_model("gpt2")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    assert resolve_model("gpt2") == cached["main"]


@pytest.mark.parametrize("revision, want", [
    ("main", "main"), ("v1.0", "v1.0"), (MAIN, "main"), (OLD, "v1.0"), (OLD[:7], "v1.0"),
])
def test_revisions_branch_tag_and_commit_hash(cached, revision, want):
    assert resolve_model("gpt2", revision=revision) == cached[want]


def test_an_uncached_revision_is_a_clear_error(cached):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("gpt2", revision="v2.0")
    message = str(e.value)
    assert "'v2.0'" in message and REPO in message and "has: main, v1.0" in message
    assert "opswitch download gpt2 --revision v2.0" in message and "\n" not in message


@pytest.mark.parametrize("revision", ["../../../etc", "/abs", ""])
def test_a_revision_cannot_escape_the_cache(cached, revision):
    with pytest.raises(ModelNotFoundError, match="invalid revision"):
        resolve_model("gpt2", revision=revision)


def test_the_resolved_snapshot_loads(cached):
    from opswitch.model.weights import load_gpt2
    from opswitch.tokenizer import load_tokenizer

    folder = resolve_model("gpt2")
    config, params = load_gpt2(folder)
    assert (config.n_layer, config.n_embd, config.vocab_size) == (1, 16, 50257)
    assert params["wte"].shape == (50257, 16)
    assert load_tokenizer(folder).encode("Hello world") == [15496, 995]


def test_a_local_directory_named_like_a_hub_id_wins(cached, tmp_path, monkeypatch, model_files):
    local = tmp_path / "work" / "gpt2"
    local.mkdir(parents=True)
    monkeypatch.chdir(local.parent)
    assert resolve_model("gpt2") == Path("gpt2")
    with pytest.raises(ModelNotFoundError, match=r"no revisions.*--model openai-community/gpt2"):
        resolve_model("gpt2", revision="main")


def test_a_cached_model_needs_no_network_even_when_online(cached, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*args: object) -> None:
        raise AssertionError("resolve_model used the network for a cached model")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert resolve_model("gpt2") == cached["main"]


def test_none_is_the_demo_model():
    assert resolve_model(None) == hub.DEMO_MODEL
    with pytest.raises(ModelNotFoundError, match="give --model too"):
        resolve_model(None, revision="main")


# --- what is not there, or not acceptable -------------------------------------------------------


def test_a_model_not_in_the_cache(hf_home):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("distilgpt2")
    message = str(e.value)
    assert "distilbert/distilgpt2" in message and str(hf_home / "hub") in message
    assert "HF_HUB_OFFLINE is set" in message and "`opswitch download distilgpt2`" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "models/a/b", "weights.safetensors"])
def test_a_missing_path_is_not_taken_for_a_hub_id(hf_home, name):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        resolve_model(name)


@pytest.mark.parametrize("name", ["bad--name", "org/na me", "-gpt2"])
def test_an_invalid_hub_id(hf_home, name):
    with pytest.raises(ModelNotFoundError, match="nor a valid Hugging Face model id"):
        resolve_model(name)


def test_pickled_weights_in_the_cache_are_refused(hf_home, model_files, tmp_path):
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x04not really a pickle")
    files = {"config.json": model_files["config.json"], "pytorch_model.bin": pickle}
    add_snapshot(hf_home / "hub", "someone/old-gpt2", MAIN, files)
    with pytest.raises(WeightsError) as e:
        resolve_model("someone/old-gpt2")
    message = str(e.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "save_pretrained" in message


def test_a_snapshot_without_config(hf_home, model_files):
    files = {n: p for n, p in model_files.items() if n != "config.json"}
    add_snapshot(hf_home / "hub", REPO, MAIN, files)
    with pytest.raises(WeightsError, match=r"has no config\.json.*opswitch download gpt2"):
        resolve_model("gpt2")


def test_a_snapshot_known_to_be_incomplete(hf_home, model_files):
    """huggingface_hub 2.x checks its cached tree listing itself and raises IncompleteSnapshotError."""
    files = {n: p for n, p in model_files.items() if n != "config.json"}
    snapshot = add_snapshot(hf_home / "hub", REPO, MAIN, files, tree=True)
    tree = snapshot.parent.parent / "trees" / f"{MAIN}.json"
    listing = json.loads(tree.read_text())
    listing["files"]["config.json"] = {"size": 1, "blob_id": "0" * 40}
    listing["files"]["pytorch_model.bin"] = {"size": 1, "blob_id": "1" * 40}  # not asked for: ignored
    tree.write_text(json.dumps(listing))
    with pytest.raises(ModelNotFoundError, match=r"incomplete, missing config\.json.*opswitch download gpt2"):
        resolve_model("gpt2")


# --- downloading (the hub itself stubbed: there is no network here) -----------------------------


def hub_error(kind: str) -> Exception:
    import httpx2
    from huggingface_hub import errors

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    if kind == "unreachable":
        try:
            raise httpx2.ConnectError("[Errno 111] Connection refused")
        except httpx2.ConnectError as cause:
            try:
                raise errors.LocalEntryNotFoundError("Cannot find ...\nPlease check") from cause
            except errors.LocalEntryNotFoundError as exc:
                return exc
    if kind == "proxy":
        return httpx2.ProxyError("407 Proxy Authentication Required\nmore")
    cls = {"missing": errors.RepositoryNotFoundError, "gated": errors.GatedRepoError,
           "revision": errors.RevisionNotFoundError}[kind]
    return cls("404 Client Error.\n\nRepository Not Found", response=response)


@pytest.mark.parametrize("kind, needle", [
    ("unreachable", "could not be reached (ConnectError)"),
    ("proxy", "failed: ProxyError: 407 Proxy Authentication Required"),
    ("missing", "does not exist on the Hugging Face hub"),
    ("gated", "is gated"),
    ("revision", "has no revision 'v9'"),
])
def test_download_failures_are_one_line(hf_home, monkeypatch, kind, needle):
    def snapshot_download(*args: object, **kwargs: object) -> str:
        raise hub_error(kind)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ModelNotFoundError) as e:
        hub.download("gpt2", revision="v9")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_download_asks_only_for_safe_files_and_refuses_a_pickle_only_repo(hf_home, monkeypatch, model_files):
    """What the hub has matters: a repo with config.json and only .bin weights gives just the config."""
    calls = []

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        config_only = {"config.json": model_files["config.json"]}
        return str(add_snapshot(Path(kwargs["cache_dir"]), repo_id, MAIN, config_only))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(WeightsError, match="no safetensors weights on the Hugging Face hub"):
        resolve_model("someone/bin-only")
    assert [c[1].get("local_files_only", False) for c in calls] == [True, False]  # the cache first
    for repo, kwargs in calls:
        assert repo == "someone/bin-only" and kwargs["cache_dir"] == str(hf_home / "hub")
        assert kwargs["allow_patterns"] == hub.ALLOW_PATTERNS
        pickles = (".bin", ".pt", ".pth", ".ckpt", ".pkl", "*")
        assert not any(pattern.endswith(pickles) for pattern in kwargs["allow_patterns"])


# --- the CLI ------------------------------------------------------------------------------------


def test_generate_with_a_cached_hub_model(cached, hf_home):
    proc = cli("generate", "--model", "gpt2", "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0",
               "--quiet", "--backend", "naive", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_download_offline_reports_a_cached_model(cached, hf_home):
    proc = cli("download", "gpt2", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(cached["main"])


def test_download_offline_and_not_cached(hf_home):
    proc = cli("download", "distilgpt2", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "HF_HUB_OFFLINE is set", "distilbert/distilgpt2", "unset HF_HUB_OFFLINE")
    assert proc.stdout == ""


def test_download_with_the_hub_unreachable(hf_home, cached):
    """A dead endpoint: an uncached model is one clear line; a cached one is still there."""
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    proc = cli("download", "distilgpt2", env=env)
    assert_one_line_error(proc, "distilbert/distilgpt2", "could not be reached")
    proc = cli("download", "gpt2", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(cached["main"])


def test_generate_with_the_hub_unreachable(hf_home):
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = cli("generate", "--model", "gpt2", "--prompt", "Hi", "--quiet", env=env)
    assert_one_line_error(proc, REPO, "could not be reached")


# --- a damaged cache is never reported as a usable model ----------------------------------------


@pytest.mark.parametrize("damaged", ["model.safetensors", "config.json", "vocab.json"])
def test_a_dangling_blob_is_not_in_the_cache(cached, hf_home, damaged):
    (cached["main"] / damaged).resolve().unlink()  # the blob goes, the snapshot's link stays
    proc = cli("download", "gpt2", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "✓" not in proc.stderr and proc.stdout == ""
    assert f"is damaged: {damaged} is not a file (a blob is missing)" in proc.stderr
    assert "opswitch download gpt2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(WeightsError, match="is damaged"):
        resolve_model("gpt2")


def test_a_broken_model_safetensors_is_not_asked_to_be_renamed(tmp_path, model_files):
    from opswitch.model.weights import load_gpt2

    shutil.copy(model_files["config.json"], tmp_path)
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(WeightsError) as e:
        load_gpt2(tmp_path)
    assert "rename" not in str(e.value) and "model.safetensors is a dangling link" in str(e.value)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(WeightsError, match=r"model\.safetensors is a directory, not a file"):
        load_gpt2(tmp_path)
