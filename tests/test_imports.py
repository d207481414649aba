"""The import structure: no circles among the project's modules (module-level imports; those inside
a function run on use and type-only ones never), `core/` (the pure modules) imports nothing from
`orchestrator/` or `actors/`, and `actors/` nothing from `orchestrator/` (anywhere in the file), so
both sides use the same pure code and neither reaches into the other."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("core", "actors", "orchestrator", "dashboards")
FORBIDDEN = {"core": ("orchestrator", "actors", "dashboards"), "actors": ("orchestrator", "dashboards")}


def project_modules() -> dict[str, Path]:
    return {f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__"}


def imports_of(path: Path, module_level: bool) -> set[str]:
    """Dotted names a file imports (`from a.b import c` gives a.b and a.b.c): at module level only
    (skipping `if TYPE_CHECKING:` blocks), or anywhere in the file."""
    tree = ast.parse(path.read_text())
    if module_level:
        nodes = [n for top in tree.body if not (isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test))
                 and isinstance(top, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) for n in ast.walk(top)]
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            found |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return found


def test_no_import_circles():
    modules = project_modules()
    graph = {m: {d for d in imports_of(p, module_level=True) if d in modules} for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_core_and_actors_do_not_import_upward():
    bad = []
    for m, path in sorted(project_modules().items()):
        banned = FORBIDDEN.get(m.split(".")[0], ())
        bad += [f"{m} imports {d}" for d in sorted(imports_of(path, module_level=False)) if d.split(".")[0] in banned]
    assert not bad, "\n".join(bad)
