// multigen's web page: the token, sessions (open, switch, close), and the wiring between the job
// form, the job list and the gallery. Talks only to the REST API and its event stream (api.js).

import { api, ApiError, followEvents, getToken, setToken } from "./api.js";
import { Gallery } from "./gallery.js";
import { JobForm } from "./jobform.js";
import { JobList } from "./jobs.js";
import { PresetPicker } from "./presets.js";

const SESSION_KEY = "multigen.session";
const $ = (id) => document.getElementById(id);

const state = {
  models: [], loras: [], pipes: [], schedulers: [], families: {}, openapi: null, maxCount: null, jobParams: [],
  loraWeight: null,
  sessions: [], session: null, events: null, streaming: false, timer: null,
};

const form = new JobForm();
const presets = new PresetPicker();  // the performance and aspect-ratio selects
const jobs = new JobList((job) => {
  gallery.refresh().catch(() => null);
  if (!["queued", "running"].includes(job.state)) loadSessions().catch(() => null);  // image counts
});
const gallery = new Gallery((meta) => { form.fill(meta); presets.fill(meta); $("prompt").focus(); announce("parameters copied into the job form"); });

function announce(text) { $("announce").textContent = text; }

/** A name or an object from /models → {id, label, type, ...}. */
function item(x) {
  if (typeof x === "string") return { id: x, label: x };
  const id = x.id ?? x.key ?? x.name;
  const label = x.title ?? x.display_name ?? (x.name && x.name !== id ? `${x.name} (${id})` : id);
  return Object.assign({}, x, { id, label });
}

// ---- token -------------------------------------------------------------------------------

function askToken(message) {
  $("token-form").hidden = false;
  $("token-forget").hidden = !getToken();
  $("err-token").textContent = message || "";
  $("token").focus();
}

$("token-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  setToken($("token").value.trim());
  $("token").value = "";
  if (state.events) { state.events.close(); state.events = null; }  // reconnect with the new token
  await start();
});
$("token-forget").addEventListener("click", () => { setToken(""); askToken("token forgotten"); });

/** Run an API action; a 401 asks for the token instead of failing. */
async function guarded(fn) {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      askToken(getToken() ? "the server did not accept this token: " + err.message : "this server needs an API token");
      return undefined;
    }
    throw err;
  }
}

// ---- models and sessions -----------------------------------------------------------------

async function loadCatalog() {
  const m = await api("GET", "models");
  state.models = (m.models || []).map(item);
  state.loras = (m.loras || []).map(item);
  state.pipes = (m.pipes || []).map(item);
  state.schedulers = (m.schedulers || []).map((s) => (typeof s === "string" ? s : item(s).id));
  // each model family once (what it runs, takes and refuses); each model names its own
  state.families = Object.fromEntries((m.families || []).map((f) => [f.name, f]));
  state.jobParams = Array.isArray(m.job_params) ? m.job_params : [];
  state.loraWeight = m.lora_weight || null;  // its range and help, from the server's parameter spec
  const count = state.jobParams.find((p) => p.name === "count");
  state.maxCount = (count && count.max) || m.max_count || (m.limits && m.limits.max_count) || null;
  state.openapi = await api("GET", "openapi.json").catch(() => null);
  form.setStyles(await api("GET", "styles").then((r) => r.styles, () => []));  // the job form's style picker
  form.setUpscalers(m.upscalers);  // uov's upscaler models
  presets.setPresets(await api("GET", "presets").then((r) => r.presets, () => []));
  fillSelect($("pipe"), state.pipes);
  fillSelect($("model"), state.models);
  renderLoras();
  renderFamily();
}

/** A model's family from GET /api/v1/models (detected or declared), or null for an unknown one. */
function familyOf(model) {
  return (model && state.families[model.family || model.type]) || null;
}

/**
 * The chosen model's family under the model list (its tasks, own parameters, LoRA support), and which
 * pipes it cannot run marked in the pipe list (the server refuses such a session, naming the pipe).
 */
function renderFamily() {
  const model = state.models.find((m) => m.id === $("model").value);
  const family = familyOf(model);
  const runs = model && Array.isArray(model.pipes) ? new Set(model.pipes) : null;
  for (const opt of $("pipe").options) {
    const pipe = state.pipes.find((p) => p.id === opt.value);
    const unsupported = runs !== null && !runs.has(opt.value);
    opt.textContent = (pipe ? pipe.label : opt.value) + (unsupported ? ` (not for ${family ? family.title : "this model"})` : "");
    if (unsupported) opt.dataset.unsupported = "true"; else delete opt.dataset.unsupported;
  }
  const text = family ? [`${family.title}: runs ${(family.roles || []).join(", ")}`,
    family.params && family.params.length ? `its own: ${family.params.join(", ")}` : "",
    family.loras === false ? "no LoRAs" : ""].filter(Boolean).join(" · ") : "";
  $("model-family").textContent = text;
}

function fillSelect(sel, items) {
  const keep = sel.value;
  sel.replaceChildren(...items.map((i) => new Option(i.label, i.id)));
  if (items.some((i) => i.id === keep)) sel.value = keep;
}

function renderLoras() {
  const model = state.models.find((m) => m.id === $("model").value);
  const type = model && (model.family || model.type);
  const fit = state.loras.filter((l) => !type || !l.type || l.type === type);
  const box = $("lora-list");
  box.replaceChildren(...fit.map((l, i) => {
    const row = document.createElement("div");
    row.className = "lora";
    row.innerHTML = `<input type="checkbox" id="lora-${i}"><label for="lora-${i}"></label>
      <label for="lora-w-${i}" class="sr-only"></label>
      <input type="number" id="lora-w-${i}" step="0.05" value="1" class="weight">`;
    row.querySelector("input[type=checkbox]").value = l.id;
    const weight = row.querySelector("input.weight");
    const w = state.loraWeight;
    if (w) {
      if (w.min != null) weight.min = String(w.min);
      if (w.max != null) weight.max = String(w.max);
      weight.title = `${w.description}; range ${w.min} to ${w.max}`;
    }
    row.querySelector(`label[for="lora-${i}"]`).textContent = l.label;
    row.querySelector(`label[for="lora-w-${i}"]`).textContent = `weight of ${l.label}`;
    return row;
  }));
  $("loras-field").hidden = fit.length === 0;
}
$("model").addEventListener("change", () => { renderLoras(); renderFamily(); });

function sessionLabel(s) {
  return `${s.project} · ${pipeLabel(s.pipe)} · ${s.model}`;
}
function pipeLabel(id) { const p = state.pipes.find((x) => x.id === id); return p ? (p.title || p.name || id) : id; }

async function loadSessions() {
  const { sessions } = await api("GET", "sessions?state=open");
  state.sessions = sessions;
  renderSessions();
}

function renderSessions() {
  const list = $("session-list");
  const focused = document.activeElement && document.activeElement.closest("#session-list li");
  const refocus = focused && [focused.dataset.session, document.activeElement.className];
  $("no-sessions").hidden = state.sessions.length > 0;
  list.replaceChildren(...state.sessions.map((s) => {
    const li = document.createElement("li");
    li.dataset.session = s.id;
    const current = state.session && state.session.id === s.id;
    li.className = current ? "current" : "";
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "session-pick";
    pick.setAttribute("aria-pressed", String(current));
    const loras = (s.loras || []).map((l) => (typeof l === "string" ? l : `${l.name} ${l.weight}`)).join(", ");
    pick.innerHTML = `<span class="s-main"></span><span class="s-sub muted"></span>`;
    pick.querySelector(".s-main").textContent = sessionLabel(s);
    const n = s.image_count ?? 0;
    pick.querySelector(".s-sub").textContent = `${n} image${n === 1 ? "" : "s"}${loras ? " · " + loras : ""}`;
    pick.addEventListener("click", () => switchSession(s.id));
    const close = document.createElement("button");
    close.type = "button";
    close.className = "session-close";
    const confirming = state.confirmClose === s.id;
    close.textContent = confirming ? "Confirm close" : "Close";
    close.setAttribute("aria-label", (confirming ? "Confirm: close session " : "Close session ") + sessionLabel(s));
    close.addEventListener("click", () => closeSession(s));
    li.append(pick, close);
    return li;
  }));
  if (refocus) {
    const el = list.querySelector(`li[data-session="${CSS.escape(refocus[0])}"] .${refocus[1]}`);
    if (el) el.focus();
  }
}

async function openSession(e) {
  e.preventDefault();
  for (const el of document.querySelectorAll("#session-form .error")) el.textContent = "";
  const loras = [...document.querySelectorAll("#lora-list .lora")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({ name: row.querySelector("input[type=checkbox]").value,
      weight: Number(row.querySelector(".weight").value) }));
  const body = { project: $("project").value.trim(), pipe: $("pipe").value, model: $("model").value, loras };
  try {
    const res = await guarded(() => api("POST", "sessions", body));
    if (!res) return;
    state.sessions = [res.session, ...state.sessions.filter((s) => s.id !== res.session.id)];
    await switchSession(res.session.id);
    announce("session opened: " + sessionLabel(res.session));
  } catch (err) {
    const field = String(err.field || "").split(".").find((p) => $("err-" + p) && $("err-" + p).closest("#session-form"));
    $(field ? "err-" + field : "err-session-form").textContent = err.message;
  }
}
$("session-form").addEventListener("submit", openSession);

// closing cannot be undone: the first press asks to confirm for a few seconds (state survives re-renders)
async function closeSession(s) {
  if (state.confirmClose !== s.id) {
    state.confirmClose = s.id;
    renderSessions();
    clearTimeout(state.confirmTimer);
    state.confirmTimer = setTimeout(() => { state.confirmClose = null; renderSessions(); }, 5000);
    return;
  }
  state.confirmClose = null;
  try {
    await guarded(() => api("DELETE", "sessions/" + s.id));
  } catch (err) {
    $("err-session-form").textContent = err.message;
  }
  state.sessions = state.sessions.filter((x) => x.id !== s.id);
  if (state.session && state.session.id === s.id) await switchSession(null);
  renderSessions();
  announce("session closed");
}

async function switchSession(id) {
  state.session = state.sessions.find((s) => s.id === id) || null;
  if (id) localStorage.setItem(SESSION_KEY, id); else localStorage.removeItem(SESSION_KEY);
  renderSessions();
  if (!state.session) {
    $("current-session").textContent = "— open a session first";
    form.disable();
    jobs.sessionId = null;
    gallery.sessionId = null;
    return;
  }
  const s = state.session;
  $("current-session").textContent = "in " + sessionLabel(s);
  const pipe = state.pipes.find((p) => p.id === s.pipe) || { id: s.pipe };
  const model = state.models.find((m) => m.id === s.model) || { id: s.model };
  const family = familyOf(model);  // its fields, schedulers, sizes and defaults
  // the fields of its pipe, less those its family refuses and those its model has nothing for (IP-Adapter, refiner)
  form.configure(pipe, state.openapi, state.schedulers, state.maxCount, state.jobParams, family, model);
  form.applyModel(model, family);
  presets.applyFamily(model, family, state.jobParams);
  await Promise.all([jobs.switchTo(s.id), gallery.switchTo(s.id)]);
}

// ---- jobs --------------------------------------------------------------------------------

$("job-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!state.session) return;
  form.clearErrors();
  let body;
  try {
    body = presets.adjust(form.request());
  } catch (err) {
    form.showError(err);
    return;
  }
  const button = $("queue-job");
  button.disabled = true;
  try {
    const res = await guarded(() => api("POST", `sessions/${state.session.id}/jobs`, body));
    if (res) {
      jobs.add(res.job);
      announce(`queued ${res.job.count || 1} image(s)`);
      // on a phone the job list is below the form: bring the new card into view
      if (matchMedia("(max-width: 700px)").matches) {
        const card = document.querySelector(`#job-list [data-job="${CSS.escape(res.job.id)}"]`);
        if (card) card.scrollIntoView({ block: "nearest", behavior: "smooth" });
      }
      schedule(300);
    }
  } catch (err) {
    form.showError(err);
  } finally {
    button.disabled = false;
  }
});

/**
 * One event stream for the page, over all of the user's sessions: switching sessions needs no new
 * connection (the server allows only a few streams at once).
 */
function followAll() {
  if (state.events) return;
  state.events = followEvents(null, onEvent, (up) => {
    state.streaming = up;
    document.body.dataset.events = up ? "live" : "polling";
    $("stream-status").textContent = up ? "live" : "polling";
    $("stream-status").title = up ? "following the server's event stream" : "the event stream is not available: polling";
  });
  addEventListener("pagehide", () => state.events && state.events.close());
}

function onEvent(ev) {
  const d = ev.data || {};
  const sid = d.session_id || ev.session_id;
  if (ev.type === "session.closed" || ev.type === "session.opened") {
    loadSessions().then(() => {
      if (state.session && !state.sessions.some((s) => s.id === state.session.id)) switchSession(null);
    }).catch(() => null);
    return;
  }
  if (!state.session || (sid && sid !== state.session.id)) return;  // another session's news
  const jobId = d.job_id || (d.job && d.job.id) || (ev.type.startsWith("job.") ? d.id : null);
  if (ev.type === "image.created") gallery.refresh().catch(() => null);
  if (jobId && jobs.jobs.has(jobId)) jobs.refresh(jobId).catch(() => null);
}

// Polling backs up the event stream: fast while it is down, slow while it is up.
function schedule(ms) {
  clearTimeout(state.timer);
  state.timer = setTimeout(tick, ms);
}

async function tick() {
  try {
    if (state.session) {
      const active = jobs.active().length > 0;
      await jobs.refreshActive();
      if (active || !state.streaming) await gallery.refresh();
    }
  } catch (_) { /* shown on the next user action */ }
  const busy = jobs.active().length > 0;
  schedule(busy ? (state.streaming ? 1500 : 700) : 4000);
}

// ---- start -------------------------------------------------------------------------------

async function start() {
  $("err-token").textContent = "";
  try {
    const health = await api("GET", "health");
    $("server-status").textContent = `server ${health.version} · ${(health.devices || []).length || 1} device(s)`;
  } catch (err) {
    $("server-status").textContent = "server unreachable: " + err.message;
  }
  try {
    const ok = await guarded(async () => { await loadCatalog(); await loadSessions(); return true; });
    if (!ok) return;
  } catch (err) {
    $("err-session-form").textContent = err.message;
    return;
  }
  if (getToken()) { $("token-form").hidden = false; }
  $("token-forget").hidden = !getToken();
  const last = localStorage.getItem(SESSION_KEY);
  await switchSession(state.sessions.some((s) => s.id === last) ? last : (state.sessions[0] || {}).id || null);
  followAll();
  document.body.dataset.ready = "1";
  schedule(1000);
}

start();
