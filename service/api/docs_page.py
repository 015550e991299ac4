"""The page at ``/api/v1/docs``: renders openapi.json in the browser, with no external asset.

Kept as a Python string so it ships with the package without package-data rules.
"""
from __future__ import annotations

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>multigen API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
main{max-width:1000px;margin:0 auto;padding:16px 24px}
.op{background:#fff;border:1px solid #d9dde5;border-radius:6px;margin:10px 0}
.op summary{cursor:pointer;padding:8px 12px;display:flex;gap:12px;align-items:center}
.m{font:bold 12px monospace;padding:3px 8px;border-radius:4px;color:#fff;min-width:52px;text-align:center}
.get{background:#2b6cb0}.post{background:#2f855a}.delete{background:#c53030}
.path{font-family:monospace;font-weight:600}.body{padding:0 14px 12px}
pre{background:#f0f2f5;padding:8px;border-radius:4px;overflow:auto;font-size:13px}
table{border-collapse:collapse}td,th{border:1px solid #d9dde5;padding:3px 8px;text-align:left;font-size:13px}
h2{margin-top:28px}
</style></head>
<body><header><h1>multigen API <span id="version"></span></h1></header>
<main><p>Generated from <a href="openapi.json">openapi.json</a>: the same models validate the requests.
Errors are <code>{"error": {"code", "message", "field"}}</code>.</p>
<div id="ops">Loading…</div><h2>Schemas</h2><div id="schemas"></div></main>
<script>
"use strict";
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
}
function refName(s) { return s && s.$ref ? s.$ref.split("/").pop() : null; }
function typeText(s) {
  if (!s) return "";
  if (s.$ref) return refName(s);
  if (s.anyOf) return s.anyOf.map(typeText).join(" | ");
  if (s.oneOf) return s.oneOf.map(typeText).join(" | ");
  if (s.enum) return s.enum.map(v => JSON.stringify(v)).join(" | ");
  if (s.const !== undefined) return JSON.stringify(s.const);
  if (s.type === "array") return typeText(s.items) + "[]";
  return s.type || "any";
}
function limits(s) {
  const out = [];
  for (const k of ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "pattern", "default"])
    if (s[k] !== undefined) out.push(k + "=" + JSON.stringify(s[k]));
  for (const alt of (s.anyOf || [])) out.push(...limits(alt));
  return out.join(", ");
}
function schemaTable(s) {
  const props = s.properties || {};
  const req = new Set(s.required || []);
  const t = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, "limits"),
    el("th", {}, "description")));
  for (const [name, p] of Object.entries(props))
    t.append(el("tr", {}, el("td", {}, name + (req.has(name) ? " *" : "")), el("td", {}, typeText(p)),
      el("td", {}, limits(p)), el("td", {}, p.description || "")));
  return t;
}
fetch("openapi.json").then(r => r.json()).then(doc => {
  document.getElementById("version").textContent = doc.info.version;
  const ops = document.getElementById("ops"); ops.textContent = "";
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const body = el("div", {class: "body"}, el("p", {}, op.summary || ""));
      for (const p of op.parameters || [])
        body.append(el("div", {}, el("code", {}, p.name), ` (${p.in}${p.required ? ", required" : ""}) ` + typeText(p.schema)));
      if (op.requestBody) {
        const [media, c] = Object.entries(op.requestBody.content)[0];
        body.append(el("p", {}, "Body (" + media + "): " + (refName(c.schema) || typeText(c.schema))));
      }
      const codes = Object.entries(op.responses).map(([code, r]) => code + " " + r.description).join("; ");
      body.append(el("p", {}, "Responses: " + codes));
      ops.append(el("details", {class: "op"}, el("summary", {}, el("span", {class: "m " + method}, method.toUpperCase()),
        el("span", {class: "path"}, path)), body));
    }
  }
  const sc = document.getElementById("schemas");
  for (const [name, s] of Object.entries(doc.components.schemas)) {
    const d = el("details", {class: "op"}, el("summary", {}, el("span", {class: "path"}, name)));
    const b = el("div", {class: "body"});
    if (s.description) b.append(el("p", {}, s.description));
    if (s.properties) b.append(schemaTable(s)); else b.append(el("pre", {}, JSON.stringify(s, null, 2)));
    d.append(b); sc.append(d);
  }
}).catch(e => { document.getElementById("ops").textContent = "Could not load openapi.json: " + e; });
</script></body></html>
"""
