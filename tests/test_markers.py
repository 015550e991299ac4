"""Every test that starts a server or builds real pipes is marked ``slow``.

``pytest -m "not slow"`` is then the fast suite (fakes only) and plain ``pytest`` the whole one.
The test files are read with ``ast``: nothing of them is imported and nothing runs. A test is
heavy when its body, a fixture it requests, or a helper it calls (defined in its module, in
conftest.py or in a test module it imports from, followed to any depth) does one of:

* load real weights: ``load_base``, diffusers' ``from_pretrained`` / ``from_single_file``,
  ``build_default_models``, or a real ``ServiceThread`` that is started (the fakes subclass it
  under other names; one built only to look at its methods runs nothing);
* start a process (anything from ``subprocess``), a waitress server or a browser (``webdriver``);
* (the test itself) request ``models_dir``: a test that takes the tiny models does something with
  them, maybe where calls cannot be seen (the README examples run with ``exec``). A fixture that
  takes ``models_dir`` only to write it into a config (``config_file``, the API fixtures on fake
  pipes) is heavy only by what else it does.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

#: fixtures that make a test heavy when the test itself requests them, and why
HEAVY_FIXTURES = {"models_dir": "uses the tiny models (models_dir)"}
#: calls (a plain name or the last part of an attribute) that load real weights or start something real
HEAVY_CALLS = {
    "ServiceThread": "starts a real ServiceThread",  # only with a .start() in the same function
    "load_base": "loads real weights (load_base)",
    "from_pretrained": "loads real weights (from_pretrained)",
    "from_single_file": "loads real weights (from_single_file)",
    "build_default_models": "builds the tiny models",
    "create_server": "starts a waitress server",
    "make_server": "starts a waitress server (multigen.service.server)",
    "run_server": "starts a waitress server (multigen.service.server)",
}
#: modules whose every call starts something real
HEAVY_MODULES = {"subprocess": "starts a process (subprocess)", "waitress": "starts a waitress server",
                 "webdriver": "starts a browser (webdriver)"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _is_fixture(fn: ast.FunctionDef) -> bool:
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if _dotted(target) in ("pytest.fixture", "fixture"):
            return True
    return False


def _marked_slow(decorators: list[ast.expr]) -> bool:
    for dec in decorators:
        for node in ast.walk(dec):
            if _dotted(node) == "pytest.mark.slow":
                return True
    return False


def _params(fn: ast.FunctionDef) -> list[str]:
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    return [a.arg for a in args if a.arg not in ("self", "cls")]


def _usefixtures(decorators: list[ast.expr]) -> list[str]:
    names = []
    for dec in decorators:
        if isinstance(dec, ast.Call) and _dotted(dec.func) == "pytest.mark.usefixtures":
            names += [a.value for a in dec.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


@dataclass
class Module:
    """What one test file defines and imports, as far as the heaviness rule needs."""

    name: str
    tree: ast.Module
    defs: dict[str, ast.AST] = field(default_factory=dict)  # top-level functions and classes
    fixtures: dict[str, ast.FunctionDef] = field(default_factory=dict)
    imported: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (tests module, name)
    module_aliases: dict[str, str] = field(default_factory=dict)  # local name -> heavy module it stands for
    slow_module: bool = False


class Heaviness:
    """Decides, with reasons, which tests of the test files are heavy."""

    def __init__(self, sources: dict[str, str]):
        self.modules = {name: self._parse(name, text, set(sources)) for name, text in sources.items()}
        self._memo: dict[tuple[str, str], str | None] = {}

    @staticmethod
    def _parse(name: str, text: str, known: set[str]) -> Module:
        tree = ast.parse(text)
        mod = Module(name, tree)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                mod.defs[node.name] = node
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_fixture(node):
                    mod.fixtures[node.name] = node
            elif isinstance(node, ast.Assign) and any(_dotted(t) == "pytestmark" for t in node.targets):
                mod.slow_module = any(_dotted(n) == "pytest.mark.slow" for n in ast.walk(node.value))
        for node in ast.walk(tree):  # imports anywhere: helpers import inside functions too
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                for alias in node.names:
                    local = alias.asname or alias.name
                    if node.level == 0 and node.module in known:
                        mod.imported[local] = (node.module, alias.name)
                    for heavy in HEAVY_MODULES:
                        if heavy in (top, alias.name) or node.module.endswith("." + heavy):
                            mod.module_aliases[local] = heavy
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    for heavy in HEAVY_MODULES:
                        if heavy in alias.name.split("."):
                            mod.module_aliases[alias.asname or alias.name.split(".")[0]] = heavy
        return mod

    # -- what makes a piece of code heavy ------------------------------------------------------
    def _call_reason(self, mod: Module, call: ast.Call, starts: bool) -> str | None:
        name = _dotted(call.func)
        if not name:
            return None
        parts = name.split(".")
        if parts[-1] in HEAVY_CALLS and (parts[-1] != "ServiceThread" or starts):
            return HEAVY_CALLS[parts[-1]]
        for part in parts[:-1] if len(parts) > 1 else parts:
            heavy = mod.module_aliases.get(part) or (part if part in HEAVY_MODULES else None)
            if heavy:
                return HEAVY_MODULES[heavy]
        if len(parts) == 1:
            return self._name_reason(mod, parts[0])
        return None

    def _name_reason(self, mod: Module, name: str) -> str | None:
        """A call of a helper by name: heavy if that helper is."""
        if name in mod.defs:
            return self._def_reason(mod.name, name)
        if name in mod.imported:
            other, real = mod.imported[name]
            if other in self.modules and real in self.modules[other].defs:
                return self._def_reason(other, real)
        return None

    def _def_reason(self, modname: str, name: str) -> str | None:
        key = (modname, name)
        if key in self._memo:
            return self._memo[key]
        self._memo[key] = None  # recursion guard
        mod = self.modules[modname]
        node = mod.defs[name]
        reason = self._body_reason(mod, node)
        if reason is None and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and name in mod.fixtures:
            reason = self._requests_reason(mod, _params(node) + _usefixtures(node.decorator_list), direct=False)
        if reason is not None:
            reason = f"{name}: {reason}" if not reason.startswith(name + ":") else reason
        self._memo[key] = reason
        return reason

    def _body_reason(self, mod: Module, node: ast.AST) -> str | None:
        starts = any(isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "start"
                     for sub in ast.walk(node))
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call):
                reason = self._call_reason(mod, sub, starts)
                if reason:
                    return reason
        return None

    def _fixture_reason(self, mod: Module, name: str, direct: bool) -> str | None:
        if name in HEAVY_FIXTURES:
            return HEAVY_FIXTURES[name] if direct else None
        if name in mod.fixtures:
            return self._def_reason(mod.name, name)
        if name in mod.imported:
            other, real = mod.imported[name]
            if other in self.modules and real in self.modules[other].fixtures:
                return self._def_reason(other, real)
        conftest = self.modules.get("conftest")
        if conftest is not None and mod is not conftest and name in conftest.fixtures:
            return self._def_reason("conftest", name)
        return None

    def _requests_reason(self, mod: Module, names: list[str], direct: bool) -> str | None:
        """Why requesting ``names`` makes heavy a test (``direct``) or a fixture (not ``direct``)."""
        for name in names:
            reason = self._fixture_reason(mod, name, direct)
            if reason:
                return f"fixture {reason}"
        return None

    # -- the tests ---------------------------------------------------------------------------------
    def tests(self) -> list[tuple[str, str, bool, str | None]]:
        """``(module, test name, marked slow, why it is heavy or None)`` for every test function."""
        out = []
        for mod in self.modules.values():
            if not mod.name.startswith("test_"):
                continue
            candidates: list[tuple[ast.FunctionDef, list[ast.expr], str]] = []
            for node in mod.tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                    candidates.append((node, [], node.name))
                elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                            candidates.append((item, node.decorator_list, f"{node.name}::{item.name}"))
            for fn, class_decorators, name in candidates:
                decorators = class_decorators + fn.decorator_list
                slow = mod.slow_module or _marked_slow(decorators)
                reason = self._requests_reason(mod, _params(fn) + _usefixtures(decorators), direct=True) \
                    or self._body_reason(mod, fn)
                out.append((mod.name, name, slow, reason))
        return out


def read_tests() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(TESTS.glob("*.py"))}


def unmarked_heavy(sources: dict[str, str]) -> dict[str, str]:
    """``{"tests/FILE.py::TEST": why it is heavy}`` for the heavy tests not marked slow."""
    return {f"tests/{mod}.py::{name}": reason for mod, name, slow, reason in Heaviness(sources).tests()
            if reason and not slow}


def test_every_heavy_test_is_marked_slow():
    missing = unmarked_heavy(read_tests())
    assert not missing, ("these tests start a server or build real pipes but are not marked slow (add "
                         "@pytest.mark.slow, or pytestmark = pytest.mark.slow for a whole file):\n  "
                         + "\n  ".join(f"{test}: {why}" for test, why in sorted(missing.items())))


def test_the_slow_marker_is_registered():
    import configparser

    ini = configparser.ConfigParser()
    ini.read(TESTS.parent / "pytest.ini")
    assert any(line.strip().startswith("slow:") for line in ini["pytest"]["markers"].splitlines())


SAMPLE_CONFTEST = '''
import pytest

@pytest.fixture()
def models_dir():
    return "models"

@pytest.fixture()
def config_file(tmp_path, models_dir):
    return tmp_path
'''

SAMPLE_HELPERS = '''
import subprocess

class Server:
    def __init__(self, config):
        self.proc = subprocess.Popen(["serve", config])

def fake(config):
    return config
'''

SAMPLE_TEST = '''
import pytest
from sample_helpers import Server, fake
from waitress.server import create_server as make
from multigen.pipes import load_base
from multigen.service import ServiceThread

@pytest.fixture()
def sd(models_dir):
    return load_base(models_dir / "tiny-sd")

@pytest.fixture()
def started(config_file):
    return Server(config_file)

def test_fast(config_file, tmp_path):
    fake(config_file)

def test_uses_sd(sd):
    pass

def test_starts_a_server(config_file):
    Server(config_file)

def test_via_fixture(started):
    pass

def test_waitress(config_file):
    make(None)

def test_service_built_not_started(config_file):
    ServiceThread(config_file).stop()

def test_service_started(config_file):
    ServiceThread(config_file).start()

@pytest.mark.slow
def test_marked(sd):
    pass

class TestGroup:
    def test_in_class(self, models_dir):
        pass

@pytest.mark.parametrize("x", [1])
@pytest.mark.slow
def test_marked_below_parametrize(sd, x):
    pass
'''


@pytest.fixture()
def sample() -> dict[str, str]:
    return {"conftest": SAMPLE_CONFTEST, "sample_helpers": SAMPLE_HELPERS, "test_sample": SAMPLE_TEST}


def test_the_rule_finds_heavy_tests_through_fixtures_helpers_and_imports(sample):
    found = unmarked_heavy(sample)
    assert {test.split("::", 1)[1] for test in found} == {
        "test_uses_sd", "test_starts_a_server", "test_via_fixture", "test_waitress", "test_service_started",
        "TestGroup::test_in_class"}
    assert "load_base" in found["tests/test_sample.py::test_uses_sd"]
    assert "models_dir" in found["tests/test_sample.py::TestGroup::test_in_class"]
    assert "subprocess" in found["tests/test_sample.py::test_via_fixture"]
    assert "waitress" in found["tests/test_sample.py::test_waitress"]


def test_a_module_pytestmark_covers_every_test(sample):
    sample["test_sample"] = "import pytest\npytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]\n" \
        + sample["test_sample"]
    assert unmarked_heavy(sample) == {}
