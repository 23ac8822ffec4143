// The node page: renders the snapshots that /v1/page/events pushes (see meshnode/web/_page.py).
"use strict";

const seenSessions = new Set();
let firstRender = true;

function setBadge(id, prefix, value) {
  const badge = document.getElementById(id);
  badge.textContent = prefix + (value || "?");
  badge.className = "badge " + stateClass(value);
  badge.dataset.state = value || "";
}

function renderMesh(snap) {
  const svg = document.getElementById("mesh-graph");
  const ns = "http://www.w3.org/2000/svg";
  const nodes = snap.nodes;
  const n = nodes.length;
  const cx = 160, cy = 98, r = n > 1 ? 78 : 0;
  const pos = {};
  nodes.forEach((node, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(n, 1);
    pos[node.node_id] = [cx + r * Math.cos(angle), cy + r * Math.sin(angle)];
  });
  const parts = [];
  for (const [a, b] of snap.links) {
    if (!pos[a] || !pos[b]) continue;
    const line = document.createElementNS(ns, "line");
    line.setAttribute("x1", pos[a][0]); line.setAttribute("y1", pos[a][1]);
    line.setAttribute("x2", pos[b][0]); line.setAttribute("y2", pos[b][1]);
    parts.push(line);
  }
  for (const node of nodes) {
    const [x, y] = pos[node.node_id];
    const g = document.createElementNS(ns, "g");
    g.setAttribute("data-node", node.node_id);
    if (node.leader) {
      const ring = document.createElementNS(ns, "circle");
      ring.setAttribute("cx", x); ring.setAttribute("cy", y); ring.setAttribute("r", 14);
      ring.setAttribute("class", "lead");
      g.append(ring);
    }
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", x); dot.setAttribute("cy", y); dot.setAttribute("r", 9);
    dot.setAttribute("class", node.state);
    const title = document.createElementNS(ns, "title");
    title.textContent = node.node_id + " (" + node.state + (node.leader ? ", leader" : "") + ")";
    dot.append(title);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x); label.setAttribute("y", y + 26);
    label.textContent = node.node_id.length > 14 ? node.node_id.slice(0, 13) + "…" : node.node_id;
    g.append(dot, label);
    parts.push(g);
  }
  svg.replaceChildren(...parts);

  const alive = nodes.filter((x) => x.state !== "dead").length;
  document.getElementById("mesh-count").textContent = alive + " of " + n + " alive";
  replaceChildren(document.querySelector("#nodes tbody"), nodes.map((node) =>
    el("tr", { "data-node": node.node_id },
      el("td", { class: "mono" }, node.node_id, node.leader ? el("span", { class: "badge warn", title: "leader: forwards to the cloud" }, " leader") : null,
        node.direct ? el("span", { class: "muted", title: "a direct neighbour" }, " · direct") : null),
      el("td", {}, el("span", { class: "badge " + stateClass(node.state) }, node.state === "self" ? "this node" : node.state)),
      el("td", { class: "num" }, node.uplink_score ?? "–"),
      el("td", { class: "num" }, node.state === "self" ? "–" : fmtAge(node.last_seen_s)))));
}

function renderNode(snap) {
  const me = snap.node;
  document.getElementById("subtitle").textContent = (me.site ? me.site + " · " : "") + me.node_id;
  document.title = "meshnode " + me.node_id;
  setBadge("mesh-state", "MESH ", me.mesh);
  setBadge("uplink-state", "CLOUD ", me.uplink);
  const fw = me.forwarder || null;
  const rows = [
    ["node", me.node_id], ["site", me.site || "–"], ["address", me.address || "–"],
    ["leader", me.leader ? me.leader + (me.leader === me.node_id ? " (this node)" : "") : "none (no uplink)"],
    ["uplink score", me.uplink_score ?? "–"], ["cloud", me.cloud_url || "not configured"],
    ["documents", (me.documents ?? 0) + " live, " + (me.archived ?? 0) + " archived"],
    ["not on every peer", me.documents_not_everywhere ?? 0],
    ["security", me.secure ? "enrolled" : "insecure (no enrolment)"],
  ];
  if (fw) rows.push(["forwarded", Object.entries(fw).map(([k, v]) => k + " " + v).join(", ")]);
  replaceChildren(document.getElementById("node-info"), rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
}

function renderSessions(snap) {
  const total = snap.sessions_total;
  document.getElementById("sessions-count").textContent =
    total > snap.sessions.length ? snap.sessions.length + " newest of " + total : String(total);
  const cards = snap.sessions.map((s) => {
    const isNew = !firstRender && !seenSessions.has(s.session_id);
    seenSessions.add(s.session_id);
    const peers = snap.nodes.length;
    return el("div", { class: "card" + (isNew ? " flash" : ""), "data-session": s.session_id, "data-state": s.state },
      el("div", { class: "top" },
        el("span", { class: "mono" }, s.session_id),
        el("span", { class: "badge " + stateClass(s.state) }, s.state)),
      el("div", { class: "row" },
        el("span", {}, "⚡ " + fmtEnergy(s.energy_wh)),
        el("span", {}, "charger " + s.charger + " / " + s.connector),
        el("span", { class: "muted" }, "started " + fmtTime(s.started_ts))),
      el("div", { class: "row" },
        el("span", { title: "this node and the direct neighbours known to hold it (in sync / known)" },
          "on " + s.in_sync_on + (s.known_on !== s.in_sync_on ? "–" + s.known_on : "") + " of " + peers + " nodes"),
        el("span", { class: s.reconciled ? "badge ok" : "badge" }, s.reconciled ? "cloud receipt" : "not reconciled yet"),
        s.conflicts ? el("span", { class: "badge bad" }, s.conflicts + " conflict" + (s.conflicts > 1 ? "s" : "")) : null));
  });
  replaceChildren(document.getElementById("sessions"), cards.length ? cards : [el("div", { class: "empty" }, "no sessions on this node")]);
}

function renderConflicts(snap) {
  document.getElementById("conflicts-count").textContent = String(snap.conflicts_total);
  const rows = snap.conflicts.map((c) => el("tr", {},
    el("td", { class: "mono" }, c.session_id), el("td", {}, el("span", { class: "badge bad" }, c.kind)), el("td", {}, c.detail)));
  replaceChildren(document.querySelector("#conflicts tbody"),
    rows.length ? rows : [el("tr", {}, el("td", { colspan: 3, class: "empty" }, "none"))]);
}

function renderChargers(snap) {
  const chargers = snap.chargers || [];
  document.getElementById("chargers-count").textContent = chargers.length ? String(chargers.length) : "";
  const cards = chargers.map((c) => el("div", { class: "card", "data-charger": c.charger_id },
    el("div", { class: "top" }, el("span", { class: "mono" }, c.charger_id),
      el("span", { class: "badge " + stateClass(c.status) }, c.status || "unknown")),
    c.protocol ? el("div", { class: "muted" }, c.protocol) : null,
    el("div", { class: "row" }, c.connectors.map((k) => el("span", {},
      "#" + k.connector_id + " ", el("span", { class: "badge " + stateClass(k.status) }, k.status || "?"),
      k.session_id ? el("span", { class: "mono" }, " " + k.session_id) : null)))));
  replaceChildren(document.getElementById("chargers"),
    cards.length ? cards : [el("div", { class: "empty" }, "no chargers connected to this node (OCPP)")]);
}

function render(snap) {
  renderNode(snap);
  renderMesh(snap);
  renderSessions(snap);
  renderConflicts(snap);
  renderChargers(snap);
  firstRender = false;
  document.getElementById("updated").textContent = new Date(snap.generated_ts * 1000).toLocaleTimeString();
  document.body.dataset.generated = String(snap.generated_ts);
}

function setLive(state) {
  const badge = document.getElementById("live");
  badge.textContent = { live: "live", retrying: "reconnecting", token: "token needed" }[state] || state;
  badge.className = "badge " + (state === "live" ? "ok" : "warn");
  badge.dataset.state = state;
}

streamEvents("/v1/page/events", (name, data) => {
  if (name === "snapshot") render(JSON.parse(data));
}, setLive);
