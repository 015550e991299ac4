"""The shape of the code: imports run one way, modules stay small, nobody uses another module's privates.

Read from the source with ``ast`` (nothing is imported), so these hold for code paths the
other tests do not reach.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"multigen.service": ROOT / "service", "multigen.pipes": ROOT / "pipes"}
#: private members of other libraries that are used on purpose (no public way to do the same)
THIRD_PARTY_PRIVATES = {
    ("service/server.py", "_map"): "waitress' socket map: the server's loop runs in slices to stop gracefully",
    ("pipes/loading.py", "_is_mkldnn_bf16_supported"): "torch's only test for native bf16 on the CPU",
}
MAX_LINES = 500
MAX_SERVICE_THREAD_LINES = 350


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every multigen module ``name`` imports, wherever the import is (TYPE_CHECKING and functions too)."""
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                module = f"{anchor}.{node.module}" if node.module else anchor
            else:
                module = node.module or ""
            for alias in node.names:  # `from . import x` and `from .pkg import mod` name modules
                if f"{module}.{alias.name}" in known:
                    found.add(f"{module}.{alias.name}")
                else:
                    found.add(module)
    return {m for m in found if m in known and m != name}


def test_no_import_cycles_not_even_under_type_checking():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # a package's __init__ re-exports its modules: an edge into a package is an edge into what it re-exports,
    # which would make every `from multigen.pipes.errors import ...` a cycle through __init__; the edges that
    # matter are module to module, so package nodes are left out
    packages = {n for n, p in modules.items() if p.name == "__init__.py"}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node] - packages):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(set(graph) - packages):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_pipes_know_nothing_of_the_service():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("multigen.pipes"):
            bad = {m for m in _imports(name, path, set(modules)) if m.startswith("multigen.service")}
            assert not bad, f"{name} imports {bad}"


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert sizes["multigen.service.serviceThread"] <= MAX_SERVICE_THREAD_LINES
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def _defined_privates(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, and attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def test_no_module_uses_another_modules_private_members():
    offences = []
    for path in _modules().values():
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        own = _defined_privates(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                offences += [f"{rel}:{node.lineno} imports {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
                continue  # a subclass extending its base's hook
            if node.attr in own or (rel, node.attr) in THIRD_PARTY_PRIVATES:
                continue
            offences.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert not offences, "private members used from outside their module:\n" + "\n".join(offences)


def test_the_api_has_no_fallbacks_for_a_missing_or_different_service():
    api = ROOT / "service" / "api"
    for path in [*api.glob("*.py"), ROOT / "service" / "server.py"]:
        text = path.read_text()
        assert "except ImportError" not in text, path.name
        assert "getattr(svc" not in text and "unwrap(" not in text, path.name
    assert not (ROOT / "tests" / "api_fakes.py").exists()
