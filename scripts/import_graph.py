#!/usr/bin/env python3
"""Print vmpod's import graph between packages and check the layering rules.

    python scripts/import_graph.py [--modules]

Reads src/vmpod with ``ast`` (nothing is imported). Fails (exit 1) on an import
cycle between modules, or when a front end (cli, runtime, matrix) imports agent
internals (anything but ``agent.protocol`` records it gets through the sandbox
API is still flagged: front ends use ``vmpod.sandbox``) or ``hypervisor.qemu``.
Imports under ``if TYPE_CHECKING:`` are ignored; function-level imports count.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FRONT_ENDS = ("vmpod.cli", "vmpod.runtime", "vmpod.matrix")
FORBIDDEN = ("vmpod.agent", "vmpod.hypervisor.qemu")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def package(mod: str) -> str:
    parts = mod.split(".")
    return (
        ".".join(parts[:3]) if len(parts) > 2 and parts[1] in ("agent", "hypervisor") else ".".join(parts[:2])
    )


def main() -> int:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    graph = {m: imports(p, modules) - {m} for m, p in files.items()}
    # a package's __init__ is imported with any of its submodules: not a cycle of its own
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    pkgs: dict[str, set[str]] = {}
    for m, deps in graph.items():
        pkgs.setdefault(package(m), set()).update(package(d) for d in deps if package(d) != package(m))
    for p in sorted(pkgs):
        print(f"{p:28} -> {', '.join(sorted(pkgs[p])) or '-'}")
    if "--modules" in sys.argv:
        for m in sorted(graph):
            print(f"  {m} -> {', '.join(sorted(graph[m]))}")
    bad = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        if m.startswith(FRONT_ENDS)
        for d in deps
        if d.startswith(FORBIDDEN)
    ]
    found = cycles(graph)
    for c in found:
        print("import cycle: " + " -> ".join(c))
    for b in bad:
        print("layering: " + b)
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main())
