"""The web page's main flows in headless Chromium against a real server: generate, watch progress,
cancel, browse the gallery; upload and paint a mask; sessions with LoRAs, ControlNet, switch, close."""
from __future__ import annotations

import io
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

# the fixtures `server` and `browser` come with the helpers (one server per test module), and so do
# selenium's names: without selenium the tests fail (CI) or skip, they do not break the collection
from test_web_support import (NARROW, WIDE, ActionChains, By, Keys, Select, Server, browser,  # noqa: F401
                              load_page, make_png, open_session, server, set_value, shoot, viewport, wait,
                              write_config)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_queue_progress_cancel_and_gallery(server: Server, browser: Any):
    """Open a session, watch a long job's progress and preview, queue 2 images behind it (queue
    position), cancel the long one, see both images in the gallery, full view, reuse parameters."""
    d = browser
    load_page(d, server)
    shoot(d, "01-start", WIDE)
    shoot(d, "01-start", NARROW)
    viewport(d, WIDE)
    sid = open_session(d, "web-flow", "prompt2image")
    wait(d, lambda d: d.execute_script("return document.body.dataset.events") == "live", 20, "the event stream")
    assert server.api("GET", f"sessions/{sid}")["session"]["pipe"] == "prompt2image"

    # a long job of two images to watch, skip one image of, and cancel
    set_value(d, "prompt", "a long job to cancel")
    set_value(d, "steps", "100")
    set_value(d, "count", "2")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#job-list li")) == 1, 10, "job card")
    long_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    card = f'#job-list li[data-job="{long_id}"]'

    def running_with_progress(d: Any) -> bool:
        value = d.execute_script(f"const p = document.querySelector('{card} progress'); return p && p.value")
        return d.find_element(By.CSS_SELECTOR, card).get_attribute("data-state") == "running" and 0 < value < 1

    wait(d, running_with_progress, 120, "the long job running with 0 < progress < 1")
    assert "step" in d.find_element(By.CSS_SELECTOR, card + " .progress-text").text

    # two images queued behind it: their card shows the queue position
    set_value(d, "prompt", "two tiny foxes")
    set_value(d, "count", "2")
    set_value(d, "steps", "2")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#job-list li")) == 2, 10, "second job card")
    pair_id = next(li.get_attribute("data-job") for li in d.find_elements(By.CSS_SELECTOR, "#job-list li")
                   if li.get_attribute("data-job") != long_id)
    pair = f'#job-list li[data-job="{pair_id}"]'
    assert d.find_element(By.CSS_SELECTOR, pair).get_attribute("data-state") == "queued"
    assert "next in the queue" in d.find_element(By.CSS_SELECTOR, pair + " .progress-text").text
    # displayed first, decoded a moment later: wait for both (a broken image never gets a width)
    def preview_decoded(d: Any) -> bool:
        shown = d.find_element(By.CSS_SELECTOR, card + " .preview").is_displayed()
        return shown and d.execute_script(f"return document.querySelector('{card} .preview').naturalWidth") > 0

    wait(d, preview_decoded, 60, "live preview shown and decoded")
    shoot(d, "02-progress", WIDE)
    shoot(d, "02-progress", NARROW, scroll_to="#jobs-title")
    viewport(d, WIDE)

    # skip the image it is making: the job goes on with its second image
    d.find_element(By.CSS_SELECTOR, card + " .skip").send_keys(Keys.ENTER)
    wait(d, lambda d: server.api("GET", f"jobs/{long_id}")["job"]["skipped"] == [0], 60, "the first image skipped")
    job = server.api("GET", f"jobs/{long_id}")["job"]
    assert job["state"] == "running" and job["done"] == 0, job

    # cancel the long one (keyboard: the button is focusable and Enter presses it)
    d.find_element(By.CSS_SELECTOR, card + " .cancel").send_keys(Keys.ENTER)
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, card).get_attribute("data-state") == "cancelled", 60,
         "the long job cancelled")
    assert server.api("GET", f"jobs/{long_id}")["job"]["state"] == "cancelled"

    # the pair runs and both images arrive in the gallery
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, pair).get_attribute("data-state") == "succeeded", 120,
         "the two-image job to succeed")
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, f'#gallery li[data-job="{pair_id}"]')) == 2, 30,
         "both images in the gallery")
    wait(d, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                          for img in d.find_elements(By.CSS_SELECTOR, "#gallery img")), 10, "thumbnails")
    job = server.api("GET", f"jobs/{pair_id}")["job"]
    assert job["state"] == "succeeded" and job["done"] == 2
    images = server.api("GET", f"sessions/{sid}/images")["images"]
    assert {im["id"] for im in images if im["job_id"] == pair_id} == {
        li.get_attribute("data-image") for li in d.find_elements(By.CSS_SELECTOR, f'#gallery li[data-job="{pair_id}"]')}
    shoot(d, "03-gallery", WIDE)
    shoot(d, "03-gallery", NARROW, scroll_to="#gallery-title")
    viewport(d, WIDE)

    # full view: the image, its parameters, downloads; then "use these parameters again"
    set_value(d, "prompt", "something else")
    set_value(d, "steps", "7")
    first = d.find_element(By.CSS_SELECTOR, f'#gallery li[data-job="{pair_id}"] button')
    seed = int(first.find_element(By.XPATH, "..").get_attribute("data-seed"))
    first.send_keys(Keys.ENTER)
    wait(d, lambda d: d.find_element(By.ID, "image-dialog").get_attribute("open") is not None, 10, "dialog")
    wait(d, lambda d: "two tiny foxes" in d.find_element(By.ID, "image-params").text, 20, "parameters")
    wait(d, lambda d: d.execute_script("return document.getElementById('full-image').naturalWidth") > 0, 10,
         "full image")
    assert "format=jpeg" in d.find_element(By.ID, "download-jpeg").get_attribute("href")
    with urllib.request.urlopen(d.find_element(By.ID, "download-webp").get_attribute("href"), timeout=30) as r:
        assert r.headers["Content-Type"] == "image/webp"
    shoot(d, "04-image", WIDE)
    shoot(d, "04-image", NARROW)
    viewport(d, WIDE)
    d.find_element(By.ID, "reuse-params").click()
    wait(d, lambda d: d.find_element(By.ID, "image-dialog").get_attribute("open") is None, 10, "dialog closed")
    assert d.find_element(By.ID, "prompt").get_attribute("value") == "two tiny foxes"
    assert d.find_element(By.ID, "seeds").get_attribute("value") == str(seed)
    assert d.find_element(By.ID, "steps").get_attribute("value") == "2"


def test_upload_and_mask(server: Server, browser: Any, tmp_path: Path):
    """An image pipe: upload an image, paint a mask with the brush, queue, get the image back."""
    d = browser
    load_page(d, server)
    sid = open_session(d, "web-mask", "masked_image2image")
    assert d.find_element(By.ID, "image").is_displayed() and d.find_element(By.ID, "mask-canvas").is_displayed()
    assert d.find_element(By.ID, "strength").is_displayed()

    # queueing without an image is refused next to the upload field
    set_value(d, "prompt", "paint over the corner")
    d.find_element(By.ID, "queue-job").click()
    assert "image" in d.find_element(By.ID, "err-images").text

    d.find_element(By.ID, "image").send_keys(str(make_png(tmp_path / "input.png")))
    wait(d, lambda d: d.find_element(By.ID, "image").get_attribute("data-upload-id"), 30, "upload")
    canvas = d.find_element(By.ID, "mask-canvas")
    assert d.execute_script("return [arguments[0].width, arguments[0].height]", canvas) == [64, 64]

    # without a mask the page asks for one
    d.find_element(By.ID, "queue-job").click()
    assert "paint" in d.find_element(By.ID, "err-mask").text

    # paint a stroke across the top-left quarter with the widest brush (keyboard: End on the slider)
    d.find_element(By.ID, "brush").send_keys(Keys.END)
    w, h = canvas.size["width"], canvas.size["height"]
    assert abs(w - h) <= 1, "the canvas keeps the image's aspect ratio"
    ActionChains(d).move_to_element_with_offset(canvas, -w // 2 + w // 8, -h // 2 + h // 8).click_and_hold() \
        .move_by_offset(w // 4, 0).move_by_offset(0, h // 8).release().perform()
    painted = d.execute_script("""
        const ctx = arguments[0].getContext('2d');
        const px = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data);
        return [px(8, 8), px(24, 12), px(56, 56)];""", canvas)
    assert all(p[0] > p[2] for p in painted[:2]), f"the stroke is not tinted red: {painted}"
    assert painted[2][:3] == [40, 120, 200], f"the far corner changed: {painted}"
    set_value(d, "steps", "2")
    set_value(d, "strength", "0.5")
    # the masked pipe's advanced parameters: its blurs and the input scale (no ControlNet ones)
    d.find_element(By.CSS_SELECTOR, "#advanced > summary").click()
    for param in ("scale", "blur", "blur_compose", "clip_skip"):
        assert d.find_element(By.ID, param).is_displayed(), param
    assert not d.find_element(By.ID, "guess_mode").is_displayed()
    set_value(d, "blur_compose", "2")
    shoot(d, "05-mask-advanced", WIDE, scroll_to="#advanced")
    shoot(d, "05-mask-advanced", NARROW, scroll_to="#advanced")
    viewport(d, WIDE)
    shoot(d, "05-mask", WIDE, scroll_to="#job-title")
    shoot(d, "05-mask", NARROW, scroll_to="#mask-label")
    viewport(d, WIDE)
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-state")
         in ("succeeded", "failed"), 180, "the masked job to finish")
    job = server.api("GET", f"jobs/{job_id}")["job"]
    assert job["state"] == "succeeded", job.get("error")
    assert job["params"]["blur_compose"] == 2  # a blur radius: the API took it for a boolean before
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery li")) == 1, 30, "the image in the gallery")
    image = server.api("GET", f"sessions/{sid}/images")["images"][0]
    assert (image["width"], image["height"]) == (64, 64)
    # the painted mask reached the pipe: the stroke's corner is regenerated, the far corner is kept
    with urllib.request.urlopen(server.url + image["url"].lstrip("/"), timeout=30) as r:
        out = Image.open(io.BytesIO(r.read())).convert("RGB")
    far = out.getpixel((58, 58))
    assert all(abs(a - b) <= 12 for a, b in zip(far, (40, 120, 200))), f"unpainted corner changed: {far}"
    stroke = out.getpixel((8, 8))
    assert any(abs(a - b) > 12 for a, b in zip(stroke, (40, 120, 200))), f"painted corner unchanged: {stroke}"
    shoot(d, "06-mask-result", WIDE, scroll_to="#job-title")


def test_sessions_loras_switch_and_close(server: Server, browser: Any, tmp_path: Path):
    """Open sessions with a LoRA weight and with a ControlNet pipe, switch between them (the job form
    follows the pipe), queue a ControlNet job, close a session."""
    d = browser
    load_page(d, server)
    Select(d.find_element(By.ID, "model")).select_by_value("tiny-sd")  # the LoRA list follows the model
    lora = d.find_element(By.CSS_SELECTOR, '#lora-list input[type=checkbox][value="tiny-sd-lora"]')
    lora.click()
    weight = lora.find_element(By.XPATH, "..").find_element(By.CSS_SELECTOR, "input.weight")
    weight.clear()
    weight.send_keys("0.5")
    with_lora = open_session(d, "web-sessions", "prompt2image")
    loras = server.api("GET", f"sessions/{with_lora}")["session"]["loras"]
    assert [(lo["name"], lo["weight"]) for lo in loras] == [("tiny-sd-lora", 0.5)]
    assert not d.find_element(By.ID, "image").is_displayed()

    # a LoRA of the other model type is not offered for tiny-sd
    names = [e.get_attribute("value") for e in d.find_elements(By.CSS_SELECTOR, "#lora-list input[type=checkbox]")]
    assert names == ["tiny-sd-lora"]

    d.find_element(By.CSS_SELECTOR, '#lora-list input[type=checkbox][value="tiny-sd-lora"]').click()  # off
    control = open_session(d, "web-sessions", "cimage2image")
    assert d.find_element(By.ID, "image").is_displayed() and d.find_element(By.ID, "ctype").is_displayed()
    assert len(d.find_elements(By.CSS_SELECTOR, "#session-list li")) >= 2

    # switch back and forth: the form follows the session's pipe
    def pick(sid: str) -> None:
        wait(d, lambda d: d.find_element(By.CSS_SELECTOR, f'#session-list li[data-session="{sid}"] .session-pick')
             .click() or True, 10, "a click on the session")

    pick(with_lora)
    wait(d, lambda d: not d.find_element(By.ID, "image").is_displayed(), 10, "prompt2image form")
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, f'#session-list li[data-session="{with_lora}"]').get_attribute(
        "class") == "current", 10, "the picked session marked current")
    pick(control)
    wait(d, lambda d: d.find_element(By.ID, "ctype").is_displayed(), 10, "cimage2image form")
    # one event stream serves every session of the page: switching does not reconnect
    wait(d, lambda d: d.execute_script("return document.body.dataset.events") == "live", 20, "the event stream")

    # a ControlNet job from an image: canny edges computed by the server
    d.find_element(By.ID, "image").send_keys(str(make_png(tmp_path / "cond.png")))
    wait(d, lambda d: d.find_element(By.ID, "image").get_attribute("data-upload-id"), 30, "upload")
    set_value(d, "prompt", "edges")
    set_value(d, "steps", "2")
    Select(d.find_element(By.ID, "ctype")).select_by_value("canny")
    set_value(d, "cscale", "0.8")
    shoot(d, "09-controlnet", WIDE, scroll_to="#job-title")
    viewport(d, WIDE)
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-state")
         in ("succeeded", "failed"), 180, "the ControlNet job to finish")
    job = server.api("GET", f"jobs/{job_id}")["job"]
    assert job["state"] == "succeeded", job.get("error")
    assert job["params"].get("ctypes") == ["canny"] and job["params"].get("cscales") == [0.8]

    # close: the first click asks to confirm, the second closes
    close = f'#session-list li[data-session="{with_lora}"] .session-close'
    d.find_element(By.CSS_SELECTOR, close).click()
    assert d.find_element(By.CSS_SELECTOR, close).text == "Confirm close"
    assert d.switch_to.active_element.get_attribute("class") == "session-close", "focus stays on the button"
    d.switch_to.active_element.send_keys(Keys.ENTER)
    wait(d, lambda d: not d.find_elements(By.CSS_SELECTOR, f'#session-list li[data-session="{with_lora}"]'), 10,
         "the closed session gone from the list")
    assert server.api("GET", f"sessions/{with_lora}")["session"]["state"] == "closed"
    shoot(d, "10-sessions", WIDE)
    shoot(d, "10-sessions", NARROW)


def test_polling_when_no_event_stream_is_free(browser: Any, tmp_path: Path, models_dir: Path):
    """With every event-stream slot taken (429 with Retry-After), the page says "polling" and still shows the job's
    progress and its images, from GET /jobs/{id} and images?after=."""
    config = write_config(tmp_path, models_dir)
    config.write_text(config.read_text().replace("max_event_streams: 4", "max_event_streams: 1"))
    srv = Server(config, tmp_path / "server.log")
    hog = None
    try:
        hog = urllib.request.urlopen(srv.url + "api/v1/events", timeout=30)  # holds the only slot
        assert hog.status == 200
        d = browser
        load_page(d, srv)
        sid = open_session(d, "web-polling", "prompt2image")
        wait(d, lambda d: d.execute_script("return document.body.dataset.events") == "polling", 20,
             "the page to fall back to polling")
        assert d.find_element(By.ID, "stream-status").text == "polling"
        set_value(d, "prompt", "polled")
        set_value(d, "count", "2")
        set_value(d, "steps", "2")
        d.find_element(By.ID, "queue-job").click()
        wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
        wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-state") == "succeeded",
             180, "the job to succeed")
        wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery li")) == 2, 30, "both images")
        assert len(srv.api("GET", f"sessions/{sid}/images")["images"]) == 2
    finally:
        if hog is not None:
            hog.close()
        srv.stop()
