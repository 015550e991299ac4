"""Bad or missing config files fail at start-up naming the file, the key and the fix."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from multigen.service.config import load_config
from multigen.service.errors import ConfigError


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_embedded_config_loads(config_file: Path):
    cfg = load_config(config_file)
    assert {"tiny-sd", "tiny-sdxl", "tiny-sd-single"} <= set(cfg.models.base)
    assert cfg.models.base["tiny-sd-single"].config is not None
    assert cfg.models.pipes["prompt2image"].classname == "Prompt2ImPipe"
    assert cfg.server.port == 8000 and cfg.server.host == "127.0.0.1"


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value) and "Fix:" in str(e.value)


def test_bad_yaml_names_file(config_file: Path):
    config_file.write_text("model_list: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert str(config_file) in str(e.value) and "YAML" in str(e.value)


@pytest.mark.parametrize("old,new,key,fix", [
    ("port: 8000", "port: eight", "server.port", "int"),
    ("devices: auto", "devices: 3", "devices", "auto"),
    ("model_list: models.yaml", "model_lst: models.yaml", "model_lst", "unknown key"),
    ("  threads: 8", "  threads: 8\n  colour: red", "server.colour", "one of"),
])
def test_bad_config_values(config_file: Path, old, new, key, fix):
    _edit(config_file, old, new)
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    msg = str(e.value)
    assert str(config_file) in msg and key in msg and fix in msg and "Fix:" in msg


@pytest.mark.parametrize("old,new,key", [
    ("classname: Prompt2ImPipe", "classname: Prompt2ImgPipe", "pipes.prompt2image.classname"),
    ("id: tiny-sdxl\n", "id: no-such-folder\n", "base.tiny-sdxl.id"),
    ("    type: SDXL\n  tiny-sd-single", "    type: SD3\n  tiny-sd-single", "base.tiny-sdxl.type"),
    ("    config: single/tiny-sd-config         # ...with the local config folder it needs\n", "",
     "base.tiny-sd-single.config"),
])
def test_bad_models_entries(config_file: Path, old, new, key):
    models = config_file.parent / "models.yaml"
    _edit(models, old, new)
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert str(models) in str(e.value) and key in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.slow
def test_serve_with_bad_config_exits_with_message(config_file: Path):
    _edit(config_file, "port: 8000", "port: [1]")
    proc = subprocess.run([sys.executable, "-m", "multigen.service.cli", "serve", "--config", str(config_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "server.port" in proc.stderr and str(config_file) in proc.stderr and "Fix:" in proc.stderr


@pytest.mark.parametrize("defaults,key,fix", [
    ("{colour: red}", "base.tiny-sd.defaults.colour", "use some of"),
    ("{steps: 0}", "base.tiny-sd.defaults.steps", "give steps 1 to 1000"),
    ("{steps: many}", "base.tiny-sd.defaults.steps", "an integer from 1 to 1000"),
    ("{steps: 5000}", "base.tiny-sd.defaults.steps", "1 to 1000"),  # the spec's range, not just "positive"
    ("{clip_skip: -1}", "base.tiny-sd.defaults.clip_skip", "0 to 10"),
    ("{guidance_scale: high}", "base.tiny-sd.defaults.guidance_scale", "number"),
    ("[128, 128]", "base.tiny-sd.defaults", "mapping"),
])
def test_bad_model_defaults(config_file: Path, defaults, key, fix):
    models = config_file.parent / "models.yaml"
    _edit(models, "    id: tiny-sd                           # a diffusers folder\n",
          f"    id: tiny-sd\n    defaults: {defaults}\n")
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    msg = str(e.value)
    assert str(models) in msg and key in msg and fix in msg


@pytest.mark.parametrize("defaults,key,fix", [
    ("{scheduler: euler_a}", "base.tiny-flux.defaults.scheduler", "flow_euler"),  # an SD sampler on Flux
    ("{clip_skip: 2}", "base.tiny-flux.defaults.clip_skip", "give clip_skip 0"),
    ("{timestep_spacing: trailing}", "base.tiny-flux.defaults.timestep_spacing", "leave it out"),
    ("{max_sequence_length: 9999}", "base.tiny-flux.defaults.max_sequence_length", "1 to 1024"),
])
def test_model_defaults_the_family_refuses(config_file: Path, defaults, key, fix):
    """models.yaml ``defaults:`` are checked by the model's family at start-up, as a job's would be."""
    models = config_file.parent / "models.yaml"
    _edit(models, "    id: tiny-flux                         # Flux.1-dev shapes (type detected from the folder)\n",
          f"    id: tiny-flux\n    defaults: {defaults}\n")
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    msg = str(e.value)
    assert str(models) in msg and key in msg and fix in msg, msg


def test_model_defaults_a_family_takes(config_file: Path):
    models = config_file.parent / "models.yaml"
    _edit(models, "    id: tiny-flux                         # Flux.1-dev shapes (type detected from the folder)\n",
          "    id: tiny-flux\n    defaults: {scheduler: flow_euler, true_cfg_scale: 2.0, max_sequence_length: 128}\n")
    entry = load_config(config_file).models.base["tiny-flux"]
    assert entry.defaults == {"scheduler": "flow_euler", "true_cfg_scale": 2.0, "max_sequence_length": 128}


def test_model_defaults_and_native_size(config_file: Path):
    models = config_file.parent / "models.yaml"
    _edit(models, "    id: tiny-sd                           # a diffusers folder\n",
          "    id: tiny-sd\n    defaults: {steps: 3, guidance_scale: 4.5}\n")
    cfg = load_config(config_file)
    sd = cfg.models.base["tiny-sd"]
    assert sd.defaults == {"steps": 3, "guidance_scale": 4.5}
    # read from the folder's configs without loading weights: UNet sample_size x VAE down-sampling
    assert sd.native_size() == (512, 512)
    assert cfg.models.base["tiny-sdxl"].native_size() == (1024, 1024)
    assert cfg.models.base["tiny-sd-single"].native_size() == (512, 512)  # through its config folder
    sd.defaults.update(width=640, height=384)
    assert sd.native_size() == (640, 384)


def test_builtin_model_ids(config_file: Path):
    models = config_file.parent / "models.yaml"
    _edit(models, "id: tiny-sdxl\n", "id: builtin:nope\n")
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert "base.tiny-sdxl.id" in str(e.value) and "builtin:demo" in str(e.value)
    _edit(models, "id: builtin:nope\n", "id: builtin:demo\n")
    cfg = load_config(config_file, check_models_exist=False)
    path = cfg.models.base["tiny-sdxl"].path
    assert path.parts[-2:] == ("demo", "model") and path.parent.name == "demo"
    assert (path.parent / "scenes.py").is_file()  # the package folder of multigen.pipes.demo


METAFUSION_MODELS = "base:\n  sdxl1: {id: tiny-sdxl, type: SDXL}\npipes:\n  prompt2image: {classname: Prompt2ImPipe}\n"


def test_metafusion_three_key_config_keeps_its_folders_beside_it(tmp_path: Path):
    work = tmp_path / "project"
    work.mkdir()
    models_dir = tmp_path / "elsewhere" / "models"  # a model folder of its own: the config only checks it is there
    (models_dir / "tiny-sdxl").mkdir(parents=True)
    (work / "config.yaml").write_text(f"model_list: models.yaml\nmodel_dir: {models_dir}/\nlogging_folder: ./logs/\n")
    (work / "models.yaml").write_text(METAFUSION_MODELS)
    cfg = load_config(work / "config.yaml")
    assert cfg.data_dir == work / "data" and cfg.output_dir == work / "outputs"  # not tmp_path/data
    assert cfg.logging_folder == work / "logs" and cfg.model_dir == models_dir.resolve()
    assert cfg.models.base["sdxl1"].path == (models_dir / "tiny-sdxl").resolve()


def test_config_with_only_model_list_puts_every_folder_beside_it(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("model_list: models.yaml\n")
    (tmp_path / "models.yaml").write_text(METAFUSION_MODELS)
    cfg = load_config(tmp_path / "config.yaml", check_models_exist=False)
    assert (cfg.model_dir, cfg.logging_folder, cfg.data_dir, cfg.output_dir) == (
        tmp_path / "models", tmp_path / "logs", tmp_path / "data", tmp_path / "outputs")
    assert cfg.models.base["sdxl1"].path == tmp_path / "models" / "tiny-sdxl"


def test_repository_config_names_its_top_level_folders():
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "config" / "config.yaml", check_models_exist=False)
    assert (cfg.model_dir, cfg.logging_folder, cfg.data_dir, cfg.output_dir) == (
        root / "models", root / "logs", root / "data", root / "outputs")


# ---- the cluster section, workers: 0, and `multigen worker` ---------------------------------------------
def test_the_cluster_section_and_workers_are_checked_naming_the_key(tmp_path):
    from helpers_service import fake_config

    cfg = fake_config(tmp_path, workers=0, cluster={"host": "gpu-07", "lease_seconds": 30, "heartbeat_seconds": 5})
    assert (cfg.workers, cfg.cluster.host, cfg.cluster.lease_seconds, cfg.cluster.heartbeat_seconds) == (0, "gpu-07",
                                                                                                          30.0, 5.0)
    assert cfg.inputs_root == cfg.data_dir  # SQLite: one process, its own data folder
    default = fake_config(tmp_path)
    assert default.workers is None and default.cluster.host and default.cluster.max_affinity_skips == 2
    for bad, key in (({"cluster": {"heartbeat_seconds": 40}}, "cluster.heartbeat_seconds"),
                     ({"cluster": {"max_affinity_skips": -1}}, "cluster.max_affinity_skips"),
                     ({"cluster": {"leases": 3}}, "cluster.leases"), ({"workers": 2}, "workers")):
        with pytest.raises(ConfigError) as e:
            fake_config(tmp_path, **bad)
        assert e.value.key == key, e.value


def test_multigen_worker_refuses_without_a_shared_store_naming_it(tmp_path):
    from helpers_service import fake_config

    from multigen.service.workerproc import check_worker_config

    with pytest.raises(ConfigError) as e:
        check_worker_config(fake_config(tmp_path))
    assert e.value.key == "store" and "postgresql://" in e.value.fix
    with pytest.raises(ConfigError) as e:
        check_worker_config(fake_config(tmp_path, workers=0, store="postgresql://u@db/multigen"))
    assert e.value.key == "workers"
