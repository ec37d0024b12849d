"""The package's layout is its architecture: imports point down the layers, no cycles, no re-exports.

Layers, bottom to top (diffusion_pl/__init__.py and docs/design.md): utils, the core, codecs, data,
training, evaluation, interop, cli. Every import of a diffusion_pl module, at the top of a file or inside a
function, counts as an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.paths import REPO

PACKAGE = REPO / "diffusion_pl"
WINGS = ("utils", None, "codecs", "data", "training", "evaluation", "interop", "cli")  # None: the core


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    """0 for utils ... 7 for cli; the core (the package root's own modules and packages) is 1."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return len(WINGS) - 1 if len(parts) > 1 else 1
    return WINGS.index(parts[1]) if parts[1] in WINGS else 1


def imports_of(path: Path) -> set[str]:
    """The diffusion_pl modules a file imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("diffusion_pl"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("diffusion_pl"))
    return found - {"diffusion_pl"}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def test_every_import_points_down_the_layers():
    upward = [f"{src} -> {dst}" for src, targets in GRAPH.items() for dst in sorted(targets)
              if layer(dst) > layer(src)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = 2
        return None

    for name in GRAPH:
        if name not in state and (cycle := visit(name, [name])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _top_level_definitions(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def test_no_module_re_exports_names_it_does_not_define():
    """Only the package root's documented public API re-exports; a subpackage __init__ holds a docstring."""
    problems = []
    for name, path in MODULES.items():
        if name == "diffusion_pl":
            continue
        tree = ast.parse(path.read_text())
        defined = _top_level_definitions(tree)
        exported = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                         and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)), [])
        problems += [f"{name}.{x}" for x in exported if x not in defined]
        if path.name == "__init__.py" and any(not isinstance(n, ast.Expr) for n in tree.body):
            problems.append(f"{name}: a subpackage __init__ with code")
    assert not problems, "re-exported names: " + ", ".join(problems)


def test_no_module_is_much_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 420}
    assert not long, f"modules over ~400 lines (split by concept): {long}"
