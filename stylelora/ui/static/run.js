"use strict";

// --- a run's page: its state, phase and progress pushed by the server (server-sent events),
// the loss chart, the previews, the downloads and the whole log -----------------------------

const ENDED = ["finished", "failed", "stopped", "interrupted"];

async function pageRun() {
  const id = location.pathname.split("/").pop();
  let detail;
  try {
    detail = await api(`/api/runs/${id}`);
  } catch (error) {
    showMissing(error.message);
    return;
  }
  $("run").hidden = false;
  const run = {
    id, name: detail.name, folder: detail.output_dir, status: detail.status, maxSteps: detail.max_steps, canResume: detail.can_resume,
    steps: [], validation: [], measures: [], picked: null, phase: null, started: false, place: detail.queue_place,
  };
  const chart = new LossChart($("chart"));
  fillDetail(detail);
  setUpActions(run);
  setUpLightbox();
  const measureChart = new MeasureChart($("measure-chart"));
  const redraw = () => { chart.draw(run.steps, run.validation); measureChart.draw(run.measures, run.picked); };
  new ResizeObserver(redraw).observe($("chart"));
  $("smoothing").oninput = () => {
    chart.weight = Number($("smoothing").value);
    $("smoothing-value").textContent = chart.weight.toFixed(2);
    redraw();
  };
  $("log-download").href = `/api/runs/${id}/log`;

  const source = new EventSource(`/api/runs/${id}/events`);
  source.onopen = () => { // each connection starts from the beginning of the run's files
    Object.assign(run, { steps: [], validation: [], measures: [], picked: null, phase: null, started: false });
    $("log-lines").textContent = "";
  };
  source.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.removed) { source.close(); showMissing(`no run ${id} (removed)`); return; }
    run.changed = run.status !== data.status; // then the downloads may have changed too
    Object.assign(run, { status: data.status, place: data.queue_place });
    for (const event of data.events || []) onEvent(run, event);
    if (data.log) appendLog(data.log);
    showState(run, data.message);
    showProgress(run);
    redraw();
    if (run.changed) refreshDetail(run);
  };
  showState(run, detail.message);
}

function showMissing(text) {
  $("run").hidden = true;
  $("missing").hidden = false;
  $("missing").textContent = text;
  document.title = `${text} · stylelora`;
}

function fillDetail(detail) {
  $("name").textContent = detail.name;
  document.title = `${detail.name} · stylelora`;
  $("config").textContent = detail.config_text;
  $("resolved").textContent = detail.resolved;
  $("resume-command").textContent = `${detail.config} · from the command line: ${detail.resume_command}`;
  fillDownloads(detail);
}

async function refreshDetail(run) {
  const detail = await api(`/api/runs/${run.id}`).catch(() => null);
  if (!detail) return;
  run.canResume = detail.can_resume;
  fillDownloads(detail);
  showState(run, detail.message);
}

function fileUrl(runId, path, download) {
  const encoded = path.split("/").map(encodeURIComponent).join("/");
  return `/api/runs/${runId}/files/${encoded}${download ? "?download=1" : ""}`;
}

function fillDownloads(detail) {
  const id = detail.id;
  const items = detail.downloads.map((name) => el("li", {},
    el("a", { href: fileUrl(id, name, true), text: name }),
    name.endsWith(".html") ? el("span", {}, " · ", el("a", { href: fileUrl(id, name), target: "_blank", text: "open" })) : ""));
  if (detail.has_log) items.push(el("li", {}, el("a", { href: `/api/runs/${id}/log`, text: `${detail.name}.log` }), el("span", { class: "muted", text: " the whole log" })));
  $("downloads").replaceChildren(...items);
  const checkpoints = detail.checkpoints.map((checkpoint) => el("li", { "data-step": checkpoint.step },
    `step ${checkpoint.step}: `,
    checkpoint.adapter
      ? el("span", {}, el("a", { href: fileUrl(id, checkpoint.adapter, true), text: checkpoint.adapter.split("/").pop() }),
        " · ", el("a", { href: `/try?run=${id}&step=${checkpoint.step}`, text: "try it" }))
      : el("span", { class: "muted", text: "no adapter file (written before checkpoints held one)" })));
  $("checkpoints").replaceChildren(...checkpoints);
  $("no-checkpoints").hidden = checkpoints.length > 0;
  $("try").dataset.adapter = detail.downloads.some((name) => name === `${detail.name}.safetensors`) ? "1" : "";
}

// --- events ------------------------------------------------------------------------------

function onEvent(run, event) {
  if (event.event === "start") { run.started = true; run.maxSteps = event.max_steps; }
  if (event.event === "step") { keepBefore(run.steps, event.step); run.steps.push(event); run.maxSteps = event.max_steps; }
  if (event.event === "validation") { keepBefore(run.validation, event.step); run.validation.push(event); }
  if (event.event === "measure") { keepBefore(run.measures, event.step); run.measures.push(event); }
  if (event.event === "pick") run.picked = event;
  if (event.event === "preview") addPreview(run.id, event);
  if (event.event === "phase") {
    run.phase = event.ended ? null : event;
    if (event.ended && event.phase === "saving a checkpoint") run.changed = true;
  }
  if (event.event === "status" && event.status !== "running") { run.started = false; run.phase = null; }
}

// A resumed run logs again the steps after its checkpoint: the later line of a step wins.
function keepBefore(list, step) {
  while (list.length && list[list.length - 1].step >= step) list.pop();
}

function ordinal(n) {
  const suffix = n % 100 >= 11 && n % 100 <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th";
  return `${n}${suffix}`;
}

function phaseText(run) {
  if (!["running", "stopping"].includes(run.status)) return "";
  const phase = run.phase;
  const now = phase ? phase.phase + (phase.total ? ` ${phase.done}/${phase.total}` : "")
    : run.started ? "training" : "starting: loading the model and the data";
  return run.status === "stopping" ? `stopping · ${now}` : now;
}

function showState(run, message) {
  const { status } = run;
  const queued = status === "queued";
  $("status").textContent = queued && run.place ? `queued, ${ordinal(run.place)}` : status;
  $("status").className = `status ${status}`;
  $("message").textContent = message && message !== status ? message : "";
  const phase = phaseText(run);
  $("phase").hidden = !phase;
  $("phase").textContent = phase;
  document.body.dataset.phase = run.phase ? run.phase.phase : phase ? "training" : "";
  $("speed-box").hidden = $("left-box").hidden = status !== "running";
  document.body.dataset.status = status;
  $("stop").hidden = !(queued || status === "running");
  $("stop").textContent = queued ? "Remove from queue" : "Stop";
  $("resume").hidden = !["stopped", "interrupted", "failed"].includes(status);
  $("resume").textContent = run.canResume ? "Resume" : "Start again";
  $("remove").hidden = !ENDED.includes(status);
  const finished = status === "finished";
  showLink($("try"), finished && $("try").dataset.adapter === "1", `/try?run=${run.id}`);
  showLink($("tools"), finished, `/tools?run=${run.id}`);
  showLink($("clone"), ENDED.includes(status), `/new?clone=${run.id}`);
}

function showLink(link, shown, href) {
  link.hidden = !shown;
  if (shown) link.href = href;
}

function showProgress(run) {
  const last = run.steps[run.steps.length - 1];
  $("max").textContent = run.maxSteps ?? "?";
  document.body.dataset.step = last ? last.step : 0;
  const running = run.status === "running";
  $("speed-box").hidden = $("left-box").hidden = !running;
  $("trained-box").hidden = running || !last;
  if (!last) return;
  $("step").textContent = last.step;
  $("loss").textContent = last.loss.toFixed(4);
  $("lr").textContent = last.lr.toExponential(2);
  $("bar").style.width = `${Math.min(100, (100 * last.step) / (run.maxSteps || last.step))}%`;
  $("trained").textContent = formatSeconds(last.seconds);
  const recent = run.steps.slice(-30);
  const perStep = recent.length > 1 ? (last.seconds - recent[0].seconds) / (last.step - recent[0].step) : 0;
  $("speed").textContent = perStep > 0 ? (perStep < 1 ? `${(1 / perStep).toFixed(2)} steps/s` : `${perStep.toFixed(2)} s/step`) : "-";
  $("left").textContent = perStep > 0 ? formatSeconds((run.maxSteps - last.step) * perStep) : "-";
}

// --- actions -----------------------------------------------------------------------------

function setUpActions(run) {
  const act = (path, options) => api(`/api/runs/${run.id}${path}`, options)
    .then(() => { $("action-error").textContent = ""; })
    .catch((error) => { $("action-error").textContent = error.message; });
  $("stop").onclick = () => act("/stop", { method: "POST" });
  $("resume").onclick = () => act("/resume", { method: "POST" });
  $("remove").onclick = async () => {
    if (!confirm(`Remove run ${run.id} (${run.name}) from the list? Its folder ${run.folder} stays on disk.`)) return;
    try { await api(`/api/runs/${run.id}`, { method: "DELETE" }); location.href = "/"; } catch (error) { $("action-error").textContent = error.message; }
  };
}

// --- previews ----------------------------------------------------------------------------

const shownPreviews = new Set();

function addPreview(runId, event) {
  if (shownPreviews.has(event.path)) return;
  shownPreviews.add(event.path);
  const prompts = event.prompts || [];
  const src = fileUrl(runId, event.path);
  const image = el("a", { href: src, class: "zoom", title: "see it at full size" },
    el("img", { src, alt: `previews at step ${event.step}` }));
  image.onclick = (click) => { click.preventDefault(); openLightbox(src, event.step, prompts); };
  const rows = prompts.length ? `repeat(${prompts.length}, minmax(0, 1fr))` : "none";
  $("gallery").prepend(el("figure", { class: "preview", "data-step": event.step },
    el("figcaption", {}, el("b", { text: `step ${event.step}` }), " · ", el("a", { href: src, target: "_blank", text: "full size" })),
    el("div", { class: prompts.length ? "heads with-prompts" : "heads" },
      prompts.length ? el("span", { text: "prompt" }) : "", el("span", { text: "without the adapter" }), el("span", { text: "with it" })),
    el("div", { class: prompts.length ? "sheet with-prompts" : "sheet" },
      prompts.length ? el("ol", { class: "prompts", style: `grid-template-rows: ${rows}` },
        ...prompts.map((prompt) => el("li", { text: prompt, title: prompt }))) : "",
      image)));
  $("no-previews").hidden = true;
}

function setUpLightbox() {
  const close = () => { $("lightbox").hidden = true; };
  $("lightbox").onclick = close;
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") close(); });
}

function openLightbox(src, step, prompts) {
  $("lightbox-img").src = src;
  $("lightbox-img").alt = `previews at step ${step}, full size`;
  $("lightbox-caption").textContent = `step ${step} · rows: ${prompts.join(" | ") || "one per prompt"} · left without the adapter, right with it`;
  $("lightbox").hidden = false;
}

// --- the log -----------------------------------------------------------------------------

function appendLog({ lines, partial, restarted }) {
  const log = $("log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  if (restarted) $("log-lines").textContent = "";
  if (lines.length) $("log-lines").append(lines.join("\n") + "\n");
  $("log-partial").textContent = partial;
  if (atEnd) log.scrollTop = log.scrollHeight; // follow the end unless the reader scrolled up
}

// --- the loss chart: SVG drawn by hand, as wide as the page -------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text != null) node.textContent = text;
  return node;
}

// TensorBoard's smoothing: an exponential moving average started at zero and divided by the
// weight it has gathered, so that the first steps are not pulled towards the first loss.
function smoothed(values, weight) {
  let average = 0;
  return values.map((value, i) => {
    average = weight * average + (1 - weight) * value;
    return weight ? average / (1 - weight ** (i + 1)) : value;
  });
}

// Round values at most `count` apart over [lo, hi]; `extend`: the range grows to round ends.
function niceTicks(lo, hi, count, extend = false) {
  const span = hi - lo || Math.abs(hi) || 1;
  const magnitude = 10 ** Math.floor(Math.log10(span / count));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => span / s <= count) || 10 * magnitude;
  const first = (extend ? Math.floor(lo / step + 1e-9) : Math.ceil(lo / step - 1e-9)) * step;
  const last = extend ? Math.ceil(hi / step - 1e-9) * step : hi;
  const ticks = [];
  for (let value = first; value <= last + step * 1e-9; value += step) ticks.push(Number(value.toPrecision(12)));
  return ticks;
}

function formatNumber(value) {
  if (value === 0) return "0";
  const size = Math.abs(value);
  return size >= 1e4 || size < 1e-3 ? value.toExponential(1) : Number(value.toPrecision(3)).toString();
}

class LossChart {
  constructor(box) {
    this.box = box;
    this.svg = box.querySelector("svg");
    this.tip = box.querySelector(".chart-tip");
    this.weight = 0.9;
    this.hoverX = null; // where the pointer is, kept across redraws
    this.svg.addEventListener("mousemove", (event) => { this.hoverX = event.clientX; this.hover(); });
    this.svg.addEventListener("mouseleave", () => { this.hoverX = null; this.unhover(); });
  }

  draw(steps, validation) {
    const width = Math.max(240, this.box.clientWidth), height = 300;
    const m = { left: 58, right: 66, top: 14, bottom: 34 };
    this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    this.svg.setAttribute("width", width);
    this.svg.setAttribute("height", height);
    this.steps = steps;
    this.validation = validation;
    this.smooth = smoothed(steps.map((s) => s.loss), this.weight);
    $("legend-val").hidden = !validation.length;
    const nodes = [];
    if (!steps.length) {
      this.unhover();
      this.svg.replaceChildren(svgEl("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "the loss appears here after the first step"));
      return;
    }
    const losses = steps.map((s) => s.loss).concat(validation.map((v) => v.loss));
    let low = Math.min(...losses), high = Math.max(...losses);
    if (high === low) { low -= Math.abs(low) * 0.1 || 1; high += Math.abs(high) * 0.1 || 1; }
    const lossTicks = niceTicks(low, high, 5, true);
    const lo = lossTicks[0], hi = lossTicks[lossTicks.length - 1];
    const lrTicks = niceTicks(0, Math.max(...steps.map((s) => s.lr)) || 1, 4, true);
    const lrMax = lrTicks[lrTicks.length - 1];
    const lastStep = steps[steps.length - 1].step; // the steps taken: the progress bar shows the rest
    const plot = { x0: m.left, x1: width - m.right, y0: height - m.bottom, y1: m.top };
    const x = (step) => plot.x0 + ((plot.x1 - plot.x0) * step) / (lastStep || 1);
    const y = (loss) => plot.y0 - ((plot.y0 - plot.y1) * (loss - lo)) / (hi - lo);
    const yLr = (lr) => plot.y0 - ((plot.y0 - plot.y1) * lr) / lrMax;
    Object.assign(this, { x, y, yLr, plot, lastStep });
    for (const tick of niceTicks(0, lastStep, Math.max(2, Math.floor((plot.x1 - plot.x0) / 90))).filter(Number.isInteger)) {
      nodes.push(svgEl("line", { x1: x(tick), x2: x(tick), y1: plot.y0, y2: plot.y1, class: "grid" }));
      nodes.push(svgEl("text", { x: x(tick), y: plot.y0 + 16, "text-anchor": "middle", class: "tick x" }, tick));
    }
    for (const tick of lossTicks) {
      nodes.push(svgEl("line", { x1: plot.x0, x2: plot.x1, y1: y(tick), y2: y(tick), class: "grid" }));
      nodes.push(svgEl("text", { x: plot.x0 - 6, y: y(tick) + 4, "text-anchor": "end", class: "tick y" }, formatNumber(tick)));
    }
    for (const tick of lrTicks) {
      nodes.push(svgEl("text", { x: plot.x1 + 6, y: yLr(tick) + 4, class: "tick lr" }, formatNumber(tick)));
    }
    nodes.push(svgEl("text", { x: (plot.x0 + plot.x1) / 2, y: height - 2, "text-anchor": "middle", class: "axis-label" }, "step"));
    nodes.push(svgEl("text", { x: 12, y: (plot.y0 + plot.y1) / 2, transform: `rotate(-90 12 ${(plot.y0 + plot.y1) / 2})`, "text-anchor": "middle", class: "axis-label" }, "loss"));
    nodes.push(svgEl("text", { x: width - 8, y: (plot.y0 + plot.y1) / 2, transform: `rotate(90 ${width - 8} ${(plot.y0 + plot.y1) / 2})`, "text-anchor": "middle", class: "axis-label lr" }, "learning rate"));
    nodes.push(svgEl("rect", { x: plot.x0, y: plot.y1, width: plot.x1 - plot.x0, height: plot.y0 - plot.y1, class: "frame" }));
    nodes.push(this.line(thinned(steps.map((s) => [x(s.step), y(s.loss)])), "raw"));
    nodes.push(this.line(steps.map((s) => [x(s.step), yLr(s.lr)]), "lr"));
    nodes.push(this.line(steps.map((s, i) => [x(s.step), y(this.smooth[i])]), "smooth"));
    if (validation.length) {
      nodes.push(this.line(validation.map((v) => [x(v.step), y(v.loss)]), "val"));
      for (const v of validation) nodes.push(svgEl("circle", { cx: x(v.step), cy: y(v.loss), r: 3, class: "val-dot" }));
    }
    this.cursor = svgEl("g", { class: "cursor", visibility: "hidden" });
    nodes.push(this.cursor);
    this.svg.replaceChildren(...nodes);
    if (this.hoverX == null) this.unhover(); else this.hover();
  }

  line(points, kind) {
    const d = points.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
    return svgEl("polyline", { points: d, class: `line ${kind}` });
  }

  nearest(step) {
    const steps = this.steps;
    let lo = 0, hi = steps.length - 1;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (steps[mid].step < step) lo = mid + 1; else hi = mid; }
    return lo > 0 && step - steps[lo - 1].step < steps[lo].step - step ? lo - 1 : lo;
  }

  hover() {
    if (!this.steps || !this.steps.length) return;
    const box = this.svg.getBoundingClientRect();
    const px = this.hoverX - box.left;
    const step = ((px - this.plot.x0) / (this.plot.x1 - this.plot.x0)) * this.lastStep;
    const i = this.nearest(step);
    const s = this.steps[i];
    const cx = this.x(s.step);
    this.cursor.replaceChildren(
      svgEl("line", { x1: cx, x2: cx, y1: this.plot.y0, y2: this.plot.y1 }),
      svgEl("circle", { cx, cy: this.y(s.loss), r: 3, class: "raw-dot" }),
      svgEl("circle", { cx, cy: this.y(this.smooth[i]), r: 3.5, class: "smooth-dot" }),
      svgEl("circle", { cx, cy: this.yLr(s.lr), r: 3, class: "lr-dot" }));
    this.cursor.setAttribute("visibility", "visible");
    const parts = [`step ${s.step}`, `loss ${s.loss.toFixed(4)}`, `smoothed ${this.smooth[i].toFixed(4)}`, `lr ${s.lr.toExponential(2)}`];
    const v = this.validation.filter((item) => item.step <= s.step).pop();
    if (v) parts.push(`validation ${v.loss.toFixed(4)} (step ${v.step})`);
    this.tip.textContent = parts.join(" · ");
    this.tip.hidden = false;
    const tipWidth = this.tip.offsetWidth;
    const left = cx + 12 + tipWidth <= box.width ? cx + 12 : cx - 12 - tipWidth;
    this.tip.style.left = `${Math.max(0, left)}px`;
  }

  unhover() {
    this.tip.hidden = true;
    if (this.cursor) this.cursor.setAttribute("visibility", "hidden");
  }
}

// Many more points than pixels: keep each pixel column's lowest and highest, in step order.
function thinned(points) {
  if (points.length < 4000) return points;
  const kept = [];
  let column = [];
  const flush = () => {
    if (!column.length) return;
    const byY = [...column].sort((a, b) => a[1] - b[1]);
    const ends = new Set([byY[0], byY[byY.length - 1]]);
    kept.push(...column.filter((point) => ends.has(point)));
  };
  for (const point of points) {
    if (column.length && Math.round(point[0]) !== Math.round(column[0][0])) { flush(); column = []; }
    column.push(point);
  }
  flush();
  return kept;
}

startPage(pageRun);
