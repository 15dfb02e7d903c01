"""Checks on the test suite itself: every test can fail, and no skip hides an area.

A test must assert something: an ``assert``, ``pytest.raises``/``fail``/``warns``, or a call
to a helper (function or method defined in tests/) that does. Skips are allowed only for the
documented host facts (no /dev/kvm, /dev/kvm emulated, no Firecracker binary); any other
missing precondition goes through ``@pytest.mark.requires(...)`` (conftest), which fails
under CI=true instead of skipping.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FILES = sorted(p for p in TESTS.rglob("*.py") if "models" not in p.parts)
#: Words a skip's condition or reason must mention to be a documented host fact.
HOST_FACTS = ("/dev/kvm", "kvm", "firecracker", "emulated")
PYTEST_CHECKS = {"raises", "fail", "warns", "deprecated_call", "approx"}


def _trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for p in FILES}


TREES = _trees()


def _called_names(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Name):
                out.add(f.id)
            elif isinstance(f, ast.Attribute):
                out.add(f.attr)
    return out


def _checks_directly(fn: ast.AST) -> bool:
    for n in ast.walk(fn):
        if isinstance(n, ast.Assert):
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            if (
                isinstance(n.func.value, ast.Name)
                and n.func.value.id == "pytest"
                and n.func.attr in PYTEST_CHECKS
            ):
                return True
    return False


def _asserting_helpers() -> set[str]:
    """Names of functions/methods in tests/ that assert, directly or through each other."""
    funcs: dict[str, list[ast.AST]] = {}
    for tree in TREES.values():
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.setdefault(n.name, []).append(n)
    good = {name for name, defs in funcs.items() if any(_checks_directly(d) for d in defs)}
    changed = True
    while changed:
        changed = False
        for name, defs in funcs.items():
            if name not in good and any(_called_names(d) & good for d in defs):
                good.add(name)
                changed = True
    return good


HELPERS = _asserting_helpers()


def _test_functions() -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for path, tree in TREES.items():
        if not path.name.startswith("test_"):
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"):
                out.append((f"{path.name}::{n.name}", n))
    return out


def test_checker_sees_a_test_without_assertions() -> None:
    tree = ast.parse("def test_x():\n    print(1)\n\ndef test_y():\n    assert 1\n")
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [_checks_directly(f) for f in fns] == [False, True]


@pytest.mark.parametrize("name,fn", _test_functions(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_test_can_fail(name: str, fn: ast.FunctionDef) -> None:
    assert _checks_directly(fn) or (_called_names(fn) & HELPERS), (
        f"{name} asserts nothing: add an assertion that can fail"
    )


def _skips(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr in ("skip", "skipif", "importorskip"):
            if isinstance(n.value, (ast.Name, ast.Attribute)) and "pytest" in ast.unparse(n.value):
                found.append(n)
    out = []
    for node in found:
        # The enclosing call (decorator or statement) carries the condition and reason.
        text = ""
        for parent in ast.walk(tree):
            if isinstance(parent, ast.Call) and parent.func is node:
                text = ast.unparse(parent)
        out.append((node.lineno, text or ast.unparse(node)))
    return out


@pytest.mark.parametrize("path", [p for p in FILES if p.name.startswith("test_")], ids=lambda p: p.name)
def test_skips_are_documented_host_facts(path: Path) -> None:
    bad = [
        f"{path.name}:{line}: {text}"
        for line, text in _skips(TREES[path])
        if path.name != "test_meta.py" and not any(f in text.lower() for f in HOST_FACTS)
    ]
    assert bad == [], "use @pytest.mark.requires(...) for preconditions (fails under CI=true)"


def test_skip_finder_sees_skips() -> None:
    tree = ast.parse(
        "import pytest\n@pytest.mark.skipif(True, reason='needs root')\ndef test_a():\n"
        "    pytest.skip('no busybox')\n"
    )
    texts = sorted(text for _, text in _skips(tree))
    assert texts == ["pytest.mark.skipif(True, reason='needs root')", "pytest.skip('no busybox')"]
