// stylelora's UI: one small script for every page (no build step). Each page's function
// below fills the page from the server's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const init = { ...options, headers: { "Content-Type": "application/json" } };
  if (init.body && typeof init.body !== "string") init.body = JSON.stringify(init.body);
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.error || `${response.status} ${response.statusText}`);
    error.data = data;
    throw error;
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function formatSeconds(seconds) {
  if (!isFinite(seconds)) return "-";
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// --- runs ------------------------------------------------------------------------------------

async function pageIndex() {
  async function refresh() {
    const { runs } = await api("/api/runs");
    const body = $("runs").querySelector("tbody");
    body.replaceChildren(...runs.map(runRow));
    $("empty").hidden = runs.length > 0;
  }
  function runRow(run) {
    const act = (label, path, method = "POST") => el("button", {
      text: label, "data-action": label.toLowerCase(),
      onclick: async () => { await api(`/api/runs/${run.id}${path}`, { method }).catch(alert); refresh(); },
    });
    const actions = el("td", {});
    if (["queued", "running"].includes(run.status)) actions.append(act("Stop", "/stop"));
    if (run.can_resume || ["stopped", "interrupted", "failed"].includes(run.status)) actions.append(act("Resume", "/resume"));
    if (!["running", "stopping"].includes(run.status)) actions.append(act("Remove", "", "DELETE"));
    return el("tr", { "data-run": run.id },
      el("td", { text: run.id }),
      el("td", {}, el("a", { href: `/runs/${run.id}`, text: run.name })),
      el("td", { class: `status ${run.status}`, text: run.status }),
      el("td", { text: `${run.step} / ${run.max_steps ?? "?"}` }),
      el("td", { text: run.loss == null ? "-" : run.loss.toFixed(4) }),
      el("td", { text: run.started_at ? new Date(run.started_at * 1000).toLocaleString() : "-" }),
      el("td", { class: "muted", text: run.message && run.message !== run.status ? run.message : "" }),
      actions);
  }
  $("import").onclick = async () => {
    $("import-error").textContent = "";
    try {
      const { id } = await api("/api/runs/import", { method: "POST", body: { folder: $("import-folder").value } });
      location.href = `/runs/${id}`;
    } catch (error) { $("import-error").textContent = error.message; }
  };
  await refresh();
  setInterval(refresh, 2000);
}

// --- a new run: the form and its TOML --------------------------------------------------------

async function pageNew() {
  const description = await api("/api/form");
  const { templates, home } = await api("/api/templates");
  let settings = {};
  $("home").textContent = home;
  for (const name of Object.keys(templates)) $("template").append(el("option", { value: name, text: name }));
  for (const name of description.presets) $("presets").append(el("option", { value: name }));
  api("/api/models").then(({ models }) => {
    for (const model of models) $("models").append(el("option", { value: model }));
  }).catch(() => {});
  api("/api/folders").then(({ folders }) => {
    for (const folder of folders) $("folders").append(el("option", { value: folder.path }));
  }).catch(() => {});

  const inputs = {};
  const groups = {};
  for (const group of description.groups) {
    const details = el("details", { "data-group": group }, el("summary", { text: group }));
    if (group === "top level" || group === "[data]") details.open = true;
    groups[group] = details;
    $("form").append(el("fieldset", {}, details));
  }
  for (const field of description.fields) {
    let input;
    if (field.kind === "choice") {
      input = el("select", {}, el("option", { value: "", text: field.default ? `(default: ${field.default})` : "(unset)" }),
        ...field.choices.map((choice) => el("option", { value: choice, text: choice })));
    } else {
      input = el("input", { type: "text", placeholder: field.default || (field.required ? "required" : "") });
      if (field.key === "model") input.setAttribute("list", "models");
      if (field.key === "preset") input.setAttribute("list", "presets");
      if (field.key === "data.dir" || field.key === "output_dir") input.setAttribute("list", "folders");
    }
    input.id = `field-${field.key}`;
    input.name = field.key;
    input.addEventListener("change", () => {
      if (input.value.trim() === "") delete settings[field.key]; else settings[field.key] = input.value;
      check();
    });
    inputs[field.key] = input;
    groups[field.group].append(el("div", { class: "field" },
      el("label", { for: input.id, text: field.key, title: field.help }), input,
      el("span", { class: "problem", id: `problem-${field.key}` })));
  }

  function show(newSettings) {
    settings = { ...newSettings };
    for (const [key, input] of Object.entries(inputs)) input.value = settings[key] ?? "";
    check();
  }
  async function check() {
    const { problems, toml } = await api("/api/config/check", { method: "POST", body: { settings } });
    showProblems(problems);
    $("toml").value = toml;
    return problems;
  }
  function showProblems(problems) {
    for (const span of document.querySelectorAll(".field .problem")) span.textContent = "";
    const loose = [];
    for (const [key, text] of Object.entries(problems)) {
      const span = $(`problem-${key}`);
      if (span) {
        span.textContent = text;
        span.closest("details").open = true;
      } else loose.push(`${key}: ${text}`);
    }
    $("start-error").textContent = loose.join("; ");
  }
  $("load-template").onclick = () => show(templates[$("template").value] || {});
  $("tab-form").onclick = () => { $("form").hidden = false; $("toml-view").hidden = true; $("tab-form").className = "on"; $("tab-toml").className = ""; };
  $("tab-toml").onclick = () => { $("form").hidden = true; $("toml-view").hidden = false; $("tab-toml").className = "on"; $("tab-form").className = ""; };
  $("apply-toml").onclick = async () => {
    $("toml-error").textContent = "";
    try {
      const parsed = await api("/api/config/parse", { method: "POST", body: { toml: $("toml").value } });
      show(parsed.settings);
      $("tab-form").onclick();
    } catch (error) { $("toml-error").textContent = error.message; }
  };
  $("start").onclick = async () => {
    $("start-error").textContent = "";
    try {
      const { id } = await api("/api/runs", { method: "POST", body: { settings } });
      location.href = `/runs/${id}`;
    } catch (error) {
      if (error.data && error.data.problems) showProblems(error.data.problems);
      if (!$("start-error").textContent) $("start-error").textContent = error.message === "400 Bad Request" ? "fix the fields marked in red" : error.message;
    }
  };
  if (templates.demo) show(templates.demo); else check();
}

// --- a run's page ------------------------------------------------------------------------------

async function pageRun() {
  const id = location.pathname.split("/").pop();
  const detail = await api(`/api/runs/${id}`);
  $("name").textContent = detail.name;
  document.title = `${detail.name} · stylelora`;
  $("config").textContent = detail.config_text;
  $("resolved").textContent = detail.resolved;
  $("resume-command").textContent = `${detail.config} · from the command line: ${detail.resume_command}`;
  const steps = [], validation = [], shown = new Set();
  let maxSteps = detail.max_steps;

  function setStatus(status, message) {
    $("status").textContent = status;
    $("status").className = `status ${status}`;
    $("message").textContent = message && message !== status ? message : "";
    $("stop").hidden = !["queued", "running"].includes(status);
    $("resume").hidden = !["stopped", "interrupted", "failed"].includes(status);
    $("remove").hidden = ["running", "stopping"].includes(status);
    if (["finished", "stopped"].includes(status)) refreshDownloads();
  }
  async function refreshDownloads() {
    const { downloads } = await api(`/api/runs/${id}`);
    $("downloads").replaceChildren(...downloads.map((name) => el("li", {},
      el("a", { href: `/api/runs/${id}/files/${encodeURIComponent(name)}?download=1`, text: name }),
      name.endsWith(".html") ? el("span", {}, " · ", el("a", { href: `/api/runs/${id}/files/${name}`, target: "_blank", text: "open" })) : "")));
  }
  function addPreview(step, path) {
    if (shown.has(path)) return;
    shown.add(path);
    const src = `/api/runs/${id}/files/${path}`;
    $("gallery").prepend(el("figure", { "data-step": step },
      el("img", { src, alt: `previews at step ${step}` }), el("figcaption", { text: `step ${step}` })));
  }
  function onEvent(event) {
    if (event.event === "start") maxSteps = event.max_steps;
    if (event.event === "step") { steps.push(event); maxSteps = event.max_steps; }
    if (event.event === "validation") validation.push(event);
    if (event.event === "preview") addPreview(event.step, event.path);
  }
  function showProgress() {
    const last = steps[steps.length - 1];
    $("max").textContent = maxSteps ?? "?";
    if (!last) return;
    $("step").textContent = last.step;
    $("loss").textContent = last.loss.toFixed(4);
    $("lr").textContent = last.lr.toExponential(2);
    $("bar").style.width = `${(100 * last.step) / maxSteps}%`;
    const recent = steps.slice(-30);
    if (recent.length > 1) {
      const first = recent[0];
      const perStep = (last.seconds - first.seconds) / (last.step - first.step);
      if (perStep > 0) {
        $("speed").textContent = perStep < 1 ? `${(1 / perStep).toFixed(2)} steps/s` : `${perStep.toFixed(2)} s/step`;
        $("left").textContent = formatSeconds((maxSteps - last.step) * perStep);
      }
    }
    drawCurves($("curves"), steps, validation);
  }

  $("stop").onclick = () => api(`/api/runs/${id}/stop`, { method: "POST" }).catch((e) => { $("action-error").textContent = e.message; });
  $("resume").onclick = () => api(`/api/runs/${id}/resume`, { method: "POST" }).catch((e) => { $("action-error").textContent = e.message; });
  $("remove").onclick = async () => {
    try { await api(`/api/runs/${id}`, { method: "DELETE" }); location.href = "/"; } catch (e) { $("action-error").textContent = e.message; }
  };
  setStatus(detail.status, detail.message);
  refreshDownloads();

  const source = new EventSource(`/api/runs/${id}/events`);
  source.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.removed) { source.close(); return; }
    for (const event of data.events || []) onEvent(event);
    if (data.log != null) { $("log").textContent = data.log; $("log").scrollTop = $("log").scrollHeight; }
    setStatus(data.status, data.message);
    document.body.dataset.step = steps.length ? steps[steps.length - 1].step : 0;
    document.body.dataset.status = data.status;
    showProgress();
  };
}

function drawCurves(canvas, steps, validation) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 40;
  ctx.clearRect(0, 0, W, H);
  if (steps.length < 2) return;
  const losses = steps.map((s) => s.loss).concat(validation.map((v) => v.loss));
  const lo = Math.min(...losses), hi = Math.max(...losses);
  const maxStep = steps[steps.length - 1].step;
  const x = (step) => pad + ((W - 2 * pad) * step) / maxStep;
  const y = (loss) => H - pad - ((H - 2 * pad) * (loss - lo)) / (hi - lo || 1);
  ctx.fillStyle = "#444"; ctx.font = "11px sans-serif";
  ctx.fillText(hi.toPrecision(3), 2, pad); ctx.fillText(lo.toPrecision(3), 2, H - pad);
  ctx.fillText(`step ${maxStep}`, W - pad - 40, H - 10);
  const line = (points, color, width) => {
    ctx.strokeStyle = color; ctx.lineWidth = width; ctx.beginPath();
    points.forEach(([sx, sy], i) => (i ? ctx.lineTo(x(sx), y(sy)) : ctx.moveTo(x(sx), y(sy))));
    ctx.stroke();
  };
  line(steps.map((s) => [s.step, s.loss]), "#bbb", 1);
  let average = steps[0].loss;
  line(steps.map((s) => [s.step, (average = 0.9 * average + 0.1 * s.loss)]), "#2f7d5b", 2);
  if (validation.length) line(validation.map((v) => [v.step, v.loss]), "#e0a93a", 2);
}

// --- datasets ----------------------------------------------------------------------------------

async function pageDatasets() {
  const params = new URLSearchParams(location.search);
  $("path").value = params.get("path") || "";
  if (params.get("resolution")) $("resolution").value = params.get("resolution");
  async function browse(path) {
    const { folders, parent } = await api(`/api/folders?path=${encodeURIComponent(path)}`);
    const links = folders.map((f) => el("a", { href: "#", text: `${f.name} (${f.images})`, onclick: (e) => { e.preventDefault(); open(f.path); } }));
    const up = parent != null ? [el("a", { href: "#", text: "..", onclick: (e) => { e.preventDefault(); open(parent); } })] : [];
    $("subfolders").replaceChildren(el("p", {}, "folders: ", ...[...up, ...links].flatMap((a) => [a, " "])));
  }
  async function open(path) {
    $("path").value = path;
    $("error").textContent = "";
    history.replaceState(null, "", `?path=${encodeURIComponent(path)}&resolution=${$("resolution").value}`);
    browse(path).catch((e) => { $("error").textContent = e.message; });
    $("cards").replaceChildren();
    $("problems").replaceChildren();
    $("report").hidden = true;
    if (!path) return;
    try {
      const ext = $("ext").value;
      const listing = await api(`/api/dataset?path=${encodeURIComponent(path)}&resolution=${$("resolution").value}&caption_extension=${encodeURIComponent(ext)}`);
      $("report").textContent = listing.report.join("\n");
      $("report").hidden = false;
      if (listing.problems.length) {
        $("problems").append(el("h2", { text: `${listing.problems.length} file${listing.problems.length === 1 ? "" : "s"} cannot be used` }),
          el("ul", {}, ...listing.problems.map((p) => el("li", { class: "problem", text: `${p.path}: ${p.problem}` }))));
      }
      $("cards").replaceChildren(...listing.items.map((item) => card(item, ext)));
    } catch (e) { $("error").textContent = e.message; }
  }
  function card(item, ext) {
    const text = el("textarea", { "data-path": item.path });
    text.value = item.caption;
    const state = el("span", { class: "muted", text: item.has_caption_file ? "" : "no caption file" });
    const save = el("button", { text: "Save", onclick: async () => {
      try {
        await api("/api/caption", { method: "POST", body: { path: item.path, caption: text.value, caption_extension: ext } });
        state.textContent = "saved"; state.className = "muted";
      } catch (e) { state.textContent = e.message; state.className = "error"; }
    } });
    return el("div", { class: "card" },
      el("img", { src: `/api/thumb?path=${encodeURIComponent(item.path)}`, alt: item.path, loading: "lazy" }),
      el("div", { class: "muted", text: `${item.path.split("/").pop()} · ${item.size.join("x")} → bucket ${item.bucket.join("x")}` }),
      text, save, state);
  }
  $("open").onclick = () => open($("path").value);
  await open($("path").value);
}

// --- try an adapter ----------------------------------------------------------------------------

async function pageTry() {
  const [{ models }, { runs }] = await Promise.all([api("/api/models"), api("/api/runs")]);
  for (const model of models) $("models").append(el("option", { value: model }));
  if (!$("model").value && models.length) $("model").value = models[0];  // the first demo model
  for (const run of runs) $("adapters").append(el("option", { value: `${run.output_dir}/${run.name}.safetensors` }));
  const params = new URLSearchParams(location.search);
  if (params.get("adapter")) $("adapter").value = params.get("adapter");
  $("render").onclick = async () => {
    $("error").textContent = "";
    $("busy").textContent = "rendering…";
    $("render").disabled = true;
    try {
      const body = { model: $("model").value, adapter: $("adapter").value, prompt: $("prompt").value,
        seed: Number($("seed").value), scale: Number($("scale").value), steps: Number($("steps").value),
        guidance: Number($("guidance").value) };
      const { image } = await api("/api/try", { method: "POST", body });
      $("result").src = image;
      $("result").hidden = false;
    } catch (e) { $("error").textContent = e.message; }
    $("busy").textContent = "";
    $("render").disabled = false;
  };
}

const PAGES = { index: pageIndex, new: pageNew, run: pageRun, datasets: pageDatasets, try: pageTry };
PAGES[document.body.dataset.page]().catch((error) => {
  document.querySelector("main").prepend(el("p", { class: "error", text: error.message }));
});
