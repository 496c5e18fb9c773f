"use strict";

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
    const { adapters } = await api(`/api/adapters?run=${id}`);  // the final adapter and the checkpoints'
    $("downloads").append(...adapters.map((a) => el("li", { class: "try" },
      el("a", { href: `/try?run=${id}${a.step == null ? "" : `&step=${a.step}`}`, text: `try ${a.label}` }),
      a.step == null ? el("span", {}, " · ", el("a", { href: `/tools?run=${id}`, text: "tools: merge, resize, combine" })) : "")));
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

startPage(pageRun);
