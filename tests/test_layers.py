"""The design's import rules (docs/architecture.md, DESIGN.md "Which way imports run"),
checked by reading every module's imports with ``ast``.

Found: an import that goes up the floors, an import cycle between modules
(module-level imports), and a function-level import of an opswitch module
that would sit in a cycle if the imports sat at the top (an import hiding a cycle).
Function-level imports of third-party packages (optional extras) are fine.
Each finding is one line; the test fails with all of them.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "opswitch"

# What each part may import directly; a part may also import whatever those may
# (the floors, from the top): cli -> serve/batch/bench -> api -> generation ->
# model/tokenizer -> core; onnx -> model/core; backends -> core; testing -> core.
# "" is the package's own __init__ (the facade: load_model, load_tokenizer).
DIRECT = {
    "__main__": {"cli"},
    "cli": {"serve", "batch", "bench", "api", "onnx", ""},
    "serve": {"api", ""},
    "batch": {"api", ""},
    "bench": {"api", ""},
    "": {"api", "tokenizer"},
    "api": {"generation", "onnx"},
    "generation": {"model", "tokenizer"},
    "onnx": {"model", "core", ""},  # "": an export is stamped with opswitch.__version__
    "model": {"core"},
    "tokenizer": {"core"},
    "backends": {"core"},
    "testing": {"core"},
    "core": set(),
}
# serve and batch see only api, generation's public names (``opswitch.generation``
# itself) and the errors everyone raises; tokenizer needs only errors and bounded reads
NARROW = {
    "serve": {"opswitch", "opswitch.api", "opswitch.generation", "opswitch.core.errors"},
    "batch": {"opswitch", "opswitch.api", "opswitch.generation", "opswitch.core.errors"},
    "tokenizer": {"opswitch.core.errors", "opswitch.core.files"},
}

# Breaks another helper is fixing now (issue 23, engine helper A: serve/batch reach below
# api and generation's public names).  Nothing else belongs here; the lead empties it at
# merge, and an entry that no longer happens fails the test, so the list only shrinks.
KNOWN: set[tuple[str, str]] = set()  # (serve.scheduler's two went with the engine, issue 22)


def _closure() -> dict[str, set[str]]:
    allowed: dict[str, set[str]] = {}

    def below(part: str) -> set[str]:
        if part not in allowed:
            allowed[part] = set()
            for lower in DIRECT[part]:
                allowed[part] |= {lower} | below(lower)
        return allowed[part]

    for part in DIRECT:
        below(part)
    return allowed


ALLOWED = _closure()


@dataclass(frozen=True)
class Import:
    importer: str  # module names, dotted
    imported: str
    line: int
    in_function: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.cache
def imports(root: Path) -> list[Import]:
    """Every import of a module of the package, module-level and function-level."""
    known = modules(root)
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool, name: str = name, is_package: bool = is_package) -> None:
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = _resolve(child, name, is_package)
                    # ``from pkg import submodule`` imports the submodule; ``from pkg import name``, pkg
                    subs = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in known]
                    targets = subs + ([base] if len(subs) < len(child.names) else [])
                for target in targets:
                    while target and target not in known:  # ``import a.b.c`` of a name inside a module
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        found.append(Import(name, target, child.lineno, in_function))
                visit(child, inner)

        visit(tree, False)
    return found


def part(module: str) -> str:
    """The floor a module lives on: its first name under the package ('' for the package)."""
    names = module.split(".")
    return names[1] if len(names) > 1 else ""


def rule_breaks(found: list[Import]) -> list[tuple[Import, str]]:
    """Imports that go up (or sideways) the floors, or past a narrow part's allowance."""
    out = []
    for imp in found:
        src, dst = part(imp.importer), part(imp.imported)
        if src == dst:
            continue
        if dst == "backends":
            out.append((imp, "imports a backend module: only the registry finds backends (by hooks)"))
        elif src in NARROW and imp.imported not in NARROW[src]:
            out.append((imp, f"{src} may import only {', '.join(sorted(NARROW[src]))}"))
        elif dst not in ALLOWED.get(src, set()):
            may = ", ".join(sorted(p or "opswitch" for p in ALLOWED.get(src, ()))) or "nothing"
            out.append((imp, f"goes up the floors ({src or 'opswitch'} may import {may})"))
    return out


def graph(found: list[Import], with_functions: bool = False) -> dict[str, set[str]]:
    """importer -> imported; module-level imports only, unless ``with_functions``."""
    edges: dict[str, set[str]] = {}
    for imp in found:
        if with_functions or not imp.in_function:
            edges.setdefault(imp.importer, set()).add(imp.imported)
    return edges


def path_between(edges: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A shortest import path start -> ... -> goal in the module-level graph, or None."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(edges.get(node, ())):
                if succ not in previous:
                    previous[succ] = node
                    if succ == goal:
                        chain: list[str] = [goal]
                        while previous[chain[-1]] is not None:
                            chain.append(previous[chain[-1]])  # type: ignore[arg-type]
                        return chain[::-1]
                    nxt.append(succ)
        frontier = nxt
    return None


def cycles(found: list[Import]) -> list[str]:
    """One line per module-level import cycle (each cycle once, from its smallest module)."""
    edges, seen, out = graph(found), set(), []
    for imp in sorted(found, key=lambda i: (i.importer, i.imported)):
        if imp.in_function:
            continue
        back = path_between(edges, imp.imported, imp.importer)
        if back is None:
            continue
        ring = [imp.importer, *back[:-1]]
        first = ring.index(min(ring))
        ring = ring[first:] + ring[:first]
        if tuple(ring) not in seen:
            seen.add(tuple(ring))
            out.append(" -> ".join([*ring, ring[0]]))
    return out


def hidden_cycles(found: list[Import]) -> list[tuple[Import, list[str]]]:
    """Function-level imports of package modules that would sit in a cycle if every
    import were at the top (the imported module leads back, through any imports)."""
    edges = graph(found, with_functions=True)
    out = []
    for imp in found:
        if imp.in_function:
            back = path_between(edges, imp.imported, imp.importer)
            if back is not None:
                out.append((imp, back))
    return out


@functools.cache
def problems(root: Path) -> list[tuple[tuple[str, str] | None, str]]:
    """(importer, imported) or None for a cycle, and the line that describes it."""
    found = imports(root)
    out: list[tuple[tuple[str, str] | None, str]] = []
    for imp, why in rule_breaks(found):
        where = "function-level " if imp.in_function else ""
        out.append(((imp.importer, imp.imported),
                    f"{imp.importer}:{imp.line}: {where}import of {imp.imported} {why}"))
    for ring in cycles(found):
        out.append((None, f"import cycle: {ring}"))
    for imp, back in hidden_cycles(found):
        out.append(((imp.importer, imp.imported),
                    f"{imp.importer}:{imp.line}: function-level import of {imp.imported} hides the cycle "
                    f"{' -> '.join([imp.importer, *back])}"))
    return out


def test_imports_follow_the_floors_without_cycles():
    found = problems(PACKAGE)
    bad = [line for key, line in found if key not in KNOWN]
    assert not bad, "import rules broken (DESIGN.md, 'Which way imports run'):\n" + "\n".join(bad)


def test_the_known_breaks_still_happen():
    """An allowed break that was fixed must leave KNOWN, so the list only shrinks."""
    happening = {key for key, _ in problems(PACKAGE)}
    stale = sorted(KNOWN - happening)
    assert not stale, "fixed, remove from KNOWN:\n" + "\n".join(f"{a} -> {b}" for a, b in stale)


# -- the checker itself finds what it must ---------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "opswitch"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {p.parent for p in root.rglob("*.py")} | {root}:
        (folder / "__init__.py").touch()
    return root


def test_an_upward_import_is_found(tmp_path):
    root = _tree(tmp_path, {
        "core/ops.py": "def f():\n    from opswitch.api import load_model\n",
        "api.py": "from opswitch.core import ops\n",
        "model/gpt2.py": "from opswitch.backends.naive import NaiveBackend\n",
        "backends/naive.py": "",
        "serve/app.py": "from opswitch.model import gpt2\nfrom opswitch.generation import GenerationConfig\n",
        "generation/__init__.py": "",
    })  # fmt: skip
    text = "\n".join(line for _, line in problems(root))
    assert "opswitch.core.ops:2: function-level import of opswitch.api goes up the floors" in text
    assert "opswitch.model.gpt2:1: import of opswitch.backends.naive imports a backend module" in text
    assert "opswitch.serve.app:1: import of opswitch.model.gpt2 serve may import only" in text
    lines = text.splitlines()
    assert not any("serve.app:2" in line for line in lines)  # generation's public names are fine
    assert not any(line.startswith("opswitch.api") for line in lines)  # down is fine


def test_a_cycle_and_a_function_level_import_hiding_one_are_found(tmp_path):
    root = _tree(tmp_path, {
        # the circle this project had: each side imported the other inside a function
        "cli/main.py": "class UsageError(Exception): ...\ndef f():\n    from opswitch.cli import eval_cmd\n",
        "cli/eval_cmd.py": "def run():\n    from opswitch.cli.main import UsageError\n",
        "cli/a.py": "from . import b\n",
        "cli/b.py": "import opswitch.cli.a\n",
        "cli/c.py": "def lazy():\n    import torch\n",
    })  # fmt: skip
    lines = [line for _, line in problems(root)]
    assert "import cycle: opswitch.cli.a -> opswitch.cli.b -> opswitch.cli.a" in lines
    assert ("opswitch.cli.eval_cmd:2: function-level import of opswitch.cli.main hides the cycle"
            " opswitch.cli.eval_cmd -> opswitch.cli.main -> opswitch.cli.eval_cmd") in lines
    assert ("opswitch.cli.main:3: function-level import of opswitch.cli.eval_cmd hides the cycle"
            " opswitch.cli.main -> opswitch.cli.eval_cmd -> opswitch.cli.main") in lines
    assert len(lines) == 3, lines  # a third-party import inside a function is no finding


def test_the_real_tree_is_read():
    """The checker sees the package's real imports (an empty reading would pass anything)."""
    found = imports(PACKAGE)
    for module in ("opswitch.core.registry", "opswitch.cli.main", "opswitch.serve.app"):
        assert any(imp.importer == module for imp in found), module
    assert ("opswitch.cli.main", "opswitch.cli.commands") in {(i.importer, i.imported) for i in found}
