// The status page: polls /api/status every two seconds and redraws.
"use strict";
const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
let lastOk = 0;

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value;
  if (cls) el.className = cls;
  return el;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c;
    tr.appendChild(td);
  }
  return tr;
}
function fill(id, rows, empty, cols) {
  const body = $(id);
  body.replaceChildren(...rows);
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = text("td", empty, "mute");
    td.colSpan = cols;
    tr.appendChild(td);
    body.appendChild(tr);
  }
}
function duration(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  const h = Math.floor(s % 86400 / 3600);
  return Math.floor(s / 86400) + "d" + (h ? " " + h + "h" : "");
}
function ago(t) { return t ? duration(Date.now() / 1000 - t) + " ago" : "never"; }
function mib(n) { return (n / 1048576).toFixed(1) + " MiB"; }
function lacking(theirs, ours) {
  let n = 0;
  for (const [k, v] of Object.entries(theirs)) n += Math.max(0, v - (ours[k] || 0));
  return n;
}

function draw(s) {
  document.title = "dfs-peer: " + s.name;
  $("title").textContent = "dfs-peer · " + s.name;
  $("subtitle").textContent = "node " + s.short_id + " · volume " + s.volume.slice(0, 16) + " · up " + duration(s.uptime_s);
  const dl = $("node");
  dl.replaceChildren();
  const facts = [
    ["mount", s.mountpoint + (s.read_only ? " (read-only)" : " (read-write)")],
    ["data dir", s.data_dir],
    ["peers at", s.listen || "-"],
    ["volume", s.files.toLocaleString() + " files, " + s.operations.toLocaleString() + " operations (" + s.own_operations.toLocaleString() + " from here)"],
    ["store", s.blocks.toLocaleString() + " blocks, " + mib(s.store_bytes)],
  ];
  for (const [k, v] of facts) { dl.appendChild(text("dt", k)); dl.appendChild(text("dd", v)); }

  const connected = s.peers.filter((p) => p.connected).length;
  const c = s.catching_up;
  if (c) {
    $("sync").replaceChildren(text("span", "catching up: " + Math.round(c.fraction * 100) + "%", "warn"),
      text("span", c.eta_s != null ? " · about " + duration(c.eta_s) + " left" : ""));
    $("syncbar").style.width = (c.fraction * 100).toFixed(1) + "%";
    $("synccounts").textContent = c.operations_done.toLocaleString() + " of " + c.operations_total.toLocaleString() +
      " operations · " + c.blocks_fetched.toLocaleString() + " blocks (" + mib(c.bytes_fetched) + ") received";
  } else {
    const alone = !s.peers.length;
    $("sync").replaceChildren(alone ? text("span", "alone: no peer known yet", "mute")
      : connected ? text("span", "up to date with " + connected + " connected peer" + (connected > 1 ? "s" : ""), "ok")
      : text("span", "no peer connected", "bad"));
    $("syncbar").style.width = alone || !connected ? "0%" : "100%";
    $("synccounts").textContent = "received so far: " + s.sync.operations_received.toLocaleString() + " operations, " +
      s.sync.blocks_received.toLocaleString() + " blocks, " + mib(s.sync.bytes_received);
  }

  const ours = s.version_vector;
  fill("peers", s.peers.map((p) => {
    const we = p.id ? lacking(p.version_vector, ours) : 0, they = p.id ? lacking(ours, p.version_vector) : 0;
    const sync = !p.id ? "-" : (!we && !they) ? "up to date" : [we ? we + " ops to get" : "", they ? they + " ops it lacks" : ""].filter(Boolean).join(", ");
    const state = p.connected ? text("span", "connected", "ok") : text("span", "unreachable", "bad");
    if (!p.connected && p.last_error) state.title = p.last_error;
    return row([p.name || "?", text("span", (p.id || "-").slice(0, 8), "id"), p.address, state, ago(p.last_seen), sync]);
  }), "no peers yet: mDNS finds those on the LAN, --peer names others", 6);

  const gc = s.gc || {};
  const held = new Set((gc.held_back_by || []).map((m) => m.id));
  const notStable = gc.operations_not_stable || 0;
  $("horizon").replaceChildren(
    held.size ? text("p", "Collection is held back by " + [...held].length + " member(s): old versions stay until they catch up.", "warn")
      : text("p", "Every member holds every operation up to the horizon: nothing holds collection back.", "ok"),
    text("p", notStable.toLocaleString() + " operations newer than the horizon (not yet held by every member); history kept " + duration(gc.keep_history_s || 0) +
      (gc.last_collection && gc.last_collection.ran ? "; last collection " + ago(gc.last_collection.at) + " freed " + mib(gc.last_collection.bytes_freed) : ""), "mute"));
  fill("members", (gc.members || []).map((m) => row([
    m.name + (m.id === s.node_id ? " (this node)" : "") + (m.forgotten ? " (forgotten)" : ""),
    text("span", m.id.slice(0, 8), "id"),
    m.id === s.node_id ? "now" : ago(m.last_seen),
    held.has(m.id) ? text("span", m.behind.toLocaleString() + " ops behind", "warn") : text("span", "up to date", "ok"),
  ])), "no members yet", 4);

  fill("conflicts", (s.conflicts || []).map((c) => row([
    text("code", c.path),
    c.version_node + " at " + c.version_time,
    (c.file || "(gone)") + (c.file_version ? ": " + c.file_version_node + " at " + c.file_version_time : ""),
  ])), "none", 3);
}

async function poll() {
  try {
    const r = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    draw(await r.json());
    lastOk = Date.now();
    $("live").textContent = "live · updated " + new Date().toLocaleTimeString();
    $("live").className = "";
  } catch (e) {
    $("live").textContent = "not answering (" + e.message + ")" + (lastOk ? " · last update " + new Date(lastOk).toLocaleTimeString() : "");
    $("live").className = "stale";
  }
}

async function showHistory(ev) {
  ev.preventDefault();
  const path = $("historypath").value.trim();
  $("historyerror").textContent = "";
  const r = await fetch("/api/history?path=" + encodeURIComponent(path), { credentials: "same-origin" });
  const a = await r.json();
  if (!r.ok) { $("historyerror").textContent = a.error; fill("history", [], "", 4); return; }
  fill("history", a.versions.map((v) => row([
    v.time, (v.node + " " + v.node_name).trim(), v.size.toLocaleString(),
    [v.kind, v.current ? "current" : "", v.conflict ? "conflict copy" : "", v.available ? "" : "unavailable (collected)"].filter(Boolean).join(", "),
  ])), "no versions", 4);
}

$("historyform").addEventListener("submit", showHistory);
poll();
setInterval(poll, POLL_MS);
