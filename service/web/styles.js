// The job form's style picker: the server's style library (GET /api/v1/styles) as suggestions, the chosen
// styles as chips in the order they apply, sent as the job's `styles`.

const $ = (id) => document.getElementById(id);
// the reserved style name: one style drawn from each image's seed
export const RANDOM_STYLE = "random";

export class StylePicker {
  /** `showError({field, message})`: how the form shows an error next to the styles field. */
  constructor(showError) {
    this.showError = showError;
    this.styles = [];  // the server's styles: {name, prompt, negative_prompt, source}
    this.chosen = [];  // the names picked, in the order they apply
    this.max = 16;  // the server's limit, from its description of `styles`
    $("style-add").addEventListener("click", () => this.add());
    $("styles").addEventListener("keydown", (e) => {  // Enter adds the typed style instead of queueing
      if (e.key === "Enter" && $("styles").value.trim()) { e.preventDefault(); this.add(); }
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
  add() {
    const input = $("styles");
    const typed = input.value.trim();
    $("err-styles").textContent = "";
    input.removeAttribute("aria-invalid");
    if (!typed) return;
    const name = this.styleName(typed);
    let message = null;
    if (!name) message = `no style is called "${typed}": pick one from the list`;
    else if (name !== RANDOM_STYLE && this.chosen.includes(name)) message = `${name} is chosen already`;
    else if (this.chosen.length >= this.max) message = `a job takes at most ${this.max} styles`;
    if (message) { this.showError({ field: "styles", message }); return; }
    this.chosen.push(name);
    input.value = "";
    this.render();
  }

  /** The styles of a job, in order (`random` stays random: the seed draws the same one again). */
  fill(names) {
    this.chosen = (Array.isArray(names) ? names : []).map((n) => this.styleName(n) || n);
    $("styles").value = "";
    this.render();
  }

  /** The chosen styles as chips, in order, each with its prompt as title and a remove button. */
  render() {
    $("style-chips").replaceChildren(...this.chosen.map((name, i) => {
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
        this.chosen.splice(i, 1);
        this.render();
        const next = $("style-chips").querySelectorAll("button")[Math.min(i, this.chosen.length - 1)];
        (next || $("styles")).focus();
      });
      li.append(label, remove);
      return li;
    }));
  }
}
