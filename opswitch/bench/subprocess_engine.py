"""An engine in a fresh process (``opswitch.bench.worker``): its JSON line, or its error.

The child runs the worker module by name with the current directory taken off
``sys.path``: ``python -m`` would put it first, and run from the parent of a
clone (which holds a folder named opswitch) the child would import that
folder, not the opswitch this process runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

WORKER = "opswitch.bench.worker"
_NO_CWD_ON_PATH = "import sys\nif sys.path and sys.path[0] in ('', '.'):\n    del sys.path[0]\n"


def worker_command(*args: str) -> list[str]:
    """``python -m opswitch.bench.worker ARGS`` that imports this process's opswitch, whatever the cwd."""
    run = f"import runpy\nrunpy.run_module({WORKER!r}, run_name='__main__', alter_sys=True)\n"
    return [sys.executable, "-c", _NO_CWD_ON_PATH + run, *args]


def _last_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def load_and_first_token(engine: str, path: str, fmt: str = "f32", backend: str = "",
                         threads: int = 1) -> dict:
    """Load time, load + first token, and peak RSS (total, and the libraries' baseline
    before loading) of a saved model directory, measured in a fresh process."""
    result = subprocess.run(worker_command("load", engine, path, fmt, backend, str(threads)),
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(_last_error_line(result))
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_engine(engine: str, model_spec: str, spec: str, fmt: str, repeats: int, prompt: int, late: int,
               prefill: int, new: int, idle_wait: float, env: dict | None = None) -> dict:
    """Decode early and late and prefill of one engine in a fresh process (thread pools of
    engines never share one): ``{figure: {median, samples}, interference}`` or ``{error}``."""
    numbers = (repeats, prompt, late, prefill, new, idle_wait)
    command = worker_command("engine", engine, model_spec, spec, fmt, *(str(v) for v in numbers))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": _last_error_line(result)}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_engines(engines: list[tuple[str, str, str, str]], model_spec: str, repeats: int, prompt: int,
                    late: int, prefill: int, new: int, idle_wait: float,
                    on_failure=lambda label, error: None,
                    kv_cache: str = "f32") -> tuple[dict[str, dict], list[int]]:
    """Each (label, engine, spec, format) in its own process, one after another, the same
    weights in each: ``{label: {fmt, early, late, prefill}}`` of Rows (``late`` None when
    skipped), and [disturbed, repeats] over all of them. A failed engine is reported
    through ``on_failure`` and left out. Our engines use the ``kv_cache`` format (torch's
    cache stays its own)."""
    from opswitch.bench.rows import Row

    results: dict[str, dict] = {}
    interference = [0, 0]
    for label, engine, spec, fmt in engines:
        kv = "" if engine == "torch" or kv_cache == "f32" else f":{kv_cache}"
        r = run_engine(engine, model_spec, spec, fmt + kv, repeats, prompt, late, prefill, new, idle_wait)
        if "error" in r:
            on_failure(label, r["error"])
            continue
        interference = [interference[0] + r["interference"][0], interference[1] + r["interference"][1]]
        results[label] = {"fmt": fmt, "late": None}
        for what, unit in (("early", "tok/s"), ("late", "tok/s"), ("prefill", "s")):
            if what in r:
                results[label][what] = Row(what, label, r[what]["samples"], unit=unit)
    return results, interference
