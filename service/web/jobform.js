// The job form: which fields a pipe and model take, reading them into a job request, showing the server's
// errors next to the field they name, and "use these parameters again". The Advanced section (advanced.js), the
// uploads (uploads.js), the style picker (styles.js) and the server's parameter descriptions (params.js) are
// their own modules.

import { AdvancedFields } from "./advanced.js";
import { MaskPainter } from "./mask.js";
import { JOB_FIELDS, applyLimits, applyParam, familyHides, helpText, modelHides, pipeParams, sizeLabel,
  variants } from "./params.js";
import { StylePicker } from "./styles.js";
import { Uploads } from "./uploads.js";

// What a pipe takes, its ranges and help texts come from the server: GET /api/v1/models lists each
// pipe's parameters (the server's parameter spec, with its limits applied); the page declares none.
// form fields that are number inputs named as the parameter they set
const NUMBER_FIELDS = ["width", "height", "steps", "guidance_scale", "strength"];
// the "Advanced" section's fields by kind (advanced.js shows them in their groups, index.html's fieldsets): shown
// only for the parameters the pipe and model take; empty = the pipe's default
const ADVANCED_NUMBERS = [
  "clip_skip", "true_cfg_scale", "max_sequence_length",  // sampling
  // quality switches (docs/features.md "Quality switches"): FreeU's factors, sharpness, guidance rescale, refiner
  "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2", "sharpness", "guidance_rescale", "refiner_switch",
  "scale", "upscale_factor", "blur", "blur_compose", "full_res_padding",  // the input image and mask
  "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom", "outpaint_seam",  // outpaint (px)
  "image_prompt_weights", "image_prompt_stop_at",  // one weight and stop-at for all the image prompts
  "control_guidance_start", "control_guidance_end",  // ControlNet
  "priority"];
// selects of choices ("" = default); uov: upscale or vary, upscaler: its model (the configured ones)
const ADVANCED_CHOICES = ["timestep_spacing", "uov", "upscaler"];
// on/off selects ("" = default)
const ADVANCED_FLAGS = ["lpw", "vae_tiling", "freeu", "full_res", "guess_mode", "wildcards_in_order", "grid"];
// text inputs (empty: none): the inpaint prompt, the URL told when the job ends (docs/features.md)
const ADVANCED_TEXTS = ["inpaint_prompt", "webhook_url"];
// multiple selects (none chosen: none): the sides to outpaint
const ADVANCED_LISTS = ["outpaint"];
// the upscale modes of uov size the output from the input, so width and height are not sent with them; a
// strength left empty takes the mode's (choosing a mode empties it)
const UPSCALE_MODES = ["upscale", "upscale_fast"];
// API parameter → the element that shows its error
const ERROR_SLOT = { image: "images", fimage: "images", original_image: "images", image_painted: "mask",
  ctypes: "control", cscales: "control", cscale: "control", ctype: "control" };

const $ = (id) => document.getElementById(id);

export class JobForm {
  constructor() {
    this.params = new Set(JOB_FIELDS);
    this.model = null;  // the model whose size and defaults the form shows
    this.upscalers = [];  // the configured upscaler models (GET /api/v1/models `upscalers`)
    this.painter = new MaskPainter($("mask-canvas"), $("brush"));
    this.uploads = new Uploads(this.painter, this);
    this.stylePicker = new StylePicker((err) => this.showError(err));
    this.advanced = new AdvancedFields({ numbers: ADVANCED_NUMBERS, choices: ADVANCED_CHOICES, flags: ADVANCED_FLAGS,
      texts: ADVANCED_TEXTS, lists: ADVANCED_LISTS });
    $("size").addEventListener("change", () => this.applySize());
    for (const id of ["width", "height"]) $(id).addEventListener("input", () => this.syncSize());
    $("mask-all").addEventListener("click", () => this.painter.fill());
    $("mask-clear").addEventListener("click", () => this.painter.clear());
    $("mask-invert").addEventListener("click", () => this.painter.invert());
    $("uov").addEventListener("change", () => {  // the server applies the mode's strength when none is sent
      if ($("uov").value) { $("strength").value = ""; $("strength").placeholder = "the mode's"; }
    });
    // [[a, b]] arrays (the server's prompt_tools.py): how many images the prompt and count make, shown as typed
    for (const id of ["prompt", "count"]) $(id).addEventListener("input", () => this.showArrays());
  }

  /** The server's upscaler models (GET /api/v1/models `upscalers`) in the upscaler select. */
  setUpscalers(upscalers) {
    this.upscalers = upscalers || [];
    const names = this.upscalers.map((u) => u.name);
    $("upscaler").replaceChildren(new Option(names.length ? `default (${names[0]})` : "default (lanczos)", ""),
      ...names.map((n) => new Option(n, n)), new Option("lanczos (no model)", "lanczos"));
  }

  /** The server's style library (GET /api/v1/styles) in the style picker. */
  setStyles(styles) { this.stylePicker.setStyles(styles); }

  /**
   * Show the fields of this pipe with the server's ranges and help texts; enable the form.
   * `jobParams`: the job-level fields of GET /api/v1/models (count, seeds, priority). `family`: the
   * session model's family from GET /api/v1/models: the fields it refuses are hidden and the scheduler
   * list is its own (`schedulers`: the server's general list, for a server that names no family). `model`: the
   * session's model from GET /api/v1/models: the image prompts without its IP-Adapter, the refiner switch without
   * its refiner and the upscaler choice without configured upscalers are hidden (params.js `modelHides`).
   */
  configure(pipe, openapi, schedulers, maxCount, jobParams = [], family = null, model = null) {
    const { names, info, schema } = pipeParams(pipe, openapi);
    // every job takes the job-level parameters (priority, styles...): their ranges and help come from the server too
    for (const jp of jobParams) { names.add(jp.name); if (!info[jp.name]) info[jp.name] = jp; }
    for (const k of [...familyHides(family), ...(model ? modelHides(model, this.upscalers) : [])]) names.delete(k);
    if (family && Array.isArray(family.schedulers)) schedulers = family.schedulers;
    this.params = names;
    if (info.image_prompts && info.image_prompts.max_items) this.uploads.maxImagePrompts = info.image_prompts.max_items;
    this.clearErrors();  // another session's errors do not belong to this one
    // a mask is required where the pipe cannot run without one (its required images name it)
    // (or another member of its group, such as an outpaint distance: see request())
    this.maskGroup = ((pipe.images && pipe.images.required) || []).find((group) => group.includes("mask")) || null;
    this.maskRequired = Boolean(this.maskGroup);
    $("mask-label").textContent = !this.maskRequired ? "Mask, optional (paint the part to regenerate)"
      : this.maskGroup.length > 1 ? "Mask (paint the part to regenerate; optional with an outpaint)"
        : "Mask (paint the part to regenerate)";
    for (const el of document.querySelectorAll("#job-form [data-param]")) {
      el.hidden = !names.has(el.dataset.param);
    }
    $("size").closest(".field").hidden = !names.has("width");
    const props = (schema && schema.properties) || {};
    for (const k of NUMBER_FIELDS) {
      if (names.has(k)) { if (info[k]) applyParam($(k), info[k]); else applyLimits($(k), props[k]); }
    }
    applyParam($("cscale"), info.cscales);
    if (info.image_prompts) $("image_prompts").title = helpText(info.image_prompts);
    if (info.scheduler) $("scheduler").title = helpText(info.scheduler);
    this.advanced.configure(names, info, props, { ...((family && family.param_defaults) || {}),
      ...((model && model.defaults) || {}) });
    const spacing = (info.timestep_spacing && info.timestep_spacing.choices)
      || (variants(props.timestep_spacing).find((v) => Array.isArray(v.enum)) || {}).enum;
    if (spacing) {
      const sel = $("timestep_spacing");
      const keepSpacing = sel.value;
      sel.replaceChildren(new Option("default", ""), ...spacing.map((v) => new Option(v, v)));
      sel.value = spacing.includes(keepSpacing) ? keepSpacing : "";
      if (info.timestep_spacing) sel.title = helpText(info.timestep_spacing);
    }
    $("mask-canvas").closest(".field").hidden = !names.has("mask");
    // pipes that compute their condition from the input image take condition types: the server's
    $("ctype-field").hidden = !names.has("ctypes");
    if (info.ctypes && info.ctypes.choices) {
      const sel = $("ctype");
      const keepType = sel.value;
      const labels = Object.fromEntries([...sel.options].map((o) => [o.value, o.textContent]));
      sel.replaceChildren(...info.ctypes.choices.map((c) => new Option(labels[c] || c, c)));
      if (info.ctypes.choices.includes(keepType)) sel.value = keepType;
      sel.title = helpText(info.ctypes);
    }
    const sel = $("scheduler");
    const keep = sel.value;
    sel.replaceChildren(new Option("pipe default", ""), ...schedulers.map((s) => new Option(s, s)));
    sel.value = schedulers.includes(keep) ? keep : "";
    const count = jobParams.find((p) => p.name === "count");
    if (count) applyParam($("count"), count);
    else {
      const prop = schema && schema.properties && schema.properties.count;
      const max = (prop && prop.maximum) || maxCount;
      if (max) $("count").max = String(max); else $("count").removeAttribute("max");
    }
    const seeds = jobParams.find((p) => p.name === "seeds");
    if (seeds) $("seeds").title = helpText(seeds);
    const styles = jobParams.find((p) => p.name === "styles");
    if (styles) { $("styles").title = helpText(styles); if (styles.max_items) this.stylePicker.max = styles.max_items; }
    if (!this.stylePicker.styles.length) $("styles-field").hidden = true;  // a server without a style library
    $("job-fields").disabled = false;
  }

  disable() { $("job-fields").disabled = true; }

  /**
   * A session on another model: its native size and its defaults (models.yaml, else its family's) fill
   * the form, and the size list offers its family's trained sizes; what the user typed stays while the
   * model stays the same.
   */
  applyModel(model, family = null) {
    if (this.model === model.id) return;
    this.model = model.id;
    this.sizePresets(model, family);
    const defaults = { ...((family && family.param_defaults) || {}), ...(model.defaults || {}) };
    if (model.native_size) {  // the server's: defaults width/height, else read from the model's configs
      [$("width").value, $("height").value] = model.native_size.map(String);
    }
    this.syncSize();
    for (const k of ["steps", "guidance_scale"]) {
      const el = $(k);
      el.value = defaults[k] !== undefined ? String(defaults[k]) : el.defaultValue;
    }
  }

  /**
   * The size list: the model's own size, then the sizes its family was trained at (`aspect_sizes`), then
   * "Custom…"; the page's own list for a model of no known family.
   */
  sizePresets(model, family) {
    const sel = $("size");
    if (!this.pageSizes) this.pageSizes = [...sel.options].map((o) => [o.value, o.textContent]);
    const sizes = (family && family.aspect_sizes) || [];
    let options = this.pageSizes;
    if (sizes.length) {
      options = sizes.map((s) => [s.join("x"), sizeLabel(s)]);
      const own = model.native_size;
      if (own && !options.some(([v]) => v === own.join("x"))) options.unshift([own.join("x"), sizeLabel(own) + " (model)"]);
      options.push(["custom", "Custom…"]);
    }
    sel.replaceChildren(...options.map(([v, t]) => new Option(t, v)));
  }

  applySize() {
    const v = $("size").value;
    if (v === "custom") { $("width").focus(); return; }
    const [w, h] = v.split("x");
    $("width").value = w;
    $("height").value = h;
  }

  syncSize() {
    const v = $("width").value + "x" + $("height").value;
    const known = [...$("size").options].some((o) => o.value === v);
    $("size").value = known ? v : "custom";
  }

  /** "N combinations x count = M images" under the prompt when it holds [[a, b]] arrays (a comma inside). */
  showArrays() {
    const arrays = $("prompt").value.match(/\[\[[^\[\]]*,[^\[\]]*\]\]/g) || [];
    const n = arrays.reduce((k, a) => k * Math.max(1, a.slice(2, -2).split(",").filter((e) => e.trim()).length), 1);
    const count = Math.max(1, Number($("count").value) || 1);
    $("prompt-arrays").textContent = arrays.length ? `${n} combinations x count ${count} = ${n * count} images` : "";
  }

  /** Read the form into a job request body; throws {field, message} for what the page can check. */
  request() {
    const p = this.params;
    const body = {};
    const num = (id) => {
      const el = $(id);
      if (el.value.trim() === "") return undefined;
      const n = Number(el.value);
      if (!Number.isFinite(n)) throw { field: id, message: id + " must be a number" };
      return n;
    };
    body.prompt = $("prompt").value;
    if (p.has("negative_prompt") && $("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
    for (const k of ["count", "width", "height", "steps", "guidance_scale", "strength"]) {
      if (p.has(k)) { const v = num(k); if (v !== undefined) body[k] = v; }
    }
    if (p.has("seeds") && $("seeds").value.trim()) {
      const parts = $("seeds").value.split(/[\s,]+/).filter(Boolean);
      if (parts.some((s) => !/^-?\d+$/.test(s))) {
        throw { field: "seeds", message: "seeds must be whole numbers separated by commas" };
      }
      body.seeds = parts.map(Number);
    }
    if (p.has("scheduler") && $("scheduler").value) body.scheduler = $("scheduler").value;
    if (p.has("styles") && !$("styles-field").hidden) {
      if ($("styles").value.trim()) {
        throw { field: "styles", message: "press Enter or Add to add the style typed here, or clear it" };
      }
      if (this.stylePicker.chosen.length) body.styles = [...this.stylePicker.chosen];
    }
    this.advanced.read(body, num);
    if (UPSCALE_MODES.includes(body.uov)) { delete body.width; delete body.height; }
    if (p.has("images")) {
      if (!this.uploads.imageId) throw { field: "images", message: "choose an input image (PNG, JPEG or WebP)" };
      body.images = [this.uploads.imageId];
    }
    const prompts = this.uploads.imagePromptIds;
    if (p.has("image_prompts") && prompts.length) body.image_prompts = [...prompts];
    if (p.has("control")) {
      const scale = num("cscale");
      const entry = { scale: scale === undefined ? 1 : scale };
      if (!$("ctype-field").hidden) entry.type = $("ctype").value;
      body.control = [entry];
    }
    // the mask's group may be filled by another member instead (outpaint sides or distances)
    const maskNeeded = this.maskRequired && !this.maskGroup.some((n) => n !== "mask" && body[n]);
    if (p.has("mask") && (maskNeeded || this.painter.isPainted())) {
      if (!this.painter.isPainted()) {
        throw { field: "mask", message: "paint the region to regenerate on the image (or Paint all)" };
      }
      body.mask = this.painter.toDataURL();
    }
    return body;
  }

  clearErrors() {
    for (const el of document.querySelectorAll("#job-form .error")) el.textContent = "";
    for (const el of document.querySelectorAll("#job-form [aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  /** Put an error next to the field it names (a dotted path such as "body.steps" or "images.0"). */
  showError(err) {
    const path = String(err.field || "").split(/[.\[\]]/).filter(Boolean);
    let slot = null;
    for (const part of path) {
      const name = ERROR_SLOT[part] || part;
      if ($("err-" + name) && $("err-" + name).closest("#job-form")) { slot = name; break; }
    }
    const box = $(slot ? "err-" + slot : "err-job-form");
    box.textContent = err.message || String(err);
    if (slot) {
      const input = { mask: $("mask-canvas"), images: $("image"), control: $("cscale") }[slot] || $(slot);
      if (input) {
        input.setAttribute("aria-invalid", "true");
        const section = input.closest("details");
        if (section) section.open = true;  // an error in "Advanced" must not stay folded away
        if (input.closest("[hidden]")) { $("err-job-form").textContent = `${slot}: ${box.textContent}`; }
        else input.focus();
      }
    }
  }

  /**
   * Fill the form from an image's metadata ("use these parameters again"): the parameters the job
   * gave (``params``) first, then the top-level ones (prompt, seed), then what the pipe used.
   */
  fill(meta) {
    const used = meta.pipe_config || {};
    const given = meta.params || {};
    const pick = (k) => given[k] ?? meta[k] ?? used[k];
    const set = (id, v) => { if (v !== undefined && v !== null && $(id)) $(id).value = v; };
    const prompt = meta.prompt_grammar ?? pick("prompt");
    set("prompt", typeof prompt === "string" ? prompt : prompt && JSON.stringify(prompt));
    $("negative_prompt").value = pick("negative_prompt") || "";
    for (const k of ["width", "height", "steps", "guidance_scale", "strength"]) set(k, pick(k));
    if (meta.seed !== undefined) set("seeds", meta.seed);
    set("count", 1);
    // a scheduler the job did not name was the pipe's default: keep "pipe default"
    const sched = given.scheduler;
    $("scheduler").value = sched && [...$("scheduler").options].some((o) => o.value === sched) ? sched : "";
    this.advanced.fill(given);  // what the job gave, else empty (the pipe's default)
    this.stylePicker.fill(given.styles);  // the styles the job named, in order
    this.syncSize();
    this.clearErrors();
  }
}
