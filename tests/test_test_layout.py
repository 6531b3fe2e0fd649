"""Tests mirror src/: every module of ``src/crystalscope`` has its test file at the same place.

``src/crystalscope/<sub-folders>/<module>.py`` is tested in ``tests/<sub-folders>/test_<module>.py``
(top-level modules in ``tests/test_<module>.py``). A sub-package inside a package (e.g.
``data/audit/``) may instead be tested as one, in ``tests/<package>/test_<sub-package>.py``
(``tests/data/test_audit.py``). A package's ``__init__.py`` that holds code (functions or
classes) is covered by its package's test file or test folder. A new module without tests fails
here, naming the file to create.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "crystalscope"
TESTS = ROOT / "tests"

# modules with nothing of their own to test, and why
EXEMPT = {
    "__init__.py": "only when it imports and re-exports (no function or class): what it re-exports is "
                   "tested in its own module; an __init__.py with code needs its package's tests",
    "__main__.py": "the `python -m` entry point: one call of the CLI's main()",
    "version.py": "the version string (the --version test in tests/test_cli_help.py prints it)",
}


def _has_code(module: Path) -> bool:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body)


def _exempt(module: Path) -> bool:
    if module.name == "__init__.py":
        return not _has_code(module)
    return module.name in EXEMPT


def mirror_candidates(module: Path) -> list[Path]:
    """The test files (or, for a package's ``__init__.py``, test folders) that may cover ``module``."""
    parts = module.relative_to(PACKAGE).with_suffix("").parts  # e.g. ("data", "audit", "scan")
    if parts[-1] == "__init__":
        package = parts[:-1]  # the package as a unit: its test folder, or its test file in the parent folder
        if not package:
            return [TESTS]
        return [TESTS.joinpath(*package), TESTS.joinpath(*package[:-1], f"test_{package[-1]}.py")]
    candidates = [TESTS.joinpath(*parts[:-1], f"test_{parts[-1]}.py")]
    # a package inside a package (parts[:k] with k >= 2) may be tested as a whole by its parent's folder
    for k in range(len(parts) - 1, 1, -1):
        candidates.append(TESTS.joinpath(*parts[:k - 1], f"test_{parts[k - 1]}.py"))
    return candidates


def _covers(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.glob("test_*.py")))


def untested_modules() -> list[str]:
    """``"src/... -> tests/... (or ...)"`` for each module that no candidate test file covers."""
    missing = []
    for module in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in module.parts or _exempt(module):
            continue
        candidates = mirror_candidates(module)
        if not any(_covers(path) for path in candidates):
            names = [str(path.relative_to(ROOT)) for path in candidates]
            missing.append(f"{module.relative_to(ROOT)} -> {names[0]}"
                           + (f" (or {', '.join(names[1:])})" if names[1:] else ""))
    return missing


def test_every_module_has_a_mirrored_test_file():
    missing = untested_modules()
    assert not missing, "modules without their test file (create it):\n" + "\n".join(missing)


def test_the_mirror_rule_maps_modules_and_sub_packages():
    assert mirror_candidates(PACKAGE / "io.py") == [TESTS / "test_io.py"]
    assert mirror_candidates(PACKAGE / "training" / "steps.py") == [TESTS / "training" / "test_steps.py"]
    assert mirror_candidates(PACKAGE / "data" / "audit" / "scan.py") == [
        TESTS / "data" / "audit" / "test_scan.py", TESTS / "data" / "test_audit.py"]
    assert mirror_candidates(PACKAGE / "data" / "audit" / "__init__.py") == [
        TESTS / "data" / "audit", TESTS / "data" / "test_audit.py"]
    # a top-level package is a folder of tests, never one file: tests/test_training.py covers nothing
    assert TESTS / "test_training.py" not in mirror_candidates(PACKAGE / "training" / "steps.py")


def test_only_a_re_exporting_init_is_exempt():
    assert not _has_code(PACKAGE / "models" / "__init__.py")
    assert _has_code(PACKAGE / "data" / "audit" / "__init__.py")  # audit_dataset lives there
    assert not _exempt(PACKAGE / "data" / "audit" / "__init__.py") and _exempt(PACKAGE / "version.py")
    names = {p.name for p in PACKAGE.rglob("*.py")}
    assert set(EXEMPT) <= names
