"""The package's shape: one-way layers, no import cycles, no reaching into other modules'
private names, small modules. Computed from the source with ``ast`` (imports inside
functions count too), so a refactor that breaks a rule fails here, not in review."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "smolvm"
MAX_LINES = 600
#: Third-party packages heavy or optional enough to import inside a function.
LAZY_OK = {
    "torch",
    "transformers",
    "ray",
    "mcp",
    "pyroute2",
    "anyio",
    "uvicorn",
    "starlette",
    "cryptography",
    "qemu",
}
#: Layers, top first. A module may import its own layer and the layers below it (and the
#: shared leaf modules), never one above. guards and cli sit on top of the public API.
LAYERS: list[set[str]] = [
    {"cli"},
    {"guards", "fleet"},
    {
        "",
        "smolvm",
        "vm",
        "build",
        "options",
        "sandboxes",
        "idle",
        "files",
        "aio",
        "endpoints",
        "guestenv",
        "terminal",
    },  # package, SmolVM facade, SmolVMManager
    {"pools"},
    {"snapshots"},
    {"runtime"},
    {"backends", "transports", "network"},
    {"state"},
    {"images"},
    {"guest", "host"},
]
#: Leaf modules any layer may use (they import only each other).
LEAVES = {"exceptions", "types", "callbacks", "paths", "procs", "keys", "locks", "envflags"}


@dataclass(frozen=True)
class Import:
    module: str  # importing module, dotted
    target: str  # imported module, dotted
    names: tuple[str, ...]
    line: int
    in_function: bool
    commented: bool


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(mod: str, path: Path) -> Iterator[Import]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    is_pkg = path.name == "__init__.py"
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in funcs for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        before = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        commented = "#" in lines[node.lineno - 1] or before.startswith("#")
        common = dict(module=mod, line=node.lineno, in_function=id(node) in inner, commented=commented)
        if isinstance(node, ast.Import):
            for a in node.names:
                yield Import(target=a.name, names=(), **common)  # type: ignore[arg-type]
            continue
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = tuple(a.name for a in node.names)
        submodules = [n for n in names if f"{target}.{n}" in MODULES]
        # ``from pkg import submodule`` depends on the submodule, not on the package.
        yield Import(target=target if len(submodules) < len(names) else "", names=names, **common)  # type: ignore[arg-type]
        for n in submodules:
            yield Import(target=f"{target}.{n}", names=(), **common)  # type: ignore[arg-type]


ALL = [imp for mod, p in MODULES.items() for imp in _imports(mod, p)]
OWN = [i for i in ALL if i.target == "smolvm" or i.target.startswith("smolvm.")]


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in OWN:
        if i.target not in MODULES or i.target == i.module:
            continue
        if i.module.startswith(i.target + "."):
            continue  # a submodule using its own package (excepted)
        g[i.module].add(i.target)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def _layer_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(layer: str) -> int | None:
    if layer in LEAVES:
        return None
    for i, group in enumerate(LAYERS):
        if layer in group or (layer == "smolvm" and "smolvm" in group):
            return i
    raise AssertionError(f"module group {layer!r} is in no layer of test_layers.LAYERS: add it")


def test_imports_point_down() -> None:
    bad = []
    for i in OWN:
        if i.target not in MODULES:
            continue
        src, dst = _layer_of(i.module), _layer_of(i.target)
        if src == dst:
            continue
        rs, rd = _rank(src), _rank(dst)
        if rs is None:  # a leaf may use only leaves
            if rd is not None:
                bad.append(f"{i.module}:{i.line} (leaf) imports {i.target}")
            continue
        if rd is not None and rd < rs:
            bad.append(f"{i.module}:{i.line} imports {i.target}, a layer above it")
    assert bad == []


def test_no_private_names_of_other_modules() -> None:
    bad = [
        f"{i.module}:{i.line} imports private name {n}"
        for i in ALL
        for n in i.names
        if n.startswith("_") and not n.startswith("__")
    ]
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        # Private names this module defines itself (methods, attributes, functions, classes).
        own = {
            n.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        }
        own |= {
            t.attr
            for n in ast.walk(tree)
            if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute)
        }
        own |= {
            t.id
            for n in ast.walk(tree)
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Name)
        }
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.Attribute)
                and n.attr.startswith("_")
                and not n.attr.startswith("__")
                and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
                and n.attr not in own
            ):
                bad.append(f"{mod}:{n.lineno} uses {ast.unparse(n)}")
    assert bad == []


def test_function_level_imports_are_justified() -> None:
    """Outside cli/ (where lazy imports keep start-up fast), an import inside a function is
    for a heavy or optional third-party package, or says why in a comment."""
    bad = [
        f"{i.module}:{i.line} imports {i.target} inside a function"
        for i in ALL
        if i.in_function
        and not i.module.startswith("smolvm.cli")
        and i.target.split(".")[0] not in LAZY_OK
        and not i.commented
    ]
    assert bad == []


def test_no_backend_name_comparisons_outside_backends() -> None:
    """What differs between hypervisors is a property of ``backends.base.Backend``."""
    bad = []
    for mod, path in MODULES.items():
        if mod.startswith("smolvm.backends"):
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Compare):
                consts = [c for c in ast.walk(n) if isinstance(c, ast.Constant)]
                if any(c.value in ("qemu", "firecracker") for c in consts):
                    bad.append(f"{mod}:{n.lineno}: {ast.unparse(n)}")
    assert bad == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_size(mod: str) -> None:
    n = len(MODULES[mod].read_text().splitlines())
    assert n <= MAX_LINES, f"{mod} has {n} lines (limit {MAX_LINES}): split it by responsibility"


def test_exceptions_live_in_one_module_and_are_exported() -> None:
    import smolvm
    from smolvm import exceptions

    classes = {
        n: c
        for n, c in vars(exceptions).items()
        if isinstance(c, type) and issubclass(c, Exception) and c.__module__ == exceptions.__name__
    }
    assert set(classes) <= set(smolvm.__all__), sorted(set(classes) - set(smolvm.__all__))
    for mod, path in MODULES.items():
        if mod in ("smolvm.exceptions",) or mod.startswith("smolvm.cli"):
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ClassDef) and not n.name.startswith("_"):
                bases = {ast.unparse(b) for b in n.bases}
                assert not any(b.endswith(("Error", "Exception")) for b in bases), (
                    f"{mod}: exception class {n.name} belongs in smolvm.exceptions"
                )


def test_seed_import_paths() -> None:
    import smolvm
    from smolvm.build import SSH_BOOT_ARGS
    from smolvm.exceptions import SmolVMError
    from smolvm.types import DEFAULT_BOOT_ARGS, VMConfig
    from smolvm.vm import SmolVMManager

    assert smolvm.SmolVMManager is SmolVMManager and smolvm.VMConfig is VMConfig
    assert smolvm.SmolVMError is SmolVMError and SSH_BOOT_ARGS == DEFAULT_BOOT_ARGS
