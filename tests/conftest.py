"""Shared fixtures: the default models (built by scripts/test), configs in temp folders; the browser rule."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
# the browser tests' rule (fail under CI=true, skip loudly elsewhere): its fixture and summary hook
from browser_check import browser_available, pytest_terminal_summary  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The default models, built once (scripts/test builds them before pytest starts); models added
    since a checkout built its folder (tiny-flux) are built on their own when missing."""
    path = ROOT / "models"
    if not (path / ".complete").exists():
        from multigen.pipes.model_builder import build_default_models

        build_default_models(path)
        (path / ".complete").touch()
    else:
        from multigen.pipes.model_builder import build_missing_models

        build_missing_models(path)
    return path


@pytest.fixture()
def config_file(tmp_path: Path, models_dir: Path) -> Path:
    """A copy of the embedded config whose data, output and log folders are in tmp_path."""
    cfg = tmp_path / "config"
    cfg.mkdir()
    shutil.copy(CONFIG_DIR / "models.yaml", cfg / "models.yaml")
    text = (CONFIG_DIR / "config.yaml").read_text()
    text = text.replace("model_dir: ../models", f"model_dir: {models_dir}")
    (cfg / "config.yaml").write_text(text)
    return cfg / "config.yaml"


@pytest.fixture()
def make_api(config_file: Path):
    """Builds HTTP API apps over a ServiceThread on fake pipes (``helpers_service.api_app``), all
    stopped after the test: ``make_api(users=(), start=True, **config_text) -> ApiApp``. A service
    holds the data folder: build a second app over ``api.svc`` rather than a second service."""
    from helpers_service import api_app

    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(api_app(config_file, **kwargs))


@pytest.fixture()
def api(make_api):
    """An app over a started service on fake pipes (``.app``, ``.svc``, ``.client()``)."""
    return make_api()


@pytest.fixture()
def client(api):
    return api.client()
