// The job form's performance and aspect-ratio selects (docs/features.md "Performance presets and aspect
// ratios"): the presets of the session model's family from GET /api/v1/presets, the common ratios each
// labelled with the size the server will pick (the family's nearest trained size), and what they change
// in a job request: a preset's values are left to the server unless the fields were changed, a ratio
// replaces width and height.

const $ = (id) => document.getElementById(id);
// the ratios offered (the server takes any W:H within the range its description gives)
const RATIOS = ["1:1", "4:3", "3:2", "16:9", "21:9", "3:4", "2:3", "9:16"];
// the form fields a preset's values are shown in (timestep_spacing is an Advanced choice)
const SHOWN = ["steps", "guidance_scale", "scheduler", "timestep_spacing", "true_cfg_scale"];

/** The family's trained size nearest to `ratio` in log space, as the server picks it (service/presets.py). */
export function nearestSize(ratio, family, model) {
  const sizes = (family && family.aspect_sizes) || [];
  if (!sizes.length) return null;
  const [rw, rh] = ratio.split(":").map(Number);
  const dist = (s) => Math.round(Math.abs(Math.log(s[0] / s[1]) - Math.log(rw / rh)) * 1e9);
  let best = sizes[0];
  for (const s of sizes) {
    const d = dist(s) - dist(best);
    if (d < 0 || (d === 0 && s[0] * s[1] > best[0] * best[1])) best = s;
  }
  const own = model && model.defaults;  // a declared size scales the family's list (by area)
  if (!own || !own.width || !own.height || (own.width === sizes[0][0] && own.height === sizes[0][1])) return best;
  // (the shorter side at least 64 px, the spec's minimum)
  const scale = Math.max(Math.sqrt((own.width * own.height) / (sizes[0][0] * sizes[0][1])), 64 / Math.min(...best));
  const m = family.size_multiple || 8;
  return best.map((x) => Math.max(m, Math.round((x * scale) / m) * m));
}

export class PresetPicker {
  constructor() {
    this.presets = [];  // GET /api/v1/presets: {family, name, description, sets, lora, source}
    this.family = null;
    this.modelId = null;
    $("performance").addEventListener("change", () => this.show());
    $("aspect_ratio").addEventListener("change", () => this.syncSize());
  }

  setPresets(presets) {
    this.presets = Array.isArray(presets) ? presets : [];
  }

  /** The selects for a session's model: its family's presets, the ratios labelled with their sizes. */
  applyFamily(model, family, jobParams = []) {
    this.family = family;
    const help = Object.fromEntries(jobParams.map((p) => [p.name, p.description]));
    for (const k of ["performance", "aspect_ratio"]) if (help[k]) $(k).title = help[k];
    if (help.aspect_ratio) $("aspect_ratio-help").textContent = help.aspect_ratio;  // its range, the server's words
    const own = this.presets.filter((p) => family && p.family === family.name);
    const keep = $("performance").value;
    $("performance").replaceChildren(new Option("Custom (the fields below)", ""), ...own.map((p) => {
      const o = new Option(p.name.replace(/_/g, " ") + (p.lora && !p.lora.configured ? " (without its LoRA)" : ""),
        p.name);
      o.title = `${p.description}; sets ${JSON.stringify(p.sets)}` + (p.lora ? `; LoRA ${p.lora.name}` +
        (p.lora.note ? ` (${p.lora.note})` : "") : "");
      return o;
    }));
    $("performance").value = own.some((p) => p.name === keep) ? keep : "";
    // another model's defaults just replaced the fields (JobForm.applyModel): the kept preset's values again
    if (this.modelId !== model.id) this.show();
    this.modelId = model.id;
    const ratio = $("aspect_ratio").value;
    $("aspect_ratio").replaceChildren(new Option("Size above", ""), ...RATIOS.map((r) => {
      const size = nearestSize(r, family, model);
      return new Option(size ? `${r} (${size[0]} × ${size[1]})` : r, r);
    }));
    $("aspect_ratio").value = ratio;
    this.syncSize();
  }

  current() {
    return this.presets.find((p) => this.family && p.family === this.family.name && p.name === $("performance").value);
  }

  /** Show the chosen preset's values in the form (sent only when changed: the job's own values win). */
  show() {
    const preset = this.current();
    if (!preset) return;
    for (const k of SHOWN) if (k in preset.sets && $(k)) $(k).value = String(preset.sets[k]);
  }

  syncSize() {
    const on = Boolean($("aspect_ratio").value);
    for (const id of ["size", "width", "height"]) $(id).disabled = on;
  }

  /** A job request body with the chosen preset and ratio (null: the form's error stands). */
  adjust(body) {
    if (!body) return body;
    const ratio = $("aspect_ratio").value;
    if (ratio && !$("aspect_ratio").closest(".field").hidden) {
      body.aspect_ratio = ratio;
      delete body.width;
      delete body.height;
    }
    const preset = this.current();
    if (preset && !$("performance").closest(".field").hidden) {
      body.performance = preset.name;
      for (const [k, v] of Object.entries(preset.sets)) if (body[k] === v) delete body[k];
    }
    return body;
  }

  /** "Use these parameters again": an image's preset and ratio back into the selects. */
  fill(meta) {
    const params = (meta && meta.params) || {};
    $("performance").value = meta.performance || params.performance || "";
    $("aspect_ratio").value = meta.aspect_ratio || params.aspect_ratio || "";
    this.syncSize();
  }
}
