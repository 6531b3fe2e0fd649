"""The design rules of README "Layout", checked on the source with ``ast`` (no imports run).

- Layers point one way: a module may import its own layer or lower ones, never a higher one.
- No import cycles between modules (lazy imports inside functions count: they are dependencies).
- No module imports another module's ``_private`` name.
- No function is longer than 60 lines (docstring and decorators included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "crystalscope"

# Bottom to top. A module belongs to the first entry that is its name or a package above it.
LAYERS = [
    ["crystalscope.version", "crystalscope.errors", "crystalscope.formats"],
    ["crystalscope.runtime", "crystalscope.io", "crystalscope.figures"],
    ["crystalscope.safety", "crystalscope.config"],
    ["crystalscope.data"],
    ["crystalscope.models"],
    ["crystalscope.evaluation"],
    ["crystalscope.inference"],
    ["crystalscope.export"],
    ["crystalscope.training"],
    ["crystalscope.insight", "crystalscope.monitor", "crystalscope.serve", "crystalscope.demo"],
    ["crystalscope.cli", "crystalscope.__main__"],
    ["crystalscope"],  # the package's lazy facade (``from crystalscope import Predictor``)
]
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    for index, members in enumerate(LAYERS):
        for member in members:
            if module == member or (member != "crystalscope" and module.startswith(member + ".")):
                return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every crystalscope import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "crystalscope"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "crystalscope":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, "", node.lineno) if submodule in MODULES else (target, alias.name, node.lineno))
    return found


def test_every_module_has_a_layer():
    assert len(MODULES) > 50  # the walk found the package, not an empty folder
    layers = {module: _layer(module) for module in MODULES}  # _layer fails on a module in no layer
    assert layers["crystalscope.errors"] == 0 and layers["crystalscope.cli"] == len(LAYERS) - 2
    assert all(0 <= layer < len(LAYERS) for layer in layers.values())
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("crystalscope_elsewhere.module")


def test_layers_point_one_way():
    upward = sorted({f"{m}:{line} imports {target} (layer {_layer(target)} > {_layer(m)})"
              for m in MODULES for target, _, line in _imports(m)
              if target in MODULES and _layer(target) > _layer(m)})
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_imported_across_modules():
    private = [f"{m}:{line} imports {name} from {target}" for m in MODULES for target, name, line in _imports(m)
               if name.startswith("_") and not name.startswith("__") and target != m]
    assert not private, "private names imported from other modules:\n" + "\n".join(private)


def _function_lengths():
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node.end_lineno - first + 1


def test_no_function_over_60_lines():
    long = [f"{where} ({n} lines)" for where, n in _function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_checks_can_fail(tmp_path):
    """The walkers see what they must: a long function and a relative upward import are found."""
    source = "from ..training import run\n\n\ndef f():\n" + "    x = 1\n" * 70
    tree = ast.parse(source)
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert function.end_lineno - function.lineno + 1 > MAX_FUNCTION_LINES
    assert _layer("crystalscope.training.run") > _layer("crystalscope.data.audit")
