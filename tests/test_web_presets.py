"""The web page's performance and aspect-ratio selects (service/web/presets.js) in headless Chromium
against a real server on the tiny models: the presets of the session model's family, the ratios labelled
with the size the server picks, and what a queued job gets."""
from __future__ import annotations

from typing import Any

import pytest

from test_web_support import (By, Select, Server, browser, load_page, open_session, server,  # noqa: F401
                              set_value, wait)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OPTIONS_JS = "return [...document.getElementById(arguments[0]).options].map(o => [o.value, o.textContent])"


def test_the_job_form_sends_a_preset_and_a_ratio_and_the_fields_changed(server: Server, browser: Any):
    d = browser
    presets = server.api("GET", "presets")["presets"]
    load_page(d, server)
    open_session(d, "web-presets", "prompt2image", model="tiny-sd")  # SD, defaults 64 x 64 (test_web_support)
    performance = d.execute_script(OPTIONS_JS, "performance")
    assert [v for v, _ in performance] == [""] + [p["name"] for p in presets if p["family"] == "SD"]
    assert ["extreme_speed", "extreme speed (without its LoRA)"] in performance  # sd-lcm-lora is not configured
    ratios = dict(d.execute_script(OPTIONS_JS, "aspect_ratio"))
    # the family's nearest size scaled to the model's declared 64 px (the shorter side 64 at least)
    assert ratios["16:9"] == "16:9 (104 × 64)" and ratios["1:1"] == "1:1 (64 × 64)"
    assert "1:4 to 4:1" in d.find_element(By.ID, "aspect_ratio-help").text  # the range, from the server
    Select(d.find_element(By.ID, "performance")).select_by_value("quality")
    value = lambda k: d.find_element(By.ID, k).get_attribute("value")  # noqa: E731
    assert value("steps") == "60" and value("guidance_scale") == "7"  # the preset's values shown
    set_value(d, "steps", "2")  # changed: the job's own value wins
    Select(d.find_element(By.ID, "aspect_ratio")).select_by_value("16:9")
    assert not d.find_element(By.ID, "width").is_enabled()
    set_value(d, "prompt", "a preset lighthouse")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    params = server.api("GET", f"jobs/{job_id}")["job"]["params"]
    assert params["performance"] == "quality" and params["steps"] == 2 and params["guidance_scale"] == 7.0
    assert params["scheduler"] == "dpmpp_2m_karras" and params["aspect_ratio"] == "16:9"
    assert (params["width"], params["height"]) == (104, 64)
