"use strict";

// --- tools on a finished run's adapter: merge, resize, combine ---------------------------------------

async function pageTools() {
  const id = new URLSearchParams(location.search).get("run");
  if (!id) throw new Error("open the tools from a run's page (/tools?run=ID)");
  const info = await api(`/api/tools/${encodeURIComponent(id)}`);
  $("run-link").textContent = info.name;
  $("run-link").href = `/runs/${info.id}`;
  document.title = `Tools: ${info.name} · stylelora`;
  $("adapter").textContent = info.adapter || `none yet (the run is ${info.status})`;
  $("model").textContent = info.model;
  $("rank").textContent = info.rank ?? "?";
  if (info.rank) $("resize-rank").value = Math.max(1, Math.floor(info.rank / 2));
  for (const other of info.others) $("combine-other").append(el("option", { value: other.path, text: other.label }));
  showResults(info.results);

  function showResults(results) {
    $("results").replaceChildren(...results.map((r) => el("li", { "data-name": r.name },
      el("a", { href: r.download, text: r.name }), " · ",
      r.kind === "adapter"
        ? el("a", { href: `/try?adapter=${encodeURIComponent(r.path)}&model=${encodeURIComponent(info.model)}`, text: "try it" })
        : el("span", { class: "muted", text: `a model: ${r.path}` }))));
  }
  let timer = null;
  async function show(job) {
    const running = job.state === "running";
    document.body.dataset.job = job.state;
    for (const b of ["merge", "resize", "combine"]) $(b).disabled = running;
    $("cancel").hidden = !running;
    $("job").textContent = running ? `${job.what}… ${job.seconds} s ${job.progress}`
      : job.state === "done" ? `done: ${job.result.name} (${job.seconds} s)`
      : job.state === "cancelled" ? "cancelled" : "";
    $("error").textContent = job.state === "failed" ? job.error : "";
    clearTimeout(timer);
    if (running) timer = setTimeout(follow, 500);
    else if (job.state === "done") showResults((await api(`/api/tools/${info.id}`)).results);
  }
  async function follow() {
    try { await show(await api("/api/tools/status")); } catch (e) { $("error").textContent = e.message; }
  }
  const run = (tool, body) => async () => {
    $("error").textContent = "";
    try { await show(await api(`/api/tools/${info.id}/${tool}`, { method: "POST", body })); } catch (e) { $("error").textContent = e.message; }
  };
  $("merge").onclick = () => run("merge", { strength: $("merge-strength").value, dtype: $("merge-dtype").value })();
  $("resize").onclick = () => run("resize", { rank: $("resize-rank").value })();
  $("combine").onclick = () => run("combine", { other: $("combine-other").value, strength: $("combine-strength").value,
    other_strength: $("combine-other-strength").value, rank: $("combine-rank").value })();
  $("cancel").onclick = async () => {
    try { await show(await api("/api/tools/cancel", { method: "POST", body: {} })); } catch (e) { $("error").textContent = e.message; }
  };
  const current = await api("/api/tools/status");
  if (current.state === "running" && current.run === info.id) show(current);
}

startPage(pageTools);
