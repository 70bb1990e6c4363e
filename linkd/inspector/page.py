"""The inspector page: one self-contained HTML document (inline CSS and JS, nothing fetched
from elsewhere). Captured data is only ever put in the page as text (``textContent``), never
as markup, so a request body cannot script the inspector."""

from __future__ import annotations

from typing import Final

__all__ = ["PAGE"]

PAGE: Final = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>linkd inspector</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  :root {
    --bg:#fafafa; --fg:#1d1d1f; --mute:#6e6e73; --line:#e2e2e6; --sel:#e8f0fe; --ok:#1a7f37;
    --warn:#9a6700; --bad:#cf222e;
  }
  * { box-sizing: border-box; }
  body { margin:0; font: 13px/1.4 system-ui, sans-serif; color:var(--fg); background:var(--bg); }
  header {
    display:flex; gap:12px; align-items:center; padding:8px 12px; border-bottom:1px solid var(--line);
    background:#fff;
  }
  header h1 { font-size:15px; margin:0 12px 0 0; }
  header .live { color:var(--mute); margin-left:auto; }
  main { display:grid; grid-template-columns: minmax(600px, 1fr) 1.6fr; height: calc(100vh - 42px); }
  #list { overflow:auto; border-right:1px solid var(--line); background:#fff; }
  table { border-collapse:collapse; width:100%; }
  th, td { text-align:left; padding:4px 8px; border-bottom:1px solid var(--line); white-space:nowrap; }
  th { position:sticky; top:0; background:#f3f3f5; font-weight:600; }
  td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
  td.path {
    max-width: 320px; overflow:hidden; text-overflow:ellipsis; font-family: ui-monospace, monospace;
  }
  tr.row { cursor:pointer; }
  tr.row:hover { background:#f5f5f7; }
  tr.row.selected { background:var(--sel); }
  .s2 { color:var(--ok); }
  .s3 { color:var(--mute); }
  .s4 { color:var(--warn); }
  .s5, .err { color:var(--bad); }
  .tag {
    font-size:11px; padding:0 4px; border-radius:3px; background:#ede7f6; color:#5e35b1; margin-left:4px;
  }
  #panes { display:flex; overflow:auto; }
  .pane { flex:1; min-width:0; padding:10px 14px; overflow:auto; }
  .pane + .pane { border-left:1px solid var(--line); }
  .pane h2 { font-size:14px; margin:0 0 6px; }
  .pane h3 { font-size:12px; text-transform:uppercase; color:var(--mute); margin:12px 0 4px; }
  .facts { color:var(--mute); margin-bottom:6px; }
  .headers td {
    white-space:normal; word-break:break-all; font-family: ui-monospace, monospace; font-size:12px;
    padding:2px 6px;
  }
  .headers td:first-child { color:var(--mute); width:32%; word-break:normal; }
  pre {
    background:#f6f8fa; border:1px solid var(--line); padding:8px; white-space:pre-wrap;
    word-break:break-all; max-height:40vh; overflow:auto; margin:0; font-size:12px;
  }
  .note { color:var(--mute); font-size:12px; margin:2px 0; }
  button { font:inherit; padding:3px 10px; }
  form#replay-form { display:none; margin-top:8px; }
  form#replay-form.open { display:block; }
  form#replay-form label { display:block; margin-top:6px; color:var(--mute); }
  form#replay-form input, form#replay-form textarea, form#replay-form select {
    width:100%; font-family: ui-monospace, monospace; font-size:12px;
  }
  .empty { color:var(--mute); padding:20px; }
</style>
</head>
<body>
<header>
  <h1>linkd inspector</h1>
  <label>Status <select id="filter-status">
    <option value="">all</option><option value="2xx">2xx</option><option value="3xx">3xx</option>
    <option value="4xx">4xx</option><option value="5xx">5xx</option><option value="error">errors</option>
  </select></label>
  <label>Path <input id="filter-path" placeholder="contains..." size="24"></label>
  <span class="live" id="live">connecting...</span>
</header>
<main>
  <div id="list">
    <table id="requests">
      <thead><tr><th>Time</th><th>Method</th><th>Path</th><th class="num">Status</th>
        <th class="num">Duration</th><th class="num">TTFB</th><th class="num">In / out</th></tr></thead>
      <tbody></tbody>
    </table>
    <div class="empty" id="no-requests">No requests yet: they appear here as they cross the link.</div>
  </div>
  <div id="panes">
    <section class="pane" id="detail-original"><div class="empty">Select a request.</div></section>
    <section class="pane" id="detail-replay" hidden></section>
  </div>
</main>
<script>
"use strict";
const rows = new Map();
let selected = null;
let renderQueued = false;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}
function ms(v) { return v == null ? "" : (v < 10 ? v.toFixed(1) : Math.round(v)) + " ms"; }
function bytes(n) {
  if (n < 1024) return n + " B";
  return n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB";
}
function statusClass(r) { return r.error ? "err" : r.status ? "s" + String(r.status)[0] : ""; }
function statusText(r) {
  return r.status != null ? String(r.status) : r.error ? r.error : r.inFlight ? "..." : "";
}
function matches(r) {
  const s = $("filter-status").value, p = $("filter-path").value;
  if (p && !r.target.includes(p)) return false;
  if (!s) return true;
  if (s === "error") return !!r.error || (r.status != null && r.status >= 500);
  return r.status != null && String(r.status)[0] === s[0];
}
function render() {
  renderQueued = false;
  const body = $("requests").tBodies[0];
  const list = [...rows.values()].sort((a, b) => b.startedAt - a.startedAt || (b.id > a.id ? 1 : -1));
  const frag = document.createDocumentFragment();
  for (const r of list) {
    if (!matches(r)) continue;
    const time = new Date(r.startedAt * 1000).toLocaleTimeString();
    const path = el("td", { class: "path", title: r.target }, r.target);
    if (r.replayOf) path.append(el("span", { class: "tag" }, "replay"));
    const cls = "row" + (r.id === selected ? " selected" : "");
    const tr = el("tr", { class: cls, "data-id": r.id, onclick: () => select(r.id) },
      el("td", {}, time), el("td", {}, r.method), path,
      el("td", { class: "num " + statusClass(r) }, statusText(r)),
      el("td", { class: "num" }, ms(r.durationMs)), el("td", { class: "num" }, ms(r.ttfbMs)),
      el("td", { class: "num" }, bytes(r.requestBytes) + " / " + bytes(r.responseBytes)));
    frag.append(tr);
  }
  body.replaceChildren(frag);
  $("no-requests").hidden = rows.size > 0;
}
function queueRender() { if (!renderQueued) { renderQueued = true; setTimeout(render, 0); } }
function upsert(r) {
  rows.set(r.id, r);
  if (rows.size > 1000) {
    const oldest = [...rows.values()].sort((a, b) => a.startedAt - b.startedAt)[0];
    rows.delete(oldest.id);
  }
}

function bodyView(b) {
  const box = el("div", {});
  const note = b.size + " bytes" + (b.truncated ? " (first " + b.captured + " kept)" : "");
  if (b.kind === "empty") { box.append(el("div", { class: "note" }, "no body")); return box; }
  if (b.kind === "text") box.append(el("pre", { class: "body-text" }, b.text));
  else if (b.kind === "hex") {
    box.append(el("div", { class: "note" }, "binary, shown as hex"), el("pre", { class: "body-hex" }, b.hex));
  }
  else box.append(el("div", { class: "note" }, b.note || b.kind));
  box.append(el("div", { class: "note" }, note));
  return box;
}
function headersView(headers) {
  const t = el("table", { class: "headers" });
  for (const [k, v] of headers) t.append(el("tr", {}, el("td", {}, k), el("td", {}, v)));
  if (!headers.length) t.append(el("tr", {}, el("td", {}, "(none)")));
  return t;
}
function detailView(d, title) {
  const facts = [statusText(d), "duration " + (ms(d.durationMs) || "-"),
    "first byte " + (ms(d.ttfbMs) || "-"),
    "in " + bytes(d.requestBytes), "out " + bytes(d.responseBytes), d.route].join(" · ");
  const out = [el("h2", {}, title + ": " + d.method + " " + d.target), el("div", { class: "facts" }, facts)];
  if (d.error) out.push(el("div", { class: "err" }, d.error + (d.errorDetail ? ": " + d.errorDetail : "")));
  out.push(el("h3", {}, "Request headers"), headersView(d.request.headers),
    el("h3", {}, "Request body"), bodyView(d.request.body),
    el("h3", {}, "Response headers"), headersView(d.response.headers),
    el("h3", {}, "Response body"), bodyView(d.response.body));
  return out;
}
async function getJSON(url, init) {
  const resp = await fetch(url, init);
  const data = await resp.json();
  if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
  return data;
}
async function select(id) {
  selected = id; queueRender();
  const pane = $("detail-original");
  let d;
  try { d = await getJSON("/api/requests/" + encodeURIComponent(id)); }
  catch (e) { pane.replaceChildren(el("div", { class: "err" }, String(e.message))); return; }
  if (selected !== id) return;
  const actions = el("div", {},
    el("button", { id: "replay", type: "button", onclick: () => replay(id, null) }, "Replay"), " ",
    el("button", { id: "edit-replay", type: "button",
      onclick: () => $("replay-form").classList.toggle("open") }, "Edit and replay"));
  const send = (ev) => { ev.preventDefault(); replay(id, edits(form)); };
  const form = el("form", { id: "replay-form", onsubmit: send },
    el("label", {}, "Method"), el("input", { name: "method", value: d.method }),
    el("label", {}, "Path"), el("input", { name: "target", value: d.target }),
    el("label", {}, "Headers (one 'Name: value' a line; [redacted] keeps the real value)"),
    el("textarea", { name: "headers", rows: "6" }),
    el("label", {}, "Body"), el("textarea", { name: "body", rows: "6" }),
    el("button", { type: "submit", id: "send-edited" }, "Send"));
  form.elements.headers.value = d.request.headers.map(([k, v]) => k + ": " + v).join("\n");
  form.elements.body.value = d.request.body.kind === "text" ? d.request.body.text : "";
  pane.replaceChildren(actions, form, ...detailView(d, "Original"));
  pane.dataset.id = id;
}
function edits(form) {
  const headers = form.elements.headers.value.split("\n").filter((l) => l.includes(":"))
    .map((l) => { const i = l.indexOf(":"); return [l.slice(0, i).trim(), l.slice(i + 1).trim()]; });
  const f = form.elements;
  return { method: f.method.value.trim(), target: f.target.value.trim(), headers, body: f.body.value };
}
async function replay(id, changes) {
  const pane = $("detail-replay");
  pane.hidden = false;
  pane.replaceChildren(el("div", { class: "note", id: "replay-status" }, "replaying..."));
  try {
    const d = await getJSON("/api/requests/" + encodeURIComponent(id) + "/replay", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(changes || {}) });
    upsert(d); queueRender();
    const status = el("div", { class: "note", id: "replay-status" }, "replayed as " + d.id);
    pane.replaceChildren(status, ...detailView(d, "Replay"));
    pane.dataset.id = d.id;
  } catch (e) {
    pane.replaceChildren(el("div", { class: "err", id: "replay-status" }, "replay failed: " + e.message));
  }
}
async function load() {
  try {
    const data = await getJSON("/api/requests?limit=1000"); rows.clear();
    for (const r of data.requests) upsert(r); render();
  }
  catch (e) { $("live").textContent = "cannot load: " + e.message; }
}
function connect() {
  const source = new EventSource("/api/requests/stream");
  source.onopen = () => { $("live").textContent = "live"; };
  source.onerror = () => { $("live").textContent = "reconnecting..."; };
  source.addEventListener("exchange", (ev) => {
    const r = JSON.parse(ev.data); upsert(r); queueRender();
    const editing = $("replay-form")?.classList.contains("open");
    const shown = $("detail-original").dataset.id === r.id;
    if (r.id === selected && !r.inFlight && shown && !editing) select(r.id);
  });
  source.addEventListener("overrun", () => load());
}
$("filter-status").addEventListener("change", render);
$("filter-path").addEventListener("input", render);
load().then(connect);
</script>
</body>
</html>
"""
