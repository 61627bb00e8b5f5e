"""The project's modules import each other as a tree, never in a circle.

Every .py file of vivit_kernels, models/vivit (the package `vivit`), benchmarks and tools is read
with `ast`; each import inside the project, at module level or inside a function alike, is an edge
to the module it names (`from package import name` to the module `package.name` where that is
one, else to the package). A cycle fails the test, printed as the chain of modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (folder, the package name it is imported as)
ROOTS = (
    ("vivit_kernels", "vivit_kernels"),
    ("models/vivit", "vivit"),
    ("benchmarks", "benchmarks"),
    ("tools", "tools"),
)


def modules(roots, base: Path = REPO) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, whether it is a package's __init__)} of every .py file under the roots."""
    found = {}
    for folder, package in roots:
        for path in sorted((base / folder).rglob("*.py")):
            parts = path.relative_to(base / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            found[name] = (path, is_package)
    return found


def imported(name: str, path: Path, is_package: bool, known) -> set[str]:
    """The project modules that the module `name` (its file `path`) imports, anywhere in the file."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b.c` runs a.b.c: the deepest project module the name reaches.
                parts = alias.name.split(".")
                hits = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known]
                targets.update(hits[:1])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                child = f"{base}.{alias.name}"
                if child in known:
                    targets.add(child)
                elif base in known:
                    targets.add(base)
    targets.discard(name)
    return targets


def import_graph(roots=ROOTS, base: Path = REPO) -> dict[str, set[str]]:
    known = modules(roots, base)
    return {name: imported(name, path, is_package, known) for name, (path, is_package) in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                return path[path.index(step) :] + [step]
            elif step not in state:
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(graph.get(step, ()))))
    return None


def test_the_project_imports_form_no_cycle():
    graph = import_graph()
    assert {"vivit_kernels", "vivit", "benchmarks.core", "tools.mutants"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_benchmarks_core_imports_no_sibling():
    siblings = {name for name in import_graph()["benchmarks.core"] if name.startswith("benchmarks")}
    assert not siblings, f"benchmarks/core.py imports {sorted(siblings)}"


def test_a_planted_cycle_is_found_and_named(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")  # function level counts
    (pkg / "c.py").write_text("from .a import x\n")
    (pkg / "d.py").write_text("from . import a\nimport pkg.c\n")
    graph = import_graph((("pkg", "pkg"),), tmp_path)
    assert graph["pkg.d"] == {"pkg.a", "pkg.c"} and graph["pkg.sub"] == {"pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph((("pkg", "pkg"),), tmp_path)) is None
