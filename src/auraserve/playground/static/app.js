// The playground page. Everything the server or the user wrote is put on the page with
// textContent or attributes, never as HTML, so a prompt like <img onerror=…> stays text.

import { api, keyStore, statusStream } from "./api.js";
import { curlSnippet, openaiSnippet, pythonSnippet } from "./code.js";

const $ = (id) => document.getElementById(id);
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
};

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(node, text, kind = "") {
  node.textContent = text;
  node.classList.toggle("error", kind === "error");
  node.classList.toggle("ok", kind === "ok");
}

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
    return true;
  } catch (error) {
    $("balance-box").hidden = true;
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
  target.textContent = message;
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

function showImages(status) {
  const images = $("images");
  images.replaceChildren();
  if (status.seeds && status.seeds.length) {
    $("seed-used").textContent = `Seed used: ${status.seeds.join(", ")}`;
  }
  if (!status.output) return;
  status.output.media_url.forEach((url, i) => {
    const img = el("img", { src: url, alt: `Image ${i + 1} of request ${status.request_id}` });
    img.width = status.width || 512;
    img.height = status.height || 512;
    const ext = (status.output.media_type || "image/png").split("/")[1];
    const link = el("a", {
      href: url,
      download: `${status.request_id}-${i + 1}.${ext}`,
      text: `Download image ${i + 1}`,
    });
    images.append(el("figure", {}, [img, el("figcaption", {}, [link])]));
  });
}

async function follow(requestId, controller) {
  let last = null;
  try {
    for await (const status of statusStream(requestId, controller.signal)) {
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
    setStatus($("job-status"), `Not submitted: ${error.message}`, "error");
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

function historyEntry(item) {
  const p = item.parameters;
  const figure = el("div", { className: "thumb" });
  if (item.output && item.output.media_url.length) {
    figure.append(el("img", { src: item.output.media_url[0], alt: `Result of ${item.request_id}`, loading: "lazy" }));
  } else {
    figure.append(el("span", { className: "muted", text: item.status.toLowerCase() }));
  }
  const details = el("dl", { className: "params" });
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
  for (const [k, v] of rows) details.append(el("div", {}, [el("dt", { text: k }), el("dd", { text: String(v) })]));
  const button = el("button", { type: "button", className: "secondary use", text: "Use these settings" });
  button.addEventListener("click", () => useSettings(item));
  return el("li", { className: "entry", "data-request-id": item.request_id, "data-status": item.status }, [
    figure,
    el("div", { className: "entry-body" }, [
      el("p", { className: `badge ${item.status.toLowerCase()}`, text: item.status }),
      el("p", { className: "prompt", text: p.prompt }),
      el("p", { className: "muted", text: item.created_at || "" }),
      details,
      button,
    ]),
  ]);
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
  $("gen-form").addEventListener("submit", submit);
  $("gen-form").addEventListener("input", () => {
    state.lastBody = null;
    state.lastModel = null;
    renderCode();
  });
  $("cancel").addEventListener("click", cancel);
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

start();
