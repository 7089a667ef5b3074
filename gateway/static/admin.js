// The admin page: a client of the admin API (README "Long-lived tokens", "Revocation"). Every value from the API is
// written with textContent, never as HTML; the admin token stays in this tab's sessionStorage.
"use strict";

const PAGE = 50;
const KEY = "gateway-admin-token";
const $ = (selector, root = document) => root.querySelector(selector);

function when(seconds) {
  return seconds == null ? "" : new Date(seconds * 1000).toISOString().replace(".000Z", "Z");
}

function device(d) {
  return d ? [d.client, d.user_agent].filter(Boolean).join(" · ") : "";
}

function say(text, error = false) {
  const message = $("#message");
  message.textContent = text;
  message.className = error ? "error" : "";
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(KEY);
  if (!token) throw new Error("enter the admin token first");
  const init = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`${response.status} ${answer.error || ""}: ${answer.error_description || response.statusText}`);
  }
  return answer;
}

function button(label, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", () => action().catch((e) => say(e.message, true)));
  return b;
}

// columns: [heading, value of a row (text, or a DOM node)]
function render(section, columns, rows) {
  const head = document.createElement("tr");
  for (const [heading] of columns) {
    const th = document.createElement("th");
    th.textContent = heading;
    head.append(th);
  }
  $("thead", section).replaceChildren(head);
  $("tbody", section).replaceChildren(
    ...rows.map((row) => {
      const tr = document.createElement("tr");
      for (const [, value] of columns) {
        const td = document.createElement("td");
        const v = value(row);
        if (v instanceof Node) td.append(v);
        else td.textContent = v == null ? "" : String(v);
        tr.append(td);
      }
      return tr;
    }),
  );
}

// One listing per section: its query, its columns, and paging by next_offset.
function listing(id, path, columns, query = () => ({})) {
  const section = $(`#${id}`);
  let offset = 0;
  let next = null;
  async function load(at = 0) {
    const params = new URLSearchParams({ ...query(), offset: String(at), limit: String(PAGE) });
    const answer = await api("GET", `${path}?${params}`);
    offset = at;
    next = answer.next_offset;
    render(section, columns, answer.items);
    $(".prev", section).disabled = offset === 0;
    $(".next", section).disabled = next == null;
    say(`${answer.items.length} shown`);
  }
  $(".prev", section).addEventListener("click", () => load(Math.max(0, offset - PAGE)).catch((e) => say(e.message, true)));
  $(".next", section).addEventListener("click", () => load(next).catch((e) => say(e.message, true)));
  const filters = $("form.filters", section);
  if (filters) {
    filters.addEventListener("submit", (event) => {
      event.preventDefault();
      load(0).catch((e) => say(e.message, true));
    });
  }
  return { load: () => load(offset) };
}

function fields(form) {
  return Object.fromEntries([...new FormData(form)].filter(([, v]) => v !== ""));
}

const tokens = listing(
  "tokens",
  "/admin/tokens",
  [
    ["jti", (t) => t.jti],
    ["kind", (t) => t.kind],
    ["status", (t) => t.status],
    ["subject", (t) => t.subject],
    ["audience", (t) => t.audience.join(" ")],
    ["scopes", (t) => t.scopes.join(" ")],
    ["created", (t) => when(t.created_at)],
    ["expires", (t) => when(t.expires_at)],
    ["last used", (t) => when(t.last_used_at)],
    ["last device", (t) => device(t.last_device)],
    ["note", (t) => t.note],
    ["", (t) => (t.status === "active" ? button("Revoke", () => revokeToken(t.jti)) : t.revoke_reason)],
  ],
  () => fields($("#tokens form.filters")),
);

const sessions = listing("sessions", "/admin/sessions", [
  ["jti", (s) => s.jti],
  ["kind", (s) => s.kind],
  ["subject", (s) => s.subject],
  ["scopes", (s) => s.scopes.join(" ")],
  ["issued", (s) => when(s.issued_at)],
  ["expires", (s) => when(s.expires_at)],
  ["first seen", (s) => when(s.first_seen)],
  ["last seen", (s) => when(s.last_seen)],
  ["last device", (s) => device(s.last_device)],
  ["note", (s) => s.note],
]);

const revocations = listing(
  "revocations",
  "/admin/revocations",
  [
    ["kind", (r) => r.kind],
    ["jti or subject", (r) => r[r.kind]],
    ["issuer", (r) => r.issuer || "every issuer"],
    ["kept until / before", (r) => when(r.kind === "jti" ? r.expires_at : r.before)],
    ["", (r) => button("Remove", () => unrevoke(r))],
  ],
  () => fields($("#revocations form.filters")),
);

async function revokeToken(jti) {
  const reason = prompt(`Revoke ${jti}? Reason:`);
  if (reason === null) return;
  await api("DELETE", `/admin/tokens/${encodeURIComponent(jti)}`, { reason, by: "admin-page" });
  await tokens.load();
  say(`revoked ${jti}`);
}

async function unrevoke(r) {
  if (!confirm(`Remove the revocation of ${r.kind} ${r[r.kind]}? Its tokens work again.`)) return;
  const params = new URLSearchParams({ [r.kind]: r[r.kind] });
  if (r.issuer) params.set("issuer", r.issuer);
  await api("DELETE", `/admin/revocations?${params}`);
  await revocations.load();
  say("revocation removed");
}

function time(text) {
  return /^\d+(\.\d+)?$/.test(text) ? Number(text) : text;
}

$("#revoke").addEventListener("submit", (event) => {
  event.preventDefault();
  const f = fields(event.target);
  const body = { [f.kind]: f.value, issuer: f.issuer || null, reason: f.reason || null };
  if (f.when) body[f.kind === "jti" ? "expires_at" : "before"] = time(f.when);
  api("POST", "/admin/revocations", body)
    .then(() => revocations.load())
    .then(() => say(`revoked ${f.kind} ${f.value}`))
    .catch((e) => say(e.message, true));
});

$("#mint-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const f = fields(event.target);
  const body = { subject: f.subject, kind: f.kind, rotate: "rotate" in f };
  for (const name of ["audience", "scopes"]) if (f[name]) body[name] = f[name].split(/\s+/).filter(Boolean);
  for (const name of ["lifetime", "note"]) if (f[name]) body[name] = f[name];
  api("POST", "/admin/tokens", body)
    .then((answer) => {
      $("#minted textarea").value = answer.token;
      $("#minted").hidden = false;
      say(`minted ${answer.metadata.jti}, expires ${when(answer.metadata.expires_at)}`);
    })
    .catch((e) => say(e.message, true));
});

$("#copy").addEventListener("click", () => {
  navigator.clipboard.writeText($("#minted textarea").value).then(() => say("copied"));
});

const views = { tokens, sessions, revocations, mint: null };

function show(name) {
  for (const id of Object.keys(views)) $(`#${id}`).hidden = id !== name;
  for (const b of document.querySelectorAll("nav button")) {
    if (b.dataset.view === name) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  $("#minted").hidden = true;
  $("#minted textarea").value = "";
  if (views[name] && sessionStorage.getItem(KEY)) views[name].load().catch((e) => say(e.message, true));
}

for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("#admin-token").value);
  $("#admin-token").value = "";
  show("tokens");
});

$("#forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  for (const body of document.querySelectorAll("tbody")) body.replaceChildren();
  $("#minted").hidden = true;
  $("#minted textarea").value = "";
  say("admin token forgotten");
});

show("tokens");
