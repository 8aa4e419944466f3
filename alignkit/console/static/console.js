// alignkit console: one page over the console's JSON API. No framework, no CDN.
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const state = { stage: "sft", fields: [], evalFields: [], run: null, after: 0, records: [], timer: null, history: [[], []] };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function toast(text, bad = false) {
  const box = $("#toast");
  box.textContent = text;
  box.className = "show" + (bad ? " bad" : "");
  clearTimeout(box.timer);
  box.timer = setTimeout(() => { box.className = ""; }, bad ? 8000 : 3000);
}

async function call(path, body, method) {
  const opts = { method: method || (body === undefined ? "GET" : "POST"), headers: {} };
  if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) { const err = new Error(data.error || res.statusText); err.key = data.key; err.status = res.status; throw err; }
  return data;
}

// ------------------------------------------------------------------------------------------------ tabs
function showTab(name) {
  $$("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  $$(".tab").forEach((s) => s.classList.toggle("active", s.id === "tab-" + name));
  location.hash = name;
  if (name === "runs") loadRuns();
  if (name === "review") loadFeedback();
  if (name === "ship") loadServers();
}

// ------------------------------------------------------------------------------------------- the model
function sharedModel() { return $("#g-model").value.trim(); }

async function showModel() {
  const table = $("#model-info");
  table.replaceChildren();
  try {
    const info = await call("/api/model", { path: sharedModel() });
    const rows = [
      [t("architecture"), `${info.architecture} (${info.model_type})`],
      [t("parameters"), info.parameters.toLocaleString()],
      ["layers / hidden / vocab", `${info.layers} / ${info.hidden_size} / ${info.vocab_size}`],
      [t("context"), info.context], ["dtype", info.dtype],
      [t("chat_template"), info.chat_template ? t("yes") : t("no")],
    ];
    if (info.adapter) rows.push(["LoRA", `r=${info.adapter.r}, alpha=${info.adapter.lora_alpha}, base ${info.adapter.base}`]);
    rows.forEach(([k, v]) => table.append(el("tr", {}, el("td", {}, k), el("td", {}, String(v)))));
  } catch (e) { toast(e.message, true); }
}

async function refreshModels() {
  const list = $("#model-list");
  const models = await call("/api/models").catch(() => []);
  list.replaceChildren(...models.map((m) => el("option", { value: m.path }, m.label)));
}

// -------------------------------------------------------------------------------------------- the data
function dataKeys() {
  return { dataset: $("#d-dataset").value.trim(), dataset_dir: $("#d-dir").value.trim() || null, model_name_or_path: sharedModel() || null };
}

function chatText(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "string") return value;
  return value.map((m) => `${m.role}: ${m.content}`).join("\n");
}

async function previewData() {
  const box = $("#d-rows");
  box.replaceChildren();
  try {
    const r = await call("/api/data/preview", { ...dataKeys(), rows: 5, template: $("#g-template").value || null });
    box.append(el("p", {}, `${t("format")}: `, el("b", { id: "d-format" }, r.format), ` · ${t("rows")}: ${r.rows}`));
    for (const row of r.preview) {
      const card = el("div", { class: "card" }, el("div", { class: "muted" }, `${row.where} · ${row.kind}`));
      card.append(el("b", {}, t("prompt")), el("pre", {}, chatText(row.prompt)));
      if (row.kind === "pair") {
        card.append(el("b", {}, t("chosen")), el("pre", {}, chatText(row.chosen)), el("b", {}, t("rejected")), el("pre", {}, chatText(row.rejected)));
      } else if (row.completion !== null && row.completion !== undefined) {
        card.append(el("b", {}, t("answer") + (row.label === null ? "" : ` (${t("label")}: ${row.label})`)), el("pre", {}, chatText(row.completion)));
      }
      if (row.rendered) card.append(el("details", {}, el("summary", {}, t("rendered")), el("pre", {}, row.rendered)));
      box.append(card);
    }
  } catch (e) { toast(e.message, true); }
}

async function inspectData() {
  const box = $("#d-report");
  box.replaceChildren();
  try {
    box.append(reportCard(await call("/api/data/inspect", { ...dataKeys(), max_length: Number($("#d-maxlen").value) || 1024 })));
  } catch (e) { toast(e.message, true); }
}

function reportCard(r) {
  const cols = ["min", "p50", "p90", "p99", "max", "mean"];
  const table = el("table", { class: "list metrics d-report-table" },
    el("tr", {}, el("th", {}, t("lengths") + ` (${r.length_unit})`), ...cols.map((k) => el("th", { class: "num" }, k))));
  for (const [name, p] of Object.entries(r.lengths)) {
    if (p && p.min !== undefined) table.append(el("tr", {}, el("td", {}, name), ...cols.map((k) => el("td", { class: "num" }, p[k]))));
  }
  const facts = [[t("format"), r.format], [t("rows"), r.rows], [t("duplicate_prompts"), r.duplicate_prompts]];
  if (r.would_truncate !== undefined) facts.push([`${t("would_truncate")} (${r.max_length})`, r.would_truncate]);
  if (r.chosen_longer_share !== undefined) facts.push([t("chosen_longer"), (100 * r.chosen_longer_share).toFixed(1) + "%"]);
  if (r.kto) facts.push([t("kto_labels"), `${r.kto.desirable} / ${r.kto.undesirable}; desirable_weight ${r.kto.desirable_weight}, undesirable_weight ${r.kto.undesirable_weight} (${r.kto.why})`]);
  return el("div", { class: "card" }, el("table", { class: "kv" }, facts.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, String(v))))), table);
}

async function upload(ev) {
  const file = ev.target.files[0];
  if (!file) return;
  const res = await fetch("/api/upload?name=" + encodeURIComponent(file.name), { method: "POST", body: file });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) return toast(data.error || res.statusText, true);
  $("#d-dataset").value = data.path;
  toast(`${t("saved")}: ${data.path} (${data.bytes} bytes)`);
}

// ------------------------------------------------------------------------------- forms from the schema
const SHARED = { model_name_or_path: "#g-model", template: "#g-template", finetuning_type: "#g-ft", dataset: "#d-dataset", dataset_dir: "#d-dir" };

function shown(value) {
  if (value === null || value === undefined) return "";
  return Array.isArray(value) ? value.join(", ") : String(value);
}

function input(f, prefix) {
  const id = `${prefix}${f.name}`;
  if (f.type === "bool" && !f.optional) return el("input", { type: "checkbox", id, name: f.name, checked: f.default === true });
  if (f.choices.length && f.type !== "list") {
    const sel = el("select", { id, name: f.name });
    if (f.optional || !f.choices.includes(shown(f.default))) sel.append(el("option", { value: "" }, "—"));
    f.choices.forEach((c) => sel.append(el("option", { value: c, selected: c === shown(f.default) }, c)));
    return sel;
  }
  const numeric = f.type === "int" || f.type === "float";
  return el("input", { type: numeric ? "number" : "text", step: numeric ? "any" : null, id, name: f.name, value: shown(f.default),
                       list: f.choices.length ? `${id}-choices` : null, placeholder: f.optional ? "null" : null });
}

function renderForm(form, fields, openGroups) {
  const prefix = form.getAttribute("data-prefix");  // not form.dataset: a form's control named "dataset" shadows it
  form.replaceChildren();
  const groups = new Map();
  for (const f of fields) {
    if (!groups.has(f.group)) groups.set(f.group, []);
    groups.get(f.group).push(f);
  }
  for (const [group, list] of groups) {
    const box = el("div", { class: "fields" });
    for (const f of list) {
      const type = f.type + (f.optional ? " | null" : "");
      const row = el("div", { class: "field", "data-key": f.name },
        el("label", { class: "name", for: `${prefix}${f.name}`, title: type }, f.name), input(f, prefix),
        el("div", { class: "help" }, [f.help, `${type}, default ${JSON.stringify(f.default)}`].filter(Boolean).join(" · ")),
        el("div", { class: "msg" }));
      if (f.choices.length && f.type === "list") row.append(el("datalist", { id: `${prefix}${f.name}-choices` }, f.choices.map((c) => el("option", { value: c }))));
      box.append(row);
    }
    form.append(el("details", { class: "card group", open: openGroups.includes(group) }, el("summary", {}, group), box));
  }
}

function formValues(form, fields, always = []) {
  const keys = {};
  for (const f of fields) {
    const node = form.elements[f.name];
    if (!node) continue;
    let value;
    if (node.type === "checkbox") value = node.checked;
    else {
      const text = node.value.trim();
      if (text === "" || text === "null") { if (f.default !== null && f.default !== "" && text === "null") keys[f.name] = null; continue; }
      if (f.type === "list") value = text.split(",").map((s) => s.trim()).filter(Boolean).map((s) => (isNaN(Number(s)) ? s : Number(s)));
      else if (f.type === "int" || f.type === "float" || (f.type === "number_or_str" && !isNaN(Number(text)))) value = Number(text);
      else value = text;
    }
    if (always.includes(f.name) || JSON.stringify(value) !== JSON.stringify(f.default === "" ? undefined : f.default)) keys[f.name] = value;
    if (f.type === "list" && !always.includes(f.name) && shown(value) === shown(f.default)) delete keys[f.name];
  }
  return keys;
}

function setValues(form, fields, keys) {
  for (const [key, value] of Object.entries(keys)) {
    const node = form.elements[key];
    if (!node) continue;
    if (node.type === "checkbox") node.checked = value === true || value === "true";
    else node.value = shown(value);
  }
}

function markError(form, key, message, box) {
  $$(".field", form).forEach((row) => { row.classList.remove("bad"); $(".msg", row).textContent = ""; });
  box.textContent = "";
  if (!message) return;
  const row = key && $(`.field[data-key="${key}"]`, form);
  if (row) {
    row.classList.add("bad");
    $(".msg", row).textContent = message;
    row.closest("details").open = true;
    row.scrollIntoView({ block: "center" });
  } else box.textContent = message;
}

async function loadStage(stage, keys) {
  const r = await call(`/api/form/${stage}`);
  state.stage = stage;  // set with the form it names: the stage shown is always the form's
  $("#t-stage").value = stage;
  state.fields = r.fields;
  renderForm($("#t-form"), r.fields, [stage, "general", "data", "optimisation"]);
  for (const [key, sel] of Object.entries(SHARED)) if ($(sel).value && $("#t-form").elements[key]) $("#t-form").elements[key].value = $(sel).value;
  if (keys) setValues($("#t-form"), r.fields, keys);
}

function trainKeys() {
  return { stage: state.stage, ...formValues($("#t-form"), state.fields, ["model_name_or_path", "dataset"]) };
}

async function checkTrain() {
  const r = await call("/api/check", { keys: trainKeys() });
  markError($("#t-form"), r.error && r.error.key, r.error && r.error.message, $("#t-error"));
  if (!r.error) toast(t("ok_config"));
  return !r.error;
}

async function startTrain() {
  try {
    const run = await call("/api/runs", { kind: "train", config: trainKeys() });
    markError($("#t-form"), null, null, $("#t-error"));
    openRun(run.id);
  } catch (e) { markError($("#t-form"), e.key, e.message, $("#t-error")); }
}

async function showYaml() {
  const box = $("#t-yaml-text");
  box.value = (await call("/api/yaml", { keys: trainKeys() })).yaml;
  box.hidden = false;
}

async function saveYaml() {
  try {
    const r = await call("/api/configs", { name: $("#t-name").value.trim(), keys: trainKeys() });
    toast(`${t("saved")}: ${r.path}`);
  } catch (e) { toast(e.message, true); }
}

async function loadYaml() {
  const box = $("#t-yaml-text");
  if (box.hidden || !box.value.trim()) { box.hidden = false; box.value = ""; return toast(t("paste_yaml")); }
  try {
    const { keys } = await call("/api/yaml/parse", { yaml: box.value });
    await loadStage(keys.stage || "sft", keys);
    const unknown = Object.keys(keys).filter((k) => k !== "stage" && !$("#t-form").elements[k]);
    if (unknown.length) toast(`not in the ${state.stage} form: ${unknown.join(", ")}`, true);
  } catch (e) { toast(e.message, true); }
}

// ------------------------------------------------------------------------------------ runs and curves
const CURVE = /^(loss|learning_rate|grad_norm|eval_loss)$|reward|margin|accurac|(^|\/)kl|length|entropy|score/;
const NOT_CURVE = /^(step|epoch|num_tokens|train_runtime|train_tokens_per_second|peak_memory_mb|count\/)/;

function fmtTime(s) { return s ? new Date(s * 1000).toLocaleString() : ""; }
function fmtEta(s) { if (s === undefined || s === null) return ""; s = Math.round(s); return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`; }

async function loadRuns() {
  const asked = (state.runsAsked = (state.runsAsked || 0) + 1);
  const runs = await call("/api/runs").catch(() => []);
  if (asked !== state.runsAsked) return;
  const table = $("#runs-table");
  if (!runs.length) { table.replaceChildren(el("tr", {}, el("td", {}, t("no_runs")))); return; }
  table.replaceChildren(el("tr", {}, ...[t("run"), t("what"), t("status"), t("step"), t("created")].map((h) => el("th", {}, h))));
  for (const r of runs) {
    const p = r.progress || {};
    const step = p.total ? `${p.step}/${p.total}` : (r.result && r.result.steps ? `${r.result.steps}/${r.result.total_steps}` : "");
    table.append(el("tr", { class: "clickable" + (state.run === r.id ? " selected" : ""), "data-run": r.id, onclick: () => openRun(r.id) },
      el("td", {}, el("code", {}, r.id)), el("td", {}, r.label), el("td", {}, el("span", { class: `status ${r.status}` }, t(r.status))),
      el("td", {}, step), el("td", {}, fmtTime(r.created))));
  }
}

function chart(name, points) {
  const w = 300, h = 120, pad = 26;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (w - pad - 6);
  const sy = (y) => h - 16 - ((y - y0) / (y1 - y0 || 1)) * (h - 26);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
  svg.append(line);
  if (points.length === 1) {
    const dot = document.createElementNS(svg.namespaceURI, "circle");
    dot.setAttribute("cx", sx(xs[0])); dot.setAttribute("cy", sy(ys[0])); dot.setAttribute("r", 3);
    svg.append(dot);
  }
  for (const [text, x, y] of [[fmtNum(y1), 2, 10], [fmtNum(y0), 2, h - 18], [String(x0), pad, h - 3], [String(x1), w - 30, h - 3]]) {
    const label = document.createElementNS(svg.namespaceURI, "text");
    label.setAttribute("x", x); label.setAttribute("y", y); label.textContent = text;
    svg.append(label);
  }
  const last = ys[ys.length - 1];
  return el("div", { class: "chart", "data-metric": name, "data-points": points.length },
    el("div", { class: "title" }, el("span", {}, name), el("span", {}, `${fmtNum(last)} · ${points.length} pts`)), svg);
}

function fmtNum(v) {
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : Number(v.toPrecision(4)).toString();
}

function drawCharts(box, records) {
  const series = new Map();
  for (const r of records) {
    for (const [k, v] of Object.entries(r)) {
      if (typeof v !== "number" || !isFinite(v) || NOT_CURVE.test(k) || !CURVE.test(k)) continue;
      if (!series.has(k)) series.set(k, []);
      series.get(k).push([r.step, v]);
    }
  }
  box.replaceChildren(...[...series].map(([k, pts]) => chart(k, pts)));
}

async function openRun(id) {
  showTab("runs");
  if (state.run !== id) { state.run = id; state.after = 0; state.records = []; }
  loadRuns();
  await pollRun();
}

async function pollRun() {
  // one polling loop at a time: a newer call (another run, a stop, the language) retires the older ones
  clearTimeout(state.timer);
  const gen = (state.pollGen = (state.pollGen || 0) + 1), id = state.run;
  let v;
  try { v = await call(`/api/runs/${id}?after=${state.after}`); } catch (e) { return toast(e.message, true); }
  if (gen !== state.pollGen) return;
  if (v.n_records < state.after) { state.records = []; state.after = 0; return pollRun(); }  // the run started over
  state.records.push(...v.records);
  state.after = v.n_records;
  renderRun(v);
  if (["queued", "running"].includes(v.status)) state.timer = setTimeout(pollRun, 700);
  else { loadRuns(); refreshModels(); }
}

function renderRun(v) {
  const box = $("#run-detail");
  box.dataset.run = v.id;
  box.dataset.status = v.status;
  const p = v.progress || {};
  const total = p.total || (v.result && v.result.total_steps) || 0;
  const step = p.step || (v.result && v.result.steps) || 0;
  const buttons = el("div", { class: "row" });
  if (v.status === "queued" || (v.status === "running" && v.kind === "train")) buttons.append(el("button", { id: "run-stop", onclick: () => act(v.id, "stop") }, t("stop")));
  if (v.kind === "train" && ["stopped", "interrupted", "failed"].includes(v.status)) buttons.append(el("button", { id: "run-resume", class: "primary", onclick: () => act(v.id, "resume") }, t("resume")));
  if (v.kind === "train" && v.status === "finished") {
    const out = `${v.folder}/output`;
    buttons.append(el("button", { onclick: () => { $(".c-model").value = out; showTab("chat"); } }, t("open_chat")),
      el("button", { onclick: () => { prefillEval(out, v.config.model_name_or_path); } }, t("evaluate_it")),
      el("button", { onclick: () => { $("#s-adapter").value = out; showTab("ship"); } }, t("export_it")));
  }
  box.replaceChildren(el("h3", {}, el("code", {}, v.id), " ", el("span", { class: `status ${v.status}`, id: "run-status" }, t(v.status)), " ", v.label), buttons);
  if (v.error) box.append(el("div", { class: "error" }, v.error));
  if (v.kind === "train") {
    box.append(el("div", { class: "row" }, el("div", { class: "meter" }, el("div", { style: `width:${total ? (100 * step) / total : 0}%` })),
      el("span", { id: "run-progress" }, `${t("step")} ${step}/${total}`), p.eta_s !== undefined && v.status === "running" ? el("span", {}, `${t("eta")} ${fmtEta(p.eta_s)}`) : null));
    const charts = el("div", { class: "charts", id: "run-charts" });
    drawCharts(charts, state.records);
    box.append(charts);
  }
  if (v.kind === "eval" && v.status === "finished") renderEval(box, v);
  if (v.kind === "export" && v.status === "finished") renderExport(box, v);
  if (v.kind === "compare" && v.status === "finished") renderCompare(box, v);
  if (v.kind === "sxs" && v.status === "finished") renderReview(box, v);
  if (v.kind === "train") box.append(dataReport(v.config));
  box.append(el("details", {}, el("summary", {}, t("config")), el("pre", {}, v.yaml)),
    v.resolved ? el("details", {}, el("summary", {}, t("resolved")), el("pre", { id: "run-resolved" }, v.resolved)) : null,
    el("details", { open: v.status === "failed" }, el("summary", {}, t("log")), el("pre", { id: "run-log" }, v.log.join("\n"))));
}

function dataReport(config) {
  const box = el("details", { class: "run-data" }, el("summary", {}, t("report")));
  box.addEventListener("toggle", async () => {
    if (!box.open || box.dataset.loaded) return;
    box.dataset.loaded = "1";
    try {
      const r = await call("/api/data/inspect", { dataset: config.dataset, dataset_dir: config.dataset_dir, model_name_or_path: config.model_name_or_path, max_length: config.max_length || 1024 });
      box.append(reportCard(r));
    } catch (e) { box.append(el("div", { class: "error" }, e.message)); }
  });
  return box;
}

async function act(id, what) {
  try { await call(`/api/runs/${id}/${what}`, {}); } catch (e) { return toast(e.message, true); }
  if (what === "resume") { state.records = []; state.after = 0; }
  openRun(id);
  loadRuns();
}

// ------------------------------------------------------------------------------------------ evaluation
async function loadEvalForm() {
  const r = await call("/api/form/eval");
  state.evalFields = r.fields;
  renderForm($("#e-form"), r.fields, ["general", "sampling", "metrics"]);
}

function prefillEval(model, baseline) {
  showTab("eval");
  setValues($("#e-form"), state.evalFields, { model, baseline: baseline || "", dataset: $("#d-dataset").value });
}

async function startEval() {
  try {
    const config = formValues($("#e-form"), state.evalFields, ["model", "dataset"]);
    const run = await call("/api/runs", { kind: "eval", config });
    markError($("#e-form"), null, null, $("#e-error"));
    openRun(run.id);
  } catch (e) { markError($("#e-form"), e.key, e.message, $("#e-error")); }
}

function ci(row) { return row && row.ci95 ? `${fmtNum(row.ci95[0])} – ${fmtNum(row.ci95[1])}` : ""; }

function renderEval(box, v) {
  const r = v.result, base = r.baseline_metrics || {};
  const table = el("table", { class: "list metrics", id: "eval-table" }, el("tr", {},
    ...[t("metric"), t("model"), t("ci"), t("n"), t("baseline"), t("ci"), t("n")].map((h, i) => el("th", { class: i ? "num" : "" }, h))));
  for (const [name, row] of Object.entries(r.metrics)) {
    const b = base[name];
    table.append(el("tr", {}, el("td", {}, name), el("td", { class: "num" }, fmtNum(row.value)), el("td", { class: "num" }, ci(row)),
      el("td", { class: "num" }, row.n ?? ""), el("td", { class: "num" }, b ? fmtNum(b.value) : ""), el("td", { class: "num" }, ci(b)), el("td", { class: "num" }, b ? b.n : "")));
  }
  box.append(el("h3", {}, t("results"), ` (${r.n_prompts} prompts)`), table);
  const skipped = Object.entries(r.skipped || {});
  if (skipped.length) box.append(el("details", {}, el("summary", {}, `${t("not_measured")}: ${skipped.length}`), el("ul", {}, skipped.map(([k, why]) => el("li", {}, el("code", {}, k), ": ", why)))));
  const metrics = Object.keys(r.metrics).filter((k) => r.metrics[k].n);
  const pick = el("select", { id: "worst-by" }, metrics.map((m) => el("option", { value: m }, m)));
  const holder = el("div", { id: "samples" });
  box.append(el("h3", {}, t("samples")), el("div", { class: "row" }, "worst by ", pick), holder);
  const show = async () => {
    const rows = await call(`/api/runs/${v.id}/samples?worst=${encodeURIComponent(pick.value)}&limit=50`).catch((e) => { toast(e.message, true); return []; });
    let i = 0;
    const draw = () => {
      const s = rows[i];
      if (!s) return holder.replaceChildren();
      const side = (k) => s[k] ? el("div", {}, el("b", {}, t(k)), ` ${JSON.stringify(s[k].scores)}`, el("pre", { class: "sample" }, s[k].completions.join("\n---\n"))) : null;
      holder.replaceChildren(el("div", { class: "card" }, el("div", { class: "row" },
        el("button", { onclick: () => { i = Math.max(0, i - 1); draw(); } }, t("prev")), `${i + 1} / ${rows.length}`,
        el("button", { id: "sample-next", onclick: () => { i = Math.min(rows.length - 1, i + 1); draw(); } }, t("next")), el("span", { class: "muted" }, s.where)),
        el("b", {}, t("prompt")), el("pre", {}, chatText(s.prompt)), side("model"), side("baseline")));
    };
    draw();
  };
  pick.addEventListener("change", show);
  if (metrics.length) show();
}

function compareTemplate() {
  const model = sharedModel() || "MODEL", data = $("#d-dataset").value.trim() || "DATA.jsonl", dir = $("#d-dir").value.trim();
  $("#k-yaml").value = [`model_name_or_path: ${model}`, `dataset: ${data}`, dir ? `dataset_dir: ${dir}` : null,
    `finetuning_type: ${$("#g-ft").value}`, "max_steps: 20", "per_device_train_batch_size: 4", "learning_rate: 5.0e-6", "max_length: 256",
    "methods:", "  dpo: {stage: dpo, beta: 0.1}", "  kto: {stage: kto}", "eval:", `  dataset: ${data}`, "  max_samples: 20", "  max_new_tokens: 32"]
    .filter(Boolean).join("\n");
}

async function startCompare() {
  $("#k-error").textContent = "";
  try {
    const { keys } = await call("/api/yaml/parse", { yaml: $("#k-yaml").value });
    openRun((await call("/api/runs", { kind: "compare", config: keys })).id);
  } catch (e) { $("#k-error").textContent = (e.key ? `${e.key}: ` : "") + e.message; }
}

function markdown(text) {
  // the compare report: headings, tables, lists and paragraphs (report.md's own Markdown), as elements
  const box = el("div", { class: "report" });
  let table = null;
  for (const line of text.split("\n")) {
    if (line.startsWith("|")) {
      const cells = line.split("|").slice(1, -1).map((c) => c.trim());
      if (cells.every((c) => /^:?-+:?$/.test(c))) continue;
      if (!table) { table = el("table", { class: "list metrics" }); box.append(table); table.append(el("tr", {}, cells.map((c) => el("th", {}, c)))); }
      else table.append(el("tr", {}, cells.map((c) => el("td", {}, c.replace(/\*\*/g, "")))));
      continue;
    }
    table = null;
    if (!line.trim() || line.startsWith("![")) continue;
    const heading = line.match(/^(#+)\s+(.*)/);
    if (heading) box.append(el(heading[1].length <= 2 ? "h3" : "h4", {}, heading[2]));
    else box.append(el(line.startsWith("- ") ? "li" : "p", {}, line.replace(/^- /, "").replace(/\*\*|`/g, "")));
  }
  return box;
}

function renderCompare(box, v) {
  const r = v.result, flagged = Object.entries(r.reward_hacking || {});
  box.append(el("h3", {}, t("hacking")), flagged.length
    ? el("ul", { id: "hacking" }, flagged.map(([m, why]) => el("li", {}, el("span", { class: "flag" }, m), ": ", why.join("; "))))
    : el("p", { id: "hacking" }, t("none_flagged")));
  box.append(markdown(r.report_md || r.table || ""));
  box.append(el("div", { class: "charts plots" }, (r.plots || []).map((name) => el("img", { src: `/api/runs/${v.id}/plots/${name}`, alt: name, class: "plot" }))));
}

async function startReview() {
  const config = { model: $("#x-model").value.trim() || sharedModel(), baseline: $("#x-baseline").value.trim(),
                   dataset: $("#x-dataset").value.trim() || $("#d-dataset").value.trim(), max_samples: Number($("#x-n").value) || 20 };
  try { openRun((await call("/api/runs", { kind: "sxs", config })).id); } catch (e) { toast((e.key ? `${e.key}: ` : "") + e.message, true); }
}

function renderReview(box, v) {
  const out = el("div", { id: "tally" });
  const tally = async () => {
    try {
      const r = await call(`/api/runs/${v.id}/tally`, {});
      out.replaceChildren(el("pre", {}, r.summary), el("div", { class: "row" }, `${t("made")}: `, el("code", {}, r.dpo), el("code", {}, r.kto),
        el("button", { class: "primary", id: "train-dpo", onclick: () => trainOn(r.prefill) }, t("train_dpo"))));
    } catch (e) { toast(e.message, true); }
  };
  box.append(el("div", { class: "row" }, el("a", { href: `/api/runs/${v.id}/review`, target: "_blank", id: "open-review", class: "button" }, t("open_review")),
    el("button", { id: "tally-btn", onclick: tally }, t("tally"))), out);
}

function renderExport(box, v) {
  const r = v.result;
  const rows = Object.entries(r).filter(([, val]) => val !== null && typeof val !== "object");
  box.append(el("h3", {}, t("fidelity")), el("table", { class: "kv", id: "export-table" }, rows.map(([k, val]) => el("tr", {}, el("td", {}, k), el("td", {}, typeof val === "number" ? fmtNum(val) : String(val))))));
}

// ------------------------------------------------------------------------------------------------ chat
function chatModels() { return $$(".c-model").filter((m) => !m.closest(".pane").hidden).map((m) => m.value.trim() || sharedModel()); }

async function send() {
  const text = $("#c-input").value.trim();
  if (!text) return;
  $("#c-input").value = "";
  const system = $("#c-system").value.trim();
  await Promise.all(chatModels().map((model, i) => answer(i, model, text, system)));
}

async function answer(i, model, text, system) {
  const pane = $$(".pane")[i], log = $(".log", pane);
  const history = state.history[i];
  history.push({ role: "user", content: text });
  log.append(el("div", { class: "msg-user" }, text));
  const bubble = el("div", { class: "msg-bot" });
  log.append(bubble);
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  const res = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, messages, temperature: Number($("#c-temp").value), max_new_tokens: Number($("#c-max").value) }) });
  if (!res.ok) { const e = await res.json().catch(() => ({})); bubble.classList.add("error"); bubble.textContent = e.error || res.statusText; history.pop(); return; }
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines.filter(Boolean)) {
      const msg = JSON.parse(line);
      if (msg.delta) bubble.textContent += msg.delta;
      if (msg.error) { bubble.classList.add("error"); bubble.textContent = msg.error; history.pop(); }
      if (msg.done) {
        bubble.textContent = msg.text;
        history.push({ role: "assistant", content: msg.text });
        bubble.append(votes(msg.id));
      }
      log.scrollTop = log.scrollHeight;
    }
  }
}

function votes(id) {
  const box = el("div", { class: "votes", "data-id": id });
  for (const [label, icon] of [["up", "▲"], ["down", "▼"]]) {
    box.append(el("button", { class: `vote-${label}`, title: t(label), "aria-label": t(label), onclick: async (ev) => {
      const button = ev.currentTarget;
      try { await call("/api/feedback", { id, label }); } catch (e) { return toast(e.message, true); }
      $$("button", box).forEach((b) => b.classList.remove("on"));
      button.classList.add("on");
    } }, `${icon} ${t(label)}`));
  }
  return box;
}

// ---------------------------------------------------------------------------------------------- review
async function loadFeedback() {
  const given = { model: $("#r-model").value.trim(), label: $("#r-label").value, q: $("#r-q").value.trim(), days: $("#r-days").value };
  const q = new URLSearchParams(Object.entries(given).filter(([, v]) => v));
  const asked = (state.feedbackAsked = (state.feedbackAsked || 0) + 1);
  const rows = await call("/api/feedback?" + q).catch((e) => { toast(e.message, true); return []; });
  if (asked !== state.feedbackAsked) return;  // a later request is on its way: its answer is the one to show
  const table = $("#r-table");
  table.replaceChildren(el("tr", {}, ...[t("when"), t("model"), t("prompt"), t("answer"), t("vote")].map((h) => el("th", {}, h))));
  for (const r of rows) {
    table.append(el("tr", { "data-id": r.id }, el("td", {}, fmtTime(r.created)), el("td", {}, el("code", {}, r.model)),
      el("td", { class: "sample" }, chatText(r.prompt)), el("td", { class: "sample" }, r.answer),
      el("td", { class: "label" }, r.label ? (r.label === "up" ? "▲ " : "▼ ") + t(r.label) : "—")));
  }
}

async function makeData() {
  const box = $("#r-made");
  box.replaceChildren();
  try {
    const r = await call("/api/feedback/data", { model: $("#r-model").value.trim() || null });
    const c = r.counts;
    box.append(el("div", { class: "card" }, `${t("made")}: `, el("code", { id: "made-path" }, r.path),
      ` — ${c.rows} ${t("rows")} (▲ ${c.up}, ▼ ${c.down}; no vote ${c.no_feedback}, empty ${c.empty}) `,
      el("button", { class: "primary", id: "train-on-this", onclick: () => trainOn(r.prefill) }, t("train_on_this"))));
  } catch (e) { toast(e.message, true); }
}

async function trainOn(prefill) {
  showTab("train");
  if (prefill.model_name_or_path) $("#g-model").value = prefill.model_name_or_path;
  if (prefill.finetuning_type) $("#g-ft").value = prefill.finetuning_type;
  $("#d-dataset").value = prefill.dataset;
  await loadStage(prefill.stage, prefill);
}

// ------------------------------------------------------------------------------------------------ ship
async function startExport() {
  const config = { adapter: $("#s-adapter").value.trim() };
  if ($("#s-dtype").value) config.dtype = $("#s-dtype").value;
  if ($("#s-quant").value) config.quantize = $("#s-quant").value;
  try { openRun((await call("/api/runs", { kind: "export", config })).id); } catch (e) { toast(e.message, true); }
}

async function startServe() {
  try {
    await call("/api/serve", { model: $("#s-model").value.trim() || sharedModel(), port: Number($("#s-port").value) });
  } catch (e) { toast(e.message, true); }
  loadServers();
}

async function loadServers() {
  const servers = await call("/api/serve").catch(() => []);
  $("#s-servers").replaceChildren(...servers.map((s) => {
    const curl = `curl ${s.url}/chat/completions -H 'Content-Type: application/json' \\\n  -d '{"model": "${s.ids[0]}", "messages": [{"role": "user", "content": "Hello"}]}'`;
    const py = `from openai import OpenAI\nclient = OpenAI(base_url="${s.url}", api_key="none")\nreply = client.chat.completions.create(model="${s.ids[0]}", messages=[{"role": "user", "content": "Hello"}])\nprint(reply.choices[0].message.content)`;
    return el("div", { class: "card server" }, el("div", { class: "row" }, el("b", {}, t("serving")), el("code", {}, s.model), el("code", {}, s.url),
      el("button", { onclick: async () => { await call(`/api/serve/${s.port}/stop`, {}).catch((e) => toast(e.message, true)); loadServers(); } }, t("stop_serving"))),
      el("pre", {}, curl), el("pre", {}, py));
  }));
}

// ------------------------------------------------------------------------------------------------ start
async function init() {
  applyWords();
  $("#lang").value = LANG;
  $("#lang").addEventListener("change", () => { LANG = $("#lang").value; localStorage.setItem("alignkit-lang", LANG); applyWords(); loadRuns(); if (state.run) pollRun(); });
  $$("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  const info = await call("/api/info");
  $("#workspace").textContent = info.workspace;
  const stages = $("#t-stage");
  info.stages.forEach((s) => stages.append(el("option", { value: s }, s)));
  const templates = (await call("/api/form/sft")).fields.find((f) => f.name === "template").choices;
  templates.forEach((name) => $("#g-template").append(el("option", { value: name }, name)));
  stages.addEventListener("change", () => loadStage(stages.value, trainKeys()));
  for (const [key, sel] of Object.entries(SHARED)) {
    $(sel).addEventListener("change", () => { const node = $("#t-form").elements[key]; if (node) node.value = $(sel).value; });
  }
  $("#model-show").addEventListener("click", showModel);
  $("#d-preview").addEventListener("click", previewData);
  $("#d-inspect").addEventListener("click", inspectData);
  $("#d-upload").addEventListener("change", upload);
  $("#t-check").addEventListener("click", checkTrain);
  $("#t-start").addEventListener("click", startTrain);
  $("#t-yaml").addEventListener("click", showYaml);
  $("#t-save").addEventListener("click", saveYaml);
  $("#t-load").addEventListener("click", loadYaml);
  $("#e-start").addEventListener("click", startEval);
  $("#k-template").addEventListener("click", compareTemplate);
  $("#k-start").addEventListener("click", startCompare);
  $("#c-send").addEventListener("click", send);
  $("#c-input").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); send(); } });
  $("#c-reset").addEventListener("click", () => { state.history = [[], []]; $$(".log").forEach((l) => l.replaceChildren()); });
  $("#c-sbs").addEventListener("change", (ev) => { $$(".pane")[1].hidden = !ev.target.checked; $("#c-panes").classList.toggle("two", ev.target.checked); });
  $("#r-filter").addEventListener("click", loadFeedback);
  $("#r-make").addEventListener("click", makeData);
  $("#x-start").addEventListener("click", startReview);
  $("#s-export").addEventListener("click", startExport);
  $("#s-serve").addEventListener("click", startServe);
  await Promise.all([loadStage("sft"), loadEvalForm(), refreshModels()]);
  if (info.interrupted.length) toast(`${t("interrupted")}: ${info.interrupted.join(", ")}`, true);
  showTab(location.hash.slice(1) || "model");
  document.body.dataset.ready = "1";
}
init().catch((e) => toast(e.message, true));
