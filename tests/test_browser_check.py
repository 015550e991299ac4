"""The browser tests' rule (tests/browser_check.py): a missing browser fails them under CI=true and
skips them elsewhere, with a section of its own in the terminal summary. The finder is replaced so
the rule is tested on this machine whatever it has installed."""
from __future__ import annotations

import pytest

import browser_check

pytest_plugins = ["pytester"]

MISSING = ["/usr/bin/chromium (Debian package chromium)", "/usr/bin/chromedriver (Debian package chromium-driver)"]

# an inner run: two tests that need the browser (as the web tests do, through the fixture) and one that does not
INNER_TESTS = """
def test_page_one(browser_available):
    pass

def test_page_two(browser_available):
    pass

def test_no_browser_needed():
    pass
"""


@pytest.fixture()
def no_browser(monkeypatch):
    monkeypatch.setattr(browser_check, "missing_browser_parts", lambda: list(MISSING))


def test_ci_variable():
    assert browser_check.in_ci({"CI": "true"}) and browser_check.in_ci({"CI": "1"})
    assert browser_check.in_ci({"CI": " TRUE "}) and browser_check.in_ci({"CI": "yes"})
    assert not browser_check.in_ci({}) and not browser_check.in_ci({"CI": "false"})
    assert not browser_check.in_ci({"CI": ""}) and not browser_check.in_ci({"CI": "0"})


def test_missing_browser_fails_under_ci_naming_it_and_the_install(no_browser, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as e:
        browser_check.require_browser()
    message = str(e.value)
    assert "/usr/bin/chromium (Debian package chromium)" in message
    assert "/usr/bin/chromedriver (Debian package chromium-driver)" in message
    assert "apt-get install chromium chromium-driver" in message and "scripts/_browser.sh" in message
    assert "CI=true" in message


def test_missing_browser_skips_outside_ci(no_browser, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as e:
        browser_check.require_browser()
    assert "/usr/bin/chromium" in str(e.value) and "apt-get install chromium chromium-driver" in str(e.value)


@pytest.mark.parametrize("ci", ["true", None])
def test_nothing_missing_runs_the_tests(monkeypatch, ci):
    monkeypatch.setattr(browser_check, "missing_browser_parts", lambda: [])
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    assert browser_check.require_browser() is None


def test_the_finder_names_each_missing_part(monkeypatch, tmp_path):
    monkeypatch.setattr(browser_check, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(browser_check, "CHROMEDRIVER", tmp_path / "chromedriver")
    (tmp_path / "chromium").write_text("#!/bin/sh\n")  # there but not executable: unusable
    assert browser_check.missing_browser_parts()[-2:] == [f"{tmp_path / 'chromium'} (Debian package chromium)",
                                                          f"{tmp_path / 'chromedriver'} (Debian package chromium-driver)"]
    for name in ("chromium", "chromedriver"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert not [m for m in browser_check.missing_browser_parts() if "Debian package" in m]


def test_a_ci_run_without_a_browser_fails(pytester, no_browser, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(test_page=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "browser_check", "-ra")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*browser tests cannot run: missing /usr/bin/chromium*apt-get install chromium "
                                 "chromium-driver*CI=true*"])


def test_a_run_outside_ci_skips_them_and_says_so_in_the_summary(pytester, no_browser, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(test_page=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "browser_check", "-ra")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*browser tests NOT run*",
                                 "2 browser tests were skipped, so the web page was not tested.",
                                 "browser tests cannot run: missing /usr/bin/chromium*"])


def test_no_summary_section_when_the_browser_is_there(pytester, monkeypatch):
    monkeypatch.setattr(browser_check, "missing_browser_parts", lambda: [])
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(test_page=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "browser_check", "-ra")
    result.assert_outcomes(passed=3)
    assert "browser tests NOT run" not in result.stdout.str()
