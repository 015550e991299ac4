// The job form: which fields a pipe takes, reading them into a job request, the upload and the
// mask, showing the server's errors next to the field they name, and "use these parameters again".

import { api, ApiError } from "./api.js";
import { MaskPainter } from "./mask.js";

// What a pipe takes, its ranges and help texts come from the server: GET /api/v1/models lists each
// pipe's parameters (the server's parameter spec, with its limits applied); the page declares none.
const JOB_FIELDS = ["prompt", "negative_prompt", "count", "seeds", "styles"];
// the reserved style name: one style drawn from each image's seed
const RANDOM_STYLE = "random";
// form fields that are number inputs named as the parameter they set
const NUMBER_FIELDS = ["width", "height", "steps", "guidance_scale", "strength"];
// the "Advanced" section: shown only for the parameters the pipe takes; empty = pipe default
const ADVANCED_NUMBERS = ["clip_skip", "scale", "blur", "blur_compose", "full_res_padding", "control_guidance_start",
  "control_guidance_end", "true_cfg_scale", "max_sequence_length"];
const ADVANCED_CHOICES = ["timestep_spacing"];
const ADVANCED_FLAGS = ["guess_mode", "full_res"];
const ADVANCED = [...ADVANCED_NUMBERS, ...ADVANCED_CHOICES, ...ADVANCED_FLAGS];
// API parameter → the element that shows its error
const ERROR_SLOT = { image: "images", fimage: "images", original_image: "images", image_painted: "mask",
  ctypes: "control", cscales: "control", cscale: "control", ctype: "control" };

const $ = (id) => document.getElementById(id);

/**
 * The form fields a pipe's job shows, and the server's description of each parameter ({name, type,
 * min, max, default, unit, description, image, choices?}) by name. From the pipe's `params` in
 * GET /api/v1/models; a server without them is read from its OpenAPI job schema instead.
 */
export function pipeParams(pipe, openapi) {
  if (Array.isArray(pipe.params)) {
    const names = new Set(JOB_FIELDS);
    const info = {};
    for (const p of pipe.params) {
      info[p.name] = p;
      // images are uploaded; a mask (or the painted copy) is painted on the mask canvas
      names.add(p.image ? (p.name === "mask" || p.name === "image_painted" ? "mask" : "images") : p.name);
    }
    if (names.has("cscales")) names.add("control");  // scales (and types) go in `control`
    return { names, info, schema: null, source: "models" };
  }
  const schema = (pipe.schema && openapi && resolveRef(openapi, { $ref: pipe.schema }))
    || findJobSchema(openapi, pipe.id, pipe.classname);
  if (schema && schema.properties) {
    const names = new Set(Object.keys(schema.properties));
    if (names.has("image") || names.has("images")) names.add("images");
    return { names, info: {}, schema, source: "openapi" };
  }
  return { names: new Set(JOB_FIELDS), info: {}, schema: null, source: "none" };
}

/**
 * The form fields a model family leaves out (its entry in GET /api/v1/models `families`): the parameters
 * it refuses (clip_skip and timestep_spacing on flow-matching families, other families' own parameters),
 * the negative prompt where its pipelines use none, the scheduler where it offers no choice.
 */
export function familyHides(family) {
  if (!family) return [];
  const out = [...(family.refused_params || [])];
  if (family.negative_prompt === false) out.push("negative_prompt");
  if (Array.isArray(family.schedulers) && family.schedulers.length === 0) out.push("scheduler");
  return out;
}

/** A size as the size list shows it: "832 × 1216 portrait". */
function sizeLabel([w, h]) { return `${w} × ${h}${w > h ? " landscape" : w < h ? " portrait" : ""}`; }

/** A parameter's help text: the server's description, range, unit and default. */
export function helpText(p) {
  const bound = (v, open) => `${v}${open ? " (exclusive)" : ""}`;
  const range = p.min != null && p.max != null ? `${bound(p.min, p.exclusive_min)} to ${bound(p.max, p.exclusive_max)}`
    : p.min != null ? `${bound(p.min, p.exclusive_min)} or more` : p.max != null ? `at most ${p.max}` : "";
  // which model families alone take it, or refuse it (the server's, from the families' declarations)
  const families = Array.isArray(p.families) && `only for model types ${p.families.join(", ")}`;
  const refused = Array.isArray(p.refused_by) && p.refused_by.length && `not for model types ${p.refused_by.join(", ")}`;
  return [p.description, range && `range ${range}${p.unit ? " " + p.unit : ""}`,
    p.default != null && p.default !== "" && `default ${p.default}`, families, refused].filter(Boolean).join("; ");
}

/** Set a number input's min/max/step and help from the server's description of its parameter. */
function applyParam(input, p) {
  if (!input || !p) return;
  for (const [attr, v] of [["min", p.min], ["max", p.max]]) {
    if (v === null || v === undefined) input.removeAttribute(attr); else input.setAttribute(attr, String(v));
  }
  if (p.type === "int") input.step = "1";
  input.title = helpText(p);
  // an empty advanced field keeps the pipe's default: show which
  if (input.closest("#advanced") && p.default != null) input.placeholder = String(p.default);
}

/** A schema property's alternatives ({anyOf: [{type: "integer", ...}, {type: "null"}]} or the property). */
function variants(prop) { return prop ? [prop, ...(prop.anyOf || []), ...(prop.oneOf || [])] : []; }

/** Set an <input type=number>'s min/max/step from the job schema, so the browser's spinner keeps to them. */
function applyLimits(input, prop) {
  for (const v of variants(prop)) {
    if (v.type !== "number" && v.type !== "integer") continue;
    if (v.minimum !== undefined) input.min = String(v.minimum);
    if (v.maximum !== undefined) input.max = String(v.maximum);
    if (v.type === "integer") input.step = "1";
    return;
  }
}

function norm(s) { return String(s || "").toLowerCase().replace(/[^a-z0-9]/g, ""); }

function resolveRef(openapi, s) {
  const seen = new Set();
  while (s && s.$ref && !seen.has(s.$ref)) {
    seen.add(s.$ref);
    s = s.$ref.split("/").slice(1).reduce((o, k) => (o ? o[k] : undefined), openapi);
  }
  return s;
}

function findJobSchema(openapi, pipeId, cls) {  // a server whose /models names no schema
  const schemas = openapi && openapi.components && openapi.components.schemas;
  if (!schemas) return null;
  const keys = [norm(pipeId), norm(cls)].filter(Boolean);
  for (const [name, s] of Object.entries(schemas)) {
    const n = norm(name) + " " + norm(s.title);
    if (!n.includes("job")) continue;
    if (keys.some((k) => norm(name).includes(k) || norm(s.title).includes(k))) {
      const r = resolveRef(openapi, s);
      if (r && r.properties && "prompt" in r.properties) return r;
    }
  }
  return null;
}

export class JobForm {
  constructor() {
    this.params = new Set(JOB_FIELDS);
    this.uploadId = null;
    this.model = null;  // the model whose size and defaults the form shows
    this.painter = new MaskPainter($("mask-canvas"), $("brush"));
    $("size").addEventListener("change", () => this.applySize());
    for (const id of ["width", "height"]) $(id).addEventListener("input", () => this.syncSize());
    $("mask-all").addEventListener("click", () => this.painter.fill());
    $("mask-clear").addEventListener("click", () => this.painter.clear());
    $("mask-invert").addEventListener("click", () => this.painter.invert());
    $("image").addEventListener("change", () => this.upload());
    this.styles = [];  // the server's styles (GET /api/v1/styles): {name, prompt, negative_prompt, source}
    this.chosenStyles = [];  // the names picked, in the order they apply
    this.maxStyles = 16;  // the server's limit, from its description of `styles`
    $("style-add").addEventListener("click", () => this.addStyle());
    $("styles").addEventListener("keydown", (e) => {  // Enter adds the typed style instead of queueing
      if (e.key === "Enter" && $("styles").value.trim()) { e.preventDefault(); this.addStyle(); }
    });
  }

  /** The server's style library: the suggestions of the styles field ("random" first), each titled with its prompt. */
  setStyles(styles) {
    this.styles = Array.isArray(styles) ? styles : [];
    const option = (name, prompt) => {
      const o = document.createElement("option");
      o.value = name;
      o.label = prompt.length > 70 ? prompt.slice(0, 69) + "…" : prompt;
      o.title = prompt;
      return o;
    };
    $("style-options").replaceChildren(option(RANDOM_STYLE, "one of the styles, drawn from each image's seed"),
      ...this.styles.map((st) => option(st.name, st.prompt || "")));
    $("styles-field").hidden = $("styles-field").hidden || !this.styles.length;
  }

  /** A typed style name as the server spells it (names are case-insensitive), or null for none. */
  styleName(typed) {
    const key = String(typed || "").trim().toLowerCase();
    if (key === RANDOM_STYLE) return RANDOM_STYLE;
    const st = this.styles.find((x) => x.name.toLowerCase() === key);
    return st ? st.name : null;
  }

  /** Add the style typed in the styles field after those chosen. */
  addStyle() {
    const input = $("styles");
    const typed = input.value.trim();
    $("err-styles").textContent = "";
    input.removeAttribute("aria-invalid");
    if (!typed) return;
    const name = this.styleName(typed);
    let message = null;
    if (!name) message = `no style is called "${typed}": pick one from the list`;
    else if (name !== RANDOM_STYLE && this.chosenStyles.includes(name)) message = `${name} is chosen already`;
    else if (this.chosenStyles.length >= this.maxStyles) message = `a job takes at most ${this.maxStyles} styles`;
    if (message) { this.showError({ field: "styles", message }); return; }
    this.chosenStyles.push(name);
    input.value = "";
    this.renderStyles();
  }

  /** The chosen styles as chips, in order, each with its prompt as title and a remove button. */
  renderStyles() {
    $("style-chips").replaceChildren(...this.chosenStyles.map((name, i) => {
      const li = document.createElement("li");
      li.dataset.style = name;
      const st = this.styles.find((x) => x.name === name);
      li.title = name === RANDOM_STYLE ? "one style drawn from each image's seed" : (st && st.prompt) || "";
      const label = document.createElement("span");
      label.textContent = name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove style ${i + 1}, ${name}`);
      remove.addEventListener("click", () => {
        this.chosenStyles.splice(i, 1);
        this.renderStyles();
        const next = $("style-chips").querySelectorAll("button")[Math.min(i, this.chosenStyles.length - 1)];
        (next || $("styles")).focus();
      });
      li.append(label, remove);
      return li;
    }));
  }

  /**
   * Show the fields of this pipe with the server's ranges and help texts; enable the form.
   * `jobParams`: the job-level fields of GET /api/v1/models (count, seeds, priority). `family`: the
   * session model's family from GET /api/v1/models: the fields it refuses are hidden and the scheduler
   * list is its own (`schedulers`: the server's general list, for a server that names no family).
   */
  configure(pipe, openapi, schedulers, maxCount, jobParams = [], family = null) {
    const { names, info, schema } = pipeParams(pipe, openapi);
    for (const k of familyHides(family)) names.delete(k);
    if (family && Array.isArray(family.schedulers)) schedulers = family.schedulers;
    this.params = names;
    this.clearErrors();  // another session's errors do not belong to this one
    // a mask is required where the pipe cannot run without one (its required images name it)
    this.maskRequired = ((pipe.images && pipe.images.required) || []).some((group) => group.includes("mask"));
    $("mask-label").textContent = this.maskRequired ? "Mask (paint the part to regenerate)"
      : "Mask, optional (paint the part to regenerate)";
    for (const el of document.querySelectorAll("#job-form [data-param]")) {
      el.hidden = !names.has(el.dataset.param);
    }
    $("size").closest(".field").hidden = !names.has("width");
    const props = (schema && schema.properties) || {};
    for (const k of [...NUMBER_FIELDS, ...ADVANCED_NUMBERS]) {
      if (names.has(k)) { if (info[k]) applyParam($(k), info[k]); else applyLimits($(k), props[k]); }
    }
    applyParam($("cscale"), info.cscales);
    for (const k of ["scheduler", "guess_mode", "full_res", "lpw"]) if (info[k] && $(k)) $(k).title = helpText(info[k]);
    const spacing = (info.timestep_spacing && info.timestep_spacing.choices)
      || (variants(props.timestep_spacing).find((v) => Array.isArray(v.enum)) || {}).enum;
    if (spacing) {
      const sel = $("timestep_spacing");
      const keepSpacing = sel.value;
      sel.replaceChildren(new Option("default", ""), ...spacing.map((v) => new Option(v, v)));
      sel.value = spacing.includes(keepSpacing) ? keepSpacing : "";
      if (info.timestep_spacing) sel.title = helpText(info.timestep_spacing);
    }
    $("advanced").hidden = !ADVANCED.some((k) => names.has(k));
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
    if (styles) { $("styles").title = helpText(styles); if (styles.max_items) this.maxStyles = styles.max_items; }
    if (!this.styles.length) $("styles-field").hidden = true;  // a server without a style library
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

  async upload() {
    this.clearErrors();
    this.uploadId = null;
    const file = $("image").files[0];
    if (!file) return;
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.alt = "";
    await new Promise((ok, fail) => { img.onload = ok; img.onerror = fail; img.src = url; })
      .catch(() => this.showError({ field: "images", message: "this file is not an image the browser can read" }));
    if (img.naturalWidth) this.painter.setImage(img);
    const fd = new FormData();
    fd.append("file", file, file.name);
    try {
      const { upload } = await api("POST", "uploads", fd);
      this.uploadId = upload.id;
      $("image").dataset.uploadId = upload.id;
    } catch (err) {
      this.showError(err instanceof ApiError ? Object.assign(err, { field: err.field || "images" }) : err);
    }
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
      if (this.chosenStyles.length) body.styles = [...this.chosenStyles];
    }
    for (const k of ADVANCED_NUMBERS) {
      if (p.has(k)) { const v = num(k); if (v !== undefined) body[k] = v; }
    }
    for (const k of ADVANCED_CHOICES) if (p.has(k) && $(k).value) body[k] = $(k).value;
    for (const k of ADVANCED_FLAGS) if (p.has(k) && $(k).value) body[k] = $(k).value === "true";
    if (p.has("images")) {
      if (!this.uploadId) throw { field: "images", message: "choose an input image (PNG, JPEG or WebP)" };
      body.images = [this.uploadId];
    }
    if (p.has("control")) {
      const scale = num("cscale");
      const entry = { scale: scale === undefined ? 1 : scale };
      if (!$("ctype-field").hidden) entry.type = $("ctype").value;
      body.control = [entry];
    }
    if (p.has("mask") && (this.maskRequired || this.painter.isPainted())) {
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
    // advanced parameters: what the job gave, else empty (the pipe's default)
    for (const k of ADVANCED) {
      const v = given[k];
      const el = $(k);
      if (ADVANCED_FLAGS.includes(k)) el.value = typeof v === "boolean" ? String(v) : "";
      else if (ADVANCED_CHOICES.includes(k)) el.value = [...el.options].some((o) => o.value === v) ? v : "";
      else el.value = typeof v === "number" ? v : "";
    }
    if (ADVANCED.some((k) => given[k] !== undefined && given[k] !== null)) $("advanced").open = true;
    // the styles the job named, in order (`random` stays random: the seed draws the same one again)
    this.chosenStyles = (Array.isArray(given.styles) ? given.styles : []).map((n) => this.styleName(n) || n);
    $("styles").value = "";
    this.renderStyles();
    this.syncSize();
    this.clearErrors();
  }
}
