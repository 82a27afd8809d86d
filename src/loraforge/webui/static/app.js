// The page shell: the config store and its generated form, the top bar, and the Train tab.
// The store holds only the keys the loaded YAML had plus the keys changed here, in order, so saving writes the
// same file back; the server turns it into YAML, a command line and the CLI's own validation messages.
"use strict";

const $ = (id) => document.getElementById(id);
const UI = { schema: null, values: {}, source: null, fields: {}, job: null, timers: {} };

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, opts);
  let data;
  try { data = await res.json(); } catch (e) { data = { error: `${res.status} ${res.statusText}` }; }
  if (!res.ok || (data && data.error && !("rc" in data))) throw new Error((data && data.error) || res.statusText);
  return data;
}

function showError(id, err) {
  const box = $(id);
  box.hidden = !err;
  box.textContent = err ? String(err.message || err) : "";
}

function esc(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

function debounce(fn, ms) {
  let handle = null;
  return (...args) => { clearTimeout(handle); handle = setTimeout(() => fn(...args), ms); };
}

// ---- config store and form -----------------------------------------------------------------------------------
function shown(value) {
  if (value === undefined) return "";
  if (value === null) return "null";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function syncInputs(key, except) {
  document.querySelectorAll(`[data-key="${key}"]`).forEach((el) => {
    if (el === except) return;
    const value = UI.values[key];
    if (el.type === "checkbox") {
      el.checked = value === undefined ? Boolean(UI.fields[key] && UI.fields[key].default) : Boolean(value);
    } else if (el.tagName === "SELECT") {
      const want = value === undefined ? "" : JSON.stringify(value);
      if (![...el.options].some((o) => o.value === want)) el.add(new Option(shown(value), want));
      el.value = want;
    } else {
      el.value = shown(value);
    }
  });
}

// The page's values survive a reload or a UI restart (unsaved edits included); Load reads the file again.
function remember() {
  localStorage.setItem("loraforge.page", JSON.stringify({ source: UI.source, values: UI.values }));
}

function setValue(key, value, source) {
  if (value === "" || value === undefined) delete UI.values[key];
  else UI.values[key] = value;
  syncInputs(key, source);
  remember();
  onValuesChanged(key);
}

function inputFor(field) {
  let el;
  if (field.kind === "bool") {
    el = document.createElement("input");
    el.type = "checkbox";
    el.addEventListener("change", () => setValue(field.name, el.checked, el));
  } else if (field.kind === "choice") {
    el = document.createElement("select");
    el.add(new Option(`(${shown(field.default) || "-"})`, ""));
    field.choices.forEach((c) => el.add(new Option(shown(c), JSON.stringify(c))));
    el.addEventListener("change", () => setValue(field.name, el.value === "" ? "" : JSON.parse(el.value), el));
  } else {
    el = document.createElement("input");
    el.placeholder = field.default === null ? "" : shown(field.default);
    if (field.name === "template") el.setAttribute("list", "template-list");
    if (field.name === "model_name_or_path") el.setAttribute("list", "model-list");
    el.addEventListener("change", () => setValue(field.name, el.value, el));
  }
  el.dataset.key = field.name;
  el.id = `f-${field.name}`;
  return el;
}

function buildForm() {
  const form = $("form");
  form.innerHTML = "";
  for (const group of UI.schema.groups) {
    const box = document.createElement("details");
    box.open = ["model", "data", "finetuning", "training"].includes(group.name);
    box.innerHTML = `<summary>${esc(group.name)}</summary>`;
    const more = document.createElement("details");
    more.innerHTML = `<summary data-i18n="more">${esc(t("more"))}</summary>`;
    for (const field of group.fields) {
      UI.fields[field.name] = field;
      const row = document.createElement("label");
      row.className = "field";
      row.title = field.help;
      row.innerHTML = `<code>${esc(field.name)}</code><span class="help">${esc(field.help)}</span>`;
      row.insertBefore(inputFor(field), row.children[1]);
      (field.advanced ? more : box).appendChild(row);
    }
    if (more.children.length > 1) box.appendChild(more);
    form.appendChild(box);
  }
  const list = document.createElement("datalist");
  list.id = "template-list";
  UI.schema.templates.forEach((name) => list.appendChild(new Option(name)));
  form.appendChild(list);
}

function fillTopBar() {
  UI.schema.configs.forEach((c) => $("config-list").appendChild(new Option(c)));
  UI.schema.models.forEach((m) => $("model-list").appendChild(new Option(m)));
  const choices = (select, values, dflt) => {
    select.add(new Option(`(${dflt})`, ""));
    values.forEach((v) => select.add(new Option(shown(v), JSON.stringify(v))));
    select.addEventListener("change", () =>
      setValue(select.dataset.key, select.value === "" ? "" : JSON.parse(select.value), select));
  };
  choices($("quick-template"), UI.schema.templates, "auto");
  choices($("quick-method"), UI.fields.finetuning_type.choices, UI.fields.finetuning_type.default);
  choices($("quick-quant"), UI.fields.quantization_bit.choices, t("none"));
  const model = document.querySelector('#top [data-key="model_name_or_path"]');
  model.addEventListener("change", () => setValue("model_name_or_path", model.value, model));
  $("est-gpu").add(new Option(`(${t("detected")})`, ""));
  UI.schema.gpus.forEach((g) => $("est-gpu").add(new Option(g)));
  $("est-gpu").addEventListener("change", () => refreshEstimate());
}

function allKeys() { Object.keys(UI.fields).forEach((k) => syncInputs(k)); }

// Keys of the loaded YAML that no config field declares (a typo, a key of another tool): shown, editable and
// removable here, so the "unknown key" problem can be fixed on the page.
function renderExtras() {
  const extra = Object.keys(UI.values).filter((k) => !UI.fields[k]);
  const box = $("extras");
  box.hidden = !extra.length;
  box.innerHTML = extra.length ? `<b>${esc(t("unknown_keys"))}</b>` : "";
  for (const key of extra) {
    const row = document.createElement("label");
    row.className = "field";
    row.innerHTML = `<code class="bad">${esc(key)}</code>`;
    const input = document.createElement("input");
    input.value = shown(UI.values[key]);
    input.addEventListener("change", () => setValue(key, input.value, input));
    const remove = document.createElement("button");
    remove.textContent = "✕";
    remove.className = "remove";
    remove.addEventListener("click", (e) => { e.preventDefault(); setValue(key, undefined); });
    row.append(input, remove);
    box.appendChild(row);
  }
}

async function loadConfig(path) {
  const data = await api("/api/config/load", { path });
  UI.values = data.values;
  UI.source = path;
  remember();
  allKeys();
  onValuesChanged("*");
  document.dispatchEvent(new Event("configloaded"));
}

const refreshRender = debounce(async () => {
  try {
    const data = await api("/api/config/render", { values: UI.values, source: UI.source });
    $("yaml").textContent = data.yaml;
    $("command").textContent = data.command;
    $("problems").innerHTML = data.problems.length
      ? data.problems.map((p) => `<li class="bad">${esc(p)}</li>`).join("")
      : `<li class="good">${esc(t("no_problems"))}</li>`;
  } catch (err) { showError("global-error", err); }
}, 250);

const refreshEstimate = debounce(async () => {
  try {
    const est = await api("/api/estimate", { values: UI.values, gpu: $("est-gpu").value });
    const verdict = est.fits === null ? t("no_gpu")
      : `${est.gpu} (${est.gpu_gib} GiB): ${est.fits ? t("fits") : t("not_fits")} — ${est.needed_gib} GiB`;
    $("est-verdict").textContent = verdict;
    $("est-verdict").className = `verdict ${est.fits === false ? "bad" : est.fits ? "good" : ""}`;
    $("est-lines").textContent = est.lines.join("\n");
  } catch (err) {
    $("est-verdict").textContent = String(err.message || err);
    $("est-lines").textContent = "";
  }
}, 600);

const refreshTemplate = debounce(async () => {
  try {
    const res = await api("/api/template/check", { values: UI.values, source: UI.source });
    $("tpl-warning").hidden = !res.warning;
    $("tpl-warning").textContent = res.warning ? `${t("tpl_warning")}: ${res.warning}` : "";
  } catch (err) {
    $("tpl-warning").hidden = false;
    $("tpl-warning").textContent = String(err.message || err);
  }
}, 800);

function onValuesChanged(key) {
  document.dispatchEvent(new CustomEvent("valuechange", { detail: key }));
  renderExtras();
  refreshRender();
  refreshEstimate();
  if (["*", "model_name_or_path", "template", "enable_thinking"].includes(key)) refreshTemplate();
}

// ---- Train tab -------------------------------------------------------------------------------------------------
// The state line of a job, and the command it runs (what to type to do the same in a terminal).
function showJobState(prefix, job) {
  $(`${prefix}-state`).textContent = stateText(job);
  $(`${prefix}-state`).className = `state ${job.state}`;
  $(`${prefix}-cmd`).textContent = job.command || "";
}

function stateText(job) {
  return job ? `${t("job")} ${job.id}: ${t(job.state)}${job.stop_requested && job.state === "running" ? " …" : ""}` : "";
}

function drawLoss(points, evalPoints) {
  const svg = $("loss-chart");
  if (!points.length) { svg.innerHTML = ""; return; }
  const all = points.concat(evalPoints);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys, Math.min(...ys) + 1e-6)];
  const X = (x) => 40 + ((x - x0) / (x1 - x0)) * 550, Y = (y) => 200 - ((y - y0) / (y1 - y0)) * 185;
  const line = (pts) => pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
  svg.innerHTML = `<line x1="40" y1="200" x2="590" y2="200" class="axis"/><line x1="40" y1="10" x2="40" y2="200" class="axis"/>`
    + `<text x="2" y="18">${y1.toFixed(3)}</text><text x="2" y="200">${y0.toFixed(3)}</text>`
    + `<text x="40" y="216">${x0}</text><text x="560" y="216">${x1}</text>`
    + `<polyline class="loss" points="${line(points)}"/>`
    + evalPoints.map((p) => `<circle class="eval" cx="${X(p[0])}" cy="${Y(p[1])}" r="3"/>`).join("");
}

function showTrainJob(job) {
  UI.job = job;
  showJobState("train", job);
  showError("train-error", job.error);
  $("train-log").textContent = (job.log || []).join("\n");
  $("train-log").scrollTop = $("train-log").scrollHeight;
  const p = job.progress || { loss: [], eval_loss: [] };
  $("train-bar").style.width = `${p.finished ? 100 : p.percentage || 0}%`;
  const last = p.loss.length ? p.loss[p.loss.length - 1][1] : null;
  $("train-stats").innerHTML = [
    `${t("step")} <b id="stat-step">${p.step || 0}</b>/<b>${p.total || "?"}</b>`,
    `${t("eta")} <b id="stat-eta">${p.eta || "-"}</b>`, `${t("elapsed")} <b>${p.elapsed || "-"}</b>`,
    `${t("tokens_s")} <b id="stat-tps">${p.tokens_per_second ?? "-"}</b>`,
    `${t("loss")} <b id="stat-loss">${last === null ? "-" : last.toFixed(4)}</b>`,
  ].join(" · ");
  drawLoss(p.loss, p.eval_loss);
  const running = job.state === "running";
  $("train-start").disabled = running;
  $("train-resume").disabled = running || !(p.checkpoints || []).length;
  $("train-stop").disabled = !running;
}

// One poll loop per page (Train, Evaluate, Export), every second while the job runs, once more when it ends.
async function follow(jobId, show, errorBox, page = "train") {
  clearTimeout(UI.timers[page]);
  const tick = async () => {
    try {
      const job = await api(`/api/jobs/${jobId}/status`);
      showError(errorBox, null);
      show(job);
      if (job.state === "running") UI.timers[page] = setTimeout(tick, 1000);
    } catch (err) {
      showError(errorBox, err instanceof TypeError ? t("unreachable") : err);
      // fetch() rejects with a TypeError when the UI itself is down (e.g. restarting); the job runs on: retry
      if (err instanceof TypeError) UI.timers[page] = setTimeout(tick, 2000);
    }
  };
  await tick();
}

async function startJob(kind, body, show, errorBox, page = "train", values = UI.values) {
  showError(errorBox, null);
  try {
    const job = await api(`/api/jobs/${kind}`, { values, source: UI.source, ...body });
    await follow(job.id, show, errorBox, page);
  } catch (err) { showError(errorBox, err); }
}

function wireTrain() {
  $("train-start").addEventListener("click", () => startJob("train", {}, showTrainJob, "train-error"));
  $("train-resume").addEventListener("click", () => startJob("train", { resume: true }, showTrainJob, "train-error"));
  $("train-stop").addEventListener("click", async () => {
    try { showTrainJob(await api(`/api/jobs/${UI.job.id}/stop`, {})); } catch (err) { showError("train-error", err); }
  });
}

async function reattach() {
  const jobs = await api("/api/jobs");
  const train = jobs.find((j) => j.kind === "train");
  if (train) await follow(train.id, showTrainJob, "train-error");
  document.dispatchEvent(new CustomEvent("jobsloaded", { detail: jobs }));
}

// ---- shell -------------------------------------------------------------------------------------------------------
function showTab(name) {
  document.querySelectorAll(".tab").forEach((s) => { s.hidden = s.id !== `tab-${name}`; });
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  localStorage.setItem("loraforge.tab", name);
}

async function init() {
  applyLanguage();
  $("lang").addEventListener("click", () => {
    toggleLanguage();
    if (UI.job) showTrainJob(UI.job);
    refreshEstimate();  // its verdict line is written in the page's language
  });
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  UI.schema = await api("/api/schema");
  buildForm();
  fillTopBar();
  wireTrain();
  document.dispatchEvent(new Event("schemaready"));
  $("load").addEventListener("click", () => loadConfig($("config-path").value).catch((e) => showError("global-error", e)));
  $("save").addEventListener("click", async () => {
    try {
      const res = await api("/api/config/save", { path: $("save-path").value, values: UI.values });
      $("save-note").textContent = `${t("saved")}: ${res.path}`;
      showError("global-error", null);
    } catch (err) { showError("global-error", err); }
  });
  applyLanguage();
  showTab(localStorage.getItem("loraforge.tab") || "train");
  const saved = JSON.parse(localStorage.getItem("loraforge.page") || "null");
  if (saved) { UI.values = saved.values || {}; UI.source = saved.source || null; }
  $("config-path").value = UI.source || "";
  allKeys();
  onValuesChanged("*");
  document.dispatchEvent(new Event("configloaded"));
  await reattach();
  document.body.dataset.ready = "1";  // for tests and scripts: the form is built and the jobs are attached
}

window.addEventListener("DOMContentLoaded", () => init().catch((err) => showError("global-error", err)));
