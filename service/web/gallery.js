// The session's images: thumbnails (polled with images?after=), full view with parameters,
// downloads in three formats, and "use these parameters again".

import { api, apiPath, fetchBlob, getToken } from "./api.js";

const $ = (id) => document.getElementById(id);

/** Set an <img> to an API image; with a token the file is fetched with the header (a blob URL). */
export async function showImage(img, url) {
  if (!getToken()) { img.src = url; return; }
  const blob = await fetchBlob(url);
  if (blob) img.src = URL.createObjectURL(blob);
}

export class Gallery {
  constructor(onReuse) {
    this.onReuse = onReuse;
    this.sessionId = null;
    this.images = [];
    this.loading = null;
    this.current = null;
    $("close-dialog").addEventListener("click", () => $("image-dialog").close());
    $("reuse-params").addEventListener("click", () => {
      if (this.current && this.current.meta) this.onReuse(this.current.meta);
      $("image-dialog").close();
    });
    $("image-dialog").addEventListener("click", (e) => { if (e.target === $("image-dialog")) $("image-dialog").close(); });
    for (const fmt of ["png", "jpeg", "webp"]) {
      $("download-" + fmt).addEventListener("click", (e) => this.download(e, fmt));
    }
  }

  switchTo(sessionId) {
    this.sessionId = sessionId;
    this.images = [];
    this.loading = null;  // a request for the previous session must not stand in for this one
    this.again = false;
    $("gallery").replaceChildren();
    this.render();
    return this.refresh();
  }

  /** Ask for the images after the last one seen; one request at a time. */
  refresh() {
    if (!this.sessionId) return Promise.resolve();
    if (this.loading) {
      // asked again while a request is out (an image may have been written since): once more after it
      this.again = true;
      return this.loading;
    }
    const sid = this.sessionId;
    const last = this.images.length ? this.images[this.images.length - 1].index : null;
    const q = last === null ? "" : "?after=" + encodeURIComponent(last);
    const loading = api("GET", `sessions/${sid}/images${q}`).then(({ images }) => {
      if (sid !== this.sessionId) return;
      const known = new Set(this.images.map((i) => i.id));
      const fresh = images.filter((i) => !known.has(i.id));
      this.images.push(...fresh);
      this.images.sort((a, b) => a.index - b.index);
      for (const im of fresh) this.addThumb(im);
      this.render();
    }).finally(() => {
      if (this.loading !== loading) return;
      this.loading = null;
      if (this.again) { this.again = false; this.refresh().catch(() => null); }
    });
    this.loading = loading;
    return loading;
  }

  addThumb(im) {
    const li = document.createElement("li");
    li.dataset.image = im.id;
    li.dataset.index = im.index;
    li.dataset.job = im.job_id;
    li.dataset.seed = im.seed;
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "thumb";
    btn.setAttribute("aria-label", `Open image ${im.index} (seed ${im.seed}, ${im.width}×${im.height})`);
    const img = document.createElement("img");
    img.alt = "";
    img.width = im.width;
    img.height = im.height;
    img.loading = "lazy";
    showImage(img, im.url || `images/${im.id}`).catch(() => null);
    const cap = document.createElement("span");
    cap.className = "caption";
    cap.textContent = `#${im.index} · seed ${im.seed}`;
    btn.append(img, cap);
    btn.addEventListener("click", () => this.open(im, btn));
    li.append(btn);
    // newest first
    $("gallery").prepend(li);
  }

  render() {
    $("no-images").hidden = this.images.length > 0;
    $("image-count").textContent = this.images.length ? `(${this.images.length})` : "";
  }

  async open(im, opener) {
    const dlg = $("image-dialog");
    this.current = { image: im, meta: null };
    $("image-dialog-title").textContent = `Image ${im.index} · seed ${im.seed}`;
    const full = $("full-image");
    full.removeAttribute("src");
    full.alt = `image ${im.index}, seed ${im.seed}, ${im.width} by ${im.height}`;
    $("image-params").replaceChildren();
    $("image-meta-all").replaceChildren();
    $("all-meta").open = false;
    this.setDownloads(im);
    dlg.showModal();
    dlg.addEventListener("close", () => opener.focus(), { once: true });
    showImage(full, im.url || `images/${im.id}`).catch(() => null);
    try {
      const meta = await api("GET", `images/${im.id}/metadata`);
      const params = meta.metadata || meta;
      this.current.meta = params;
      $("image-params").replaceChildren(...rows(keyParams(params, im)));
      $("image-meta-all").replaceChildren(...rows(flatten(params)));
    } catch (err) {
      $("image-params").textContent = "parameters unavailable: " + err.message;
    }
  }

  /** Point the three download links at the image in each format. */
  setDownloads(im) {
    for (const fmt of ["png", "jpeg", "webp"]) {
      const a = $("download-" + fmt);
      a.href = apiPath(formatUrl(im, fmt));
      a.download = `multigen-${im.session_id}-${im.index}.${fmt === "jpeg" ? "jpg" : fmt}`;
    }
  }

  async download(e, fmt) {
    // without a token the links work as they are; with one, the file is fetched with the header
    if (!getToken()) return;
    e.preventDefault();
    const im = this.current && this.current.image;
    if (!im) return;
    const blob = await fetchBlob(formatUrl(im, fmt));
    if (!blob) return;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = $("download-" + fmt).download;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }
}

function formatUrl(im, fmt) {
  const base = im.url || `images/${im.id}`;
  return base + (base.includes("?") ? "&" : "?") + "format=" + fmt;
}

/** The parameters a person looks for first, from an image's metadata. */
function keyParams(m, im) {
  const used = m.pipe_config || {};
  const given = m.params || {};
  const pick = (k) => given[k] ?? m[k] ?? used[k];
  const loras = (m.loras || used.loras || []).map((l) => (Array.isArray(l) ? l.join(" ") : typeof l === "object" ? `${l.name} ${l.weight}` : l));
  const out = [
    ["prompt", m.prompt_grammar ? JSON.stringify(m.prompt_grammar) : pick("prompt")],
    ["negative prompt", pick("negative_prompt")],
    ["seed", m.seed ?? im.seed],
    ["model", [m.model, m.pipe].filter(Boolean).join(" · ")],
    ["LoRAs", loras.join(", ")],
    ["size", `${pick("width") ?? im.width} × ${pick("height") ?? im.height}`],
    ["steps", pick("steps")],
    ["guidance", pick("guidance_scale")],
    ["scheduler", given.scheduler ?? used.scheduler],
    ["strength", pick("strength")],
    ["created", m.created_at ?? im.created_at],
  ];
  return out.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]);
}

function rows(pairs) {
  return pairs.map(([k, v]) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = k;
    const td = document.createElement("td");
    td.textContent = v;
    tr.append(th, td);
    return tr;
  });
}

/** {a: 1, b: {c: 2}} → [["a", "1"], ["b.c", "2"]] for the parameter table. */
function flatten(obj, prefix = "", out = []) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? prefix + "." + k : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else out.push([key, typeof v === "string" ? v : JSON.stringify(v)]);
  }
  return out;
}
