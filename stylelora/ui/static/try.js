"use strict";

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

startPage(pageTry);
