"use strict";

// --- a new run: the essentials, every other key under "All settings", and their TOML --------
//
// `settings` holds only the keys the user set (as `--set` takes them); an empty field takes
// the preset's value (shown in it, tagged "from preset") or else the default.

async function pageNew() {
  const description = await api("/api/form");
  const { templates, home } = await api("/api/templates");
  const cloneId = new URLSearchParams(location.search).get("clone");
  let settings = {};
  let loaded = "{}"; // the settings as last loaded from a template: what an edit departs from
  let runProblems = {}; // a cloned run's failure, by key, until its field is edited
  let lastCheck = { problems: {}, preset: {}, not_taken: [] };
  let checks = 0;
  $("home").textContent = home;
  for (const name of Object.keys(templates)) $("template").append(el("option", { value: name, text: name }));
  for (const name of description.presets) $("presets").append(el("option", { value: name }));
  api("/api/models").then(({ models }) => {
    for (const model of models) $("models").append(el("option", { value: model }));
  }).catch(() => {});
  api("/api/folders?recursive=1").then(({ folders }) => {
    for (const folder of folders) $("folders").append(el("option", { value: folder.path }));
  }).catch(() => {});

  const groups = {};
  for (const group of description.groups) {
    groups[group] = el("details", { "data-group": group }, el("summary", { text: group }));
    $("groups").append(el("fieldset", {}, groups[group]));
  }
  const fields = {};
  for (const field of description.fields) fields[field.key] = field;
  const rows = {};
  for (const key of [...description.essentials, ...description.fields.map((f) => f.key)]) {
    if (rows[key]) continue; // an essential key has its one field in the essentials
    rows[key] = fieldRow(fields[key]);
    (fields[key].essential ? $("essentials") : groups[fields[key].group]).append(rows[key]);
  }

  function fieldRow(field) {
    let input;
    if (field.kind === "choice") {
      input = el("select", {}, el("option", { value: "" }),
        ...field.choices.map((choice) => el("option", { value: choice, text: choice })));
    } else {
      input = el("input", { type: "text" });
      if (field.key === "model") input.setAttribute("list", "models");
      if (field.key === "preset") input.setAttribute("list", "presets");
      if (field.key === "data.dir" || field.key === "output_dir") input.setAttribute("list", "folders");
    }
    input.id = `field-${field.key}`;
    input.name = field.key;
    input.setAttribute("aria-describedby", `help-${field.key}`);
    input.addEventListener("change", () => {
      if (input.value.trim() === "") delete settings[field.key]; else settings[field.key] = input.value;
      delete runProblems[field.key];
      check();
    });
    const label = el("label", { for: input.id, text: field.label });
    if (field.essential) label.append(el("code", { text: field.key }));
    return el("div", { class: field.essential ? "field essential" : "field", "data-key": field.key },
      label,
      el("div", { class: "control" }, input, el("span", { class: "from-preset", id: `from-preset-${field.key}` })),
      el("small", { class: "help", id: `help-${field.key}`, text: field.help }),
      el("span", { class: "problem", id: `problem-${field.key}` }));
  }

  function show(newSettings) {
    settings = { ...newSettings };
    loaded = canonical(settings);
    for (const key of Object.keys(rows)) $(`field-${key}`).value = settings[key] ?? "";
    return check();
  }
  const canonical = (object) => JSON.stringify(Object.entries(object).sort());

  async function check() {
    const number = ++checks;
    const result = await api("/api/config/check", { method: "POST", body: { settings } });
    if (number !== checks) return result.problems; // a later check is on its way
    lastCheck = result;
    showPreset(result.preset);
    showApplicable(new Set(result.not_taken));
    showProblems(result.problems);
    $("toml").value = result.toml;
    return result.problems;
  }

  // An empty field shows the value it will take: the preset's (tagged so), else the default.
  function showPreset(preset) {
    const name = preset.preset || "";
    for (const key of Object.keys(rows)) {
      const input = $(`field-${key}`);
      const fromPreset = key !== "preset" && key in preset && !(key in settings);
      const value = key in preset && key !== "preset" ? preset[key] : fields[key].default;
      const shown = value ? value : fields[key].required ? "required" : "";
      if (input.tagName === "SELECT") {
        input.options[0].text = value ? `(${fromPreset ? "preset" : "default"}: ${value})` : "(unset)";
      } else input.placeholder = shown;
      const tag = $(`from-preset-${key}`);
      tag.textContent = fromPreset ? `from preset ${name}` : "";
      tag.hidden = !fromPreset;
    }
  }

  // Only the fields the model's family takes; one set for another family stays, to be removed.
  function showApplicable(notTaken) {
    for (const [key, row] of Object.entries(rows)) row.hidden = notTaken.has(key) && !(key in settings);
  }
  function hideEmptyGroups() {
    for (const details of Object.values(groups)) {
      details.parentElement.hidden = [...details.querySelectorAll(".field")].every((row) => row.hidden);
    }
  }

  function showProblems(problems) {
    const all = { ...problems, ...runProblems };
    for (const span of document.querySelectorAll(".field .problem")) span.textContent = "";
    const loose = [];
    let inAllSettings = 0;
    for (const [key, text] of Object.entries(all)) {
      const span = $(`problem-${key}`);
      if (span) {
        span.textContent = text;
        rows[key].hidden = false;
        if (!fields[key].essential) inAllSettings += 1;
      } else loose.push(`${key}: ${text}`);
    }
    hideEmptyGroups();
    $("all-problems").textContent = inAllSettings ? `(${inAllSettings} to fix)` : "";
    $("start-error").textContent = loose.join("; ");
  }

  // The first field with a problem, in the page's order: its sections opened, in view, focused.
  function goToFirstProblem() {
    const span = [...document.querySelectorAll(".field .problem")].find((s) => s.textContent);
    if (!span) {
      $("start-error").scrollIntoView({ block: "center" });
      return;
    }
    showForm();
    const row = span.closest(".field");
    for (let details = row.closest("details"); details; details = details.parentElement.closest("details")) {
      details.open = true;
    }
    const input = $(`field-${row.dataset.key}`);
    input.scrollIntoView({ block: "center" });
    input.focus();
  }

  async function startFrom(name) {
    runProblems = {};
    $("clone-note").hidden = true;
    await show(templates[name] || {});
  }
  let chosen = $("template").value;
  $("template").addEventListener("change", async () => {
    const name = $("template").value;
    if (canonical(settings) !== loaded && !confirm(`Discard your changes and start from ${name}?`)) {
      $("template").value = chosen;
      return;
    }
    chosen = name;
    await startFrom(name);
  });

  async function cloneRun(id) {
    const { settings: cloned, run, problems } = await api(`/api/runs/${encodeURIComponent(id)}/settings`);
    const text = `run ${run.id} (${run.name}, ${run.status})`;
    $("template").prepend(el("option", { value: "", text }));
    $("template").value = chosen = "";
    templates[""] = cloned;
    $("clone-note").textContent = `Settings of ${text}, under a new name and folder.` +
      (run.status === "failed" ? ` It failed: ${run.message}` : "");
    $("clone-note").hidden = false;
    runProblems = problems;
    await show(cloned);
    if (Object.keys(problems).length) goToFirstProblem();
  }

  function showForm() {
    $("form").hidden = false; $("toml-view").hidden = true; $("tab-form").className = "on"; $("tab-toml").className = "";
  }
  $("tab-form").onclick = showForm;
  $("tab-toml").onclick = () => { $("form").hidden = true; $("toml-view").hidden = false; $("tab-toml").className = "on"; $("tab-form").className = ""; };
  $("apply-toml").onclick = async () => {
    $("toml-error").textContent = "";
    try {
      const parsed = await api("/api/config/parse", { method: "POST", body: { toml: $("toml").value } });
      const keep = loaded;
      await show(parsed.settings);
      loaded = keep; // TOML typed in is an edit of what was loaded
      showForm();
    } catch (error) { $("toml-error").textContent = error.message; }
  };
  $("start").onclick = async () => {
    $("start-error").textContent = "";
    try {
      const { id } = await api("/api/runs", { method: "POST", body: { settings } });
      location.href = `/runs/${id}`;
    } catch (error) {
      if (error.data && error.data.problems) showProblems({ ...lastCheck.problems, ...error.data.problems });
      else $("start-error").textContent = error.message;
      goToFirstProblem();
    }
  };
  if (cloneId) await cloneRun(cloneId);
  else if (templates.demo) { $("template").value = chosen = "demo"; await show(templates.demo); }
  else await show({});
}

startPage(pageNew);
