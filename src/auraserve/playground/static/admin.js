// The operator's console (the Admin view), for admin keys only: accounts with balances, usage
// and keys; credits granted or deducted with a reason; keys created and revoked; the recent
// requests of every account. The server refuses every /v2/admin call of a tenant key (403):
// hiding the view is convenience, not the protection.

import { api } from "./api.js";
import { $, el, setStatus } from "./dom.js";
import { timeElement } from "./format.js";

let enabled = false;
let wired = false;

export function adminAvailable(isAdmin) {
  enabled = isAdmin;
  if (!isAdmin) {
    $("accounts").replaceChildren();
    $("admin-jobs").replaceChildren();
    $("new-key-out").hidden = true;
    setStatus($("admin-status"), "");
  }
}

export async function showAdmin() {
  if (!enabled) return;
  if (!wired) wire();
  await refresh();
}

async function refresh() {
  try {
    const [accounts, jobs] = await Promise.all([
      api("/v2/admin/accounts?limit=200"),
      api("/v2/admin/jobs?limit=30"),
    ]);
    renderAccounts(accounts);
    renderJobs(jobs.items);
    $("admin").dataset.loaded = "true";
  } catch (error) {
    report(error);
  }
}

function report(error) {
  const text = error.status === 403 ? "This key is not an admin key." : error.message;
  setStatus($("admin-status"), text, "error");
}

// ---- accounts ------------------------------------------------------------------------------

function stat(label, value) {
  return el("div", {}, [el("dt", { text: label }), el("dd", { text: String(value) })]);
}

function keyItem(key) {
  const revoked = key.revoked_at !== null;
  const item = el("li", { className: "key", "data-key-id": key.key_id, "data-revoked": String(revoked) }, [
    el("span", { className: "key-name", text: key.name }),
    el("code", { text: key.key_id }),
    el("span", { className: revoked ? "badge error" : "badge completed", text: revoked ? "revoked" : "active" }),
  ]);
  if (!revoked) {
    // Two clicks, no confirm(): the first arms the button, the second revokes.
    const button = el("button", { type: "button", className: "secondary small revoke", text: "Revoke" });
    button.addEventListener("click", async () => {
      if (button.dataset.armed !== "true") {
        button.dataset.armed = "true";
        button.textContent = "Confirm revoke";
        return;
      }
      button.disabled = true;
      try {
        await api(`/v2/admin/keys/${encodeURIComponent(key.key_id)}/revoke`, { method: "POST" });
        setStatus($("admin-status"), `Key ${key.key_id} revoked.`, "ok");
        await refresh();
      } catch (error) {
        button.disabled = false;
        report(error);
      }
    });
    item.append(button);
  }
  return item;
}

function creditsForm(account) {
  const id = account.account_id;
  const action = el("select", { id: `credits-action-${id}`, "aria-label": `Grant or deduct for ${account.name}` }, [
    el("option", { value: "grant", text: "Grant" }),
    el("option", { value: "deduct", text: "Deduct" }),
  ]);
  const amount = el("input", { id: `credits-amount-${id}`, type: "number", min: "1", step: "1", "aria-label": "Credits" });
  amount.placeholder = "credits";
  const reason = el("input", { id: `credits-reason-${id}`, type: "text", maxlength: "200", "aria-label": "Reason (kept in the ledger)" });
  reason.placeholder = "reason";
  const error = el("p", { className: "error-text", role: "alert" });
  const form = el("form", { className: "credits inline", novalidate: "" }, [
    action,
    amount,
    reason,
    el("button", { type: "submit", text: "Apply" }),
    error,
  ]);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const body = { action: action.value, amount: Number(amount.value), reason: reason.value.trim() };
    if (!Number.isInteger(body.amount) || body.amount < 1) {
      error.textContent = "Credits: a whole number of at least 1.";
      amount.focus();
      return;
    }
    if (!body.reason) {
      error.textContent = "Reason: say why (it is kept in the ledger).";
      reason.focus();
      return;
    }
    try {
      const done = await api(`/v2/admin/accounts/${encodeURIComponent(id)}/credits`, { method: "POST", body });
      const verb = done.kind === "grant" ? "Granted" : "Deducted";
      setStatus($("admin-status"), `${verb} ${done.amount} credits: ${account.name} now has ${done.balance}.`, "ok");
      await refresh();
    } catch (err) {
      error.textContent = err.field ? err.message.replace(/^amount\b/, "Credits").replace(/^reason\b/, "Reason") : err.message;
    }
  });
  return form;
}

function newKeyForm(account) {
  const name = el("input", { type: "text", maxlength: "200", "aria-label": `Name of a new key for ${account.name}` });
  name.placeholder = "new key name";
  const form = el("form", { className: "inline add-key", novalidate: "" }, [
    name,
    el("button", { type: "submit", className: "secondary", text: "Add key" }),
  ]);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!name.value.trim()) {
      name.focus();
      return;
    }
    try {
      const made = await api("/v2/admin/keys", {
        method: "POST",
        body: { name: name.value.trim(), account_id: account.account_id },
      });
      showNewKey(made);
      await refresh();
    } catch (error) {
      report(error);
    }
  });
  return form;
}

function accountCard(account) {
  const u = account.usage;
  const last = el("dd");
  if (u.last_request_at) last.append(timeElement(u.last_request_at));
  else last.textContent = "never";
  const head = el("div", { className: "account-head" }, [
    el("h3", { text: account.name }),
    el("code", { text: account.account_id }),
  ]);
  if (account.is_admin) head.append(el("span", { className: "badge", text: "admin" }));
  return el("li", { className: "account", "data-account-id": account.account_id }, [
    head,
    el("dl", { className: "stats" }, [
      stat("Balance", account.balance),
      stat("Reserved", account.reserved),
      stat("Requests", u.requests),
      stat("Images", u.images),
      stat("Spent", u.spent),
      el("div", {}, [el("dt", { text: "Last request" }), last]),
    ]),
    creditsForm(account),
    el("ul", { className: "keys" }, account.keys.map(keyItem)),
    newKeyForm(account),
  ]);
}

function renderAccounts(page) {
  $("accounts").replaceChildren(...page.accounts.map(accountCard));
  $("accounts-heading").textContent = `Accounts (${page.total})`;
}

function showNewKey(made) {
  $("new-key-name").textContent = made.name;
  $("new-key-value").textContent = made.key;
  $("new-key-out").hidden = false;
}

async function createAccount(event) {
  event.preventDefault();
  const name = $("new-account-name").value.trim();
  const credits = Number($("new-account-credits").value || "0");
  if (!name) {
    setStatus($("admin-status"), "Name: give the new account a name.", "error");
    $("new-account-name").focus();
    return;
  }
  try {
    const made = await api("/v2/admin/keys", { method: "POST", body: { name, credits } });
    showNewKey(made);
    $("new-account-name").value = "";
    $("new-account-credits").value = "0";
    setStatus($("admin-status"), `Account ${made.name} created with ${made.balance} credits.`, "ok");
    await refresh();
  } catch (error) {
    report(error);
  }
}

// ---- recent jobs ---------------------------------------------------------------------------

function jobRow(item) {
  const thumb = el("span", { className: "thumb small" });
  if (item.output && item.output.media_url.length) {
    thumb.append(el("img", { src: item.output.media_url[0], alt: "", loading: "lazy" }));
  }
  return el("li", { className: "admin-job", "data-request-id": item.request_id, "data-account-id": item.account_id }, [
    thumb,
    el("div", { className: "job-body" }, [
      el("span", { className: "prompt", text: item.parameters.prompt || "" }),
      el("span", { className: "meta" }, [
        el("span", { className: `badge ${item.status.toLowerCase()}`, text: item.status }),
        el("span", { className: "job-account", text: item.account_name }),
        el("span", { className: "muted", text: `${item.price} credits` }),
        timeElement(item.created_at),
      ]),
    ]),
  ]);
}

function renderJobs(items) {
  $("admin-jobs").replaceChildren(...items.map(jobRow));
  if (!items.length) $("admin-jobs").append(el("li", { className: "muted", text: "No requests yet." }));
}

function wire() {
  wired = true;
  $("new-account").addEventListener("submit", createAccount);
  $("admin-refresh").addEventListener("click", refresh);
  $("new-key-copy").addEventListener("click", () => navigator.clipboard.writeText($("new-key-value").textContent));
}
