"""Make the OpenCL runtimes that pip installs visible to the ICD loader.

pyopencl's wheel ships its own ICD loader (ocl-icd), which finds PoCL's
bundled library and whatever ``/etc/OpenCL/vendors`` names.  Intel's CPU
runtime from PyPI (``intel-opencl-rt``, in ``opswitch[opencl]``) puts
``libintelocl.so`` in the environment's ``lib/``, but the ICD file it ships
names a placeholder path from Intel's build machine, so the loader never
loads it.  PoCL 3.0 (the newest on PyPI, LLVM 14) cannot compile for CPUs
newer than LLVM 14 knows (Zen 5: "unknown target CPU 'generic'"), so on such
a machine Intel's runtime is the one that works, from pip alone.

``register_pip_runtimes()`` writes a vendors folder naming the installed
library, plus copies of the system's own ICD files (``OCL_ICD_VENDORS``
replaces ``/etc/OpenCL/vendors``, so a GPU driver registered there must stay
visible), and points the loader at it.  The loader reads the variable at its
first platform query, so this runs before that, once per process.  A user
who set ``OCL_ICD_VENDORS`` or ``OPENCL_VENDOR_PATH`` keeps their choice.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

INTEL_DISTRIBUTION = "intel-opencl-rt"
INTEL_LIBRARY = "libintelocl.so"
SYSTEM_VENDORS = Path("/etc/OpenCL/vendors")
USER_VARIABLES = ("OCL_ICD_VENDORS", "OPENCL_VENDOR_PATH")
_MAX_ICD_BYTES = 4096  # an ICD file is one library name or path

_registered: str | None = None  # the note of the first call, kept for later ones


def intel_runtime() -> Path | None:
    """The installed ``libintelocl.so`` of ``intel-opencl-rt``, if pip installed it."""
    try:
        dist = metadata.distribution(INTEL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    candidates = [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == INTEL_LIBRARY]
    candidates.append(Path(sys.prefix) / "lib" / INTEL_LIBRARY)  # where pip puts wheel data files
    for path in candidates:
        if path.is_file():
            return path.resolve()
    return None


def _system_icds() -> dict[str, str]:
    """The system's ICD files (name -> contents), which our folder must keep visible."""
    found: dict[str, str] = {}
    try:
        entries = sorted(SYSTEM_VENDORS.iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            if entry.suffix == ".icd" and entry.is_file() and entry.stat().st_size <= _MAX_ICD_BYTES:
                found[f"system-{entry.name}"] = entry.read_text(errors="replace").strip() + "\n"
        except OSError:
            continue
    return found


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "opswitch" / "opencl-vendors"


def _write_folder(files: dict[str, str]) -> Path:
    """A folder holding exactly ``files``, named by their contents (written once, atomically)."""
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
    try:
        root = _cache_root()
        final = root / digest
        if final.is_dir() and sorted(p.name for p in final.iterdir()) == sorted(files):
            return final
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
    except OSError:  # no writable cache: a folder for this process only
        final = staging = Path(tempfile.mkdtemp(prefix="opswitch-opencl-vendors-"))
        atexit.register(shutil.rmtree, staging, True)
    for name, text in files.items():
        (staging / name).write_text(text)
    if staging != final:
        try:
            os.replace(staging, final)
        except OSError:  # another process got there first with the same contents
            shutil.rmtree(staging, ignore_errors=True)
    return final


def register_pip_runtimes() -> str:
    """Point the ICD loader at pip-installed runtimes; returns what it did, for messages."""
    global _registered
    if _registered is not None:
        return _registered
    library = intel_runtime()
    user_set = [name for name in USER_VARIABLES if os.environ.get(name)]
    if library is None:
        _registered = "Intel's CPU OpenCL runtime is not installed"
    elif user_set:
        _registered = f"{user_set[0]} is set, so the ICD loader uses the vendors you chose"
    else:
        try:
            folder = _write_folder({"opswitch-intel-cpu.icd": f"{library}\n", **_system_icds()})
        except OSError as exc:
            _registered = f"could not register Intel's CPU OpenCL runtime ({exc})"
        else:
            os.environ["OCL_ICD_VENDORS"] = str(folder)
            _registered = f"Intel's CPU OpenCL runtime registered from {library.parent}"
    return _registered
