"""The tree keeps the bars of issue 21: ruff-clean and ruff-formatted (rules, line length and
complexity limit in pyproject.toml), few top-level modules, short modules and functions, and no
private name imported across modules. Each failure lists every offender."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pathray"
LINTED = ("pathray", "tests", "benchmarks", "jobs")
MAX_TOP_LEVEL_MODULES = 12  # *.py directly in pathray/, __init__.py included (subpackages not counted)
MAX_MODULE_LINES = 400  # as written (the tree is ruff-formatted)
MAX_FUNCTION_LINES = 40  # def line to last line, its docstring not counted
MAX_PARAMETERS = 6  # self / cls not counted; *args and **kwargs count one each
RAYDATA = PACKAGE / "job" / "raydata.py"
MAX_RAYDATA_LINES = 300


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: it is in the test extra (scripts/setup.sh installs it)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def python_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (ROOT / root).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_ruff_check_is_clean():
    done = ruff("check", *LINTED)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_is_clean():
    done = ruff("format", "--check", *LINTED)
    assert done.returncode == 0, "not ruff-formatted (run `ruff format`):\n" + done.stdout + done.stderr


def test_no_function_is_more_complex_than_12():
    done = ruff("check", "--select", "C901", "--output-format", "concise", *LINTED)
    assert done.returncode == 0, "McCabe complexity over 12 (pyproject.toml):\n" + done.stdout + done.stderr


def test_at_most_12_modules_directly_in_the_package():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, f"{len(modules)} modules in pathray/: {', '.join(modules)}"


def test_no_module_is_longer_than_400_lines():
    lengths = {rel(p): len(p.read_text().splitlines()) for p in python_files("pathray")}
    long = [f"{path}: {n} lines" for path, n in lengths.items() if n > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_the_ray_data_job_module_is_at_most_300_lines():
    n = len(RAYDATA.read_text().splitlines())
    assert n <= MAX_RAYDATA_LINES, f"{rel(RAYDATA)}: {n} lines (at most {MAX_RAYDATA_LINES})"


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the ``def`` line to the function's last line (decorators not counted), less its docstring's."""
    n = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters other than ``self`` / ``cls``, plus one each for ``*args`` and ``**kwargs``."""
    a = fn.args
    named = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.arg not in ("self", "cls")]
    return len(named) + (a.vararg is not None) + (a.kwarg is not None)


def test_no_function_is_longer_than_40_lines_or_takes_more_than_6_parameters():
    bad = []
    for path in python_files("pathray"):
        for fn in functions(ast.parse(path.read_text(), str(path))):
            lines, params = code_lines(fn), parameters(fn)
            if lines > MAX_FUNCTION_LINES or params > MAX_PARAMETERS:
                bad.append(f"{rel(path)}:{fn.lineno} {fn.name} lines={lines} params={params}")
    assert not bad, f"functions over {MAX_FUNCTION_LINES} code lines or {MAX_PARAMETERS} parameters:\n" + "\n".join(bad)


def private_imports(tree: ast.AST) -> Iterator[tuple[int, str, str]]:
    """(line, module, name) of each ``from pathray... import _name`` (relative imports too; dunders
    such as ``__version__`` are public)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = "." * node.level + (node.module or "")
        if node.level == 0 and module.split(".")[0] != "pathray":
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.endswith("__"):
                yield node.lineno, module, alias.name


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for path in python_files(*LINTED):
        for line, module, name in private_imports(ast.parse(path.read_text(), str(path))):
            bad.append(f"{rel(path)}:{line} from {module} import {name}")
    assert not bad, "private names imported across modules (make them public or move the code):\n" + "\n".join(bad)
