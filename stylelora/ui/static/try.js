"use strict";

// --- try an adapter ----------------------------------------------------------------------------

async function pageTry() {
  const [{ models }, { adapters }] = await Promise.all([api("/api/models"), api("/api/adapters")]);
  for (const model of models) $("models").append(el("option", { value: model }));
  if (models.length) $("model").value = models[0];  // the first demo model
  adapters.forEach((adapter, index) => {
    $("choice").append(el("option", { value: index, text: adapter.label }));
    $("adapters").append(el("option", { value: adapter.path, label: adapter.label }));
  });
  function choose(adapter) {
    $("adapter").value = adapter.path;
    if (adapter.model) $("model").value = adapter.model;
    $("width").value = $("height").value = adapter.resolution ?? "";
  }
  $("choice").onchange = () => { if ($("choice").value !== "") choose(adapters[Number($("choice").value)]); };

  const params = new URLSearchParams(location.search);
  if (params.get("run")) {
    const step = params.get("step");
    const index = adapters.findIndex((a) => String(a.run) === params.get("run") && (step ? String(a.step) === step : a.step === null));
    if (index >= 0) { $("choice").value = index; choose(adapters[index]); }
    else $("error").textContent = `run ${params.get("run")} has no ${step ? `checkpoint at step ${step}` : "finished adapter"}`;
  }
  if (params.get("adapter")) $("adapter").value = params.get("adapter");
  if (params.get("model")) $("model").value = params.get("model");

  let timer = null;
  function show(job) {
    const running = job.state === "running";
    document.body.dataset.render = job.state;
    $("render").disabled = running;
    $("cancel").hidden = !running;
    $("busy").textContent = running ? `rendering… ${job.progress || "loading the model"}` : job.state === "cancelled" ? "cancelled" : "";
    $("error").textContent = job.state === "failed" ? job.error : "";
    if (job.state === "done") {
      $("labels").replaceChildren(...job.labels.map((text) => el("span", { text })));
      $("result").src = job.image;
      $("figure").hidden = false;
    }
    clearTimeout(timer);
    if (running) timer = setTimeout(follow, 500);
  }
  async function follow() {
    try { show(await api("/api/try/status")); } catch (e) { $("error").textContent = e.message; }
  }
  $("render").onclick = async () => {
    $("error").textContent = "";
    try {
      const body = { model: $("model").value, adapter: $("adapter").value, prompt: $("prompt").value,
        negative: $("negative").value, scales: $("scales").value, seed: $("seed").value,
        steps: $("steps").value, guidance: $("guidance").value, width: $("width").value, height: $("height").value };
      show(await api("/api/try", { method: "POST", body }));
    } catch (e) { $("error").textContent = e.message; }
  };
  $("cancel").onclick = async () => {
    try { show(await api("/api/try/cancel", { method: "POST", body: {} })); } catch (e) { $("error").textContent = e.message; }
  };
  const current = await api("/api/try/status");
  if (current.state === "running") show(current);  // a render this page started before a reload
}

startPage(pageTry);
