"""The import structure: no circles among the project's modules (module-level imports; those inside
a function run on use and type-only ones never), and the pure modules stay pure: they import no
actor, no Ray and no driver module, so both sides can use them."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("actors", "orchestrator", "dashboards")
PURE = {"orchestrator.losses", "orchestrator.extrapolation", "orchestrator.step_metrics", "orchestrator.data_order",
        "orchestrator.sandbox", "orchestrator.rendezvous", "orchestrator.methods", "orchestrator.modeling",
        "orchestrator.geometry"}
"""Math and rules with no process of their own: they may import the config schema and each other."""
PURE_MAY_IMPORT = PURE | {"orchestrator.config"}


def module_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports at module level."""
    modules = {f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else ():
                if isinstance(sub, ast.Import):
                    found |= {a.name for a in sub.names}
                elif isinstance(sub, ast.ImportFrom) and sub.module:
                    found |= {sub.module} | {f"{sub.module}.{a.name}" for a in sub.names}
        out[name] = {m for m in found if m in modules} | {m for m in found if m.split(".")[0] in ("ray",)}
    return out


def test_no_import_circles():
    graph = {m: {d for d in deps if d in module_imports_cache} for m, deps in module_imports_cache.items()}
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


def test_pure_modules_import_no_actor_ray_or_driver_module():
    for m in sorted(PURE):
        bad = {d for d in module_imports_cache[m] if d not in PURE_MAY_IMPORT}
        assert not bad, f"{m} imports {sorted(bad)}"


module_imports_cache = module_imports()
