"""Every parameter of the spec reaches the OpenAPI document and the web page, with its range.

The spec (multigen.pipes.spec) declares each parameter once; the API's request models are generated
from it and the web form reads the ranges from GET /api/v1/models. What a generator cannot add by
itself is a form control: this test names any parameter the page has no field for.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from multigen.pipes import spec as specs
from multigen.pipes.registry import pipe_spec

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "service" / "web" / "index.html").read_text()
IDS = set(re.findall(r'id="([A-Za-z0-9_-]+)"', PAGE))
#: parameters the form sets through another control (their id here): images are uploaded, a mask is
#: painted, ControlNet types and scales are one `control` list, seeds and LoRAs have their own widgets
THROUGH = {"image": "image", "image_painted": "mask-canvas", "mask": "mask-canvas", "cscales": "cscale",
           "ctypes": "ctype"}
NUMERIC = (specs.ParamType.INT, specs.ParamType.FLOAT)


def _all_params() -> list[specs.Param]:
    seen: dict[str, specs.Param] = {}
    for spec in (*specs.PIPE_SPECS.values(), specs.JOB):
        for p in spec:
            seen.setdefault(p.name, p)
    return list(seen.values())


@pytest.mark.parametrize("param", _all_params(), ids=lambda p: p.name)
def test_every_parameter_has_a_form_field(param: specs.Param):
    field = THROUGH.get(param.name, param.name)
    assert field in IDS, (f"{param.name} ({param.description}) has no field in service/web/index.html: add an "
                          f"input with id={field!r} (and err-{field}) to the job form")


def _number_schema(prop: dict) -> dict:
    for v in [prop, *prop.get("anyOf", []), *prop.get("oneOf", [])]:
        if v.get("type") in ("integer", "number"):
            return v
        if v.get("type") == "array" and v.get("items", {}).get("type") in ("integer", "number"):
            return v["items"]
    return {}


def test_every_job_parameter_is_in_every_job_schema_with_its_range(client):
    schemas = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]
    jobs = {name: s for name, s in schemas.items() if name.startswith("JobCreate_")}
    assert jobs
    limits = client.application.config.get("MULTIGEN_LIMITS")  # None: the embedded config's limits apply
    for name, schema in jobs.items():
        props = schema["properties"]
        for p in specs.JOB:
            assert p.name in props, f"{name} lacks the job parameter {p.name}"
            if p.type in NUMERIC and p.name != "count":  # count's maximum is the config's limit
                got = _number_schema(props[p.name])
                assert (got.get("minimum"), got.get("maximum")) == (p.minimum, p.maximum), (name, p.name, got)
    assert limits is None


@pytest.mark.parametrize("classname", sorted(specs.PIPE_SPECS))
def test_every_setup_parameter_is_in_its_job_schema(client, classname):
    schemas = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]
    pipes = client.get("/api/v1/models").get_json()["pipes"]
    names = [p["name"] for p in pipes if p["classname"] == classname]
    if not names:
        pytest.skip(f"no pipe of class {classname} in the embedded config")
    props = schemas[f"JobCreate_{names[0]}"]["properties"]
    for p in pipe_spec(classname):
        if not p.image:
            assert p.name in props, f"JobCreate_{names[0]} lacks {p.name}"
