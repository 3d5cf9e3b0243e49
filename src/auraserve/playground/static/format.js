// Small formatting helpers shared by the playground and the admin console.

// "just now", "2 min ago", "3 h ago", "yesterday", "4 days ago", then the date.
export function relativeTime(iso, now = Date.now()) {
  const then = Date.parse(iso);
  if (!Number.isFinite(then)) return "";
  const seconds = Math.max(0, Math.round((now - then) / 1000));
  if (seconds < 45) return "just now";
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.round(minutes / 60);
  if (hours < 24) return `${hours} h ago`;
  const days = Math.round(hours / 24);
  if (days === 1) return "yesterday";
  if (days < 7) return `${days} days ago`;
  return new Date(then).toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
}

// The full local time, for a tooltip.
export function fullTime(iso) {
  const then = Date.parse(iso);
  if (!Number.isFinite(then)) return "";
  return new Date(then).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

// A <time> element showing the relative time, the full one on hover; `refreshTimes` keeps
// every such element current.
export function timeElement(iso) {
  const node = document.createElement("time");
  node.dateTime = iso || "";
  node.className = "rel-time";
  node.textContent = iso ? relativeTime(iso) : "";
  node.title = iso ? fullTime(iso) : "";
  return node;
}

export function refreshTimes(root = document) {
  for (const node of root.querySelectorAll("time.rel-time")) {
    if (node.dateTime) node.textContent = relativeTime(node.dateTime);
  }
}

// The words a form shows for a field (its <label>, without the range hint), so a server
// error about `num_inference_steps` reads "Steps: …".
export function fieldLabel(field) {
  const control = document.getElementById(field);
  const label = control && control.labels && control.labels[0];
  if (!label) return field;
  const copy = label.cloneNode(true);
  for (const hint of copy.querySelectorAll(".hint")) hint.remove();
  return copy.textContent.trim() || field;
}

export function withLabel(field, message) {
  const label = fieldLabel(field);
  if (label === field) return message;
  const escaped = field.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return message.replace(new RegExp(`\\b${escaped}\\b`, "g"), label);
}
