"use strict";

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
      onclick: async () => { if (method === "DELETE" && !confirm(`Remove run ${run.id} (${run.name}) from the list? Its folder ${run.output_dir} stays on disk.`)) return; await api(`/api/runs/${run.id}${path}`, { method }).catch(alert); refresh(); },
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

startPage(pageIndex);
