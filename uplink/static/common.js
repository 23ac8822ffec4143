// Shared by the node page and the cloud page (the two copies are kept identical by a test).
// No framework: DOM built with el(), never from HTML strings, so data cannot inject markup.
"use strict";

const TOKEN_KEY = "meshnode.token";

// A `?token=...` in the address is kept for this tab (sessionStorage) and removed from the address bar.
(function bootToken() {
  const url = new URL(location.href);
  const token = url.searchParams.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
})();

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

class AuthNeeded extends Error {}

// Show the token form; `retry` runs once a token was entered.
function askToken(message, retry) {
  const section = document.getElementById("token-section");
  const form = document.getElementById("token-form");
  if (!section || !form) return;
  section.hidden = false;
  form.classList.add("show");
  document.getElementById("token-error").textContent = message || "";
  form.onsubmit = (ev) => {
    ev.preventDefault();
    const value = document.getElementById("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    section.hidden = true;
    form.classList.remove("show");
    retry();
  };
}

async function api(path, options) {
  const opts = options || {};
  const response = await fetch(path, Object.assign({}, opts, {
    headers: Object.assign({ Accept: "application/json" }, authHeaders(), opts.headers || {}),
  }));
  if (response.status === 401 || response.status === 403) {
    let detail = "";
    try { detail = (await response.json()).error || ""; } catch (e) { /* not JSON */ }
    throw new AuthNeeded(detail || "this node asks for a token");
  }
  return response;
}

// Server-sent events read with fetch (EventSource cannot send an Authorization header).
// Calls onEvent(name, data) per event and onState("live" | "retrying" | "token") as the link changes;
// reconnects with growing delays. Returns a function that stops it.
function streamEvents(path, onEvent, onState) {
  let stopped = false;
  let delay = 1000;
  let controller = null;
  async function once() {
    controller = new AbortController();
    const response = await api(path, { signal: controller.signal, headers: { Accept: "text/event-stream" } });
    if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
    onState("live");
    delay = 1000;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          else if (line.startsWith("retry:")) delay = Math.max(1000, parseInt(line.slice(6), 10) || delay);
        }
        if (data.length) onEvent(name, data.join("\n"));
      }
    }
  }
  async function loop() {
    while (!stopped) {
      try {
        await once();
      } catch (err) {
        if (err instanceof AuthNeeded) {
          onState("token");
          askToken(err.message, loop);
          return;
        }
      }
      if (stopped) return;
      onState("retrying");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 30000);
    }
  }
  loop();
  return () => { stopped = true; if (controller) controller.abort(); };
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function replaceChildren(parent, children) {
  parent.replaceChildren(...children);
}

function fmtEnergy(wh) {
  if (wh === null || wh === undefined) return "–";
  return wh >= 1000 ? (wh / 1000).toFixed(2) + " kWh" : wh + " Wh";
}

function fmtTime(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

function stateClass(state) {
  switch ((state || "").toLowerCase()) {
    case "synced": case "online": case "alive": case "self": case "reconciled": case "approve": case "approved":
      return "ok";
    case "syncing": case "suspect": case "charging": case "authorized": case "paused": case "reserving":
      return "info";
    case "offline": case "dead": case "reject": case "rejected":
      return "bad";
    case "completed": case "pending":
      return "warn";
    default:
      return "";
  }
}
