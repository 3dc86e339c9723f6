"""Deliberate copies (marked "# Copied from X", so each file can be copied into another codebase alone)
must stay identical to their original, as Hugging Face's check_copies does for its model files."""
import ast
import inspect
import re

import pytest

from conftest import ROOT

TOP = sorted(ROOT.glob("*.py"))


def _copies():
    """(file, function name, original 'module.name') for every function marked as a copy."""
    for path in TOP:
        for m in re.finditer(r"^# Copied from (\w+)\.(\w+).*\ndef (\w+)\(", path.read_text(), re.M):
            yield path.stem, m.group(3), f"{m.group(1)}.{m.group(2)}"


def _body(module: str, name: str) -> str:
    """The function's source without comments (the marker sits in one)."""
    src = inspect.getsource(getattr(__import__(module), name))
    return ast.unparse(ast.parse(src))


def test_there_are_marked_copies():
    assert len(list(_copies())) >= 4


@pytest.mark.parametrize("module, name, original", list(_copies()))
def test_marked_copies_equal_their_original(module, name, original):
    assert _body(module, name) == _body(*original.split(".")), f"{module}.{name} drifted from {original}"


def test_model_files_import_no_other_project_file():
    project = {p.stem for p in TOP}
    for name in ("data", "encoderec", "unisrec", "rqvae", "tiger", "trainer"):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & project, f"{name}.py imports {imported & project}"
    tree = ast.parse((ROOT / "eval.py").read_text())
    assert "train" not in {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
