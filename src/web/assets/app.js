// graft kiosk page: plain JavaScript, no framework. Every call goes to the HTTP JSON API
// (docs/HTTP.md); state changes carry the session's CSRF token.
"use strict";
const $ = (id) => document.getElementById(id);
let csrf = null;
let events = null;
let previewOn = true;
let knownClasses = [];
let pending = [];          // classes added on the page that have no example yet
let burstActive = false;

function say(text, error) {
  const m = $("message");
  m.textContent = text || "";
  m.className = error ? "error" : "";
}

async function api(method, path, body, type) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = csrf || "";
  let payload;
  if (body instanceof Blob) { payload = body; headers["Content-Type"] = type || body.type || "application/octet-stream"; }
  else if (body !== undefined) { payload = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  let j = {};
  try { j = await r.json(); } catch (_) { j = { ok: r.ok }; }
  if (r.status === 401) { showLogin(); throw new Error(j.error || "log in first"); }
  if (!r.ok || j.ok === false) throw new Error((j.code || r.status) + ": " + (j.error || r.statusText));
  return j;
}

function showLogin() {
  $("login").hidden = false; $("app").hidden = true; $("logout").hidden = true;
  stopLive();
  $("secret").focus();
}

async function showApp() {
  $("login").hidden = true; $("app").hidden = false; $("logout").hidden = false;
  startLive();
  await refresh();
}

function startLive() {
  if (previewOn) $("preview").src = "/api/preview.mjpg?t=" + Date.now();
  if (events) events.close();
  events = new EventSource("/api/events");
  events.onmessage = (e) => {
    let ev; try { ev = JSON.parse(e.data); } catch (_) { return; }
    if (ev.type === "label") showLabel(ev);
    else if (ev.type === "changed") refresh();
    else if (ev.type === "error") say(ev.message, true);
  };
}

function stopLive() {
  if (events) { events.close(); events = null; }
  $("preview").removeAttribute("src");
}

function showLabel(ev) {
  $("live-label").textContent = ev.label;
  $("live-score").textContent = ev.score.toFixed(2);
  $("overlay").className = ev.label === "unknown" ? "unknown" : "";
  if (ev.changed) addRecent(ev.label, ev.score);
}

function addRecent(label, score) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + " — " + label + " (" + score.toFixed(2) + ")";
  const list = $("recent");
  list.prepend(li);
  while (list.children.length > 10) list.lastChild.remove();
}

async function refresh() {
  try {
    const [info, cls] = await Promise.all([api("GET", "/api/info"), api("GET", "/api/classes")]);
    $("model").textContent = info.model + " · " + info.examples + " examples";
    knownClasses = cls.classes;
    pending = pending.filter((p) => !knownClasses.some((c) => c.label === p));
    renderClasses();
    renderTrained(info);
  } catch (e) { say(e.message, true); }
}

function renderTrained(info) {
  const t = $("threshold");
  if (info.head === "none") {
    $("trained").textContent = "No head yet: add examples of at least 2 classes.";
    t.disabled = true; $("threshold-out").textContent = "—";
    $("export-onnx").hidden = true; $("export-json").hidden = true;
    return;
  }
  // The spread: one binomial standard error over the examples held out in turn.
  const se = typeof info.cv === "number" && info.examples > 0 ? Math.sqrt(info.cv * (1 - info.cv) / info.examples) : 0;
  const cv = typeof info.cv === "number"
    ? (info.cv * 100).toFixed(1) + "% ± " + (se * 100).toFixed(1) + " held-out accuracy (each example scored by a head trained without its object)"
    : "accuracy not measured";
  $("trained").textContent = "Head: " + info.head + " · " + cv + " · threshold " + info.threshold.toFixed(2) +
    (info.saved === 0 ? " · NOT saved (disk full?)" : "");
  t.disabled = false;
  if (document.activeElement !== t) t.value = info.threshold;
  $("threshold-out").textContent = Number(t.value).toFixed(2);
  $("export-onnx").hidden = false; $("export-json").hidden = false;
}

function renderClasses() {
  const ul = $("classes");
  // Redrawn whenever the kiosk changes (from any front end): keep what was typed.
  const typed = {};
  for (const li of ul.querySelectorAll("li.class")) typed[li.dataset.label] = li.querySelector(".n").value;
  ul.replaceChildren();
  const all = knownClasses.concat(pending.map((p) => ({ label: p, count: 0, files: [] })));
  for (const c of all) {
    const li = $("class-item").content.firstElementChild.cloneNode(true);
    li.querySelector(".name").textContent = c.label;
    li.querySelector(".count").textContent = "(" + c.count + " examples)";
    li.dataset.label = c.label;
    if (typed[c.label]) li.querySelector(".n").value = typed[c.label];
    const thumbs = li.querySelector(".thumbs");
    for (const f of c.files.slice(-24)) {
      const t = document.createElement("li");
      const img = document.createElement("img");
      img.loading = "lazy";
      img.alt = c.label + " example " + f;
      img.src = "/api/example?label=" + encodeURIComponent(c.label) + "&file=" + encodeURIComponent(f);
      const del = document.createElement("button");
      del.type = "button"; del.textContent = "×"; del.className = "delete-example";
      del.setAttribute("aria-label", "Delete example " + f + " of " + c.label);
      del.onclick = () => act("Deleted an example of " + c.label, () => api("POST", "/api/delete-example", { label: c.label, file: f }));
      t.append(img, del);
      thumbs.append(t);
    }
    wireClass(li, c.label);
    ul.append(li);
  }
}

async function act(done, f) {
  try { say("Working…"); const r = await f(); say(typeof done === "function" ? done(r) : done); await refresh(); return r; }
  catch (e) { say(e.message, true); }
}

function countdown(seconds) {
  return new Promise((resolve) => {
    const c = $("countdown");
    let n = seconds;
    c.hidden = false; c.textContent = n;
    const tick = setInterval(() => {
      n -= 1;
      if (n <= 0) { clearInterval(tick); c.hidden = true; resolve(); }
      else c.textContent = n;
    }, 1000);
  });
}

function wireClass(li, label) {
  li.querySelector(".capture").onclick = async () => {
    const n = Math.max(1, Math.min(100, parseInt(li.querySelector(".n").value, 10) || 1));
    await countdown(3);
    await act((r) => "Added " + r.added + " of " + n + " frames to " + label +
      (r.added < n ? " (the same picture twice is kept once)" : ""),
      () => api("POST", "/api/learn", { label, n }));
  };
  const burst = li.querySelector(".burst");
  const start = (e) => {
    e.preventDefault();
    if (burstActive) return;
    burstActive = true;
    burst.setAttribute("aria-pressed", "true");
    say("Capturing " + label + " while held…");
    api("POST", "/api/burst", { label })
      .then((r) => { say("Added " + r.added + " frames to " + label); return refresh(); })
      .catch((err) => say(err.message, true))
      .finally(() => { burstActive = false; burst.setAttribute("aria-pressed", "false"); });
  };
  const stop = () => { if (burstActive) api("POST", "/api/burst/stop").catch(() => {}); };
  burst.addEventListener("pointerdown", start);
  burst.addEventListener("pointerup", stop);
  burst.addEventListener("pointerleave", stop);
  burst.addEventListener("keydown", (e) => { if ((e.key === " " || e.key === "Enter") && !e.repeat) start(e); });
  burst.addEventListener("keyup", (e) => { if (e.key === " " || e.key === "Enter") stop(); });
  li.querySelector(".upload").onchange = async (e) => {
    const files = Array.from(e.target.files || []);
    let added = 0;
    for (const [i, f] of files.entries()) {
      say("Uploading " + (i + 1) + " of " + files.length + "…");
      try {
        const r = await api("POST", "/api/upload?label=" + encodeURIComponent(label) + "&name=" + encodeURIComponent(f.name), f, f.type || "image/jpeg");
        added += r.added;
      } catch (err) { say(f.name + ": " + err.message, true); return; }
    }
    e.target.value = "";
    say("Added " + added + " photos to " + label);
    await refresh();
  };
  li.querySelector(".rename").onclick = () => {
    const to = prompt("New name for " + label, label);
    if (!to || to === label) return;
    if (!knownClasses.some((c) => c.label === label)) { pending = pending.map((p) => (p === label ? to : p)); renderClasses(); return; }
    act("Renamed " + label + " to " + to, () => api("POST", "/api/rename", { from: label, to }));
  };
  li.querySelector(".forget").onclick = () => {
    if (!knownClasses.some((c) => c.label === label)) { pending = pending.filter((p) => p !== label); renderClasses(); return; }
    if (!confirm("Forget " + label + " and all its examples?")) return;
    act("Forgot " + label, () => api("POST", "/api/forget", { label }));
  };
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").onsubmit = async (e) => {
    e.preventDefault();
    try {
      const r = await fetch("/api/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ secret: $("secret").value }), credentials: "same-origin" });
      const j = await r.json();
      if (!r.ok) throw new Error(j.error || r.statusText);
      csrf = j.csrf; $("secret").value = ""; say(""); await showApp();
    } catch (err) { say(err.message, true); }
  };
  $("logout").onclick = async () => { try { await api("POST", "/api/logout"); } catch (_) {} csrf = null; showLogin(); };
  $("new-class").onsubmit = (e) => {
    e.preventDefault();
    const l = $("new-label").value.trim();
    if (!l) return;
    if (!knownClasses.some((c) => c.label === l) && !pending.includes(l)) pending.push(l);
    $("new-label").value = "";
    renderClasses();
    say("Class " + l + " added: capture or upload examples of it");
  };
  $("train").onclick = () => act((r) => "Trained: " + r.head + ", held-out accuracy " +
    (r.cv * 100).toFixed(1) + "%, threshold " + r.threshold.toFixed(2),
    () => api("POST", "/api/train"));
  $("classify").onclick = () => act((r) => { addRecent(r.label, r.score); return "This frame: " + r.label + " (" + r.score.toFixed(2) + ")"; },
    () => api("POST", "/api/classify"));
  $("toggle-preview").onclick = () => {
    previewOn = !previewOn;
    $("toggle-preview").setAttribute("aria-pressed", String(previewOn));
    $("toggle-preview").textContent = previewOn ? "Pause preview" : "Resume preview";
    if (previewOn) $("preview").src = "/api/preview.mjpg?t=" + Date.now(); else $("preview").removeAttribute("src");
  };
  $("pictures").ontoggle = () => {
    if (!$("pictures").open) return;
    const t = Date.now();
    $("confusion").src = "/api/plots/confusion.svg?t=" + t;
    $("curve").src = "/api/plots/curve.svg?t=" + t;
  };
  $("restore").onchange = async (e) => {
    const f = e.target.files && e.target.files[0];
    e.target.value = "";
    if (!f || !confirm("Replace every example and setting of this kiosk with " + f.name + "?")) return;
    await act((r) => "Restored " + r.restored + " examples of " + r.classes + " classes",
      () => api("POST", "/api/restore", f, "application/x-tar"));
  };
  const t = $("threshold");
  t.oninput = () => { $("threshold-out").textContent = Number(t.value).toFixed(2); };
  t.onchange = () => act("Threshold set to " + Number(t.value).toFixed(2), () => api("POST", "/api/threshold", { value: Number(t.value) }));
  // A login link (`graft serve` prints http://HOST:PORT/#secret=...): the fragment never
  // reaches the network; it is used once and removed from the address bar.
  const m = /^#secret=([0-9a-fA-F]+)$/.exec(location.hash);
  if (m) {
    history.replaceState(null, "", location.pathname);
    $("secret").value = m[1];
    $("login-form").requestSubmit();
    return;
  }
  try {
    const s = await fetch("/api/session", { credentials: "same-origin" }).then((r) => r.json());
    if (s.csrf) { csrf = s.csrf; await showApp(); } else showLogin();
  } catch (_) { showLogin(); }
});
