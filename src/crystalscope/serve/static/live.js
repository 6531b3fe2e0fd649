// The live view: polls /api/live once a second and redraws the chart; no other server is asked.
"use strict";
const live = { token: sessionStorage.getItem("crystalscope-token") || "", rows: [], info: null, overlay: null };
const el = (id) => document.getElementById(id);

async function poll() {
  const headers = live.token ? { Authorization: "Bearer " + live.token } : {};
  try {
    const response = await fetch("/api/live?since=" + live.rows.length, { headers, cache: "no-store" });
    if (response.status === 401) { el("token-form").hidden = false; return; }
    if (!response.ok) return;
    const state = await response.json();
    if (state.frames < live.rows.length) live.rows = [];  // a new run replaced the folder
    live.rows = live.rows.concat(state.rows);
    live.info = state;
    render(state);
  } catch (error) {
    el("now").textContent = "no answer from the server: " + error;
  }
}

function num(text) { return text === "" || text === undefined ? null : Number(text); }

function render(state) {
  const watched = state.watched || "pg";
  el("run").textContent = (state.run ? "run " + state.run + ", " : "") + live.rows.length + " frames" +
    (state.rule ? "; alarm rule: " + state.rule : "");
  const last = live.rows[live.rows.length - 1];
  if (last) {
    const counts = (state.class_names || []).map((c) => c + " " + last["n_" + c]).join(", ");
    const fraction = num(last[watched + "_fraction"]);
    el("now").textContent = "frame " + last.frame + " (" + last.file + ", t=" + Number(last.time_s).toFixed(0) +
      " s): " + counts + "; " + watched + " fraction " + (fraction === null ? "-" : fraction.toFixed(3)) +
      ", EWMA " + (num(last.ewma) === null ? "-" : num(last.ewma).toFixed(3)) + "; " + last.status;
  }
  const list = el("alarms");
  list.replaceChildren();
  for (const a of state.alarms) {
    const item = document.createElement("li");
    item.textContent = "frame " + a.frame + " (" + a.file + ") at " + a.time_s + " s: EWMA " + a.ewma;
    list.appendChild(item);
  }
  if (!state.alarms.length) { const none = document.createElement("li"); none.className = "muted"; none.textContent = "none"; list.appendChild(none); }
  if (state.overlay && state.overlay !== live.overlay) {
    live.overlay = state.overlay;
    el("overlay").src = "/api/live/overlay/" + encodeURIComponent(state.overlay);
    el("overlay").hidden = false;
    el("no-overlay").hidden = true;
  }
  draw(watched, state.limit, state.alarms);
}

function draw(watched, limit, alarms) {
  const canvas = el("chart");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 40;
  g.clearRect(0, 0, w, h);
  const times = live.rows.map((r) => Number(r.time_s));
  const tMax = Math.max(1, ...times);
  const x = (t) => pad + (w - 2 * pad) * t / tMax;
  const y = (v) => h - pad - (h - 2 * pad) * v;
  g.strokeStyle = "#888"; g.lineWidth = 1;
  g.strokeRect(pad, pad, w - 2 * pad, h - 2 * pad);
  g.fillStyle = "#555"; g.font = "12px sans-serif";
  g.fillText("1.0", 8, y(1) + 4); g.fillText("0.0", 8, y(0) + 4);
  g.fillText(tMax.toFixed(0) + " s", w - pad - 30, h - pad + 16);
  g.fillStyle = "rgba(120,120,120,0.25)";  // the 95 % band, one bar per frame
  for (const r of live.rows) {
    const low = num(r.ci95_low), high = num(r.ci95_high);
    if (low !== null && high !== null) g.fillRect(x(Number(r.time_s)) - 2, y(high), 4, y(low) - y(high));
  }
  let points = 0;
  g.fillStyle = "#d04020";
  for (const r of live.rows) {
    const f = num(r[watched + "_fraction"]);
    if (f === null) continue;
    g.beginPath(); g.arc(x(Number(r.time_s)), y(f), 2.5, 0, 2 * Math.PI); g.fill();
    points += 1;
  }
  g.strokeStyle = "#1060c0"; g.lineWidth = 2; g.beginPath();
  let started = false;
  for (const r of live.rows) {
    const e = num(r.ewma);
    if (e === null) continue;
    if (started) g.lineTo(x(Number(r.time_s)), y(e)); else g.moveTo(x(Number(r.time_s)), y(e));
    started = true;
  }
  g.stroke();
  if (limit !== null && limit !== undefined) {
    g.setLineDash([6, 4]); g.strokeStyle = "#b00"; g.lineWidth = 1;
    g.beginPath(); g.moveTo(pad, y(limit)); g.lineTo(w - pad, y(limit)); g.stroke(); g.setLineDash([]);
  }
  g.strokeStyle = "#e00"; g.lineWidth = 2;
  for (const a of alarms) { g.beginPath(); g.moveTo(x(a.time_s), pad); g.lineTo(x(a.time_s), h - pad); g.stroke(); }
  canvas.dataset.points = String(points);  // what the browser test counts
  canvas.dataset.frames = String(live.rows.length);
}

el("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  live.token = el("token").value.trim();
  sessionStorage.setItem("crystalscope-token", live.token);
  el("token-form").hidden = true;
  poll();
});
poll();
setInterval(poll, 1000);
