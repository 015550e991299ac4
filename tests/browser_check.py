"""Whether the browser tests (tests/test_web_*.py) can run, and what happens when they cannot.

They need Debian's Chromium and its WebDriver (scripts/_browser.sh installs the ``chromium`` and
``chromium-driver`` packages when scripts/test runs as root) and the selenium package. When one
is missing:

* under CI (the ``CI`` environment variable is ``true``, as CI services set it) every browser
  test fails, naming what is missing and how to install it: a CI run that skipped them would be
  green without having tested the page;
* elsewhere they are skipped, and the terminal summary says so in a section of its own.

``browser_available`` (a session fixture the browser fixtures request) applies the rule and
``pytest_terminal_summary`` prints the section; conftest.py imports both.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: the start of every skip and failure message of the rule (the terminal summary counts skips by it)
CANNOT_RUN = "browser tests cannot run"
INSTALL = ("Install them as root with `apt-get install chromium chromium-driver` (scripts/test does it "
           "through scripts/_browser.sh when run as root)")


def missing_browser_parts() -> list[str]:
    """What the browser tests need and this machine lacks (empty when they can run)."""
    missing = []
    if importlib.util.find_spec("selenium") is None:
        missing.append("the Python package selenium (pip install -e '.[test]')")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.is_file() and os.access(path, os.X_OK)):
            missing.append(f"{path} (Debian package {package})")
    return missing


def in_ci(environ: Any = None) -> bool:
    """True when the ``CI`` environment variable says this is a CI run (``true``, ``1`` or ``yes``)."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() in {"true", "1", "yes"}


def require_browser() -> None:
    """Return when the browser tests can run; else fail them (under CI) or skip them (elsewhere).

    Raises:
        pytest.fail.Exception: something is missing and ``CI`` is true.
        pytest.skip.Exception: something is missing outside CI.
    """
    missing = missing_browser_parts()
    if not missing:
        return
    fail_in_ci_else_skip(f"{CANNOT_RUN}: missing {'; '.join(missing)}. {INSTALL}", "a missing browser",
                         "the browser tests")


def fail_in_ci_else_skip(message: str, what: str, tests: str) -> None:
    """Fail with ``message`` under CI, skip with it elsewhere (also pg_check.py's rule for PostgreSQL)."""
    if in_ci():
        pytest.fail(f"{message}. CI=true: {what} fails the run instead of skipping {tests}", pytrace=False)
    pytest.skip(f"{message}. Skipped because CI is not set (under CI=true this fails the run)")


@pytest.fixture(scope="session")
def browser_available() -> None:
    """Applies :func:`require_browser` once per run, before any browser test starts its server."""
    require_browser()


def skipped_browser_tests(terminalreporter: Any) -> list[str]:
    """The skip reasons of the browser tests skipped by the rule in this run."""
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if CANNOT_RUN in reason:
            reasons.append(reason)
    return reasons


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    """A section of its own, in the warning colour, when the rule skipped browser tests."""
    reasons = skipped_browser_tests(terminalreporter)
    if not reasons:
        return
    terminalreporter.section("browser tests NOT run", sep="!", yellow=True, bold=True)
    terminalreporter.line(f"{len(reasons)} browser tests were skipped, so the web page was not tested.",
                          yellow=True, bold=True)
    terminalreporter.line(reasons[0].removeprefix("Skipped: "), yellow=True)
