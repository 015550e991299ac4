"""The web page's forms in headless Chromium against a real server: errors next to their field,
labels and keyboard use, the token when auth is on."""
from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import pytest

# the fixtures `server`, `auth_server` and `browser` come with the helpers (one server per test module),
# and so do selenium's names: without selenium the tests fail (CI) or skip, they do not break the collection
from test_web_support import (NARROW, WIDE, By, Keys, Select, Server, auth_server, browser,  # noqa: F401
                              load_page, open_session, server, set_value, shoot, viewport, wait)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_bad_values_show_their_errors(server: Server, browser: Any):
    """The server's 400 names the field; the page shows the message next to that field."""
    d = browser
    load_page(d, server)
    open_session(d, "web-errors", "prompt2image")
    set_value(d, "prompt", "bad size")
    Select(d.find_element(By.ID, "size")).select_by_value("custom")
    set_value(d, "width", "40")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_element(By.ID, "err-width").text, 10, "width error")
    assert "width" in d.find_element(By.ID, "err-width").text
    assert d.find_element(By.ID, "width").get_attribute("aria-invalid") == "true"
    assert d.switch_to.active_element.get_attribute("id") == "width"
    assert not d.find_elements(By.CSS_SELECTOR, "#job-list li"), "a bad job must not be queued"
    shoot(d, "07-error", WIDE)
    shoot(d, "07-error", NARROW, scroll_to="#size")
    viewport(d, WIDE)

    # fixing it clears the error; then a bad step count is named instead
    set_value(d, "width", "64")
    set_value(d, "steps", "0")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_element(By.ID, "err-steps").text, 10, "steps error")
    assert d.find_element(By.ID, "err-width").text == ""
    assert "steps" in d.find_element(By.ID, "err-steps").text

    # what the page itself can check is shown the same way
    set_value(d, "steps", "2")
    set_value(d, "seeds", "1, two")
    d.find_element(By.ID, "queue-job").click()
    assert "seeds" in d.find_element(By.ID, "err-seeds").text
    assert not d.find_elements(By.CSS_SELECTOR, "#job-list li")


GROUPS_JS = """
return [...document.querySelectorAll('#advanced [data-group]')].filter(g => !g.hidden).map(g =>
  [g.dataset.group, g.tagName + ':' + ((g.querySelector(':scope > legend') || {}).textContent || ''),
   [...g.querySelectorAll('[data-param]')].filter(e => !e.hidden).map(e => e.dataset.param)]);
"""


def advanced_groups(d: Any) -> dict[str, list[str]]:
    """The Advanced section's groups shown, in order, each with the fields it shows; each is a <fieldset> with a
    <legend> (its accessible name), and a group shows only with a field to show."""
    groups = d.execute_script(GROUPS_JS)
    for name, legend, fields in groups:
        assert legend.startswith("FIELDSET:") and legend.removeprefix("FIELDSET:").strip(), (name, legend)
        assert fields, name
    hidden = d.execute_script("return [...document.querySelectorAll('#advanced [data-group]')].filter(g => g.hidden)"
                              ".flatMap(g => [...g.querySelectorAll('[data-param]')]).filter(e => !e.hidden)"
                              ".map(e => e.dataset.param)")
    assert hidden == [], f"fields shown in hidden groups: {hidden}"
    return {name: fields for name, _, fields in groups}


def test_advanced_parameters_reach_the_server(server: Server, browser: Any):
    """The "Advanced" section: closed by default, opened with the keyboard, the pipe's own parameters in
    labelled groups (those its model has nothing for left out); what is set there is in the job's params on
    the server, a bad value is named there."""
    d = browser
    load_page(d, server)
    weight = d.find_element(By.CSS_SELECTOR, "#lora-list input.weight")  # the LoRA weight range is the server's
    assert (weight.get_attribute("min"), weight.get_attribute("max")) == ("-10", "10")
    sid = open_session(d, "web-advanced", "prompt2image")
    advanced = d.find_element(By.ID, "advanced")
    assert advanced.is_displayed() and advanced.get_attribute("open") is None
    # prompt2image on tiny-sd: sampling, quality (FreeU's factors only while it is on; no refiner switch: tiny-sd
    # has no refiner), image prompts (tiny-sd has an IP-Adapter) and the job's own; no image, outpaint or ControlNet
    groups = advanced_groups(d)
    assert list(groups) == ["sampling", "quality", "image-prompts", "job"], groups
    assert groups["sampling"] == ["clip_skip", "timestep_spacing", "lpw", "vae_tiling"], groups
    assert groups["quality"] == ["freeu", "sharpness", "guidance_rescale"], groups
    assert groups["image-prompts"] == ["image_prompt_weights", "image_prompt_stop_at"], groups
    assert groups["job"] == ["priority", "wildcards_in_order", "grid", "webhook_url"], groups
    # ranges, defaults and help texts come from the server's parameter spec (GET /api/v1/models)
    from multigen.pipes import spec as specs

    attr = lambda k, a: d.find_element(By.ID, k).get_attribute(a)  # noqa: E731
    assert attr("clip_skip", "max") == str(specs.CLIP_SKIP.maximum) == "10"
    assert attr("clip_skip", "placeholder") == str(specs.CLIP_SKIP.default)
    assert (attr("steps", "min"), attr("steps", "max")) == (str(specs.STEPS.minimum), str(specs.STEPS.maximum))
    assert specs.STEPS.description in attr("steps", "title") and "1 to 1000" in attr("steps", "title")
    assert attr("width", "min") == str(specs.WIDTH.minimum) and attr("count", "max") == "100"  # limits.max_count
    assert attr("guidance_scale", "max") == str(specs.GUIDANCE_SCALE.maximum).removesuffix(".0")
    summary = d.find_element(By.CSS_SELECTOR, "#advanced > summary")
    d.execute_script("arguments[0].focus()", summary)
    summary.send_keys(Keys.ENTER)
    wait(d, lambda d: advanced.get_attribute("open") is not None, 5, "Advanced opened with Enter")
    assert d.execute_script(LABELS_JS) == []
    Select(d.find_element(By.ID, "freeu")).select_by_value("true")
    assert advanced_groups(d)["quality"] == ["freeu", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2", "sharpness",
                                             "guidance_rescale"]
    Select(d.find_element(By.ID, "freeu")).select_by_value("")
    set_value(d, "prompt", "advanced settings")
    set_value(d, "steps", "2")
    set_value(d, "clip_skip", "1")
    Select(d.find_element(By.ID, "timestep_spacing")).select_by_value("trailing")
    shoot(d, "11-advanced", WIDE, scroll_to="#job-title")
    shoot(d, "11-advanced", NARROW, scroll_to="#advanced")
    viewport(d, WIDE)
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    params = server.api("GET", f"jobs/{job_id}")["job"]["params"]
    assert params["clip_skip"] == 1 and params["timestep_spacing"] == "trailing", params
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-state")
         in ("succeeded", "failed"), 120, "the job to finish")
    assert server.api("GET", f"jobs/{job_id}")["job"]["state"] == "succeeded"
    assert server.api("GET", f"sessions/{sid}/images")["images"]

    # "use these parameters again" brings them back (and the pipe defaults stay empty)
    set_value(d, "clip_skip", "")
    Select(d.find_element(By.ID, "timestep_spacing")).select_by_value("")
    d.execute_script("document.getElementById('advanced').open = false")
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .thumb"), 30, "the thumbnail")
    d.find_element(By.CSS_SELECTOR, "#gallery .thumb").click()
    wait(d, lambda d: "advanced settings" in d.find_element(By.ID, "image-params").text, 20, "parameters")
    d.find_element(By.ID, "reuse-params").click()
    wait(d, lambda d: d.find_element(By.ID, "image-dialog").get_attribute("open") is None, 10, "dialog closed")
    assert advanced.get_attribute("open") is not None
    assert d.find_element(By.ID, "clip_skip").get_attribute("value") == "1"
    assert d.find_element(By.ID, "timestep_spacing").get_attribute("value") == "trailing"

    # a value past the schema's range is refused by the server and shown next to the field, unfolded
    set_value(d, "clip_skip", "11")
    d.execute_script("document.getElementById('advanced').open = false")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_element(By.ID, "err-clip_skip").text, 10, "clip_skip error")
    assert advanced.get_attribute("open") is not None
    assert d.switch_to.active_element.get_attribute("id") == "clip_skip"
    assert len(d.find_elements(By.CSS_SELECTOR, "#job-list li")) == 1, "the bad job is not queued"

    # a model without an IP-Adapter (demo) shows no image prompts; one with a refiner (tiny-sdxl) its switch
    open_session(d, "web-advanced-demo", "prompt2image", model="demo")
    groups = advanced_groups(d)
    assert "image-prompts" not in groups and "refiner_switch" not in groups["quality"], groups
    assert not d.find_element(By.ID, "image_prompts").is_displayed()
    open_session(d, "web-advanced-sdxl", "prompt2image", model="tiny-sdxl")
    assert advanced_groups(d)["quality"][-1] == "refiner_switch"
    # image to image: the input image's scale and upscale-or-vary with the configured upscalers
    open_session(d, "web-advanced-im2im", "image2image")
    groups = advanced_groups(d)
    assert groups["input"] == ["scale", "uov", "upscale_factor", "upscaler"], groups
    assert "outpaint" not in groups and "controlnet" not in groups, groups
    # a ControlNet pipe shows its own: the input scale, guess mode and the control guidance range
    open_session(d, "web-advanced-cn", "cimage2image")
    groups = advanced_groups(d)
    assert groups["controlnet"] == ["guess_mode", "control_guidance_start", "control_guidance_end"], groups
    assert groups["input"] == ["scale"] and "outpaint" not in groups, groups
    assert d.find_element(By.ID, "control_guidance_end").get_attribute("max") == "1"
    # the masked pipes show the mask's blur and inpainting at full resolution (a flag and its padding), and outpaint
    open_session(d, "web-advanced-inpaint", "inpainting")
    groups = advanced_groups(d)
    assert groups["input"] == ["scale", "blur", "full_res", "full_res_padding"], groups["input"]
    assert groups["outpaint"] == ["outpaint", "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom",
                                  "outpaint_seam", "inpaint_prompt"], groups
    assert "controlnet" not in groups, groups
    assert attr("full_res_padding", "max") == str(specs.FULL_RES_PADDING.maximum)
    assert attr("cscale", "max") == str(specs.CSCALES.maximum).removesuffix(".0")  # the page said 4
    options = d.execute_script("return [...document.getElementById('ctype').options].map(o => o.value)")
    assert options == list(specs.CONDITION_TYPES)
    assert attr("strength", "max") == "1" and specs.STRENGTH.description in attr("strength", "title")
    assert d.execute_script(LABELS_JS) == []
    shoot(d, "11-advanced-controlnet", WIDE, scroll_to="#advanced")
    shoot(d, "11-advanced-controlnet", NARROW, scroll_to="#advanced")


LABELS_JS = """
const missing = [];
for (const el of document.querySelectorAll('input, select, textarea, button, canvas[tabindex], progress')) {
  if (el.closest('[hidden]') && el.type !== 'hidden') continue;
  const name = (el.labels && [...el.labels].map(l => l.textContent.trim()).join(' ')) || el.getAttribute('aria-label')
    || (el.getAttribute('aria-labelledby') || '').split(' ').map(id => (document.getElementById(id) || {}).textContent || '').join(' ').trim()
    || (el.tagName === 'BUTTON' ? el.textContent.trim() : '');
  if (!name) missing.push(el.outerHTML.slice(0, 80));
}
return missing;
"""


def test_labels_and_keyboard(server: Server, browser: Any):
    """Every control has a label; a session opens, a job queues and an image opens with the keyboard."""
    d = browser
    load_page(d, server)
    for size in (WIDE, NARROW):
        viewport(d, size)
        assert d.execute_script(LABELS_JS) == []
    viewport(d, WIDE)
    project = d.find_element(By.ID, "project")
    project.clear()
    project.send_keys("web-keys")
    order = []
    for _ in range(8):
        d.switch_to.active_element.send_keys(Keys.TAB)
        order.append(d.switch_to.active_element.get_attribute("id"))
        if order[-1] == "open-session":
            break
    assert order[:2] == ["pipe", "model"] and order[-1] == "open-session", order
    d.switch_to.active_element.send_keys(Keys.ENTER)
    wait(d, lambda d: not d.find_element(By.ID, "job-fields").get_attribute("disabled"), 30, "session open")
    assert d.execute_script(LABELS_JS) == []
    d.find_element(By.ID, "prompt").send_keys("typed with the keyboard")
    for field, value in (("steps", "2"), ("count", "1")):
        # one key at a time: send_keys(CONTROL, "a", BACKSPACE, value) keeps Control held, so the value never
        # reached the field
        box = d.find_element(By.ID, field)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(value)
        assert box.get_attribute("value") == value
    d.find_element(By.ID, "count").send_keys(Keys.ENTER)  # Enter in a field submits the form
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .thumb"), 120, "the image")
    thumb = d.find_element(By.CSS_SELECTOR, "#gallery .thumb")
    assert thumb.get_attribute("aria-label").startswith("Open image")
    thumb.send_keys(Keys.ENTER)
    wait(d, lambda d: d.find_element(By.ID, "image-dialog").get_attribute("open") is not None, 10, "dialog")
    d.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(d, lambda d: d.find_element(By.ID, "image-dialog").get_attribute("open") is None, 10, "dialog closed")
    assert d.switch_to.active_element == thumb, "focus goes back to the thumbnail"


def test_token_entry_with_auth_on(auth_server: tuple[Server, str], browser: Any):
    """With auth on the page asks for the token, refuses a wrong one, then works with the right one:
    images and previews are fetched with the Authorization header, events over fetch() streaming."""
    srv, token = auth_server
    d = browser
    viewport(d, WIDE)
    d.get(srv.url + "static/style.css")
    d.execute_script("localStorage.clear()")
    d.get(srv.url)
    wait(d, lambda d: d.find_element(By.ID, "token-form").is_displayed(), 30, "the token form")
    assert "token" in d.find_element(By.ID, "err-token").text
    assert d.switch_to.active_element.get_attribute("id") == "token"
    shoot(d, "08-token", WIDE)
    shoot(d, "08-token", NARROW)
    viewport(d, WIDE)

    d.find_element(By.ID, "token").send_keys("mg_not-a-token", Keys.ENTER)
    wait(d, lambda d: "did not accept" in d.find_element(By.ID, "err-token").text, 20, "wrong token refused")

    d.find_element(By.ID, "token").send_keys(token, Keys.ENTER)
    wait(d, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), 30, "page ready")
    assert d.find_element(By.ID, "err-token").text == ""
    sid = open_session(d, "web-auth", "prompt2image")
    wait(d, lambda d: d.execute_script("return document.body.dataset.events") == "live", 20,
         "the event stream (fetch with the Authorization header)")
    assert srv.api("GET", f"sessions/{sid}", token=token)["session"]["user"] == "alice"
    set_value(d, "prompt", "behind a token")
    set_value(d, "steps", "2")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img"), 120, "the image")
    img = d.find_element(By.CSS_SELECTOR, "#gallery img")
    wait(d, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img), 20,
         "the thumbnail fetched with the token")
    assert img.get_attribute("src").startswith("blob:")


def test_page_is_self_contained(server: Server, browser: Any):
    """Everything the page loads comes from the server itself; the CSP forbids other hosts."""
    with urllib.request.urlopen(server.url, timeout=30) as r:
        csp = r.headers["Content-Security-Policy"]
        assert r.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    with urllib.request.urlopen(server.url + "static/app.js", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
    d = browser
    load_page(d, server)
    urls = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server.url) for u in urls), urls
    assert {"app.js", "api.js", "style.css"} <= {u.rsplit("/", 1)[-1] for u in urls}
    for bad in ("../config/config.yaml", "..%2fapi%2fweb.py"):
        try:
            urllib.request.urlopen(server.url + "static/" + bad, timeout=30)
            raise AssertionError(f"static/{bad} was served")
        except urllib.error.HTTPError as e:
            assert e.code == 404


def test_form_takes_the_models_size_and_defaults(server: Server, browser: Any):
    """A session on another model fills width/height with its native size (or its defaults) and steps and
    guidance with its defaults; within one model, what the user typed stays."""
    d = browser
    load_page(d, server)
    single = open_session(d, "web-defaults", "prompt2image", model="tiny-sd-single")  # no defaults: native size
    value = lambda k: d.find_element(By.ID, k).get_attribute("value")  # noqa: E731
    wait(d, lambda d: value("width") == "512", 10, "the native width of tiny-sd-single")
    assert value("height") == "512" and value("size") == "512x512" and value("steps") == "20"
    set_value(d, "steps", "3")
    open_session(d, "web-defaults", "prompt2image", model="tiny-sd")  # defaults: 64 x 64 (test_web_support)
    wait(d, lambda d: value("width") == "64", 10, "tiny-sd's default width")
    assert value("height") == "64" and value("size") == "64x64" and value("steps") == "20"
    set_value(d, "steps", "2")
    open_session(d, "web-defaults-2", "prompt2image", model="tiny-sd")  # the same model: the form is kept
    assert value("steps") == "2" and value("width") == "64"
    d.find_element(By.CSS_SELECTOR, f'#session-list li[data-session="{single}"] .session-pick').click()
    wait(d, lambda d: value("width") == "512", 10, "back to tiny-sd-single's size")


@pytest.fixture(scope="module")
def family_server(browser_available: None, tmp_path_factory: pytest.TempPathFactory, models_dir: Any):
    """A server whose models.yaml also has the tiny Flux model, its family detected from its files (no
    ``type:``), at 64 x 64 for speed."""
    import yaml
    from test_web_support import write_config

    folder = tmp_path_factory.mktemp("web-families")
    config = write_config(folder, models_dir)
    models = yaml.safe_load((config.parent / "models.yaml").read_text())
    models["base"]["web-flux"] = {"id": "tiny-flux", "defaults": {"width": 64, "height": 64}}
    (config.parent / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    srv = Server(config, folder / "server.log")
    yield srv
    srv.stop()


SHOWN_JS = "return [...document.querySelectorAll('#job-form [data-param]')].filter(e => !e.hidden).map(e => e.dataset.param)"
OPTIONS_JS = "return [...document.getElementById(arguments[0]).options].map(o => o.value)"


def test_the_form_shows_the_fields_of_the_models_family(family_server: Server, browser: Any):
    """A Flux session: no clip_skip/timestep_spacing, its own true_cfg_scale/max_sequence_length, its flow
    schedulers, its trained sizes and defaults; an SD session the reverse. The pipes a model's family does not
    run are marked in the pipe list, and a choice the family refuses is the server's 400 next to its field."""
    srv, d = family_server, browser
    catalog = srv.api("GET", "models")
    families = {f["name"]: f for f in catalog["families"]}
    models = {m["name"]: m for m in catalog["models"]}
    flux, sd = families["FLUX"], families["SD"]
    assert models["web-flux"]["family"] == "FLUX"
    load_page(d, srv)

    # the session form: the chosen model's family, and the pipes it cannot run marked
    Select(d.find_element(By.ID, "model")).select_by_value("web-flux")
    assert d.find_element(By.ID, "model-family").text.startswith(flux["title"] + ": runs text2image")
    marked = d.execute_script("return [...document.getElementById('pipe').options].filter(o => o.dataset.unsupported)"
                              ".map(o => o.value)")
    assert marked == [p["name"] for p in catalog["pipes"] if p["name"] not in models["web-flux"]["pipes"]]

    open_session(d, "web-flux", "prompt2image", model="web-flux")
    shown = d.execute_script(SHOWN_JS)
    assert not {"clip_skip", "timestep_spacing"} & set(shown), shown
    assert {"true_cfg_scale", "max_sequence_length", "negative_prompt", "scheduler"} <= set(shown), shown
    assert d.execute_script(OPTIONS_JS, "scheduler") == [""] + flux["schedulers"]
    sizes = d.execute_script(OPTIONS_JS, "size")
    assert sizes == ["64x64"] + ["x".join(map(str, s)) for s in flux["aspect_sizes"]] + ["custom"], sizes
    value = lambda k: d.find_element(By.ID, k).get_attribute("value")  # noqa: E731
    assert value("size") == "64x64" and value("width") == "64"
    assert (value("steps"), value("guidance_scale")) == (str(flux["param_defaults"]["steps"]),
                                                         str(flux["param_defaults"]["guidance_scale"]))
    assert "FLUX" in d.find_element(By.ID, "true_cfg_scale").get_attribute("title")  # the parameter's families
    assert d.execute_script(LABELS_JS) == []
    shoot(d, "12-family-flux", WIDE, scroll_to="#job-title")
    shoot(d, "12-family-flux", NARROW, scroll_to="#advanced")
    viewport(d, WIDE)

    # a Flux job with a flow scheduler and its own parameter reaches the server and runs
    set_value(d, "prompt", "a flux job")
    set_value(d, "steps", "2")
    Select(d.find_element(By.ID, "scheduler")).select_by_value("flow_euler_stochastic")
    d.execute_script("document.getElementById('advanced').open = true")
    set_value(d, "true_cfg_scale", "1.5")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    params = srv.api("GET", f"jobs/{job_id}")["job"]["params"]
    assert params["scheduler"] == "flow_euler_stochastic" and params["true_cfg_scale"] == 1.5, params
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-state")
         in ("succeeded", "failed"), 120, "the Flux job to finish")
    assert srv.api("GET", f"jobs/{job_id}")["job"]["state"] == "succeeded"

    # an SD-style name (a stale page, a hand-made request) is the server's 400, shown at the scheduler
    d.execute_script("const s = document.getElementById('scheduler'); s.add(new Option('euler_a', 'euler_a'));"
                     "s.value = 'euler_a'")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_element(By.ID, "err-scheduler").text, 10, "scheduler error")
    assert "flow_euler" in d.find_element(By.ID, "err-scheduler").text
    assert len(d.find_elements(By.CSS_SELECTOR, "#job-list li")) == 1, "the refused job is not queued"

    # an SD session shows SD's fields, schedulers and sizes
    open_session(d, "web-sd", "prompt2image", model="tiny-sd")
    shown = d.execute_script(SHOWN_JS)
    assert {"clip_skip", "timestep_spacing"} <= set(shown) and not {"true_cfg_scale", "max_sequence_length"} & set(shown)
    schedulers = d.execute_script(OPTIONS_JS, "scheduler")
    assert schedulers == [""] + sd["schedulers"] and "flow_euler" not in schedulers
    assert "512x768" in d.execute_script(OPTIONS_JS, "size")

    # a pipe the model's family does not run: the session is refused, the message next to the pipe
    pairs = [(m, p["name"]) for m in models.values() for p in catalog["pipes"] if m["family"] and p["name"] not in m["pipes"]]
    if pairs:  # only when the configured families leave some pipe out
        model, pipe = pairs[0]
        Select(d.find_element(By.ID, "model")).select_by_value(model["name"])
        Select(d.find_element(By.ID, "pipe")).select_by_value(pipe)
        d.find_element(By.ID, "open-session").click()
        wait(d, lambda d: d.find_element(By.ID, "err-pipe").text, 10, "pipe error")
        assert pipe in d.find_element(By.ID, "err-pipe").text


def test_styles_picker_sends_the_chosen_styles_in_order(server: Server, browser: Any):
    """The job form lists the server's styles (GET /api/v1/styles, and `random`), each titled with its prompt;
    two picked with the keyboard go into the job's `styles` in the order picked; "use again" brings them back."""
    d = browser
    library = server.api("GET", "styles")["styles"]
    assert len(library) >= 100
    load_page(d, server)
    open_session(d, "web-styles", "prompt2image")
    options = d.execute_script("return [...document.querySelectorAll('#style-options option')]"
                               ".map(o => [o.value, o.title])")
    assert len(options) == len(library) + 1 >= 101 and options[0][0] == "random"
    assert options[1:] == [[s["name"], s["prompt"]] for s in library]
    assert d.find_element(By.ID, "styles").is_displayed() and d.execute_script(LABELS_JS) == []
    first, second = library[7]["name"], library[3]["name"]  # not in the library's order
    box = d.find_element(By.ID, "styles")
    box.send_keys(first.upper(), Keys.ENTER)  # names are case-insensitive; Enter adds, it does not queue
    box.send_keys("no such style", Keys.ENTER)
    assert "no such style" in d.find_element(By.ID, "err-styles").text
    box.clear()
    box.send_keys(second)
    d.find_element(By.ID, "style-add").click()
    chips = lambda d: [li.get_attribute("data-style") for li in d.find_elements(By.CSS_SELECTOR, "#style-chips li")]  # noqa: E731
    assert chips(d) == [first, second], (d.find_element(By.ID, "err-styles").text, box.get_attribute("value"))
    assert d.find_element(By.CSS_SELECTOR, "#style-chips li").get_attribute("title") == library[7]["prompt"]
    assert not d.find_elements(By.CSS_SELECTOR, "#job-list li") and d.execute_script(LABELS_JS) == []
    shoot(d, "13-styles", WIDE, scroll_to="#job-title")
    shoot(d, "13-styles", NARROW, scroll_to="#styles")
    viewport(d, WIDE)
    set_value(d, "prompt", "a styled lighthouse")
    set_value(d, "steps", "2")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    assert server.api("GET", f"jobs/{job_id}")["job"]["params"]["styles"] == [first, second]

    # "use these parameters again" refills the chosen styles, in order; a removed chip is left out
    d.find_element(By.CSS_SELECTOR, "#style-chips li button").click()
    assert chips(d) == [second]
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .thumb"), 120, "the thumbnail")
    d.find_element(By.CSS_SELECTOR, "#gallery .thumb").click()
    wait(d, lambda d: "a styled lighthouse" in d.find_element(By.ID, "image-params").text, 20, "parameters")
    d.find_element(By.ID, "reuse-params").click()
    wait(d, lambda d: d.find_element(By.ID, "image-dialog").get_attribute("open") is None, 10, "dialog closed")
    assert chips(d) == [first, second]
