"use strict";

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

startPage(pageNew);
