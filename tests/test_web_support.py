"""Shared by the browser tests (tests/test_web_*.py): a real server, headless Chromium, helpers.

The server is `python -m multigen.service.cli serve --port 0` on loopback with the tiny default
models; the browser is driven with selenium pointed at /usr/bin/chromium and /usr/bin/chromedriver
(never a browser download: scripts/_browser.sh installs Debian's chromium and chromium-driver).
Without them the browser tests fail under CI=true and are skipped elsewhere (tests/browser_check.py):
every fixture here requests conftest's ``browser_available`` first. The selenium names the tests use (``By``,
``Keys``, ``Select``, ``ActionChains``) come from here. Screenshots go to artifacts/screenshots/ at
1280x800 and 390x844. This module holds no tests.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_check import CHROMEDRIVER, CHROMIUM

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # no test runs then: browser_available fails or skips them, naming selenium
    webdriver = StaleElementReferenceException = TimeoutException = Service = None  # type: ignore[assignment]
    ActionChains = By = Keys = Select = WebDriverWait = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "screenshots"
WIDE = (1280, 800)
NARROW = (390, 844)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


# ---- server and browser ------------------------------------------------------------------

def write_config(folder: Path, models_dir: Path) -> Path:
    """A copy of the embedded config (as tests/conftest.py's `config_file`) with its data in ``folder``."""
    cfg = folder / "config"
    cfg.mkdir(parents=True)
    # the page fills width/height from the model's defaults: small images keep the browser tests fast
    models = (ROOT / "config" / "models.yaml").read_text()
    for name in ("tiny-sd", "tiny-sdxl"):
        models = re.sub(rf"(    id: {name})\b[^\n]*\n", r"\1\n    defaults: {width: 64, height: 64}\n", models, count=1)
    (cfg / "models.yaml").write_text(models)
    text = (ROOT / "config" / "config.yaml").read_text()
    text = text.replace("model_dir: ../models", f"model_dir: {models_dir}")
    (cfg / "config.yaml").write_text(text)
    return cfg / "config.yaml"


class Server:
    """`multigen serve` on a free loopback port; ``url`` is read from its first line."""

    def __init__(self, config: Path, log: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "multigen.service.cli", "serve", "--config",
                                      str(config), "--port", "0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.url = ""
        deadline = time.time() + 120
        lines = []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("multigen serving on "):
                self.url = line.split()[-1]
                break
        if not self.url:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(lines))
        # keep draining stdout into a file so the server never blocks on a full pipe
        self._drain = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=log.open("w"))

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "api/v1/" + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", "Bearer " + token)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()


@pytest.fixture(scope="module")
def server(browser_available: None, tmp_path_factory: pytest.TempPathFactory,
           models_dir: Path) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("web")
    srv = Server(write_config(folder, models_dir), folder / "server.log")
    yield srv
    srv.stop()


def make_browser() -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--user-data-dir=" + tempfile.mkdtemp(prefix="multigen-chromium-"))
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium-manager is never asked to download anything
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def browser(browser_available: None) -> Iterator[Any]:
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager: never download a driver or browser
    driver = make_browser()
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def viewport(driver: Any, size: tuple[int, int]) -> None:
    """Make the page's viewport exactly ``size`` (the window's own chrome does not count)."""
    width, height = size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    WebDriverWait(driver, 5).until(lambda d: d.execute_script("return window.innerWidth") == width)


def shoot(driver: Any, name: str, size: tuple[int, int], scroll_to: str | None = None) -> Path:
    """Save a screenshot at ``size``; checks that nothing overflows sideways or overlaps."""
    viewport(driver, size)
    if scroll_to:
        driver.execute_script("document.querySelector(arguments[0]).scrollIntoView({block: 'start'})", scroll_to)
    time.sleep(0.2)
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}_{size[0]}x{size[1]}.png"
    driver.save_screenshot(str(path))
    assert_layout(driver, size)
    return path


LAYOUT_JS = """
const W = window.innerWidth;
const problems = [];
if (document.scrollingElement.scrollWidth > W + 1) problems.push('page scrolls sideways: ' + document.scrollingElement.scrollWidth);
const els = [...document.querySelectorAll('input, select, textarea, button, label, h1, h2, h3, progress, .thumb, canvas, a')]
  .filter(e => e.getClientRects().length && getComputedStyle(e).visibility !== 'hidden' && !e.closest('dialog:not([open])') && !e.classList.contains('sr-only') && !e.closest('.sr-only') && !e.classList.contains('skip'));
// the part of an element that can be seen: clipped by every scrolling ancestor
function visible(e) {
  let r = e.getBoundingClientRect();
  let box = {left: r.left, right: r.right, top: r.top, bottom: r.bottom};
  for (let a = e.parentElement; a; a = a.parentElement) {
    const s = getComputedStyle(a);
    if (s.overflowX === 'visible' && s.overflowY === 'visible') continue;
    const c = a.getBoundingClientRect();
    box = {left: Math.max(box.left, c.left), right: Math.min(box.right, c.right),
           top: Math.max(box.top, c.top), bottom: Math.min(box.bottom, c.bottom)};
  }
  return box.right > box.left && box.bottom > box.top ? box : null;
}
const rects = els.map(e => [e, visible(e)]).filter(([, r]) => r);
for (const [e] of rects) {
  const r = e.getBoundingClientRect();  // whole element, not only its visible part
  if (r.left < -1 || r.right > W + 1) problems.push('cut off: ' + (e.id || e.className || e.tagName) + ' ' + r.left + '..' + r.right);
}
const ctl = rects.filter(([e]) => /^(INPUT|SELECT|TEXTAREA|BUTTON|PROGRESS|CANVAS)$/.test(e.tagName));
const dlg = document.querySelector('dialog[open]');
for (let i = 0; i < ctl.length; i++) for (let j = i + 1; j < ctl.length; j++) {
  const [a, ra] = ctl[i], [b, rb] = ctl[j];
  if (dlg && (dlg.contains(a) !== dlg.contains(b))) continue;
  if (a.contains(b) || b.contains(a)) continue;
  const ox = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
  const oy = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
  if (ox > 1 && oy > 1) problems.push('overlap: ' + (a.id || a.className || a.tagName) + ' / ' + (b.id || b.className || b.tagName));
}
return problems;
"""


def assert_layout(driver: Any, size: tuple[int, int]) -> None:
    problems = driver.execute_script(LAYOUT_JS)
    assert not problems, f"layout at {size}: {problems}"


def wait(driver: Any, cond, timeout: float = 60, what: str = "") -> Any:
    try:
        # lists are re-rendered as the server's state changes: a vanished element is retried
        return WebDriverWait(driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=[StaleElementReferenceException]).until(cond)
    except TimeoutException:
        logs = [e["message"] for e in driver.get_log("browser")]
        errors = driver.execute_script(
            "return [...document.querySelectorAll('.error')].filter(e => e.textContent).map(e => e.id + ': ' + e.textContent)")
        raise AssertionError(f"timed out waiting for {what or cond}; errors on the page: {errors}; "
                             f"browser log: {logs[-10:]}") from None


def load_page(driver: Any, server: Server, token: str | None = None) -> None:
    """Open the page fresh (empty localStorage) at the wide size and wait until it has started."""
    viewport(driver, WIDE)
    # clear the storage from a page of the same origin that runs no script, so that the last
    # test's session does not open an event stream (each holds one of the server's few slots)
    driver.get(server.url + "static/style.css")
    driver.execute_script("localStorage.clear()")
    if token:
        driver.execute_script("localStorage.setItem('multigen.token', arguments[0])", token)
    driver.get(server.url)
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), 30, "page ready")


def open_session(driver: Any, project: str, pipe: str, model: str = "tiny-sd") -> str:
    """Fill the session form, open it; returns the new session's id."""
    before = set(driver.execute_script(
        "return [...document.querySelectorAll('#session-list li')].map(li => li.dataset.session)"))
    project_input = driver.find_element(By.ID, "project")
    project_input.clear()
    project_input.send_keys(project)
    Select(driver.find_element(By.ID, "pipe")).select_by_value(pipe)
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    driver.find_element(By.ID, "open-session").click()

    def new_current(d: Any) -> str | None:
        sid, enabled = d.execute_script("const li = document.querySelector('#session-list li.current');"
                                        "return [li && li.dataset.session, !document.getElementById('job-fields').disabled]")
        return sid if sid and sid not in before and enabled else None

    return wait(driver, new_current, 30, "the new session to be open and current")


def set_value(driver: Any, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)




def make_png(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (40, 120, 200)).save(path)
    return path


@pytest.fixture(scope="module")
def auth_server(browser_available: None, tmp_path_factory: pytest.TempPathFactory,
                models_dir: Path) -> Iterator[tuple[Server, str]]:
    """A server with one user (auth on): `multigen users add alice` prints the token last."""
    folder = tmp_path_factory.mktemp("web-auth")
    config = write_config(folder, models_dir)
    out = subprocess.run([sys.executable, "-m", "multigen.service.cli", "users", "add", "alice", "--config",
                          str(config)], capture_output=True, text=True, check=True).stdout
    token = out.strip().splitlines()[-1]
    srv = Server(config, folder / "server.log")
    yield srv, token
    srv.stop()
