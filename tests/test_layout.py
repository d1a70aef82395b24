"""The package's shape: small modules, small functions, and the paper's maths free of onnx."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dfmpc_onnx"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
OPTIONS_MODULE_LINES = 400
"""options.py holds every option, its validation and its resolution, by design (one place for each), so it
grows with the options."""


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= (OPTIONS_MODULE_LINES if path.name == "options.py" else MAX_MODULE_LINES)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{node.name} has {length} lines"


@pytest.mark.parametrize("path", sorted((PACKAGE / "maths").glob("*.py")), ids=lambda p: p.name)
def test_the_maths_imports_no_onnx(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"onnx", "onnxruntime", "onnx_graphsurgeon"}
