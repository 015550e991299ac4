"""The parameter spec (multigen.pipes.spec): declared once, and the pipes, the service's queue-time
checks, the API's request models, the OpenAPI document and ``GET /api/v1/models`` all agree with it."""
from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from multigen.pipes import spec as specs
from multigen.pipes.errors import InvalidValueError, PipeError, SizeError, UnknownParameterError
from multigen.pipes.registry import UnknownPipeClassError, pipe_class, pipe_names, pipe_spec, spec_of
from multigen.pipes.spec import ParamType
from multigen.service.errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent
#: the pipe of config/models.yaml for each class
PIPE_OF = {"Prompt2ImPipe": "prompt2image", "Im2ImPipe": "image2image", "MaskedIm2ImPipe": "masked_image2image",
           "InpaintingPipe": "inpainting", "Cond2ImPipe": "cond2image", "CIm2ImPipe": "cimage2image"}
NUMERIC = (ParamType.INT, ParamType.FLOAT, ParamType.SCALE)


def edges(param: specs.Param) -> list[tuple[Any, bool]]:
    """``(value, accepted)`` at each end of ``param``'s range: the bound, and one step past it
    (one step inside it for an exclusive bound)."""
    step = 1 if param.type is ParamType.INT else 0.01
    out: list[tuple[Any, bool]] = []
    if param.minimum is not None:
        out += ([(param.minimum, False), (param.minimum + step, True)] if param.exclusive_minimum
                else [(param.minimum, True), (param.minimum - step, False)])
    if param.maximum is not None:
        out += ([(param.maximum, False), (param.maximum - step, True)] if param.exclusive_maximum
                else [(param.maximum, True), (param.maximum + step, False)])
    return out


# ---- the spec itself ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_spec_and_registry_import_without_torch():
    code = ("import sys\n"
            "import multigen.pipes, multigen.pipes.spec, multigen.pipes.registry\n"
            "from multigen.pipes.registry import pipe_spec\n"
            "pipe_spec('CIm2ImPipe').describe()\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'numpy', 'PIL') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unified_ranges_are_the_engines():
    """Where the API and the pipes disagreed, the pipe's range is the one range."""
    assert (specs.STEPS.minimum, specs.STEPS.maximum) == (1, 1000)  # the API said 500
    assert (specs.GUIDANCE_SCALE.minimum, specs.GUIDANCE_SCALE.maximum) == (0, 100)  # the API said 50
    assert (specs.LORA_WEIGHT.minimum, specs.LORA_WEIGHT.maximum) == (-10, 10)  # the API said 4
    assert (specs.SEEDS.minimum, specs.SEEDS.maximum) == (0, 2**64 - 1)  # the API said 2**63-1
    assert (specs.PRIORITY.minimum, specs.PRIORITY.maximum) == (-100, 100)
    assert (specs.CSCALES.minimum, specs.CSCALES.maximum) == (0, 10)  # the API said 4
    assert specs.COUNT.minimum == 1 and specs.COUNT.maximum is None  # limits.max_count sets the top


def test_pipe_specs_name_their_images_and_aliases():
    masked = pipe_spec("MaskedIm2ImPipe")
    assert masked.image_slots == ("image", "image_painted")
    assert masked.required_images == (("image",), ("image_painted", "mask", *specs.OUTPAINT_REQUESTS))
    assert dict(masked.aliases) == {"fimage": "image", "original_image": "image"}
    inpaint = pipe_spec("InpaintingPipe")
    assert inpaint.image_slots == ("image", "mask") and dict(inpaint.aliases)["mask_image"] == "mask"
    assert inpaint["strength"].default == 1.0 and pipe_spec("Im2ImPipe")["strength"].default == 0.75
    cond = pipe_spec("Cond2ImPipe")
    assert cond.image_slots == ("image",) and cond["image"].many and cond.max_images == specs.MAX_IMAGES
    for name in ("Im2ImPipe", "CIm2ImPipe"):
        assert pipe_spec(name).image_slots == ("image",) and pipe_spec(name).max_images == 1
    prompt = pipe_spec("Prompt2ImPipe")
    # its one image parameter is the image prompts' list (IP-Adapter), which `images` never fills
    assert prompt.image_slots == () and not prompt.required_images
    assert [p.name for p in prompt.image_params] == ["image_prompts"]
    assert specs.IMAGE_PARAM_NAMES == {"image", "fimage", "original_image", "image_painted", "mask", "mask_image",
                                       "image_prompts"}


def test_condition_types_are_the_implemented_ones():
    from multigen.pipes.conditions import CONDITION_TYPES

    assert specs.CONDITION_TYPES == tuple(CONDITION_TYPES)


@pytest.mark.parametrize("classname", sorted(PIPE_OF))
def test_assign_images_follows_the_spec(classname):
    spec = pipe_spec(classname)
    params: dict[str, Any] = {}
    if not spec.image_slots:
        with pytest.raises(InvalidValueError) as e:
            spec.assign_images(["a.png"], params)
        assert e.value.param == "images" and "no input images" in str(e.value)
        return
    spec.assign_images(["a.png"], params)
    assert params == {"image": "a.png"}
    too_many = ["a.png"] * (spec.max_images + 1)
    with pytest.raises(InvalidValueError) as e:
        spec.assign_images(too_many, {})
    assert e.value.param == "images" and str(spec.max_images + 1) in str(e.value)
    if len(spec.image_slots) == 2:
        params = {}
        spec.assign_images(["a.png", "b.png"], params)
        assert params == {"image": "a.png", spec.image_slots[1]: "b.png"}
    with pytest.raises(InvalidValueError) as e:  # the image is given under an alias as well
        spec.assign_images(["a.png"], {"fimage": "c.png"})
    assert "fimage" in str(e.value)


def test_cond2im_takes_the_whole_list():
    params: dict[str, Any] = {}
    pipe_spec("Cond2ImPipe").assign_images(["a.png", "b.png"], params)
    assert params == {"image": ["a.png", "b.png"]}


def test_missing_images():
    masked = pipe_spec("MaskedIm2ImPipe")
    assert masked.missing_images({"original_image": "a", "mask": "m"}) == []
    assert masked.missing_images({"image": "a"}) == [("image_painted", "mask", *specs.OUTPAINT_REQUESTS)]
    # an outpaint stands in for the mask; a distance of 0 asks for none
    assert masked.missing_images({"image": "a", "outpaint_left": 8}) == []
    assert masked.missing_images({"image": "a", "outpaint": ["top"]}) == []
    assert masked.missing_images({"image": "a", "outpaint_left": 0}) == [("image_painted", "mask",
                                                                          *specs.OUTPAINT_REQUESTS)]
    assert pipe_spec("InpaintingPipe").missing_images({"mask_image": "m"}) == [("image",)]


def test_param_check_types_and_messages():
    assert specs.STEPS.check(7.0) == 7 and isinstance(specs.GUIDANCE_SCALE.check(7), float)
    for bad in (True, "5", 2.5, float("nan"), None):
        with pytest.raises(InvalidValueError) as e:
            specs.STEPS.check(bad)
        assert e.value.param == "steps" and "1 to 1000" in str(e.value)
    with pytest.raises(InvalidValueError):
        specs.GUIDANCE_SCALE.check(float("inf"))
    with pytest.raises(SizeError) as e:  # sizes out of range are SizeErrors, as the pipes raised them
        specs.WIDTH.check(4097)
    assert e.value.param == "width" and e.value.allowed == "64 to 4096 px"
    assert specs.WIDTH.check(None) is None and specs.VAE_TILING.check(None) is None
    with pytest.raises(InvalidValueError):
        specs.LPW.check(None)
    with pytest.raises(InvalidValueError) as e:
        specs.TIMESTEP_SPACING.check("sideways")
    assert "leading, linspace, trailing" in str(e.value)
    assert specs.CSCALES.check([0.5, 10]) == [0.5, 10.0] and specs.CSCALES.check(2) == 2.0
    with pytest.raises(InvalidValueError) as e:
        specs.CSCALES.check([0.5, 11])
    assert e.value.param == "cscales[1]"
    with pytest.raises(InvalidValueError):
        specs.CSCALES.check([1.0] * (specs.MAX_IMAGES + 1))
    assert specs.SCALE.check([64, 4096]) == [64, 4096] and specs.SCALE.check(2) == 2.0
    with pytest.raises(SizeError) as e:
        specs.SCALE.check([63, 64])
    assert e.value.param == "scale[0]"
    for bad in ([64], [64, 64, 64], "2"):
        with pytest.raises(InvalidValueError):
            specs.SCALE.check(bad)
    assert specs.CTYPES.check(["canny", "soft"]) == ["canny", "soft"]
    with pytest.raises(InvalidValueError) as e:
        specs.CTYPES.check(["canny", "sketch"])
    assert e.value.param == "ctypes[1]" and "canny" in e.value.allowed


@pytest.mark.parametrize("param", [p for s in specs.PIPE_SPECS.values() for p in s if p.type in NUMERIC]
                         + [specs.COUNT, specs.SEEDS, specs.PRIORITY, specs.LORA_WEIGHT],
                         ids=lambda p: p.name)
def test_every_numeric_param_is_checked_at_its_edges(param):
    assert edges(param), f"{param.name} has no range"
    for value, ok in edges(param):
        if ok:
            assert param.check(value) == value
        else:
            with pytest.raises(PipeError) as e:
                param.check(value)
            assert e.value.param == param.name and "out of range" in str(e.value)


def test_every_list_of_a_request_is_capped():
    """A list parameter without max_items would be an unbounded list in the request models: refused when the
    models are built. Seeds are capped by the config's max_count."""
    from multigen.service.api.schemas import value_list
    from multigen.service.config import Limits

    many = [p for spec in specs.PIPE_SPECS.values() for p in spec if p.many]
    assert many and all(p.max_items for p in many)
    assert specs.apply_limits(specs.JOB, Limits(max_count=7))["seeds"].max_items == 7
    with pytest.raises(ValueError, match="max_items"):
        value_list(specs.Param("things", ParamType.INT, "a list without a cap", many=True))


def test_limits_narrow_the_spec_and_are_named():
    class Limits:
        max_width, max_height, max_count = 1024, 10000, 3

    spec = specs.apply_limits(pipe_spec("Im2ImPipe"), Limits())
    assert spec["width"].maximum == 1024 and spec["width"].limit == "limits.max_width"
    assert spec["height"].maximum == 4096 and spec["height"].limit is None  # the spec is tighter
    with pytest.raises(SizeError) as e:
        spec["width"].check(1025)
    assert "limits.max_width in config.yaml" in str(e.value)
    assert spec["scale"].sides[0].maximum == 1024 and spec["scale"].sides[1].maximum == 4096
    with pytest.raises(SizeError):
        spec["scale"].check([1025, 64])
    job = specs.apply_limits(specs.JOB, Limits())
    assert job["count"].maximum == 3 and job["seeds"].max_items == 3
    assert pipe_spec("Im2ImPipe")["width"].maximum == 4096  # the declaration itself is unchanged
    assert specs.apply_limits(pipe_spec("Im2ImPipe"), object()) == pipe_spec("Im2ImPipe")  # no limits


def test_derived_specs_for_model_families():
    base = pipe_spec("Prompt2ImPipe")
    narrow = base.narrowed("guidance_scale", maximum=20).narrowed("timestep_spacing", choices=["trailing"])
    assert narrow["guidance_scale"].maximum == 20 and narrow["timestep_spacing"].choices == ("trailing",)
    assert base.narrowed("steps", maximum=5000)["steps"].maximum == 1000  # narrowing never widens
    shift = specs.Param("shift", ParamType.FLOAT, "timestep shift", default=3.0, minimum=0.0, maximum=10.0)
    extended = base.extended(shift).without("clip_skip")
    assert extended.names[-1] == "shift" and "clip_skip" not in extended and extended.classname == "Prompt2ImPipe"
    assert "shift" not in base and "clip_skip" in base
    with pytest.raises(ValueError):
        base.narrowed("steps", minimum=2000)
    with pytest.raises(ValueError):
        base.narrowed("timestep_spacing", choices=["sideways"])


def test_registry_gives_specs_classes_and_clear_errors():
    assert pipe_names() == (*PIPE_OF, "Edit2ImPipe")  # edit models only: no models.yaml pipe yet
    with pytest.raises(UnknownPipeClassError) as e:
        pipe_spec("Prompt2ImgPipe")
    assert "Prompt2ImgPipe" in str(e.value) and all(n in str(e.value) for n in PIPE_OF)
    with pytest.raises(UnknownPipeClassError):
        pipe_class("BasePipe")  # a class of the package that is no pipe

    class Fake:  # a test fake: names only
        PARAMS = ("width", "steps", "image", "colour")
        ALIASES = {"fimage": "image"}

    spec = spec_of(Fake)
    assert spec.names == Fake.PARAMS and spec["steps"] == specs.STEPS and spec["colour"].type is ParamType.ANY
    assert spec.canonical("fimage") == "image"


# ---- the pipes --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(models_dir):
    from multigen.pipes import load_base

    pipe, _ = load_base(models_dir / "tiny-sd", dtype="float32")
    return pipe


def _pipe(classname: str, base: Any, models_dir: Path) -> Any:
    cls = pipe_class(classname)
    cn = models_dir / "tiny-controlnet-sd"
    if classname == "Cond2ImPipe":
        return cls(pipe=base, controlnets=cn)
    if classname == "CIm2ImPipe":
        return cls(pipe=base, controlnets={"canny": cn}, ctypes=["canny"])
    return cls(pipe=base)


def _values() -> dict[str, Any]:
    image = Image.new("RGB", (64, 64), (90, 90, 90))
    painted = image.copy()
    painted.paste((250, 0, 0), (10, 10, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (10, 10, 30, 30))
    return {"width": 64, "height": 64, "steps": 4, "guidance_scale": 5.0, "clip_skip": 1,
            "scheduler": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "lpw": False, "vae_tiling": False,
            "image": image, "image_painted": painted, "mask": mask, "blur": 2, "blur_compose": 2, "full_res": True,
            # outpaint and the inpaint prompt (tests/test_outpaint.py)
            "outpaint": ["left"], "outpaint_left": 8, "outpaint_right": 0, "outpaint_top": 8, "outpaint_bottom": 0,
            "outpaint_seam": 4, "inpaint_prompt": "a wall",
            "full_res_padding": 8, "strength": 0.5,
            "scale": 1.0, "cscales": [0.5], "guess_mode": True, "control_guidance_start": 0.1,
            "control_guidance_end": 0.9, "ctypes": ["canny"], "true_cfg_scale": None, "max_sequence_length": None,
            # quality switches (tests/test_quality.py); refiner_switch needs a refiner
            "freeu": True, "freeu_b1": 1.2, "freeu_b2": 1.3, "freeu_s1": 0.8, "freeu_s2": 0.3, "sharpness": 2.0,
            "guidance_rescale": 0.5, "refiner_switch": None,
            # image prompts (tests/test_ip_adapter.py): these pipes have no IP-Adapter, so no images
            "image_prompts": None, "image_prompt_weights": 0.5, "image_prompt_stop_at": 0.5,
            # upscale or vary (tests/test_upscale.py): vary takes the sizing parameters, as image to image
            "uov": "vary_subtle", "upscale_factor": 2.0, "upscaler": None}


@pytest.mark.slow
@pytest.mark.parametrize("classname", list(PIPE_OF))
def test_every_pipe_setup_takes_exactly_its_spec(classname, sd, models_dir):
    pipe = _pipe(classname, sd, models_dir)
    cls = type(pipe)
    assert cls.SPEC is pipe_spec(classname)
    assert cls.PARAMS == cls.SPEC.names and cls.ALIASES == dict(cls.SPEC.aliases)
    values = _values()
    pipe.setup(**{name: values[name] for name in cls.SPEC.names})
    assert set(pipe.params) == set(cls.SPEC.names)
    for alias, name in cls.SPEC.aliases.items():
        given = {n: values[n] for n in cls.SPEC.names if cls.SPEC[n].image}
        given[alias] = given.pop(name)
        pipe.setup(**given)
    with pytest.raises(UnknownParameterError) as e:
        pipe.setup(**{n: values[n] for n in cls.SPEC.names if cls.SPEC[n].image}, colour=1)
    assert e.value.param == "colour" and e.value.allowed == ", ".join(cls.SPEC.names)


@pytest.mark.slow
@pytest.mark.parametrize("classname", ["MaskedIm2ImPipe", "CIm2ImPipe"])
def test_pipes_refuse_what_the_spec_refuses(classname, sd, models_dir):
    """setup takes the value on each edge of every numeric range and refuses one step past it (these two
    classes hold every numeric parameter there is). Edges that another parameter decides are set up so
    that it allows them: strength x steps must reach one step."""
    pipe = _pipe(classname, sd, models_dir)
    values = _values()
    images = {n: values[n] for n in pipe.SPEC.names if pipe.SPEC[n].image}
    wrong = []
    for param in pipe.SPEC:
        if param.type not in NUMERIC or param in specs.FAMILY_PARAMS:
            continue  # the family-only ones are refused on SD whatever their value (test_families.py)
        for value, ok in edges(param):
            if param.name == "scale" and value == param.minimum:
                continue  # a factor of 0.01 makes the 64 px input 1 px: the input's size decides (SizeError)
            given = {**images, "steps": 1000 if param.name == "strength" else 4,
                     "strength": 1.0 if param.name == "steps" else 0.75, param.name: value}
            try:
                pipe.setup(**given)
                accepted = True
            except PipeError as e:
                accepted = False
                assert e.param and e.param.startswith(param.name), (param.name, value, e)
            if accepted != ok:
                wrong.append((param.name, value, accepted))
    assert not wrong, wrong


# ---- the service and the API (fake pipes with the real classes' declarations) ------------------------------------
def _png_url(size: tuple[int, int] = (64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _copy_config(folder: Path, models_dir: Path) -> Path:
    shutil.copy(ROOT / "config" / "models.yaml", folder / "models.yaml")
    text = (ROOT / "config" / "config.yaml").read_text().replace("model_dir: ../models", f"model_dir: {models_dir}")
    (folder / "config.yaml").write_text(text)
    return folder / "config.yaml"


#: the queue holds every job these tests queue (none runs: the service is not started)
ROOMY = {"max_queued_jobs: 1000": "max_queued_jobs: 100000",
         "max_queued_jobs_per_user: 200": "max_queued_jobs_per_user: 100000"}


@pytest.fixture(scope="module")
def edge_app(models_dir, tmp_path_factory):
    from helpers_service import api_app

    with api_app(_copy_config(tmp_path_factory.mktemp("spec"), models_dir), start=False, **ROOMY) as app:
        yield app


class Job:
    """Queues one job through the API and through ``queue_gen`` with the images its pipe needs."""

    def __init__(self, app: Any, classname: str) -> None:
        from helpers_service import open_session

        self.app, self.client = app, app.client()
        self.spec = pipe_spec(classname)
        self.sid = open_session(self.client, pipe=PIPE_OF[classname])["id"]
        needs_mask = any("mask" in g for g in self.spec.required_images)
        url, image = _png_url(), Image.new("RGB", (64, 64), (200, 100, 50))
        self.api_images = {**({"images": [url]} if self.spec.image_slots else {}),
                           **({"mask": url} if needs_mask else {})}
        self.call_images = {**({"images": [image]} if self.spec.image_slots else {}),
                            **({"mask": image} if needs_mask else {})}

    def api(self, **body: Any) -> tuple[bool, str | None]:
        r = self.client.post(f"/api/v1/sessions/{self.sid}/jobs", json={"prompt": "x", **self.api_images, **body})
        assert r.status_code in (202, 400), r.get_json()
        return r.status_code == 202, None if r.status_code == 202 else r.get_json()["error"].get("field")

    def queue_gen(self, **kwargs: Any) -> tuple[bool, str | None]:
        try:
            self.app.svc.queue_gen(self.sid, prompt="x", **self.call_images, **kwargs)
        except InvalidInput as e:
            return False, e.field
        return True, None


def _disagreements(job: Job, name: str, cases: list[tuple[Any, bool]]) -> list[tuple]:
    wrong = []
    for value, ok in cases:
        for path in (job.api, job.queue_gen):
            accepted, field = path(**{name: value})
            if accepted != ok or (not ok and not str(field).startswith(name)):
                wrong.append((path.__name__, name, value, accepted, field))
    return wrong


@pytest.mark.parametrize("classname", list(PIPE_OF))
def test_api_and_queue_gen_take_the_edges_and_refuse_one_step_past(edge_app, classname):
    job = Job(edge_app, classname)
    spec = specs.apply_limits(job.spec, edge_app.svc.config.limits)
    wrong: list[tuple] = []
    checked = 0
    for param in spec:
        if param.type in NUMERIC and param not in specs.FAMILY_PARAMS + specs.CONFIGURED_PARAMS:  # SD refuses:
            wrong += _disagreements(job, param.name, edges(param))  # their edges: tests/test_api_families.py
            checked += 1
        if param.sides:  # [width, height] in pixels
            for i, side in enumerate(param.sides):
                cases = [([v if j == i else 64 for j in range(2)], ok) for v, ok in edges(side)]
                wrong += _disagreements(job, param.name, cases)
    assert checked >= 5 and not wrong, wrong


def test_job_fields_and_lora_weights_at_their_edges(edge_app):
    job = Job(edge_app, "Prompt2ImPipe")
    limited = specs.apply_limits(specs.JOB, edge_app.svc.config.limits)
    wrong = _disagreements(job, "count", edges(limited["count"]))
    wrong += _disagreements(job, "priority", edges(specs.PRIORITY))
    wrong += _disagreements(job, "seeds", [([v], ok) for v, ok in edges(specs.SEEDS)])
    client = edge_app.client()
    for weight, ok in edges(specs.LORA_WEIGHT):
        loras = [{"name": "tiny-sd-lora", "weight": weight}]
        r = client.post("/api/v1/sessions", json={"project": "w", "pipe": "prompt2image", "model": "tiny-sd",
                                                  "loras": loras})
        if (r.status_code == 201) != ok or (not ok and not r.get_json()["error"]["field"].startswith("loras.0")):
            wrong.append(("api", "weight", weight, r.get_json()))
        try:
            edge_app.svc.create_session("local", "w", "prompt2image", "tiny-sd", loras)
            accepted, field = True, None
        except InvalidInput as e:
            accepted, field = False, e.field
        if accepted != ok or (not ok and not field.endswith(".weight")):
            wrong.append(("service", "weight", weight, field))
    assert not wrong, wrong


def _number_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """The numeric alternative of a (possibly optional) property schema."""
    for alt in [prop, *prop.get("anyOf", [])]:
        if alt.get("type") in ("integer", "number"):
            return alt
    raise AssertionError(f"no number in {prop}")


def _bounds(schema: dict[str, Any]) -> tuple[Any, Any, bool, bool]:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    return lo, hi, "exclusiveMinimum" in schema, "exclusiveMaximum" in schema


def test_openapi_ranges_are_the_specs(edge_app):
    doc = edge_app.client().get("/api/v1/openapi.json").get_json()
    schemas = doc["components"]["schemas"]
    limits = edge_app.svc.config.limits
    for classname, pipe in PIPE_OF.items():
        props = schemas[f"JobCreate_{pipe}"]["properties"]
        spec = specs.apply_limits(pipe_spec(classname), limits)
        assert {p.name for p in spec if not p.image} <= set(props)
        # images come as `images` (upload ids or data: URLs) and `mask`, not under their setup names
        assert not {"image", "image_painted"} & set(props) and ("images" in props) == bool(spec.image_slots)
        for p in spec:
            if p.type in NUMERIC:
                got = _bounds(_number_schema(props[p.name]))
                assert got == (p.minimum, p.maximum, p.exclusive_minimum, p.exclusive_maximum), (pipe, p.name, got)
        job = specs.apply_limits(specs.JOB, limits)
        assert _bounds(props["count"])[:2] == (1, limits.max_count)
        seeds = _number_schema(props["seeds"]["anyOf"][0]["items"])
        assert _bounds(seeds)[:2] == (0, 2**64 - 1) and props["seeds"]["anyOf"][0]["maxItems"] == job["seeds"].max_items
        assert _bounds(props["priority"])[:2] == (-100, 100)
    assert _bounds(schemas["LoraRef"]["properties"]["weight"])[:2] == (-10, 10)
    assert _bounds(schemas["ControlRef"]["properties"]["scale"])[:2] == (0, 10)


def test_models_describes_each_pipes_params(edge_app):
    body = edge_app.client().get("/api/v1/models").get_json()
    limits = edge_app.svc.config.limits
    for item in body["pipes"]:
        spec = specs.apply_limits(pipe_spec(item["classname"]), limits)
        # the spec's description, plus which model types alone take (or refuse) a parameter: test_api_families.py
        family_keys = ("families", "refused_by")
        assert [{k: v for k, v in d.items() if k not in family_keys} for d in item["params"]] == spec.describe()
        assert [p["name"] for p in item["params"]] == list(pipe_class(item["classname"]).PARAMS)
        assert item["images"]["slots"] == list(spec.image_slots)
    steps = next(p for p in body["pipes"][0]["params"] if p["name"] == "steps")
    assert {k: steps[k] for k in ("type", "min", "max", "default", "image")} == {
        "type": "int", "min": 1, "max": 1000, "default": 50, "image": False} and steps["description"]
    count = next(p for p in body["job_params"] if p["name"] == "count")
    assert count["max"] == limits.max_count and count["limit"] == "limits.max_count"
    assert (body["lora_weight"]["min"], body["lora_weight"]["max"]) == (-10, 10)


def test_config_limits_narrow_the_api_the_service_and_the_docs(config_file):
    from helpers_service import api_app

    with api_app(config_file, start=False, **{"  max_count: 100\n": "  max_count: 3\n  max_width: 1024\n"}) as app:
        job = Job(app, "Prompt2ImPipe")
        client, sid = job.client, job.sid
        for call in (job.api, job.queue_gen):
            assert call(width=1024) == (True, None) and call(count=3) == (True, None)
            assert call(width=1025) == (False, "width") and call(count=4) == (False, "count")
            assert call(height=4096) == (True, None) and call(height=4097) == (False, "height")
        r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x", "width": 1025})
        assert "1024" in r.get_json()["error"]["message"]
        with pytest.raises(InvalidInput) as e:
            app.svc.queue_gen(sid, prompt="x", width=1025)
        assert "limits.max_width" in e.value.message
        props = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]["JobCreate_prompt2image"][
            "properties"]
        assert _number_schema(props["width"])["maximum"] == 1024 and props["count"]["maximum"] == 3
        width = next(p for p in client.get("/api/v1/models").get_json()["pipes"][0]["params"] if p["name"] == "width")
        assert width["max"] == 1024 and width["limit"] == "limits.max_width"


def test_a_control_entry_without_scale_gets_the_declared_default(edge_app):
    job = Job(edge_app, "CIm2ImPipe")
    r = job.client.post(f"/api/v1/sessions/{job.sid}/jobs",
                        json={"prompt": "x", **job.api_images, "control": [{"type": "canny"}]})
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["job"]["params"]["cscales"] == [1.0]


def test_the_web_page_declares_no_range():
    """The form's number inputs get min/max from GET /api/v1/models (jobform.js); the page holds none."""
    from html.parser import HTMLParser

    class Inputs(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[dict[str, Any]] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
            if tag == "input" and dict(attrs).get("type") == "number":
                self.found.append(dict(attrs))

    parser = Inputs()
    parser.feed((ROOT / "service" / "web" / "index.html").read_text())
    assert len(parser.found) >= 10
    assert [i["id"] for i in parser.found if "min" in i or "max" in i] == []
    script = (ROOT / "service" / "web" / "jobform.js").read_text()
    assert "Prompt2ImPipe" not in script and "MaskedIm2ImPipe" not in script  # no table of pipe classes


def test_queue_time_checks_take_a_spec_without_loading_the_pipes():
    from multigen.service.config import Limits
    from multigen.service.validation import check_setup_params

    spec = pipe_spec("MaskedIm2ImPipe")
    params = {"steps": 4.0, "original_image": "in.png"}
    check_setup_params(params, spec, "masked", Limits())
    assert params["steps"] == 4 and isinstance(params["steps"], int)  # normalised as the pipe would
    with pytest.raises(InvalidInput) as e:
        check_setup_params({"cscales": 1.0}, spec, "masked", Limits())
    assert e.value.field == "cscales" and "MaskedIm2ImPipe" in e.value.message and "blur_compose" in e.value.message
    with pytest.raises(InvalidInput) as e:
        check_setup_params({"scale": [64, 4097]}, spec, "masked", Limits())
    assert e.value.field == "scale" and "scale[1]" in e.value.message
