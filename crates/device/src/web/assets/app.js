// The live view: the MJPEG stream in an <img>, /api/status polled for the
// label, bars and figures, /api/events (server-sent events) for the log.
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token");
  const q = token ? "?token=" + encodeURIComponent(token) : "";
  const auth = token ? { Authorization: "Bearer " + token } : {};
  const $ = (id) => document.getElementById(id);
  const pct = (p) => (100 * p).toFixed(1) + " %";

  $("stream").src = "stream.mjpg" + q;

  function bars(top) {
    const box = $("bars");
    box.textContent = "";
    for (const s of top) {
      const row = document.createElement("div");
      row.className = "row";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = s.label;
      name.title = s.label;
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = Math.max(0, Math.min(100, 100 * s.probability)) + "%";
      track.appendChild(fill);
      const p = document.createElement("span");
      p.className = "p";
      p.textContent = pct(s.probability);
      row.append(name, track, p);
      box.appendChild(row);
    }
  }

  function show(s) {
    const label = $("label");
    label.textContent = s.label === null ? "no label" : s.label;
    label.className = s.label === null ? "label none" : "label";
    $("confidence").textContent = pct(s.confidence);
    bars(s.top);
    $("fps").textContent = s.fps.toFixed(1);
    $("latency").textContent = s.latency_ms.toFixed(1) + " ms";
    $("frames").textContent = s.frames;
    $("dropped").textContent = s.dropped;
    $("slow").textContent = s.slow;
    $("viewers").textContent = s.viewers;
    $("bundle").textContent = s.bundle;
    $("source").textContent = s.source;
    if (s.mqtt) {
      $("mqtt-row").hidden = false;
      $("mqtt").textContent = (s.mqtt.connected ? "connected" : "disconnected") + ", " + s.mqtt.queued + " queued, " + s.mqtt.dropped + " dropped";
    }
    showSnapshot(s.snapshot);
    $("frame").textContent = s.width ? "frame " + s.frame + (s.name ? " · " + s.name : "") + " · " + s.width + "×" + s.height : "waiting for the first frame";
  }

  // The newest snapshot: fetched again only when its name changes.
  let snapshotName = null;
  function showSnapshot(snap) {
    if (!snap || snap.name === snapshotName) return;
    snapshotName = snap.name;
    $("snapshot").hidden = false;
    $("snapshot-img").src = "snapshot.jpg?n=" + encodeURIComponent(snap.name) + (token ? "&token=" + encodeURIComponent(token) : "");
    const who = snap.region ? snap.region + ": " : "";
    $("snapshot-caption").textContent = new Date(snap.ts_ms).toLocaleTimeString() + " · " + who + (snap.label === null ? "no label" : snap.label) + " · " + snap.name;
  }

  async function poll() {
    try {
      const r = await fetch("api/status", { headers: auth, cache: "no-store" });
      if (r.ok) show(await r.json());
    } catch (e) { /* the next poll tries again */ }
    setTimeout(poll, 300);
  }
  poll();

  function describe(e) {
    const t = new Date(e.ts_ms).toLocaleTimeString();
    switch (e.event) {
      case "label": return t + "  label " + (e.label === null ? "none" : e.label) + " (" + pct(e.confidence) + ")";
      case "stats": return t + "  stats " + e.fps.toFixed(1) + " fps, " + e.latency_ms_mean.toFixed(1) + " ms, " + e.dropped + " dropped";
      case "reload": return t + "  reload " + (e.ok ? "done: " : "refused: ") + e.detail;
      case "source": return t + "  source " + e.state + ": " + e.detail;
      case "slow-frame": return t + "  slow frame " + e.frame + ": " + e.latency_ms.toFixed(1) + " ms";
      default: return t + "  " + e.event;
    }
  }

  const list = $("events");
  const events = new EventSource("api/events" + q);
  events.onopen = () => { $("conn").textContent = ""; };
  events.onerror = () => { $("conn").textContent = "(reconnecting)"; };
  events.onmessage = (m) => {
    let e;
    try { e = JSON.parse(m.data); } catch (err) { return; }
    const li = document.createElement("li");
    li.textContent = describe(e);
    list.insertBefore(li, list.firstChild);
    while (list.children.length > 40) list.removeChild(list.lastChild);
  };

  $("upload").onsubmit = async (ev) => {
    ev.preventDefault();
    const f = $("file").files[0];
    if (!f) return;
    $("result").textContent = "…";
    try {
      const r = await fetch("api/classify", { method: "POST", headers: auth, body: f });
      const j = await r.json();
      $("result").textContent = r.ok ? j.top.map((s) => s.label + " " + pct(s.probability)).join(", ") : j.error;
    } catch (e) {
      $("result").textContent = String(e);
    }
  };

  // Review of captured frames (only when the run has --capture).
  const captureList = $("capture-list");
  async function act(path, body) {
    const r = await fetch(path, { method: "POST", headers: Object.assign({ "Content-Type": "application/json" }, auth), body: JSON.stringify(body) });
    if (!r.ok) { const j = await r.json().catch(() => ({})); alert(j.error || r.statusText); }
    loadCaptures();
  }
  function captureItem(it) {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = "api/captures/image?id=" + encodeURIComponent(it.id) + (token ? "&token=" + encodeURIComponent(token) : "");
    img.alt = it.id;
    const caption = document.createElement("div");
    const reviewed = it.sidecar && it.sidecar.reviewed;
    caption.textContent = it.label + (it.sidecar ? " · " + pct(it.sidecar.probability) : "") + (reviewed ? " · confirmed" : "");
    const ok = document.createElement("button");
    ok.textContent = "Confirm";
    ok.onclick = () => act("api/captures/confirm", { id: it.id });
    const mv = document.createElement("button");
    mv.textContent = "Move…";
    mv.onclick = () => { const l = prompt("File under which label?", it.label); if (l) act("api/captures/move", { id: it.id, label: l }); };
    const del = document.createElement("button");
    del.textContent = "Delete";
    del.onclick = () => act("api/captures/delete", { id: it.id });
    li.append(img, caption, ok, mv, del);
    return li;
  }
  async function loadCaptures() {
    try {
      const r = await fetch("api/captures?per_page=24", { headers: auth, cache: "no-store" });
      if (!r.ok) return;
      const j = await r.json();
      $("captures").hidden = false;
      $("captures-count").textContent = "(" + j.total + ")";
      captureList.replaceChildren(...j.items.map(captureItem));
    } catch (e) { /* no captures on this run */ }
  }
  loadCaptures();
  setInterval(loadCaptures, 5000);
})();
