// The server's description of the job parameters (GET /api/v1/models, else its OpenAPI job schema): which
// form fields a pipe and a model family show, and the ranges and help texts those fields get from it.

// the fields every job shows
export const JOB_FIELDS = ["prompt", "negative_prompt", "count", "seeds", "styles"];

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
      names.add(p.image ? (p.name === "mask" || p.name === "image_painted" ? "mask"
        : p.name === "image_prompts" ? p.name : "images") : p.name);
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
export function sizeLabel([w, h]) { return `${w} × ${h}${w > h ? " landscape" : w < h ? " portrait" : ""}`; }

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
export function applyParam(input, p) {
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
export function variants(prop) { return prop ? [prop, ...(prop.anyOf || []), ...(prop.oneOf || [])] : []; }

/** Set an <input type=number>'s min/max/step from the job schema, so the browser's spinner keeps to them. */
export function applyLimits(input, prop) {
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

/**
 * The form fields a session's model leaves out (its entry in GET /api/v1/models): the image prompts where no
 * IP-Adapter serves it (`ip_adapter` null), the refiner switch where it has no `refiner`, and the upscaler
 * choice where no upscaler model is configured (`upscalers` empty: lanczos is all there is).
 */
export function modelHides(model, upscalers) {
  const out = [];
  if (!model || !model.ip_adapter) out.push("image_prompts", "image_prompt_weights", "image_prompt_stop_at");
  if (!model || !model.refiner) out.push("refiner_switch");
  if (!upscalers || !upscalers.length) out.push("upscaler");
  return out;
}
