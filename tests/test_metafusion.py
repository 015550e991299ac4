"""metafusion drop-in: the programs of metafusion's README run with their own import lines.

Each example below is the README's text; only model paths and image sizes are replaced
(each replacement is checked to have happened), so the tiny default models run them fast.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from multigen.pipes import CIm2ImPipe, Cond2ImPipe, ModelType
from multigen.pipes.controlnet_folders import ROOT_ENV
from multigen.pipes.errors import InvalidValueError, MissingConditionModelError
from multigen.pipes.families import SD, SDXL
from multigen.pipes.imagelist import ImageList
from pipes_fixtures import one_thread, sd_base, sdxl_base  # noqa: F401

SOFT_SD = SD.controlnet_models["soft"]  # metafusion: control_v11p_sd15_softedge

# ---- README texts (metafusion's, as written) ----------------------------------------------------

PROMPT2IM = '''
from multigen.pipes import Prompt2ImPipe
pipe = Prompt2ImPipe(model_id='runwayml/stable-diffusion-v1-5')
pipe.setup(width=768, height=768, clip_skip=2)
image = pipe.gen({'prompt': 'bio-tech lab with computers and exotic flowers, artwork'})
image.save('bio.png')
'''

GENSESSION = '''
from multigen.pipes import Prompt2ImPipe
from multigen.sessions import GenSession
from multigen.prompting import Cfgen
nprompt = "jpeg artifacts, blur, distortion, lowres, bad anatomy, bad crop"
prompt = "biological lab with computers and exotic flowers, green colors"
pipe = Prompt2ImPipe(model_id)
pipe.setup(width=768, height=768)
gs = GenSession("./_projects/biolab", pipe, Cfgen(prompt, nprompt))
gs.gen_sess(add_count=10)
'''

IM2IM = '''
from multigen.pipes import Im2ImPipe
pipe = Im2ImPipe(model_id='runwayml/stable-diffusion-v1-5')
pipe.setup("./_projects/biolab/00000.png", strength=0.5, steps=25)
img = pipe.gen({'prompt': 'biolab, anime style drawing, green colors'})
img.save('bio1.png')
'''

CIM2IM = '''
from multigen.pipes import CIm2ImPipe, ModelType
model_id = 'runwayml/stable-diffusion-v1-5'
pipe = CIm2ImPipe(model_id, model_type=ModelType.SD)
pipe.setup("./bio1.png", strength=0.5, steps=25, ctypes=['soft'])
img = pipe.gen({'prompt': 'biolab, anime style drawing, green colors'})
img.save('bio2.png')
'''

MASKED = '''
import numpy
import PIL.Image
from multigen.pipes import MaskedIm2ImPipe
blur = 8
model_id = 'runwayml/stable-diffusion-v1-5'
img = PIL.Image.open("./mech_beard_sigm.png")
# read image with mask painted over
img_paint = numpy.array(PIL.Image.open("./mech_beard_sigm_mask.png"))
scheduler = "EulerAncestralDiscreteScheduler" # gives good results

pipe = MaskedIm2ImPipe(model_dir+model_id)
pipe.setup(original_image=img, image_painted=img_paint, strength=0.85,
           scheduler=scheduler, guidance_scale=7, clip_skip=3, blur=blur)

prompt = "a man wearing a mask"
img = pipe.gen({'prompt': prompt, 'seed':84958344})
img.save('inpaint1.png')
'''

SERVICE = '''
from multigen.worker import ServiceThread
prompt = "bio-tech lab with computers and exotic flowers, artwork"
seed = 42

cfg_file = 'config.yaml'

worker = ServiceThread(cfg_file)
worker.start()

pipe = "prompt2image"
model = 'sdxl1'
result = worker.open_session(
    user='test',
    project="results",
    model=model,
    pipe=pipe,
    loras=['hypersd4steps'],
)

count = 5
c = 0
def on_new_image(*args, **kwargs):
    print(args, kwargs)
    global c
    c += 1

if 'error' not in result:
    sess_id = result['session_id']
    worker.queue_gen(session_id=sess_id,
                    images=None,
                    prompt=prompt,
                    image_callback=on_new_image,
                    lpw=True,
                    width=1024, height=1024, steps=4,
                    timestep_spacing='trailing',
                    guidance_scale=0,
                    scheduler='EulerAncestralDiscreteScheduler',
                    count=count,
                    seeds=[seed + i for i in range(count)],
                    )
'''

SERVICE_CONFIG = "model_list: models.yaml\nmodel_dir: {models}/\nlogging_folder: ./logs/\n"
SERVICE_MODELS = """\
base:
  sdxl1:
    id: tiny-sdxl
    type: SDXL
lora:
  hypersd4steps:
    id: loras/tiny-sdxl-lora.safetensors
    type: SDXL

pipes:
    prompt2image:
        name: "Prompt to Image"
        classname: Prompt2ImPipe
        need_imgs: False
        needs_cnet: False
"""


def adapted(text: str, **replacements: str) -> str:
    """``text`` with each ``old`` replaced by ``new``; each ``old`` must occur in it."""
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def run_example(text: str, **names: object) -> dict[str, object]:
    """Run an example as a script (``__main__``) in the working directory; ``names`` are predefined."""
    scope: dict[str, object] = {"__name__": "__main__", **names}
    exec(compile(text, "example.py", "exec"), scope)  # noqa: S102 - the README's own text
    return scope


def shapes(path: Path, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle((8, 8, size // 2, size // 2), fill=(220, 40, 40))
    d.ellipse((size // 2, size // 2, size - 6, size - 6), fill=(30, 30, 200))
    img.save(path)
    return img


def place_controlnet(root: Path, folder: str, name: str, source: Path) -> Path:
    """Put a ControlNet where metafusion looks for it (a symlink to ``source``)."""
    target = root / folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source, target_is_directory=True)
    return target


# ---- gen's result: a list that stands for its only image -------------------------------------------

def test_image_list_forwards_to_its_only_image(tmp_path):
    one = ImageList([Image.new("RGB", (5, 3), (1, 2, 3))])
    assert one.size == (5, 3) and one.mode == "RGB" and one.convert("L").size == (5, 3)
    one.save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").getpixel((0, 0)) == (1, 2, 3)
    assert isinstance(one, list) and one[0].size == (5, 3) and len(one) == 1
    assert np.asarray(one).shape == (3, 5, 3)  # the image's array, as metafusion's gen gave
    several = ImageList([Image.new("RGB", (5, 3)), Image.new("RGB", (5, 3))])
    with pytest.raises(AttributeError) as e:
        several.save(tmp_path / "b.png")
    assert "holds 2 images" in str(e.value) and "result[i]" in str(e.value)
    assert not hasattr(several, "size") and np.asarray(several).shape == (2, 3, 5, 3)
    assert not hasattr(ImageList(), "size")


# ---- the README's pipe examples, in the order they feed each other ---------------------------------

@pytest.mark.slow
def test_readme_pipe_examples_run_as_written(tmp_path, monkeypatch, models_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOT_ENV, raising=False)
    sd = str(models_dir / "tiny-sd")
    place_controlnet(tmp_path, "models-cn", SOFT_SD, models_dir / "tiny-controlnet-sd")

    run_example(adapted(PROMPT2IM, **{"runwayml/stable-diffusion-v1-5": sd, "width=768, height=768":
                                      "width=64, height=64, steps=2"}))
    assert Image.open("bio.png").size == (64, 64)

    scope = run_example(adapted(GENSESSION, **{"width=768, height=768": "width=64, height=64, steps=2"}),
                        model_id=sd)
    written = sorted(p.name for p in (tmp_path / "_projects" / "biolab").iterdir())
    assert written == sorted([f"{i:05d}.png" for i in range(10)] + [f"{i:05d}.json" for i in range(10)])
    first = json.loads((tmp_path / "_projects" / "biolab" / "00000.json").read_text())
    assert first["prompt"] == scope["prompt"] and first["negative_prompt"] == scope["nprompt"]

    run_example(adapted(IM2IM, **{"runwayml/stable-diffusion-v1-5": sd}))
    assert Image.open("bio1.png").size == (64, 64)

    scope = run_example(adapted(CIM2IM, **{"runwayml/stable-diffusion-v1-5": sd}))
    assert Image.open("bio2.png").size == (64, 64)
    pipe = scope["pipe"]
    assert pipe.ctypes == ["soft"] and pipe.get_config()["controlnets"] == [str(tmp_path / "models-cn" / SOFT_SD)]


@pytest.mark.slow
def test_readme_masked_example_runs_as_written(tmp_path, monkeypatch, models_dir):
    monkeypatch.chdir(tmp_path)
    original = shapes(tmp_path / "mech_beard_sigm.png")
    painted = original.copy()
    ImageDraw.Draw(painted).rectangle((20, 20, 44, 44), fill=(0, 255, 0))
    painted.save(tmp_path / "mech_beard_sigm_mask.png")
    # the example sets model_id itself and reads model_dir: the tiny model, whose text encoder has
    # 2 layers (clip_skip 3 is for a 12-layer one); everything else as written
    scope = run_example(adapted(MASKED, **{"'runwayml/stable-diffusion-v1-5'": "'tiny-sd'",
                                           "clip_skip=3": "clip_skip=2"}), model_dir=f"{models_dir}/")
    out = np.asarray(Image.open("inpaint1.png").convert("RGB")).astype(int)
    src = np.asarray(original).astype(int)
    assert out.shape == src.shape
    mask = np.asarray(scope["pipe"].mask) > 0
    assert mask[30, 30] and not mask[2, 2]
    assert np.array_equal(out[:10, :10], src[:10, :10])  # far outside the (blurred) mask: the original


# ---- ControlNets from metafusion's folders ---------------------------------------------------------

@pytest.mark.slow
def test_missing_default_controlnet_names_the_folder_and_the_fix(tmp_path, monkeypatch, sd_base, sdxl_base):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOT_ENV, raising=False)
    pipe = CIm2ImPipe(pipe=sd_base, model_type=ModelType.SD)  # no ctypes yet: nothing is looked up
    with pytest.raises(MissingConditionModelError) as e:
        pipe.setup(image=shapes(tmp_path / "in.png"), steps=2, ctypes=["canny"])
    msg = str(e.value)
    assert str(tmp_path / "models-cn" / SD.controlnet_models["canny"]) in msg
    assert "controlnets=" in msg and "controlnet:" in msg and ROOT_ENV in msg and e.value.param == "controlnets"
    with pytest.raises(MissingConditionModelError) as e:  # constructor ctypes: looked up at once
        CIm2ImPipe(pipe=sdxl_base, ctypes=["soft"])
    assert str(tmp_path / "models-cn-xl" / SDXL.controlnet_models["soft"]) in str(e.value)
    with pytest.raises(MissingConditionModelError) as e:  # metafusion has no SDXL ip2p ControlNet
        CIm2ImPipe(pipe=sdxl_base, ctypes=["ip2p"])
    assert "models-cn-xl" in str(e.value) and "ip2p" in str(e.value)
    with pytest.raises(InvalidValueError) as e:  # Cond2ImPipe: neither controlnets nor ctypes
        Cond2ImPipe(pipe=sd_base)
    assert "models-cn" in str(e.value)


@pytest.mark.slow
def test_default_controlnets_by_condition_type_and_root_variable(tmp_path, monkeypatch, sd_base, models_dir):
    root = tmp_path / "elsewhere"
    cn = models_dir / "tiny-controlnet-sd"
    for ctype in ("canny", "soft-sobel", "soft"):  # soft and soft-sobel share metafusion's softedge folder
        name = SD.controlnet_models[ctype]
        if not (root / "models-cn" / name).exists():
            place_controlnet(root, "models-cn", name, cn)
    monkeypatch.chdir(tmp_path)  # not here: found through the variable
    monkeypatch.setenv(ROOT_ENV, str(root))
    src = shapes(tmp_path / "in.png")
    pipe = CIm2ImPipe(pipe=sd_base)
    pipe.setup(image=src, steps=2, ctypes=["canny", "soft"])
    assert pipe.get_config()["controlnets"] == [str(root / "models-cn" / SD.controlnet_models[c])
                                                for c in ("canny", "soft")]
    first = pipe.gen({"prompt": "x", "seed": 1})
    assert first.size == src.size
    pipe.setup(image=src, steps=2, ctypes=["soft-sobel"])
    soft = pipe.controlnets
    pipe.setup(image=src, steps=2, ctypes=["soft"])
    assert pipe.controlnets[0] is soft[0]  # one folder, loaded once
    cond = Cond2ImPipe(pipe=sd_base, ctypes=["canny"])
    cond.setup(image=src, steps=2)
    assert cond.get_config()["cscales"] == [SD.default_cscale("canny")]
    assert cond.gen({"prompt": "x", "seed": 1}).size == src.size


@pytest.mark.slow
def test_controlnet_dict_without_ctypes_waits_for_setup(sd_base, models_dir, tmp_path):
    cn = models_dir / "tiny-controlnet-sd"
    src = shapes(tmp_path / "in.png")
    one = CIm2ImPipe(pipe=sd_base, controlnets={"canny": cn})  # one entry: its type is the default
    assert one.ctypes == ["canny"] and len(one.controlnets) == 1
    two = CIm2ImPipe(pipe=sd_base, controlnets={"canny": cn, "qr": cn})  # as the service builds it
    assert two.controlnets == []
    with pytest.raises(InvalidValueError) as e:  # no ctypes anywhere: metafusion's default soft is not there
        two.setup(image=src, steps=2)
    assert e.value.param == "ctypes" and "canny, qr" in str(e.value)
    two.setup(image=src, steps=2, ctypes=["qr"])
    assert two.ctypes == ["qr"] and two.gen({"prompt": "x", "seed": 2}).size == src.size


# ---- the service: metafusion's full example, as a script that ends without stop() -------------------

@pytest.mark.slow
def test_readme_service_example_runs_as_written(tmp_path, models_dir):
    work = tmp_path / "project"
    work.mkdir()
    (work / "config.yaml").write_text(SERVICE_CONFIG.format(models=models_dir))
    (work / "models.yaml").write_text(SERVICE_MODELS)
    (work / "example.py").write_text(adapted(SERVICE, **{"width=1024, height=1024, steps=4":
                                                         "width=64, height=64, steps=2"}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "example.py"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [line for line in proc.stdout.splitlines() if line.startswith("(")]
    assert len(calls) == 5, proc.stdout  # the callback ran once per image, before the script ended
    sessions = list((work / "outputs" / "test" / "results").iterdir())  # beside config.yaml
    assert len(sessions) == 1
    pngs = sorted(p.name for p in sessions[0].glob("*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(5)]
    assert all(str(sessions[0] / name) in proc.stdout for name in pngs)
    metas = [json.loads(p.read_text()) for p in sorted(sessions[0].glob("*.json"))]
    assert [m["seed"] for m in metas] == [42, 43, 44, 45, 46] and all(m["width"] == 64 for m in metas)
    assert all(m["loras"] == [{"name": "hypersd4steps", "weight": 1.0}] for m in metas)
    assert (work / "data").is_dir() and not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_service_picks_the_controlnet_of_the_jobs_ctype(tmp_path, models_dir):
    from multigen.service import ServiceThread

    cn_dir = tmp_path / "cn"  # two copies: image metadata names a ControlNet by its resolved path
    for name in ("canny-net", "qr-net"):
        shutil.copytree(models_dir / "tiny-controlnet-sd", cn_dir / name)
    (tmp_path / "config.yaml").write_text(f"model_list: models.yaml\nmodel_dir: {models_dir}/\nthreads: 1\n")
    (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""\
        base:
          sd: {{id: tiny-sd, type: SD}}
        controlnet:
          cn-canny: {{id: {cn_dir / 'canny-net'}, type: SD}}
          cn-qr: {{id: {cn_dir / 'qr-net'}, type: SD}}
        pipes:
          cimage2image:
            classname: CIm2ImPipe
            need_imgs: True
            needs_cnet: True
            controlnet: {{canny: cn-canny, qr: cn-qr}}
        """))
    svc = ServiceThread(str(tmp_path / "config.yaml")).start()
    try:
        sid = svc.open_session(user="u", project="p", pipe="cimage2image", model="sd")["session_id"]
        src = shapes(tmp_path / "in.png")
        jobs = [svc.queue_gen(sid, images=[src], prompt="x", ctypes=[c], width=64, height=64, steps=2,
                              seeds=[1])["job_id"] for c in ("qr", "canny")]
        assert svc.wait_idle(300)
        for job_id, want in zip(jobs, ("cn-qr", "cn-canny")):
            job = svc.get_job(job_id)
            assert job["state"] == "succeeded", job
        metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "outputs").rglob("*.json"))]
        used = [m.get("pipe_config", m).get("controlnets") for m in metas]
        assert used == [["cn-qr"], ["cn-canny"]], metas
    finally:
        svc.stop()
        svc.store.close()
