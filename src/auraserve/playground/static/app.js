// The playground page: the form, the result stage, the history and the views. Everything the
// server or the user wrote is put on the page with textContent or attributes (dom.js), never
// as HTML, so a prompt like <img onerror=…> stays text.

import { adminAvailable, showAdmin } from "./admin.js";
import { api, keyStore, statusStream } from "./api.js";
import { curlSnippet, openaiSnippet, pythonSnippet } from "./code.js";
import { $, el, setStatus } from "./dom.js";
import { refreshTimes, timeElement, withLabel } from "./format.js";

const TERMINAL = new Set(["COMPLETED", "FAILED", "ERROR", "CANCELLED"]);
const NUMBER_FIELDS = [
  "width",
  "height",
  "num_inference_steps",
  "guidance_scale",
  "shift",
  "num_images",
  "output_quality",
  "seed",
];
const CHOICE_FIELDS = ["sampler", "scheduler", "output_format"];
const TEXT_FIELDS = ["prompt", "negative_prompt"];

const state = {
  catalogue: null,
  current: null, // { requestId, controller }
  lastBody: null,
  lastModel: null,
  codeLang: "curl",
  historyCursor: null,
  detail: null, // the history item open in the detail dialog
};

function model() {
  return state.catalogue.models.find((m) => m.model_id === $("model").value);
}

// ---- form built from GET /v2/models -------------------------------------------------------

function rangeText(range) {
  if (!range) return "";
  if (range.minimum !== undefined && range.maximum !== undefined) {
    return `(${range.minimum}–${range.maximum})`;
  }
  if (range.maxLength !== undefined) return `(up to ${range.maxLength} characters)`;
  return "";
}

function fillSelect(select, values, labels = values) {
  select.replaceChildren(...values.map((v, i) => el("option", { value: v, text: labels[i] })));
}

function applyRanges(ranges) {
  for (const hint of document.querySelectorAll("[data-range]")) {
    hint.textContent = rangeText(ranges[hint.dataset.range]);
  }
  for (const name of NUMBER_FIELDS) {
    const range = ranges[name];
    if (!range) continue;
    if (range.minimum !== undefined) $(name).min = String(range.minimum);
    if (range.maximum !== undefined) $(name).max = String(range.maximum);
  }
  for (const name of TEXT_FIELDS) {
    if (ranges[name] && ranges[name].maxLength) $(name).maxLength = ranges[name].maxLength;
  }
}

function sizeOptions() {
  const sizes = state.catalogue.sizes.map((s) => `${s.width}x${s.height}`);
  fillSelect($("size"), [...sizes, "custom"], [...sizes.map((s) => s.replace("x", " × ")), "Custom…"]);
}

function applyDefaults(preset) {
  const d = preset.defaults;
  for (const name of ["num_inference_steps", "guidance_scale", "shift", "num_images", "output_quality"]) {
    $(name).value = String(d[name]);
  }
  for (const name of CHOICE_FIELDS) $(name).value = d[name];
  setSize(d.width, d.height);
}

function setSize(width, height) {
  const label = `${width}x${height}`;
  const known = [...$("size").options].some((o) => o.value === label);
  $("size").value = known ? label : "custom";
  $("width").value = String(width);
  $("height").value = String(height);
  $("custom-size").hidden = known;
}

async function loadCatalogue() {
  try {
    state.catalogue = await api("/v2/models");
  } catch (error) {
    setStatus($("server-status"), error.message, "error");
    $("server-status").hidden = false;
    $("submit").disabled = true;
    return false;
  }
  $("server-status").hidden = true;
  const models = state.catalogue.models;
  fillSelect(
    $("model"),
    models.map((m) => m.model_id),
    models.map((m) => (m.description ? `${m.model_id} — ${m.description}` : m.model_id)),
  );
  fillSelect($("sampler"), state.catalogue.samplers);
  fillSelect($("scheduler"), state.catalogue.schedulers);
  fillSelect($("output_format"), state.catalogue.output_formats);
  fillSelect(
    $("history-filter"),
    ["", "QUEUED", "PROCESSING", "COMPLETED", "FAILED", "ERROR", "CANCELLED"],
    ["All", "Queued", "Processing", "Completed", "Failed", "Error", "Cancelled"],
  );
  sizeOptions();
  applyRanges(models[0].ranges);
  applyDefaults(models[0]);
  $("submit").disabled = false;
  return true;
}

// ---- key and balance ----------------------------------------------------------------------

async function refreshAccount() {
  if (!keyStore.get()) {
    setAdmin(false);
    $("balance-box").hidden = true;
    setStatus($("key-status"), "Enter your API key to start.");
    return false;
  }
  try {
    const account = await api("/v2/account?entries=0");
    $("balance").textContent = String(account.balance);
    $("reserved").textContent = String(account.reserved);
    $("balance-box").hidden = false;
    const low = account.balance === 0 ? " No credits left: ask the operator for more." : "";
    setStatus($("key-status"), `Signed in as ${account.name}.${low}`, low ? "error" : "ok");
    setAdmin(account.is_admin === true);
    return true;
  } catch (error) {
    $("balance-box").hidden = true;
    setAdmin(false);
    const text =
      error.status === 401
        ? "This key is not valid (unknown or revoked). Check it and try again."
        : error.message;
    setStatus($("key-status"), text, "error");
    return false;
  }
}

// ---- submit, progress, cancel --------------------------------------------------------------

function clearFieldErrors() {
  for (const p of document.querySelectorAll("[data-error-for]")) p.textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

function showFieldError(field, message) {
  const target = document.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
  if (!target) return false;
  target.textContent = withLabel(field, message);
  target.id = `${field}-error`;
  const input = $(field);
  if (input) {
    if (field === "width" || field === "height") $("custom-size").hidden = false;
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", target.id);
    input.focus();
  }
  return true;
}

function numberOrRaw(value) {
  // An unparsable entry is sent as typed, so the server names the field and its range.
  if (value.trim() === "") return undefined;
  const n = Number(value);
  return Number.isFinite(n) ? n : value;
}

function formBody() {
  const body = { prompt: $("prompt").value };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  for (const name of ["width", "height", "num_inference_steps", "guidance_scale", "shift", "num_images", "output_quality"]) {
    const value = numberOrRaw($(name).value);
    if (value !== undefined) body[name] = value;
  }
  for (const name of CHOICE_FIELDS) body[name] = $(name).value;
  if ($("seed-fixed").checked) {
    const seed = numberOrRaw($("seed").value);
    if (seed !== undefined) body.seed = seed;
  }
  return body;
}

function showProgress(status) {
  const bar = $("progress");
  const p = status.progress;
  if (status.status === "COMPLETED") {
    bar.value = 100;
  } else if (p && p.total) {
    bar.value = Math.min(100, (100 * p.step) / p.total);
  }
  const parts = [status.status.toLowerCase()];
  if (status.status === "QUEUED" && status.queue_position !== undefined && status.queue_position !== null) {
    parts.push(`position ${status.queue_position + 1} in the queue`);
  }
  if (status.status === "PROCESSING" && p) parts.push(`step ${p.step} of ${p.total}`);
  if (status.error) parts.push(status.error);
  $("progress-label").textContent = `Progress: ${bar.value.toFixed(0)}%`;
  setStatus(
    $("job-status"),
    `${status.request_id}: ${parts.join(" — ")}`,
    ["FAILED", "ERROR"].includes(status.status) ? "error" : status.status === "COMPLETED" ? "ok" : "",
  );
  $("job-status").dataset.state = status.status;
}

function stageRatio(width, height) {
  if (width && height) $("stage").style.setProperty("--ar", String(width / height));
}

function showOnStage(url, alt) {
  const img = el("img", { id: "result-image", src: url, alt });
  const open = el("button", { type: "button", className: "stage-open", "aria-label": `${alt}: open full size` }, [img]);
  open.addEventListener("click", () => openLightbox(url, alt));
  $("stage").replaceChildren(open);
}

// A live preview while the image forms: the first image as it stands at this step (a small
// JPEG the worker projects from its latents), replaced by the finished image at the end.
function showPreview(preview) {
  if (!preview.images || !preview.images.length) return;
  const current = $("preview-image");
  const label = `Preview at step ${preview.step} of ${preview.total_steps}`;
  if (current) {
    current.src = preview.images[0];
    current.alt = label;
    current.dataset.step = String(preview.step);
    return;
  }
  const img = el("img", { id: "preview-image", className: "preview", src: preview.images[0], alt: label });
  img.dataset.step = String(preview.step);
  $("stage").replaceChildren(img);
}

function clearStage(text = "Your image appears here.") {
  $("stage").replaceChildren(el("p", { id: "stage-empty", className: "stage-empty", text }));
  $("thumbs").replaceChildren();
  $("thumbs").hidden = true;
}

function showImages(status) {
  const images = $("images");
  images.replaceChildren();
  if (status.seeds && status.seeds.length) {
    $("seed-used").textContent = `Seed used: ${status.seeds.join(", ")}`;
  }
  stageRatio(status.width, status.height);
  if (!status.output) {
    clearStage(status.status === "COMPLETED" ? "No image (deleted after the retention period)." : "No image: see the status above.");
    return;
  }
  const urls = status.output.media_url;
  const ext = (status.output.media_type || "image/png").split("/")[1];
  const alt = (i) => `Image ${i + 1} of request ${status.request_id}`;
  showOnStage(urls[0], alt(0));
  $("thumbs").hidden = urls.length < 2;
  $("thumbs").replaceChildren(
    ...urls.map((url, i) => {
      const button = el("button", { type: "button", className: "thumb-pick", "aria-label": `Show image ${i + 1}` }, [
        el("img", { src: url, alt: "" }),
      ]);
      button.addEventListener("click", () => showOnStage(url, alt(i)));
      return button;
    }),
  );
  urls.forEach((url, i) => {
    images.append(
      el("a", {
        href: url,
        download: `${status.request_id}-${i + 1}.${ext}`,
        className: "download",
        text: urls.length > 1 ? `Download ${i + 1}` : "Download",
      }),
    );
  });
}

// ---- lightbox and the history's detail view ---------------------------------------------------

function openLightbox(url, alt) {
  const img = $("lightbox-img");
  img.onload = () => $("lightbox").style.setProperty("--ar", String(img.naturalWidth / img.naturalHeight));
  img.src = url;
  $("lightbox-img").alt = alt;
  $("lightbox-original").href = url;
  $("lightbox").showModal();
  $("lightbox-close").focus();
}

function closeOnBackdrop(dialog) {
  // A click on the dialog element itself (not its content) is a click on the backdrop.
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close();
  });
}

async function follow(requestId, controller) {
  let last = null;
  try {
    for await (const status of statusStream(requestId, controller.signal, showPreview)) {
      last = status;
      showProgress(status);
      if (TERMINAL.has(status.status)) break;
    }
  } catch (error) {
    setStatus($("job-status"), error.message, "error");
  }
  if (state.current && state.current.requestId === requestId) {
    state.current = null;
    $("cancel").disabled = true;
    $("submit").disabled = false;
  }
  if (last) {
    showImages(last);
    if (last.status === "CANCELLED") {
      setStatus($("job-status"), `${requestId}: cancelled — not charged`);
      $("job-status").dataset.state = "CANCELLED";
    }
  }
  await Promise.all([refreshAccount(), loadHistory(true)]);
  // After the history has its new entry: the page is then long enough to scroll to the image.
  if (last && last.output) revealStage();
}

// On a phone the form comes first: bring the finished image up, clear of the pinned bar.
function revealStage() {
  const box = $("stage").getBoundingClientRect();
  const bar = $("actionbar").getBoundingClientRect();
  const visibleBottom = bar.top > 0 && bar.top < window.innerHeight ? bar.top : window.innerHeight;
  if (box.top < 0 || box.bottom > visibleBottom) {
    $("stage").scrollIntoView({ block: "start", behavior: "smooth" });
  }
}

async function submit(event) {
  event.preventDefault();
  clearFieldErrors();
  if (!keyStore.get()) {
    setStatus($("key-status"), "Enter your API key first.", "error");
    $("api-key").focus();
    return;
  }
  const preset = model();
  const body = formBody();
  state.lastBody = body;
  state.lastModel = preset;
  renderCode();
  $("images").replaceChildren();
  stageRatio(body.width, body.height);
  clearStage("Generating…");
  $("seed-used").textContent = "";
  $("progress").value = 0;
  $("submit").disabled = true;
  let accepted;
  try {
    accepted = await api(preset.submit_path, { method: "POST", body });
  } catch (error) {
    $("submit").disabled = false;
    reportSubmitError(error);
    return;
  }
  const controller = new AbortController();
  state.current = { requestId: accepted.request_id, controller };
  $("cancel").disabled = false;
  showProgress({ ...accepted, progress: null });
  refreshAccount();
  await follow(accepted.request_id, controller);
}

function reportSubmitError(error) {
  if (error.field && showFieldError(error.field, error.message)) {
    setStatus($("job-status"), `Not submitted: ${withLabel(error.field, error.message)}`, "error");
    return;
  }
  let text = error.message;
  if (error.status === 401) text = "This key is not valid (unknown or revoked). Check it and try again.";
  if (error.status === 402) text = "Not enough credits for this request. Ask the operator for more, or make it smaller.";
  setStatus($("job-status"), `Not submitted: ${text}`, "error");
  if (error.status === 401 || error.status === 402) refreshAccount();
}

async function cancel() {
  if (!state.current) return;
  // The stream may end (and clear state.current) while the cancel call is in flight.
  const { requestId } = state.current;
  $("cancel").disabled = true;
  try {
    await api(`/v2/requests/${encodeURIComponent(requestId)}/cancel`, { method: "POST" });
  } catch (error) {
    setStatus($("job-status"), error.message, "error");
    return;
  }
  if (state.current && state.current.requestId === requestId) {
    setStatus($("job-status"), `${requestId}: cancelling…`);
  }
}

// ---- code panel --------------------------------------------------------------------------

function renderCode() {
  if (!state.catalogue) return;
  const preset = state.lastModel || model();
  const body = state.lastBody || formBody();
  const origin = window.location.origin;
  const text =
    state.codeLang === "curl"
      ? curlSnippet(origin, preset.submit_path, body)
      : state.codeLang === "python"
        ? pythonSnippet(origin, preset.submit_path, body)
        : openaiSnippet(origin, preset.model_id, body);
  $("code-text").textContent = text;
}

function selectTab(tab) {
  for (const t of document.querySelectorAll("[role=tab]")) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
  }
  state.codeLang = tab.dataset.lang;
  $("code").setAttribute("aria-labelledby", tab.id);
  renderCode();
}

function tabKeys(event) {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  const i = tabs.indexOf(event.target);
  if (i < 0) return;
  let next = null;
  if (event.key === "ArrowRight") next = tabs[(i + 1) % tabs.length];
  if (event.key === "ArrowLeft") next = tabs[(i - 1 + tabs.length) % tabs.length];
  if (event.key === "Home") next = tabs[0];
  if (event.key === "End") next = tabs[tabs.length - 1];
  if (next) {
    event.preventDefault();
    next.focus();
    selectTab(next);
  }
}

// ---- history -------------------------------------------------------------------------------

function useSettings(item) {
  if ($("detail").open) $("detail").close();
  const preset = state.catalogue.models.find((m) => m.model_id === item.model_id);
  if (preset) $("model").value = preset.model_id;
  const p = item.parameters;
  $("prompt").value = p.prompt;
  $("negative_prompt").value = p.negative_prompt || "";
  for (const name of ["num_inference_steps", "guidance_scale", "shift", "num_images", "output_quality"]) {
    $(name).value = String(p[name]);
  }
  for (const name of CHOICE_FIELDS) $(name).value = p[name];
  setSize(p.width, p.height);
  $("seed-fixed").checked = true;
  $("seed").disabled = false;
  $("seed").value = String(p.seed);
  state.lastBody = null;
  state.lastModel = null;
  renderCode();
  $("prompt").focus();
  setStatus($("job-status"), `Settings of ${item.request_id} loaded into the form.`);
}

function paramRows(item) {
  const p = item.parameters;
  const rows = [
    ["Model", item.model_id],
    ["Size", `${p.width} × ${p.height}`],
    ["Steps", p.num_inference_steps],
    ["Guidance", p.guidance_scale],
    ["Shift", p.shift],
    ["Sampler", `${p.sampler} / ${p.scheduler}`],
    ["Seed", p.seed],
    ["Images", p.num_images],
    ["Format", `${p.output_format} (${p.output_quality})`],
  ];
  if (p.negative_prompt) rows.splice(1, 0, ["Negative", p.negative_prompt]);
  return rows.map(([k, v]) => el("div", {}, [el("dt", { text: k }), el("dd", { text: String(v) })]));
}

function openDetail(item) {
  const p = item.parameters;
  const url = item.output && item.output.media_url.length ? item.output.media_url[0] : null;
  const box = $("detail-image");
  if (url) {
    const alt = `Result of ${item.request_id}`;
    const open = el("button", { type: "button", className: "stage-open", "aria-label": `${alt}: open full size` }, [
      el("img", { src: url, alt }),
    ]);
    open.addEventListener("click", () => openLightbox(url, alt));
    box.replaceChildren(open);
    $("detail-download").href = url;
    $("detail-download").download = `${item.request_id}-1.${(item.output.media_type || "image/png").split("/")[1]}`;
    $("detail-download").hidden = false;
  } else {
    box.replaceChildren(el("p", { className: "stage-empty", text: item.error || item.status.toLowerCase() }));
    $("detail-download").hidden = true;
  }
  $("detail-status").textContent = item.status;
  $("detail-status").className = `badge ${item.status.toLowerCase()}`;
  $("detail-prompt").textContent = p.prompt;
  $("detail-time").replaceChildren(timeElement(item.created_at), ` · ${item.request_id}`);
  $("detail-params").replaceChildren(...paramRows(item));
  $("detail").dataset.requestId = item.request_id;
  state.detail = item;
  $("detail").showModal();
  $("detail-close").focus();
}

function historyEntry(item) {
  const p = item.parameters;
  const thumb = el("span", { className: "thumb" });
  if (item.output && item.output.media_url.length) {
    thumb.append(el("img", { src: item.output.media_url[0], alt: "", loading: "lazy" }));
  } else {
    thumb.append(el("span", { className: "muted", text: item.status.toLowerCase() }));
  }
  const open = el("button", { type: "button", className: "open", "aria-label": `Open: ${p.prompt}` }, [
    thumb,
    el("span", { className: "prompt", text: p.prompt }),
    el("span", { className: "meta" }, [
      el("span", { className: `badge ${item.status.toLowerCase()}`, text: item.status }),
      timeElement(item.created_at),
    ]),
  ]);
  open.addEventListener("click", () => openDetail(item));
  return el("li", { className: "entry", "data-request-id": item.request_id, "data-status": item.status }, [open]);
}

async function loadHistory(reset) {
  if (!keyStore.get() || !state.catalogue) {
    $("history").replaceChildren();
    setStatus($("history-status"), "Enter your API key to see your requests.");
    $("more-history").hidden = true;
    return;
  }
  if (reset) state.historyCursor = null;
  const query = new URLSearchParams({ limit: "12" });
  if ($("history-filter").value) query.set("status", $("history-filter").value);
  if (state.historyCursor) query.set("cursor", state.historyCursor);
  let page;
  try {
    page = await api(`/v2/requests?${query}`);
  } catch (error) {
    setStatus($("history-status"), error.status === 401 ? "The key is not valid." : error.message, "error");
    return;
  }
  const entries = page.items.map(historyEntry);
  if (reset) $("history").replaceChildren(...entries);
  else $("history").append(...entries);
  state.historyCursor = page.next_cursor;
  $("more-history").hidden = !page.next_cursor;
  const count = $("history").children.length;
  const empty = $("history-filter").value
    ? "No requests with this status."
    : "No requests yet. Submit one above and it will appear here.";
  setStatus($("history-status"), count ? "" : empty);
}

// ---- wiring ------------------------------------------------------------------------------

async function useKey(event) {
  event.preventDefault();
  const value = $("api-key").value.trim();
  if (!value) {
    setStatus($("key-status"), "Paste a key first.", "error");
    return;
  }
  keyStore.set(value);
  $("api-key").value = "";
  $("api-key").placeholder = "key set for this tab";
  await Promise.all([refreshAccount(), loadHistory(true)]);
}

function forgetKey() {
  keyStore.clear();
  $("api-key").placeholder = "aura_…";
  refreshAccount();
  loadHistory(true);
}

async function start() {
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("admin-forget").addEventListener("click", forgetKey);
  $("gen-form").addEventListener("submit", submit);
  $("gen-form").addEventListener("input", () => {
    state.lastBody = null;
    state.lastModel = null;
    renderCode();
  });
  $("cancel").addEventListener("click", cancel);
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    if ($("playground").hidden || document.querySelector("dialog[open]")) return;
    event.preventDefault();
    if (!$("submit").disabled) $("gen-form").requestSubmit();
  });
  $("lightbox-close").addEventListener("click", () => $("lightbox").close());
  $("detail-close").addEventListener("click", () => $("detail").close());
  $("detail-use").addEventListener("click", () => useSettings(state.detail));
  closeOnBackdrop($("lightbox"));
  closeOnBackdrop($("detail"));
  $("view-playground").addEventListener("click", () => selectView("playground", true));
  $("view-admin").addEventListener("click", () => selectView("admin", true));
  window.addEventListener("hashchange", () => selectView(window.location.hash === "#admin" ? "admin" : "playground"));
  setInterval(() => refreshTimes(), 30_000);
  $("size").addEventListener("change", () => {
    const custom = $("size").value === "custom";
    $("custom-size").hidden = !custom;
    if (!custom) {
      const [w, h] = $("size").value.split("x");
      $("width").value = w;
      $("height").value = h;
    }
    renderCode();
  });
  $("model").addEventListener("change", () => applyDefaults(model()));
  for (const radio of document.querySelectorAll("input[name=seed-mode]")) {
    radio.addEventListener("change", () => {
      $("seed").disabled = !$("seed-fixed").checked;
      if ($("seed-fixed").checked && !$("seed").value) $("seed").value = String(Math.floor(Math.random() * 2 ** 32));
      renderCode();
    });
  }
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", tabKeys);
  }
  $("copy-code").addEventListener("click", () => navigator.clipboard.writeText($("code-text").textContent));
  $("history-filter").addEventListener("change", () => loadHistory(true));
  $("refresh-history").addEventListener("click", () => loadHistory(true));
  $("more-history").addEventListener("click", () => loadHistory(false));
  if (keyStore.get()) $("api-key").placeholder = "key set for this tab";
  if (await loadCatalogue()) {
    renderCode();
    await Promise.all([refreshAccount(), loadHistory(true)]);
  }
  document.body.dataset.ready = "true";
}

// ---- views: the playground, and the admin console for admin keys -------------------------

// `chosen`: the user picked the view, so the URL follows (#admin); otherwise the URL stays as
// it is, and an admin signing in later on /#admin still lands in the console.
function selectView(view, chosen = false) {
  const admin = view === "admin" && !$("view-admin").hidden;
  $("playground").hidden = admin;
  $("admin").hidden = !admin;
  $("view-playground").setAttribute("aria-pressed", String(!admin));
  $("view-admin").setAttribute("aria-pressed", String(admin));
  const hash = admin ? "#admin" : "";
  if (chosen && window.location.hash !== hash) {
    history.replaceState(null, "", hash || window.location.pathname);
  }
  if (admin) showAdmin();
}

function setAdmin(isAdmin) {
  $("view-admin").hidden = !isAdmin;
  adminAvailable(isAdmin);
  selectView(window.location.hash === "#admin" ? "admin" : "playground");
}

start();
