// The cloud page: reads /v1/page/overview every few seconds, posts decisions to /v1/reviews/{id}
// (see uplink/_cloud_web.py).
"use strict";

const POLL_MS = 5000;
const REVIEWER_KEY = "meshnode.reviewer";
let timer = null;

function fmtCost(cents, currency) {
  if (cents === null || cents === undefined) return "–";
  return (cents / 100).toFixed(2) + " " + (currency || "");
}

function ago(ms, now) {
  if (!ms) return "never";
  return fmtAge(Math.max(0, (now - ms) / 1000)) + " ago";
}

async function decide(sessionId, decision, button) {
  const card = button.closest(".card");
  card.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  const reviewer = document.getElementById("reviewer").value.trim() || "operator";
  localStorage.setItem(REVIEWER_KEY, reviewer);
  const note = card.querySelector("input.note").value;
  const status = card.querySelector(".status");
  try {
    const response = await api("/v1/reviews/" + encodeURIComponent(sessionId), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ decision, reviewer, note }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
    status.textContent = decision + "d by " + body.reviewer;
  } catch (err) {
    if (err instanceof AuthNeeded) { askToken(err.message, refresh); return; }
    status.textContent = "not recorded: " + err.message;
    card.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    return;
  }
  refresh();
}

function renderFlagged(data) {
  document.getElementById("flagged-count").textContent =
    data.flagged.length ? data.pending_reviews + " pending of " + data.flagged.length : "";
  const pending = document.getElementById("pending");
  pending.textContent = data.pending_reviews + " to review";
  pending.className = "badge " + (data.pending_reviews ? "warn" : "ok");
  const cards = data.flagged.map((f) => {
    const d = f.decision;
    return el("div", { class: "card", "data-session": f.session_id, "data-decision": d ? d.decision : "pending" },
      el("div", { class: "top" },
        el("span", { class: "mono" }, f.session_id),
        el("span", { class: "badge " + stateClass(d ? d.decision : "pending") }, d ? d.decision + "d" : "pending")),
      el("div", { class: "row" },
        el("span", {}, f.site + " · charger " + f.charger + " / " + f.connector),
        el("span", {}, "token " + f.id_token),
        el("span", {}, "⚡ " + fmtEnergy(f.energy_wh)),
        el("span", {}, fmtCost(f.cost_cents, f.currency)),
        el("span", { class: "badge " + stateClass(f.state) }, f.state)),
      el("div", { class: "row" }, f.reasons.map((r) => el("span", { class: "badge bad" }, r))),
      d ? el("div", { class: "muted" }, "by " + d.reviewer + " · " + fmtTime(d.decided_ts) + (d.note ? " · " + d.note : "")) : null,
      el("div", { class: "row" },
        el("input", { class: "note", maxlength: 500, placeholder: "note (optional)", "aria-label": "note" }),
        el("button", { class: "approve", type: "button", onclick: (ev) => decide(f.session_id, "approve", ev.target) }, "Approve"),
        el("button", { class: "reject", type: "button", onclick: (ev) => decide(f.session_id, "reject", ev.target) }, "Reject")),
      el("div", { class: "status muted" }));
  });
  const box = document.getElementById("flagged");
  // Keep what a person is typing: do not rebuild while a note field has the focus.
  if (box.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
  replaceChildren(box, cards.length ? cards : [el("div", { class: "empty" }, "nothing to review")]);
}

function renderSites(data) {
  document.getElementById("sites-count").textContent = String(data.sites.length);
  const now = data.generated_ms;
  const cards = data.sites.map((s) => el("div", { class: "card", "data-site": s.site },
    el("div", { class: "top" }, el("strong", {}, s.site),
      el("span", { class: "muted" }, "last contact " + ago(s.last_contact_ms, now))),
    el("div", { class: "row" },
      el("span", {}, "leader " + (s.leader || "unknown since restart")),
      el("span", {}, s.sessions + " sessions, " + s.reconciled + " reconciled"),
      el("span", {}, "⚡ " + fmtEnergy(s.energy_wh)))));
  replaceChildren(document.getElementById("sites"), cards.length ? cards : [el("div", { class: "empty" }, "no site has synced yet")]);
}

function renderStats(data) {
  const s = data.stats || {};
  const rows = [["sessions", s.sessions], ["receipts", s.receipts], ["events", s.events], ["conflicts", s.conflicts],
    ["sync requests", s.requests]].filter(([, v]) => v !== undefined);
  replaceChildren(document.getElementById("stats"), rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
}

function renderLedger(data) {
  document.getElementById("ledger-count").textContent =
    data.ledger_total > data.ledger.length ? data.ledger.length + " latest of " + data.ledger_total : String(data.ledger_total);
  const rows = data.ledger.map((r) => el("tr", { "data-session": r.session_id },
    el("td", { class: "mono" }, r.session_id),
    el("td", {}, r.site),
    el("td", {}, el("span", { class: "badge " + stateClass(r.state) }, r.state)),
    el("td", { class: "num" }, fmtEnergy(r.energy_wh)),
    el("td", { class: "num" }, fmtCost(r.cost_cents, r.currency)),
    el("td", {}, fmtTime(r.stop_ts))));
  replaceChildren(document.querySelector("#ledger tbody"),
    rows.length ? rows : [el("tr", {}, el("td", { colspan: 6, class: "empty" }, "the ledger is empty"))]);
}

function setLive(state) {
  const badge = document.getElementById("live");
  badge.textContent = state;
  badge.className = "badge " + (state === "live" ? "ok" : "warn");
  badge.dataset.state = state;
}

async function refresh() {
  clearTimeout(timer);
  try {
    const response = await api("/v1/page/overview");
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    renderFlagged(data);
    renderSites(data);
    renderStats(data);
    renderLedger(data);
    setLive("live");
    document.getElementById("updated").textContent = new Date(data.generated_ms).toLocaleTimeString();
    document.body.dataset.generated = String(data.generated_ms);
  } catch (err) {
    if (err instanceof AuthNeeded) { setLive("token needed"); askToken(err.message, refresh); return; }
    setLive("retrying");
  }
  timer = setTimeout(refresh, POLL_MS);
}

document.getElementById("reviewer").value = localStorage.getItem(REVIEWER_KEY) || "";
refresh();
