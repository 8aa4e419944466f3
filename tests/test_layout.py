"""The layout: every module imports on its own, the layers point one way (import-linter's contracts in
pyproject.toml), there is no import circle, and no module takes another package's private names."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import alignkit

MODULES = sorted(m.name for m in pkgutil.walk_packages(alignkit.__path__, "alignkit."))
PACKAGE = Path(alignkit.__file__).parent


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_the_layer_contracts_hold() -> None:
    """`lint-imports` checks the contracts of pyproject.toml ([tool.importlinter]) on the whole package,
    imports inside functions included."""
    tool = shutil.which("lint-imports")
    assert tool, "import-linter is a dev dependency: pip install -e '.[dev]'"
    done = subprocess.run(
        [tool, "--no-cache"], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 kept, 0 broken" in done.stdout


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, name)} for every `from alignkit... import name`, in functions too."""
    out: dict[str, set[tuple[str, str]]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = out.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alignkit"):
                found.update((node.module, a.name) for a in node.names)
            elif isinstance(node, ast.Import):
                found.update((a.name, "") for a in node.names if a.name.startswith("alignkit"))
    return out


def test_no_import_circles() -> None:
    """Between any two modules, imports go one way (a `from a import b` where b is a module counts as a.b)."""
    modules = set(MODULES) | {"alignkit"}
    edges = {
        m: {f"{t}.{n}" if f"{t}.{n}" in modules else t for t, n in found} - {m}
        for m, found in _imports().items()
    }
    edges = {m: {t for t in ts if t in modules and not m.startswith(t + ".")} for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert not circles, circles


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_private_names_across_packages() -> None:
    taken = [
        f"{m} takes {t}.{n}"
        for m, found in _imports().items()
        for t, n in found
        if n.startswith("_") and not n.startswith("__") and _package(t) != _package(m)
    ]
    assert not taken, taken


# import name -> the distribution that provides it, where the two differ (pydantic and starlette come with fastapi)
DISTRIBUTION = {
    "yaml": "pyyaml",
    "prometheus_client": "prometheus-client",
    "pydantic": "fastapi",
    "starlette": "fastapi",
}


def test_every_import_at_a_modules_top_is_a_declared_dependency() -> None:
    """A plain `pip install alignkit` (no extras) must import every module: what a module imports at its top
    is in [project] dependencies; optional libraries (vLLM, lm-eval, bitsandbytes, trackers) are imported
    where they are used. (The dev extra installs more, so the suite alone would not notice a missing one.)"""
    import sys

    import tomllib

    with open(PACKAGE.parent / "pyproject.toml", "rb") as fh:
        declared = {
            re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0].lower()
            for dep in tomllib.load(fh)["project"]["dependencies"]
        }
    missing = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in (n.split(".")[0] for n in names):
                if name in sys.stdlib_module_names or name == "alignkit":
                    continue
                if DISTRIBUTION.get(name, name.replace("_", "-")) not in declared:
                    missing.add(f"{path.relative_to(PACKAGE.parent)}: {name}")
    assert not missing, sorted(missing)
