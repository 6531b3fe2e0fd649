// The crystalscope page: no framework, no build step, no request to any other server.
"use strict";

const state = { token: sessionStorage.getItem("crystalscope-token") || "", model: null,
                csvHeader: "", csvRows: [], pending: 0 };
const $ = (id) => document.getElementById(id);

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: "the server sent no JSON (" + response.status + ")" }; }
  if (response.status === 401) { $("token-form").hidden = false; }
  return { ok: response.ok, status: response.status, body };
}

async function loadModel() {
  const { ok, body } = await api("/api/model");
  if (!ok) { $("model").textContent = "model unavailable: " + body.error; return; }
  state.model = body;
  const parts = ["classes: " + body.class_names.join(", "), "model: " + body.model_file,
                 body.backbone ? "backbone: " + body.backbone : null, "backend: " + body.backend,
                 "temperature: " + Number(body.temperature).toFixed(3)];
  if (body.rejection && body.rejection.threshold != null) parts.push("rejection threshold: " + body.rejection.threshold);
  if (body.sha256) parts.push("sha256: " + body.sha256.slice(0, 12));
  parts.push("crystalscope " + body.crystalscope_version);
  $("model").textContent = parts.filter(Boolean).join(" · ");
  $("model").dataset.classes = body.class_names.join(",");
}

function addRow(file) {
  const li = document.createElement("li");
  li.className = "row pending";
  li.dataset.filename = file.name;
  const img = document.createElement("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);  // the thumbnail shows before the server answers
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = file.name;
  const label = document.createElement("div");
  label.className = "label";
  const status = document.createElement("div");
  status.className = "status";
  status.textContent = "labelling...";
  li.append(img, name, label, status);
  $("results").append(li);
  return li;
}

function showResult(li, result) {
  const status = String(result.status || "");
  const label = li.querySelector(".label");
  li.classList.remove("pending");
  li.dataset.status = status;
  if (status.startsWith("error")) {
    li.classList.add("failed");
    li.querySelector(".status").textContent = status;
    return;
  }
  const confidence = Number(result.confidence);
  const predicted = document.createElement("span");
  predicted.className = "predicted";
  predicted.textContent = result.predicted;
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.title = "confidence " + (100 * confidence).toFixed(1) + "%";
  const fill = document.createElement("span");
  fill.style.width = Math.max(0, Math.min(100, 100 * confidence)).toFixed(1) + "%";
  bar.append(fill);
  const value = document.createElement("span");
  value.className = "confidence";
  value.textContent = (100 * confidence).toFixed(1) + "%";
  label.append(predicted, bar, value);
  const probabilities = Object.entries(result.probabilities || {})
    .map(([name, p]) => name + " " + Number(p).toFixed(3)).join(", ");
  if (status.startsWith("rejected")) {
    li.classList.add("rejected");
    const flag = document.createElement("span");
    flag.className = "flag";
    flag.textContent = "rejected";
    label.prepend(flag);
    const reason = status.replace(/^rejected:?\s*/, "") || "outside what the model was trained on";
    li.querySelector(".status").textContent = "rejected: " + reason + " (" + probabilities + ")";
  } else {
    li.querySelector(".status").textContent = probabilities;
  }
}

function fail(li, message) {
  showResult(li, { status: "error: " + message });
}

function addCsv(text) {
  const cut = text.indexOf("\n") + 1;  // header line, then rows exactly as `predict` writes them
  if (!state.csvHeader) state.csvHeader = text.slice(0, cut);
  state.csvRows.push(text.slice(cut));
}

function chunks(files) {
  const limits = (state.model && state.model.limits) || { max_files: 16, max_request_bytes: 8 << 20 };
  const out = [];
  let current = [], bytes = 0;
  for (const item of files) {
    const size = item.file.size + 1024;  // multipart overhead per part
    if (current.length && (current.length >= limits.max_files || bytes + size > 0.95 * limits.max_request_bytes)) {
      out.push(current); current = []; bytes = 0;
    }
    current.push(item); bytes += size;
  }
  if (current.length) out.push(current);
  return out;
}

async function send(batch) {
  const form = new FormData();
  for (const item of batch) form.append("files", item.file, item.file.name);
  const { ok, body } = await api("/api/predict", { method: "POST", body: form });
  if (ok) {
    body.results.forEach((result, i) => showResult(batch[i].li, result));
    addCsv(body.csv);
  } else if (batch.length > 1) {
    for (const item of batch) await send([item]);  // find out which file was refused, and why
  } else {
    fail(batch[0].li, body.error.replace(batch[0].file.name + ": ", ""));
  }
}

async function handleFiles(fileList) {
  const items = Array.from(fileList).map((file) => ({ file, li: addRow(file) }));
  if (!items.length) return;
  $("notice").hidden = true;
  state.pending += items.length;
  updateSummary();
  for (const batch of chunks(items)) {
    try { await send(batch); }
    catch (e) { batch.forEach((item) => fail(item.li, "the server did not answer (" + e + ")")); }
    state.pending -= batch.length;
    updateSummary();
  }
}

function updateSummary() {
  const rows = Array.from(document.querySelectorAll(".row"));
  const done = rows.filter((r) => !r.classList.contains("pending"));
  const failed = rows.filter((r) => r.classList.contains("failed")).length;
  const rejected = rows.filter((r) => r.classList.contains("rejected")).length;
  $("summary").textContent = rows.length ? done.length + " of " + rows.length + " labelled" +
    (rejected ? ", " + rejected + " rejected" : "") + (failed ? ", " + failed + " errors" : "") : "";
  $("download").disabled = state.csvRows.length === 0 || state.pending > 0;
  $("clear").disabled = rows.length === 0 || state.pending > 0;
}

function downloadCsv() {
  const blob = new Blob([state.csvHeader + state.csvRows.join("")], { type: "text/csv" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "predictions.csv";
  document.body.append(link);
  link.click();
  link.remove();
}

function clearAll() {
  document.querySelectorAll(".row img").forEach((img) => URL.revokeObjectURL(img.src));
  $("results").replaceChildren();
  state.csvHeader = ""; state.csvRows = [];
  updateSummary();
}

function wire() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => handleFiles(e.dataTransfer.files));
  $("files").addEventListener("change", (e) => { handleFiles(e.target.files); e.target.value = ""; });
  $("download").addEventListener("click", downloadCsv);
  $("clear").addEventListener("click", clearAll);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("crystalscope-token", state.token);
    $("token-form").hidden = true;
    loadModel();
  });
  loadModel();
}

wire();
