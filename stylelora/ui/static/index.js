"use strict";

// --- runs, the queue's order and the machine ------------------------------------------------------

async function pageIndex() {
  async function refresh() {
    const [{ runs }, { queue }] = await Promise.all([api("/api/runs"), api("/api/queue")]);
    const body = $("runs").querySelector("tbody");
    body.replaceChildren(...runs.map((run) => runRow(run, queue)));
    $("empty").hidden = runs.length > 0;
  }
  async function act(run, path, method = "POST", body = undefined) {
    if (method === "DELETE" && !confirm(`Remove run ${run.id} (${run.name}) from the list? Its folder ${run.output_dir} stays on disk.`)) return;
    try { await api(`/api/runs/${run.id}${path}`, { method, body }); } catch (error) { alert(error.message); }
    refresh();
  }
  function button(label, action, onclick, title = "") {
    return el("button", { text: label, "data-action": action, title, onclick });
  }
  function runRow(run, queue) {
    const actions = el("td", { class: "actions" });
    const place = queue.indexOf(run.id);
    if (place >= 0) {
      if (place > 0) {
        actions.append(button("⇈", "front", () => act(run, "/move", "POST", { to: "front" }), "to the front of the queue"));
        actions.append(button("↑", "up", () => act(run, "/move", "POST", { to: "up" }), "one place up"));
      }
      if (place < queue.length - 1) actions.append(button("↓", "down", () => act(run, "/move", "POST", { to: "down" }), "one place down"));
    }
    if (["queued", "running"].includes(run.status)) actions.append(button("Stop", "stop", () => act(run, "/stop")));
    if (run.can_resume || ["stopped", "interrupted", "failed"].includes(run.status)) actions.append(button("Resume", "resume", () => act(run, "/resume")));
    if (!["running", "stopping"].includes(run.status)) actions.append(button("Remove", "remove", () => act(run, "", "DELETE")));
    const status = el("td", { class: `status ${run.status}`, text: run.status });
    if (place >= 0) status.append(el("span", { class: "place", text: `#${place + 1} in queue` }));
    return el("tr", { "data-run": run.id, "data-place": place >= 0 ? place + 1 : "" },
      el("td", { text: run.id }),
      el("td", { class: "name" }, el("a", { href: `/runs/${run.id}`, text: run.name })),
      status,
      el("td", { class: "step", text: `${run.step} / ${run.max_steps ?? "?"}` }),
      el("td", { class: "loss", text: run.loss == null ? "-" : run.loss.toFixed(4) }),
      el("td", { class: "started", text: run.started_at ? new Date(run.started_at * 1000).toLocaleString() : "-" }),
      el("td", { class: "note muted", text: run.message && run.message !== run.status ? run.message : "" }),
      actions);
  }
  async function showMachine() {
    const m = await api("/api/machine");
    $("cpu").textContent = `${m.cpu_percent.toFixed(0)}% of ${m.cpus}`;
    $("ram").textContent = `${gib(m.ram_used)} / ${gib(m.ram_total)} GiB`;
    $("gpus").replaceChildren(...m.gpus.map((g, i) => el("span", { class: "gpu", "data-gpu": i },
      `GPU ${i} ${g.name} `, el("b", { text: `${g.use_percent}%` }), ` · ${gib(g.memory_used)} / ${gib(g.memory_total)} GiB`)));
  }
  $("import").onclick = async () => {
    $("import-error").textContent = "";
    try {
      const { id } = await api("/api/runs/import", { method: "POST", body: { folder: $("import-folder").value } });
      location.href = `/runs/${id}`;
    } catch (error) { $("import-error").textContent = error.message; }
  };
  await Promise.all([refresh(), showMachine()]);
  setInterval(refresh, 2000);
  setInterval(() => showMachine().catch(() => {}), 3000);
}

function gib(bytes) {
  return (bytes / 2 ** 30).toFixed(1);
}

startPage(pageIndex);
