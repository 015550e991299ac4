// The job form's "Advanced" section: its fields in labelled groups (index.html's <fieldset data-group>:
// Sampling, Quality, Input image and mask, Outpaint, Image prompts, ControlNet, Job). Which of them show for
// the session's pipe and model (a group with none to show is hidden, and the section with no group), reading
// them into a job request, and refilling them from an image's parameters. An empty field keeps the default.

import { applyLimits, applyParam, helpText } from "./params.js";

const $ = (id) => document.getElementById(id);
// FreeU's factors show only while FreeU is on (chosen, or the model's default with "default")
const FREEU_FACTORS = ["freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2"];

export class AdvancedFields {
  /** `kinds`: the parameter names of each kind of field, {numbers, choices, flags, texts, lists} (jobform.js). */
  constructor(kinds) {
    this.kinds = kinds;
    this.all = Object.values(kinds).flat();
    this.params = new Set();  // the parameters the session's pipe and model take
    this.freeuDefault = false;
    $("freeu").addEventListener("change", () => this.update());
  }

  freeuOn() { const v = $("freeu").value; return v === "true" || (v === "" && this.freeuDefault); }

  /** Whether the field of `k` shows (and is sent): the pipe takes it, and FreeU is on for its factors. */
  shown(k) { return this.params.has(k) && (!FREEU_FACTORS.includes(k) || this.freeuOn()); }

  /**
   * The fields `params` names, with the server's ranges and help texts (`info`: by name from GET /api/v1/models;
   * `props`: the OpenAPI job schema's properties of a server without them). `defaults`: the model's (FreeU's).
   */
  configure(params, info, props, defaults = {}) {
    this.params = params;
    this.freeuDefault = defaults.freeu === true;
    for (const k of this.kinds.numbers) {
      if (params.has(k)) { if (info[k]) applyParam($(k), info[k]); else applyLimits($(k), props[k]); }
    }
    for (const k of this.all) if (!this.kinds.numbers.includes(k) && info[k]) $(k).title = helpText(info[k]);
    this.update();
  }

  /** Show the fields taken, hide the groups left empty (and the whole section when none is left). */
  update() {
    for (const k of this.all) $(k).closest("[data-param]").hidden = !this.shown(k);
    for (const group of document.querySelectorAll("#advanced [data-group]")) {
      group.hidden = ![...group.querySelectorAll("[data-param]")].some((f) => !f.hidden);
    }
    $("advanced").hidden = !this.all.some((k) => this.params.has(k));
  }

  /** Put the fields set into `body`; `num(id)`: a number field's value (undefined when empty). */
  read(body, num) {
    const { numbers, choices, flags, texts, lists } = this.kinds;
    for (const k of numbers) if (this.shown(k)) { const v = num(k); if (v !== undefined) body[k] = v; }
    for (const k of choices) if (this.shown(k) && $(k).value) body[k] = $(k).value;
    for (const k of flags) if (this.shown(k) && $(k).value) body[k] = $(k).value === "true";
    for (const k of texts) if (this.shown(k) && $(k).value.trim()) body[k] = $(k).value;
    for (const k of lists) {
      const chosen = this.shown(k) ? [...$(k).selectedOptions].map((o) => o.value) : [];
      if (chosen.length) body[k] = chosen;
    }
  }

  /** Refill from what a job gave (`given`); the others empty (the default). Unfolds the section if any was given. */
  fill(given) {
    const { choices, flags, texts, lists } = this.kinds;
    for (const k of this.all) {
      const v = given[k];
      const el = $(k);
      if (flags.includes(k)) el.value = typeof v === "boolean" ? String(v) : "";
      else if (choices.includes(k)) el.value = [...el.options].some((o) => o.value === v) ? v : "";
      else if (texts.includes(k)) el.value = typeof v === "string" ? v : "";
      else if (lists.includes(k)) for (const o of el.options) o.selected = Array.isArray(v) && v.includes(o.value);
      else el.value = typeof v === "number" ? v : "";
    }
    this.update();
    if (this.all.some((k) => given[k] !== undefined && given[k] !== null)) $("advanced").open = true;
  }
}
