// The job form: which fields a pipe takes, reading them into a job request, the upload and the
// mask, showing the server's errors next to the field they name, and "use these parameters again".

import { api, ApiError } from "./api.js";
import { MaskPainter } from "./mask.js";

// What each pipe class takes, used when the OpenAPI document has no job schema for the pipe.
const IMAGE = ["images", "strength"];
const FIXED_PARAMS = {
  Prompt2ImPipe: [],
  Im2ImPipe: IMAGE,
  MaskedIm2ImPipe: [...IMAGE, "mask"],
  InpaintingPipe: [...IMAGE, "mask"],
  Cond2ImPipe: ["images", "control"],
  CIm2ImPipe: [...IMAGE, "control", "ctypes"],
};
const COMMON = ["prompt", "negative_prompt", "count", "seeds", "width", "height", "steps",
  "guidance_scale", "scheduler"];
const MASK_REQUIRED = new Set(["MaskedIm2ImPipe", "InpaintingPipe"]);
// the "Advanced" section: shown only for the parameters the pipe's job schema has; empty = pipe default
const ADVANCED_NUMBERS = ["clip_skip", "scale", "blur", "blur_compose", "control_guidance_start",
  "control_guidance_end"];
const ADVANCED_CHOICES = ["timestep_spacing"];
const ADVANCED_FLAGS = ["guess_mode"];
const ADVANCED = [...ADVANCED_NUMBERS, ...ADVANCED_CHOICES, ...ADVANCED_FLAGS];
// the pipe ids of config/models.yaml, for a server that lists pipes by id only
const CLASS_OF = {
  prompt2image: "Prompt2ImPipe", image2image: "Im2ImPipe", masked_image2image: "MaskedIm2ImPipe",
  inpainting: "InpaintingPipe", cond2image: "Cond2ImPipe", cimage2image: "CIm2ImPipe",
};
// API parameter → the element that shows its error
const ERROR_SLOT = { image: "images", fimage: "images", original_image: "images", image_painted: "mask",
  ctypes: "control", cscales: "control", cscale: "control", ctype: "control" };

const $ = (id) => document.getElementById(id);

/** The parameter names a pipe's job form shows (OpenAPI job schema first, else the fixed table). */
export function pipeParams(pipe, openapi) {
  const cls = pipe.classname || CLASS_OF[pipe.id] || "Prompt2ImPipe";
  const schema = (pipe.schema && openapi && resolveRef(openapi, { $ref: pipe.schema }))
    || findJobSchema(openapi, pipe.id, cls);
  if (schema && schema.properties) {
    const names = new Set(Object.keys(schema.properties));
    if (names.has("image") || names.has("images")) names.add("images");
    return { names, schema, source: "openapi" };
  }
  return { names: new Set([...COMMON, ...(FIXED_PARAMS[cls] || [])]), schema: null, source: "table" };
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

function findJobSchema(openapi, pipeId, cls) {
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
    this.params = new Set(COMMON);
    this.uploadId = null;
    this.model = null;  // the model whose size and defaults the form shows
    this.painter = new MaskPainter($("mask-canvas"), $("brush"));
    $("size").addEventListener("change", () => this.applySize());
    for (const id of ["width", "height"]) $(id).addEventListener("input", () => this.syncSize());
    $("mask-all").addEventListener("click", () => this.painter.fill());
    $("mask-clear").addEventListener("click", () => this.painter.clear());
    $("mask-invert").addEventListener("click", () => this.painter.invert());
    $("image").addEventListener("change", () => this.upload());
  }

  /** Show the fields of this pipe; enable the form. */
  configure(pipe, openapi, schedulers, maxCount) {
    const { names, schema } = pipeParams(pipe, openapi);
    this.params = names;
    this.clearErrors();  // another session's errors do not belong to this one
    // masked pipes need a mask; for the others (ControlNet "inpaint") it is optional
    const cls = pipe.classname || CLASS_OF[pipe.id];
    this.maskRequired = MASK_REQUIRED.has(cls);
    $("mask-label").textContent = this.maskRequired ? "Mask (paint the part to regenerate)"
      : "Mask, optional (paint the part to regenerate)";
    for (const el of document.querySelectorAll("#job-form [data-param]")) {
      el.hidden = !names.has(el.dataset.param);
    }
    $("size").closest(".field").hidden = !names.has("width");
    const props = (schema && schema.properties) || {};
    for (const k of ADVANCED_NUMBERS) if (names.has(k)) applyLimits($(k), props[k]);
    const spacing = variants(props.timestep_spacing).find((v) => Array.isArray(v.enum));
    if (spacing) {
      const sel = $("timestep_spacing");
      const keepSpacing = sel.value;
      sel.replaceChildren(new Option("default", ""), ...spacing.enum.map((v) => new Option(v, v)));
      sel.value = spacing.enum.includes(keepSpacing) ? keepSpacing : "";
    }
    $("advanced").hidden = !ADVANCED.some((k) => names.has(k));
    $("mask-canvas").closest(".field").hidden = !names.has("mask");
    // pipes that compute their condition from the input image take a condition type
    $("ctype-field").hidden = !(names.has("ctypes") || pipe.classname === "CIm2ImPipe");
    const sel = $("scheduler");
    const keep = sel.value;
    sel.replaceChildren(new Option("pipe default", ""), ...schedulers.map((s) => new Option(s, s)));
    sel.value = schedulers.includes(keep) ? keep : "";
    const count = schema && schema.properties && schema.properties.count;
    const max = (count && count.maximum) || maxCount;
    if (max) $("count").max = String(max); else $("count").removeAttribute("max");
    $("job-fields").disabled = false;
  }

  disable() { $("job-fields").disabled = true; }

  /**
   * A session on another model: its native size and its defaults (models.yaml) fill the form; what the
   * user typed stays while the model stays the same.
   */
  applyModel(model) {
    if (this.model === model.id) return;
    this.model = model.id;
    const defaults = model.defaults || {};
    if (model.native_size) {  // the server's: defaults width/height, else read from the model's configs
      [$("width").value, $("height").value] = model.native_size.map(String);
      this.syncSize();
    }
    for (const k of ["steps", "guidance_scale"]) {
      const el = $(k);
      el.value = defaults[k] !== undefined ? String(defaults[k]) : el.defaultValue;
    }
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
    this.syncSize();
    this.clearErrors();
  }
}
