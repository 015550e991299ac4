// The jobs of the current session: state, queue position, progress bar, live preview, cancel, skip.

import { api, fetchBlob } from "./api.js";

const ACTIVE = new Set(["queued", "running"]);
const KEEP = 8;  // jobs remembered per session (localStorage), newest first

const $ = (id) => document.getElementById(id);

function storeKey(sid) { return "multigen.jobs." + sid; }

export class JobList {
  constructor(onChange) {
    this.onChange = onChange;   // called after a job changed (the gallery refreshes)
    this.sessionId = null;
    this.jobs = new Map();      // id -> Job
    this.previewBusy = new Set();
    this.previewUrls = new Map();
    this.gridUrls = new Map();  // id -> object URL of the job's grid (grid: true)
  }

  /** Show the jobs this page queued in a session (remembered across reloads). */
  async switchTo(sessionId) {
    this.sessionId = sessionId;
    this.jobs.clear();
    for (const u of this.previewUrls.values()) URL.revokeObjectURL(u);
    this.previewUrls.clear();
    for (const u of this.gridUrls.values()) if (u) URL.revokeObjectURL(u);
    this.gridUrls.clear();
    $("job-list").replaceChildren();
    const ids = JSON.parse(localStorage.getItem(storeKey(sessionId)) || "[]");
    await Promise.all(ids.map((id) => this.refresh(id).catch(() => null)));
    this.render();
  }

  add(job) {
    const ids = JSON.parse(localStorage.getItem(storeKey(job.session_id)) || "[]").filter((i) => i !== job.id);
    ids.unshift(job.id);
    localStorage.setItem(storeKey(job.session_id), JSON.stringify(ids.slice(0, KEEP)));
    this.jobs.set(job.id, job);
    this.render();
  }

  active() { return [...this.jobs.values()].filter((j) => ACTIVE.has(j.state)); }

  /** Fetch one job again and redraw it. */
  async refresh(id) {
    const { job } = await api("GET", "jobs/" + id);
    if (job.session_id !== this.sessionId) return;
    const before = this.jobs.get(id);
    this.jobs.set(id, job);
    this.render();
    if (job.state === "running" && job.progress && job.progress.step > 0) this.loadPreview(job);
    if (job.grid_url && !this.gridUrls.has(job.id)) this.loadGrid(job);
    if (before && (before.state !== job.state || before.done !== job.done)) this.onChange(job);
  }

  async refreshActive() {
    // a job's webhook is delivered after the job ends: its state is followed until it is settled
    const hooked = [...this.jobs.values()].filter((j) => j.webhook && ["waiting", "pending"].includes(j.webhook.state));
    const ids = new Set([...this.active(), ...hooked].map((j) => j.id));
    await Promise.all([...ids].map((id) => this.refresh(id).catch(() => null)));
  }

  /** The job's grid (its images side by side), fetched once with the token. */
  async loadGrid(job) {
    this.gridUrls.set(job.id, "");
    try {
      const blob = await fetchBlob(job.grid_url);
      if (blob) { this.gridUrls.set(job.id, URL.createObjectURL(blob)); this.render(); }
    } catch (_) { this.gridUrls.delete(job.id); }
  }

  /** Cancel the job, or (`action` "skip") skip only the image it is making: the job goes on with the next. */
  async cancel(id, action = "cancel") {
    try {
      const { job } = await api("POST", "jobs/" + id + "/" + action);
      this.jobs.set(id, job);
    } catch (err) {
      await this.refresh(id).catch(() => null);
    }
    this.render();
  }

  async loadPreview(job) {
    if (this.previewBusy.has(job.id)) return;
    this.previewBusy.add(job.id);
    try {
      const blob = await fetchBlob("jobs/" + job.id + "/preview");
      if (blob) {
        const old = this.previewUrls.get(job.id);
        this.previewUrls.set(job.id, URL.createObjectURL(blob));
        if (old) URL.revokeObjectURL(old);
        this.render();
      }
    } catch (_) { /* a preview is optional */ } finally {
      this.previewBusy.delete(job.id);
    }
  }

  render() {
    const list = $("job-list");
    const jobs = [...this.jobs.values()].sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
    $("no-jobs").hidden = jobs.length > 0;
    const seen = new Set();
    for (const job of jobs) {
      seen.add(job.id);
      let li = list.querySelector(`[data-job="${CSS.escape(job.id)}"]`);
      if (!li) {
        li = document.createElement("li");
        li.className = "job";
        li.dataset.job = job.id;
        li.innerHTML = `<div class="job-head"><span class="job-title"></span><span class="badge"></span></div>
          <label class="job-progress-label"><span class="progress-text"></span>
          <progress max="1" value="0"></progress></label>
          <img class="preview" alt="" hidden>
          <p class="job-error error" role="alert"></p>
          <img class="grid" alt="" hidden>
          <p class="job-webhook muted small" hidden></p>
          <button type="button" class="cancel">Cancel</button>
          <button type="button" class="skip">Skip image</button>`;
        li.querySelector(".cancel").addEventListener("click", () => this.cancel(job.id));
        li.querySelector(".skip").addEventListener("click", () => this.cancel(job.id, "skip"));
        list.append(li);
      }
      this.fill(li, job);
    }
    for (const li of [...list.children]) if (!seen.has(li.dataset.job)) li.remove();
    // keep newest first
    for (const job of jobs) list.append(list.querySelector(`[data-job="${CSS.escape(job.id)}"]`));
  }

  fill(li, job) {
    const p = job.progress || {};
    const count = job.count || (job.seeds ? job.seeds.length : 1);
    li.dataset.state = job.state;
    li.querySelector(".job-title").textContent = `${count} image${count === 1 ? "" : "s"} · ${shortPrompt(job)}`;
    const badge = li.querySelector(".badge");
    badge.textContent = job.state;
    badge.className = "badge " + job.state;
    const bar = li.querySelector("progress");
    let text;
    let fraction = typeof p.fraction === "number" ? p.fraction : 0;
    if (job.state === "queued") {
      // position is 0-based: the number of queued jobs that run before this one
      const pos = job.position;
      text = pos == null ? "waiting in the queue"
        : pos === 0 ? "waiting · next in the queue" : `waiting · ${pos} job${pos === 1 ? "" : "s"} ahead in the queue`;
    } else if (job.state === "running") {
      const img = (p.image != null ? p.image + 1 : (job.done || 0) + 1);
      text = `image ${Math.min(img, count)} of ${count} · step ${p.step || 0} of ${p.steps || "?"}`;
      if (job.eta_seconds != null) text += ` · about ${Math.ceil(job.eta_seconds)} s left`;
    } else if (job.state === "succeeded") {
      fraction = 1;
      const skipped = (job.skipped || []).length;
      text = `done · ${job.done ?? count} of ${count} images` + (skipped ? ` (${skipped} skipped)` : "");
    } else {
      text = `${job.state} · ${job.done || 0} of ${count} images written`;
    }
    bar.value = Math.max(0, Math.min(1, fraction));
    bar.textContent = Math.round(fraction * 100) + "%";
    li.querySelector(".progress-text").textContent = text;
    const preview = li.querySelector(".preview");
    const url = this.previewUrls.get(job.id);
    const showPreview = Boolean(url) && job.state === "running";
    preview.hidden = !showPreview;
    if (showPreview && preview.src !== url) { preview.src = url; preview.alt = "live preview of " + shortPrompt(job); }
    li.querySelector(".job-error").textContent = job.error ? `${job.error.type}: ${job.error.message}` : "";
    const grid = li.querySelector(".grid");
    const gridUrl = this.gridUrls.get(job.id);
    grid.hidden = !gridUrl;
    if (gridUrl && grid.src !== gridUrl) { grid.src = gridUrl; grid.alt = "grid of the images of " + shortPrompt(job); }
    const hook = li.querySelector(".job-webhook");
    const w = job.webhook;
    hook.hidden = !w;
    if (w) {
      hook.textContent = `webhook ${w.state}` + (w.attempts ? ` · ${w.attempts} attempt${w.attempts === 1 ? "" : "s"}` : "")
        + (w.state === "pending" && w.next_try_at ? ` · next try ${new Date(w.next_try_at).toLocaleTimeString()}` : "")
        + (w.last_error && w.state !== "delivered" ? ` · ${w.last_error}` : "");
      hook.title = w.url;
    }
    const cancel = li.querySelector(".cancel");
    cancel.hidden = !ACTIVE.has(job.state);
    cancel.setAttribute("aria-label", "Cancel job " + shortPrompt(job));
    // skipping one image needs a running job with another image after it, and no skip already asked for
    const skip = li.querySelector(".skip");
    skip.hidden = job.state !== "running" || (job.count || 1) < 2 || Boolean(job.skip_requested || job.cancel_requested);
    skip.setAttribute("aria-label", "Skip the image job " + shortPrompt(job) + " is making");
  }
}

function shortPrompt(job) {
  const p = job.prompt ?? (job.params && job.params.prompt);
  const s = typeof p === "string" ? p : p ? JSON.stringify(p) : "";
  return s ? (s.length > 40 ? s.slice(0, 39) + "…" : s) : "job " + String(job.id).slice(0, 8);
}
