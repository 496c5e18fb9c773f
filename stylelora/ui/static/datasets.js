"use strict";

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

startPage(pageDatasets);
