"""What a wheel install gets: the demo model and a default config that needs no repository beside it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import multigen.service.config as config_mod
from multigen.service.cli import ensure_models
from multigen.service.config import PACKAGED_CONFIG, builtin_model_path, default_config_path, load_config
from multigen.service.errors import ConfigError
from multigen.service.users import add_user

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_path(monkeypatch, tmp_path):
    monkeypatch.delenv("MULTIGEN_CONFIG", raising=False)
    assert default_config_path() == config_mod.DEFAULT_CONFIG  # in the repository
    monkeypatch.setenv("MULTIGEN_CONFIG", str(tmp_path / "mine.yaml"))
    assert default_config_path() == tmp_path / "mine.yaml"
    monkeypatch.delenv("MULTIGEN_CONFIG")
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG", tmp_path / "no-repository" / "config.yaml")
    assert default_config_path() == PACKAGED_CONFIG  # installed from a wheel


def test_packaged_config_runs_the_demo_model_with_data_in_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(PACKAGED_CONFIG)  # every listed model exists
    assert list(cfg.models.base) == ["demo"] and cfg.models.base["demo"].path == builtin_model_path("demo")
    assert cfg.data_dir == tmp_path / ".multigen" / "data"
    assert cfg.output_dir == tmp_path / ".multigen" / "outputs" and cfg.logging_folder == tmp_path / ".multigen" / "logs"
    ensure_models(cfg)  # nothing listed lives in model_dir: the tiny models are not built
    assert not cfg.model_dir.exists()
    with pytest.raises(ConfigError) as e:
        add_user(str(PACKAGED_CONFIG), "ann")
    assert "--config" in str(e.value)


@pytest.mark.slow
def test_wheel_carries_the_demo_model_and_default_config(tmp_path):
    # built from a copy: setuptools leaves build/ and *.egg-info behind
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "models", "build", "*.egg-info", "data",
                                                             "outputs", "logs", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("multigen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "model_index.json"):
        assert f"multigen/pipes/demo/model/{part}" in names, part
    assert {"multigen/service/defaults/config.yaml", "multigen/service/defaults/models.yaml",
            "multigen/service/defaults/styles.json", "multigen/service/web/index.html"} <= names
