// The Data, Evaluate, Chat and Export tabs. Each button calls one API route, which runs the CLI's own code.
"use strict";

// ---- Data ----------------------------------------------------------------------------------------------------
// `data preview` marks trained tokens with a terminal colour; they become <mark> here (text escaped first).
function ansiToHtml(text) {
  return esc(text).replace(/\x1b\[42;30m([\s\S]*?)\x1b\[0m/g, '<mark class="trained">$1</mark>')
    .replace(/\x1b\[[0-9;]*m/g, "");
}

function cliText(res) {
  return [res.output, ...(res.log || []), res.error || ""].filter(Boolean).join("\n");
}

async function listDatasets() {
  try {
    const res = await api("/api/data/datasets", { values: UI.values, source: UI.source });
    $("reg-dir").value = $("reg-dir").value || res.dataset_dir;
    $("datasets").innerHTML = `<p class="note">${esc(res.dataset_dir)}</p><table><tr><th>${t("name")}</th>`
      + `<th>${t("file")}</th><th>${t("formatting")}</th><th>${t("exists")}</th></tr>`
      + res.datasets.map((d) => `<tr><td>${esc(d.name)}</td><td>${esc(d.file_name || "")}</td>`
        + `<td>${esc(d.formatting)}</td><td>${d.exists ? "✓" : "✗"}</td></tr>`).join("") + "</table>";
  } catch (err) { $("datasets").innerHTML = `<div class="error">${esc(err.message)}</div>`; }
}

function wireData() {
  $("pv-go").addEventListener("click", async () => {
    $("pv-out").textContent = t("loading");
    try {
      const res = await api("/api/data/preview", {
        values: UI.values, source: UI.source, index: Number($("pv-index").value), split: $("pv-split").value });
      if (res.error) { $("pv-head").textContent = ""; $("pv-out").innerHTML = `<span class="bad">${esc(res.error)}</span>`; return; }
      const lines = res.output.split("\n");
      const start = lines.findIndex((l) => l.startsWith("----- rendered"));
      $("pv-head").textContent = lines.slice(0, Math.max(start, 0)).join(" · ");
      $("pv-out").innerHTML = ansiToHtml(lines.slice(start + 1, lines.lastIndexOf("-----")).join("\n"));
    } catch (err) { $("pv-out").textContent = err.message; }
  });
  $("check-go").addEventListener("click", async () => {
    $("check-out").textContent = t("loading");
    try { $("check-out").textContent = cliText(await api("/api/data/check", { values: UI.values, source: UI.source })); }
    catch (err) { $("check-out").textContent = err.message; }
  });
  $("reg-go").addEventListener("click", async () => {
    try {
      $("reg-out").textContent = cliText(await api("/api/data/register", {
        name: $("reg-name").value, file: $("reg-file").value, formatting: $("reg-format").value,
        dataset_dir: $("reg-dir").value }));
      listDatasets();
    } catch (err) { $("reg-out").textContent = err.message; }
  });
  $("cv-go").addEventListener("click", async () => {
    try {
      $("cv-res").textContent = cliText(await api("/api/data/convert", {
        input: $("cv-in").value, output: $("cv-out").value, to: "sharegpt", limit: $("cv-limit").value }));
    } catch (err) { $("cv-res").textContent = err.message; }
  });
  document.addEventListener("configloaded", listDatasets);
}

// ---- Evaluate ------------------------------------------------------------------------------------------------
function adapterDefault() { return shown(UI.values.output_dir) || "saves/run"; }

// Paths derived from the config's output_dir follow it when another config is loaded, unless the user typed
// something else into them.
const DERIVED = {};

function defaultPaths() {
  const adapter = adapterDefault();
  const wanted = { "ev-adapter": adapter, "ch-adapter": adapter, "ex-adapter": adapter, "ev-out": `${adapter}/eval`,
    "ev-variants": `base,${adapter}`, "ex-dir": `${adapter}/export` };
  for (const [id, value] of Object.entries(wanted)) {
    if (!$(id).value || $(id).value === DERIVED[id]) $(id).value = value;
    DERIVED[id] = value;
  }
}

function scoreTable(rows) {
  const keys = [...new Set(rows.flatMap((r) => Object.keys(r.scores)))];
  return `<table><tr><th>variant</th>${keys.map((k) => `<th>${esc(k)}</th>`).join("")}<th>samples/s</th></tr>`
    + rows.map((r) => `<tr><td>${esc(r.variant)}</td>${keys.map((k) => `<td>${r.scores[k] ?? "-"}</td>`).join("")}`
      + `<td>${r.samples_per_second ?? "-"}</td></tr>`).join("") + "</table>";
}

async function showEvalJob(job) {
  showJobState("ev", job);
  showError("ev-error", job.error);
  $("ev-log").textContent = (job.log || []).slice(-40).join("\n");
  if (job.state !== "finished") return;
  const res = await api(`/api/jobs/${job.id}/results`);
  let html = "";
  if (res.metrics) {
    html += `<table id="ev-metrics">${Object.entries(res.metrics).map(([k, v]) =>
      `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join("")}</table>`;
  }
  if (res.comparison) html += scoreTable(res.comparison.variants || []);
  if (res.chart) html += `<img id="ev-chart" alt="comparison chart" src="/api/jobs/${job.id}/chart.png?t=${Date.now()}">`;
  $("ev-results").innerHTML = html;
}

function evalValues() {
  return { ...UI.values, adapter_name_or_path: $("ev-adapter").value, output_dir: $("ev-out").value };
}

function wireEval() {
  $("ev-predict").addEventListener("click", () =>
    startJob("predict", {}, showEvalJob, "ev-error", "eval", evalValues()));
  $("ev-compare").addEventListener("click", () =>
    startJob("eval", { variants: $("ev-variants").value }, showEvalJob, "ev-error", "eval", evalValues()));
}

// ---- Chat ----------------------------------------------------------------------------------------------------
const CHAT = { base: [], adapter: [] };
const BOX = { base: "ch-base", adapter: "ch-adapter-log" };

function describeModels(models) {
  for (const slot of ["base", "adapter"]) {
    $(`ch-${slot}-name`).textContent = models[slot] ? `(${models[slot].model})` : `(${t("not_loaded")})`;
  }
}

async function chatLoad(slot, load) {
  showError("ch-error", null);
  $(`ch-${slot}-name`).textContent = `(${t("loading")})`;
  try {
    const values = { ...UI.values, adapter_name_or_path: $("ch-adapter").value };
    describeModels(load ? await api("/api/chat/load", { slot, values, source: UI.source })
      : await api("/api/chat/unload", { slot }));
  } catch (err) { showError("ch-error", err); describeModels(await api("/api/chat")); }
}

function bubble(slot, role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $(BOX[slot]).appendChild(div);
  return div;
}

async function ask(slot, text) {
  CHAT[slot].push({ role: "user", content: text });
  bubble(slot, "user", text);
  const out = bubble(slot, "assistant", "");
  const think = document.createElement("span");
  think.className = "reasoning";
  const answer = document.createElement("span");
  out.append(think, answer);
  const res = await fetch("/api/chat/stream", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ slot, messages: CHAT[slot], thinking: $("ch-think").checked,
      max_new_tokens: Number($("ch-max").value) || 64, system: $("ch-system").value }) });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const msg = JSON.parse(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 1);
      if (msg.error) { out.classList.add("bad"); answer.textContent = msg.error; CHAT[slot].pop(); return; }
      if (msg.done) {
        out.dataset.done = msg.finish_reason || "stop";
        const meta = document.createElement("small");
        meta.className = "meta";
        meta.textContent = `${msg.completion_tokens} tokens · ${msg.finish_reason}`;
        out.appendChild(meta);
        continue;
      }
      (msg.kind === "reasoning" ? think : answer).textContent += msg.text;
    }
  }
  CHAT[slot].push({ role: "assistant", content: answer.textContent });
}

function wireChat() {
  $("ch-load-base").addEventListener("click", () => chatLoad("base", true));
  $("ch-unload-base").addEventListener("click", () => chatLoad("base", false));
  $("ch-load-adapter").addEventListener("click", () => chatLoad("adapter", true));
  $("ch-unload-adapter").addEventListener("click", () => chatLoad("adapter", false));
  $("ch-send").addEventListener("click", async () => {
    const text = $("ch-input").value.trim();
    if (!text) return;
    $("ch-input").value = "";
    const models = await api("/api/chat");
    const slots = $("ch-both").checked ? ["base", "adapter"].filter((s) => models[s]) : [models.adapter ? "adapter" : "base"];
    if (!slots.length) { showError("ch-error", t("not_loaded")); return; }
    await Promise.all(slots.map((s) => ask(s, text).catch((err) => showError("ch-error", err))));
  });
  $("ch-clear").addEventListener("click", () => {
    for (const slot of ["base", "adapter"]) { CHAT[slot] = []; $(BOX[slot]).innerHTML = ""; }
  });
  api("/api/chat").then(describeModels).catch(() => {});
}

// ---- Export --------------------------------------------------------------------------------------------------
function size(bytes) {
  return bytes < 1048576 ? `${(bytes / 1024).toFixed(1)} KiB` : `${(bytes / 1048576).toFixed(1)} MiB`;
}

async function showExportJob(job) {
  showJobState("ex", job);
  showError("ex-error", job.error);
  $("ex-log").textContent = (job.log || []).slice(-60).join("\n");
  if (job.state !== "finished") return;
  const res = await api(`/api/jobs/${job.id}/results`);
  $("ex-files").innerHTML = (res.files || []).length ? `<table>${res.files.map(([n, s]) =>
    `<tr><td>${esc(n)}</td><td>${size(s)}</td></tr>`).join("")}</table>` : "";
}

function exportValues() {
  const out = { ...UI.values, adapter_name_or_path: $("ex-adapter").value, export_dir: $("ex-dir").value,
    export_format: $("ex-format").value, export_quantization: $("ex-quant").value, export_ollama: $("ex-ollama").checked };
  if ($("ex-hub").value) out.export_hub_model_id = $("ex-hub").value;
  return out;
}

function wireExport() {
  UI.fields.export_format.choices.forEach((c) => $("ex-format").add(new Option(c)));
  UI.fields.export_quantization.choices.forEach((c) => $("ex-quant").add(new Option(c)));
  $("ex-format").value = "gguf";
  $("ex-quant").value = "q8_0";
  const run = (dry) => startJob("export", { dry_run: dry, overwrite: $("ex-overwrite").checked }, showExportJob,
    "ex-error", "export", exportValues());
  $("ex-dry").addEventListener("click", () => run(true));
  $("ex-go").addEventListener("click", () => run(false));
}

function wirePages() {
  wireData();
  wireEval();
  wireChat();
  wireExport();
  document.addEventListener("configloaded", defaultPaths);
  document.addEventListener("valuechange", (e) => { if (e.detail === "output_dir") defaultPaths(); });
  document.addEventListener("jobsloaded", (e) => {
    const last = (kind) => e.detail.find((j) => j.kind === kind);
    const ev = last("eval") || last("predict");
    if (ev) follow(ev.id, showEvalJob, "ev-error", "eval");
    if (last("export")) follow(last("export").id, showExportJob, "ex-error", "export");
  });
}

// app.js's init() builds the form from the schema first; the pages wire themselves once that is done.
document.addEventListener("schemaready", wirePages);
