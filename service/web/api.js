// The REST API of API.md and its event stream, with the bearer token kept in localStorage.
// Every request goes to this page's own origin: nothing is loaded from another host.

const TOKEN_KEY = "multigen.token";
export const BASE = new URL("api/v1/", document.baseURI).pathname;

/** An error answered by the server in API.md's shape {"error": {code, message, field}}. */
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

export function getToken() { return localStorage.getItem(TOKEN_KEY) || ""; }
export function setToken(token) {
  if (token) localStorage.setItem(TOKEN_KEY, token); else localStorage.removeItem(TOKEN_KEY);
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = getToken();
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

/** Absolute path of an API route ("sessions" → "/api/v1/sessions"); full URLs pass through. */
export function apiPath(path) {
  return path.startsWith("/") || path.startsWith("http") ? path : BASE + path;
}

async function errorFrom(resp) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  const e = body && body.error;
  if (e) return new ApiError(resp.status, e.code, e.message, e.field);
  return new ApiError(resp.status, "http_" + resp.status, resp.statusText || "request failed", null);
}

/**
 * Call the API; resolves to the parsed JSON body, rejects with ApiError.
 * @param {string} method
 * @param {string} path relative to /api/v1/
 * @param {object|FormData} [body]
 */
export async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(apiPath(path), init);
  } catch (err) {
    throw new ApiError(0, "network", "the server cannot be reached (" + err.message + ")", null);
  }
  if (!resp.ok) throw await errorFrom(resp);
  if (resp.status === 204) return {};
  return resp.json();
}

/** Fetch a binary (image, preview) with the token; resolves to a Blob, or null on 404. */
export async function fetchBlob(path) {
  const resp = await fetch(apiPath(path), { headers: headers(), cache: "no-store" });
  if (resp.status === 404) return null;
  if (!resp.ok) throw await errorFrom(resp);
  return resp.blob();
}

/**
 * Follow GET /api/v1/events (all of the user's sessions, or one with ``sessionId``) with fetch()
 * streaming, so that the Authorization header can be sent (EventSource cannot). Reconnects with
 * Last-Event-ID; calls onState(true|false) when the stream opens or drops, so the caller can poll
 * faster while it is down.
 * @returns {{close: function}}
 */
export function followEvents(sessionId, onEvent, onState) {
  const ctrl = new AbortController();
  let lastId = null;
  let closed = false;
  let delay = 1000;

  async function connect() {
    while (!closed) {
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (lastId) h["Last-Event-ID"] = lastId;
        const query = sessionId ? "?session_id=" + encodeURIComponent(sessionId) : "";
        const resp = await fetch(apiPath("events" + query),
          { headers: h, signal: ctrl.signal, cache: "no-store" });
        if (!resp.ok || !resp.body) throw await errorFrom(resp);
        onState(true);
        delay = 1000;
        await readStream(resp.body, (ev) => {
          if (ev.id) lastId = ev.id;
          onEvent(ev);
        });
      } catch (err) {
        if (closed) return;
      }
      onState(false);
      if (closed) return;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }

  connect();
  return { close() { closed = true; ctrl.abort(); } };
}

/** Parse a text/event-stream body: blocks separated by a blank line; "data:" lines are JSON. */
async function readStream(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = { type: "message", id: null, data: "" };
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;  // heartbeat comment
        const i = line.indexOf(":");
        const key = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (key === "event") ev.type = val;
        else if (key === "id") ev.id = val;
        else if (key === "data") data.push(val);
      }
      if (!data.length && ev.type === "message") continue;
      try { ev.data = JSON.parse(data.join("\n")); } catch (_) { ev.data = data.join("\n"); }
      if (ev.type === "message" && ev.data && ev.data.type) ev.type = ev.data.type;
      onEvent(ev);
    }
  }
}
