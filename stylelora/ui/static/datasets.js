"use strict";

// --- datasets ----------------------------------------------------------------------------------
// A folder's images as cards (caption, buckets, what `dataset check` says of each), listed with
// the [data] settings it trains with: those in the address (`resolution`, `run`, any other
// data key), else the last run's that used the folder, else the defaults.

const unsaved = new Set(); // the textareas whose caption differs from the file's

async function pageDatasets() {
  const params = new URLSearchParams(location.search);
  let listing = null;
  $("path").value = params.get("path") || "";
  $("resolution").value = params.get("resolution") || "";
  $("ext").value = params.get("caption_extension") || "";
  api("/api/folders?recursive=1").then(({ folders }) => {
    $("dataset-folders").replaceChildren(...folders.map((f) => el("option", { value: f.path, label: `${f.images} images` })));
  }).catch(() => {});

  function say(id, text, isError = false) {
    $(id).textContent = text;
    $(id).className = isError ? "error" : "muted";
  }
  function keepEdits() {
    return unsaved.size === 0 || confirm(`${unsaved.size} caption${unsaved.size === 1 ? " is" : "s are"} edited but not written yet: leave them?`);
  }
  async function browse(path) {
    const { folders, parent } = await api(`/api/folders?path=${encodeURIComponent(path)}`);
    const link = (text, to) => el("a", { href: "#", text, onclick: (e) => { e.preventDefault(); open(to); } });
    const links = [...(parent != null ? [link("..", parent)] : []), ...folders.map((f) => link(`${f.name} (${f.images})`, f.path))];
    $("subfolders").replaceChildren(el("p", {}, "folders: ", ...links.flatMap((a) => [a, " "])));
  }
  // `changes`: address parameters to set (null removes one); the others are kept
  async function open(path, changes = {}) {
    if (!keepEdits()) return;
    if (path !== params.get("path")) params.delete("run"); // a run trains on one folder
    params.set("path", path);
    for (const [key, value] of Object.entries(changes)) value == null || value === "" ? params.delete(key) : params.set(key, value);
    $("path").value = path;
    $("resolution").value = params.get("resolution") || "";
    $("ext").value = params.get("caption_extension") || "";
    history.replaceState(null, "", `?${params}`);
    say("error", "", true);
    unsaved.clear();
    browse(path).catch((e) => say("error", e.message, true));
    $("cards").replaceChildren();
    $("problems").replaceChildren();
    $("settings").replaceChildren();
    $("report-box").hidden = $("tools").hidden = true;
    listing = null;
    if (!path) return;
    try {
      listing = await api(`/api/dataset?${params}`);
    } catch (e) { say("error", e.message, true); return; }
    showSettings(listing);
    showProblems(listing);
    $("cards").replaceChildren(...listing.items.map((item) => card(item, listing.settings)));
    $("report").textContent = listing.report.join("\n");
    $("report-box").hidden = $("tools").hidden = false;
    if (!$("trigger").value) $("trigger").value = listing.settings.trigger_word;
    if (!$("cap-trigger").value) $("cap-trigger").value = listing.settings.trigger_word;
    selectionChanged();
    showUndo();
  }
  const reopen = (changes = {}) => open(params.get("path") || "", changes);

  function showSettings({ source, uses, defaults, settings }) {
    const side = [].concat(settings.resolution).join(", ");
    const said = source.kind === "run" ? `Buckets at ${side} px, as run ${source.run} (${source.name}) trains this folder.`
      : source.kind === "given" ? `Buckets at ${side} px, as given.`
      : `Buckets at ${side} px, data.resolution's default: no run here has trained on this folder yet.`;
    const offer = (text, changes) => el("a", { href: "#", text, onclick: (e) => { e.preventDefault(); reopen(changes); } });
    const others = [
      ...uses.filter((u) => !(source.kind === "run" && u.run === source.run))
        .map((u) => offer(`run ${u.run} (${u.name}): ${[].concat(u.resolution).join(", ")} px`, { run: u.run, resolution: null })),
      ...defaults.map((d) => offer(`${d.family}: ${d.resolution} px`, { resolution: d.resolution, run: null })),
    ];
    $("settings").replaceChildren(said, others.length ? " Or as: " : "", ...others);
  }
  function showProblems({ problems, notes }) {
    const parts = [];
    if (problems.length) {
      parts.push(el("h2", { text: `${problems.length} file${problems.length === 1 ? "" : "s"} cannot be used` }),
        el("ul", {}, ...problems.map((p) => el("li", { class: "problem", text: `${p.path}: ${p.problem}` }))));
    }
    if (notes.length) {
      parts.push(el("h2", { text: `${notes.length} other file${notes.length === 1 ? "" : "s"} to look at` }),
        el("ul", {}, ...notes.map((n) => el("li", { class: "note", text: `${n.path}: ${n.note}` }))));
    }
    $("problems").replaceChildren(...parts);
  }

  function card(item, settings) {
    const background = settings.alpha_background.join(",");
    const trained = `/api/thumb?path=${encodeURIComponent(item.path)}&background=${background}`;
    const image = el("img", { src: trained, alt: item.path, loading: "lazy" });
    const text = el("textarea", { "data-path": item.path });
    text.value = item.caption;
    let written = item.caption;
    const state = el("span", { class: "state muted", text: item.has_caption_file ? "" : "no caption file" });
    const box = el("div", { class: "card", "data-path": item.path });
    const markEdited = () => {
      const edited = text.value.trim() !== written.trim();
      edited ? unsaved.add(text) : unsaved.delete(text);
      box.classList.toggle("unsaved", edited);
      if (edited) { state.textContent = "edited, not written yet"; state.className = "state unsaved"; }
      else if (state.classList.contains("unsaved")) { state.textContent = ""; state.className = "state muted"; }
    };
    text.addEventListener("input", markEdited);
    const save = el("button", { type: "button", text: "Save", onclick: async () => {
      try {
        await api("/api/caption", { method: "POST", body: { path: item.path, caption: text.value, caption_extension: settings.caption_extension } });
        written = text.value;
        markEdited();
        state.textContent = "saved"; state.className = "state muted";
      } catch (e) { state.textContent = e.message; state.className = "state error"; }
    } });
    const buckets = item.buckets.length > 1
      ? `buckets ${item.buckets.map((b) => `${b.bucket.join("x")} (${b.resolution} px)`).join(", ")}`
      : `bucket ${item.bucket.join("x")}`;
    const notes = [...item.notes];
    if (item.transparent) {
      notes.push(settings.alpha_mask
        ? `transparent: its alpha is the loss mask (data.alpha_mask); shown as trained, over rgb(${background})`
        : `transparent: trained over rgb(${background}) (data.alpha_background), as shown`);
    }
    const select = el("input", { type: "checkbox", class: "select", onchange: () => { box.classList.toggle("selected", select.checked); selectionChanged(); } });
    const row = el("div", { class: "row" }, el("label", {}, select, " select"));
    if (item.transparent) {
      const original = el("input", { type: "checkbox", class: "original", onchange: () => {
        image.src = original.checked ? `/api/thumb?path=${encodeURIComponent(item.path)}&original=1` : trained;
        image.classList.toggle("checker", original.checked);
      } });
      row.append(el("label", {}, original, " its transparency"));
    }
    box.append(image,
      el("div", { class: "muted", text: `${item.path.split("/").pop()} · ${item.size.join("x")} → ${buckets}` }),
      ...(item.author ? [el("div", { class: "muted author", text: item.author })] : []),
      ...(notes.length ? [el("ul", { class: "notes" }, ...notes.map((n) => el("li", { text: n })))] : []),
      text, el("div", { class: "row" }, save, state), row);
    return box;
  }

  // --- changing the folder: upload, remove, captions all at once, undo -------------------------

  const selected = () => [...document.querySelectorAll(".card .select:checked")].map((c) => c.closest(".card").dataset.path);
  function selectionChanged() {
    const count = selected().length;
    $("remove-selected").disabled = count === 0;
    $("remove-selected").textContent = count ? `Remove ${count} selected` : "Remove selected";
  }
  async function showUndo() {
    const { undo } = await api(`/api/dataset/undo?path=${encodeURIComponent(params.get("path") || "")}`).catch(() => ({ undo: null }));
    $("undo").hidden = !undo;
    $("undo").textContent = undo ? `Undo: ${undo}` : "";
  }
  async function change(path, body, done) {
    if (!listing) return;
    try {
      const reply = await api(path, { method: "POST", body });
      const message = done(reply);
      await reopen();
      say("action-state", message);
    } catch (e) { say("action-state", e.message, true); }
  }
  function captions(body) {
    if (!keepEdits()) return;
    unsaved.clear();
    change("/api/dataset/captions", { path: params.get("path"), caption_extension: listing.settings.caption_extension, ...body },
      (r) => `${r.what}: ${r.changed} file${r.changed === 1 ? "" : "s"} changed${r.created ? ` (${r.created} made)` : ""}`);
  }
  $("add-trigger").onclick = () => captions({ action: "add_trigger", word: $("trigger").value });
  $("remove-trigger").onclick = () => captions({ action: "remove_trigger", word: $("trigger").value });
  $("replace-all").onclick = () => captions({ action: "replace", find: $("find").value, replace: $("replace").value });
  $("undo").onclick = () => {
    if (!keepEdits()) return;
    unsaved.clear();
    change("/api/dataset/undo", { path: params.get("path") }, (r) => `undone: ${r.undone} (${r.files} file${r.files === 1 ? "" : "s"})`);
  };
  $("remove-selected").onclick = () => {
    const paths = selected();
    if (!paths.length || !confirm(`Move ${paths.length} image${paths.length === 1 ? "" : "s"}, with caption and other files of the same name, into ${params.get("path")}/.trash? Training skips that folder; Undo puts them back.`)) return;
    change("/api/dataset/remove", { folder: params.get("path"), paths },
      (r) => `moved ${r.removed.length} file${r.removed.length === 1 ? "" : "s"} into ${r.trash}`);
  };

  async function uploadOne(file, replace) {
    const query = new URLSearchParams({ path: params.get("path") || "", name: file.name });
    if (replace) query.set("replace", "1");
    const response = await fetch(`/api/dataset/upload?${query}`, { method: "POST", body: file });
    const reply = await response.json().catch(() => ({}));
    if (response.status === 409 && !replace) {
      if (confirm(reply.error)) return uploadOne(file, true);
      throw new Error(`${file.name}: not added; the folder's file of that name is kept`);
    }
    if (!response.ok) throw new Error(reply.error || `${file.name}: ${response.status} ${response.statusText}`);
    return reply;
  }
  async function upload(files) {
    if (!listing || !files.length || !keepEdits()) return;
    const refused = [];
    let added = 0;
    for (const [index, file] of [...files].entries()) {
      say("upload-state", `adding ${index + 1} of ${files.length}: ${file.name}`);
      try { await uploadOne(file, false); added += 1; } catch (e) { refused.push(e.message); }
    }
    unsaved.clear();
    await reopen();
    say("upload-state", [`added ${added} image${added === 1 ? "" : "s"}`, ...refused].join("; "), refused.length > 0);
  }
  $("files").onchange = () => { upload($("files").files); $("files").value = ""; };
  const dragging = (on) => document.body.classList.toggle("dragging", on && listing != null);
  document.addEventListener("dragover", (e) => { if (listing && e.dataTransfer.types.includes("Files")) { e.preventDefault(); dragging(true); } });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) dragging(false); });
  document.addEventListener("drop", (e) => {
    dragging(false);
    if (!listing || !e.dataTransfer.files.length) return;
    e.preventDefault();
    upload(e.dataTransfer.files);
  });

  // --- captioning with a model: `stylelora caption` in its own process ---------------------------

  api("/api/captioners").then(({ captioners, defaults }) => {
    $("captioners").replaceChildren(...captioners.map((c) => el("option", { value: c.model, label: c.kind })));
    if (!$("cap-model").value && captioners.length) $("cap-model").value = captioners[0].model;
    $("captioners-note").textContent = captioners.length
      ? `${captioners.length} captioner${captioners.length === 1 ? "" : "s"} in the local model cache; a folder holding one works too.`
      : `No captioner in the local model cache: download one (e.g. ${defaults.natural} or ${defaults.tags}) or give its folder.`;
  }).catch(() => {});
  function showCaptioning(job) {
    const running = job.state === "running";
    $("caption-start").disabled = running;
    $("caption-cancel").hidden = !running;
    if (running) say("caption-state", `${job.what}: ${job.progress || "starting"}`);
    else if (job.state === "failed") say("caption-state", job.error, true);
    else if (job.state !== "idle") say("caption-state", `${job.state}: ${job.said || ""}`);
    return running;
  }
  // `followed`: true right after a start, which a quick job may outrun
  async function followCaptioning(followed = false) {
    let job = await api("/api/caption/status");
    while (showCaptioning(job)) {
      followed = true;
      await new Promise((r) => setTimeout(r, 500));
      job = await api("/api/caption/status");
    }
    if (followed && job.path === params.get("path")) await reopen(); // the new captions, to edit
  }
  $("caption-start").onclick = async () => {
    if (!listing || !keepEdits()) return;
    const overwrite = $("cap-all").checked;
    if (overwrite && !confirm("Replace every caption in this folder with the captioner's?")) return;
    unsaved.clear();
    try {
      await api("/api/caption/start", { method: "POST", body: {
        path: params.get("path"), model: $("cap-model").value.trim(), style: $("cap-style").value,
        trigger: $("cap-trigger").value, overwrite, caption_extension: listing.settings.caption_extension,
      } });
      await followCaptioning(true);
    } catch (e) { say("caption-state", e.message, true); }
  };
  $("caption-cancel").onclick = () => api("/api/caption/cancel", { method: "POST", body: {} }).catch((e) => say("caption-state", e.message, true));
  followCaptioning().catch(() => {});

  window.addEventListener("beforeunload", (e) => {
    if (unsaved.size) { e.preventDefault(); e.returnValue = ""; }
  });
  $("open-form").onsubmit = (e) => {
    e.preventDefault();
    open($("path").value.trim(), { resolution: $("resolution").value.trim(), caption_extension: $("ext").value.trim() });
  };
  await open($("path").value);
}

startPage(pageDatasets);
