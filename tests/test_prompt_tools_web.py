"""The prompt tools in the web page (headless Chromium, a real server on tiny-sd): the in-order switch
reaches the job, and the server's 400 for a prompt whose arrays make too many images shows next to the
prompt field."""
from __future__ import annotations

from typing import Any

import pytest

from test_web_support import (By, Select, Server, browser, load_page, open_session, server,  # noqa: F401
                              set_value, wait)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_in_order_switch_reaches_the_job_and_too_many_images_show_at_the_prompt(server: Server, browser: Any):
    d = browser
    load_page(d, server)
    open_session(d, "web-prompt-tools", "prompt2image")
    assert "__color__" in d.find_element(By.ID, "prompt-help").text
    field = d.find_element(By.CSS_SELECTOR, "[data-param=wildcards_in_order]")
    assert not field.get_attribute("hidden")
    assert "line i" in d.find_element(By.ID, "wildcards_in_order").get_attribute("title")  # the spec's help text
    # [[...]] arrays: 3 x 2 combinations x count 20 = 120 images, over limits.max_count (100)
    set_value(d, "prompt", "[[a, b, c]] [[d, e]]")
    set_value(d, "count", "20")
    assert d.find_element(By.ID, "prompt-arrays").text == "6 combinations x count 20 = 120 images"
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_element(By.ID, "err-prompt").text, 10, "prompt error")
    assert "120 images" in d.find_element(By.ID, "err-prompt").text
    assert not d.find_elements(By.CSS_SELECTOR, "#job-list li"), "a refused job must not be queued"
    d.execute_script("document.getElementById('advanced').open = true")
    set_value(d, "prompt", "a __season__ [[cube, ball]]")
    set_value(d, "count", "1")
    set_value(d, "steps", "2")
    Select(d.find_element(By.ID, "wildcards_in_order")).select_by_value("true")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    assert d.find_element(By.ID, "err-prompt").text == ""
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    job = server.api("GET", f"jobs/{job_id}")["job"]
    assert job["params"]["wildcards_in_order"] is True and job["count"] == 2
