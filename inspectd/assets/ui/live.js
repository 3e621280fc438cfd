// inspectd live view: polls /api/state and /api/defects, shows each camera's MJPEG stream.
// Every element is built with createElement/textContent and every URL parameter with
// encodeURIComponent: nothing the daemon sends is ever parsed as HTML.
"use strict";

const STATE_EVERY_MS = 1000;
const DEFECTS_EVERY_MS = 2000;
// A browser opens about 6 connections to one server: the first tiles stream (MJPEG), the others refresh
// a snapshot, so that the polls and the thumbnails always get through.
const STREAMED_TILES = 4;
const tiles = new Map(); // camera id -> {root, fields}
let collect = false;
let runId = null; // the daemon's run: when it changes (a restart), every picture is opened again
let answering = true;
let snapshotMs = 1000;

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function q(name, value) { return name + "=" + encodeURIComponent(value); }

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

function streamUrl(id) { return "/stream?" + q("camera", id) + "&" + q("t", Date.now()); }
function snapshotUrl(id) { return "/snapshot?" + q("camera", id) + "&" + q("t", Date.now()); }

// (Re)open a tile's picture: a stream for the first STREAMED_TILES tiles, snapshots for the rest.
function openPicture(tile) {
  clearTimeout(tile.refresh);
  tile.streamed = [...tiles.values()].indexOf(tile) < STREAMED_TILES;
  tile.img.src = tile.streamed ? streamUrl(tile.id) : snapshotUrl(tile.id);
}

function makeTile(id) {
  const root = el("article", { class: "tile", "data-camera": id });
  const head = el("div", { class: "tile-head" });
  head.append(el("h2", {}, id));
  const state = el("span", { class: "state" }, "…");
  head.append(state);
  const img = el("img", { class: "live", alt: "live picture of camera " + id });
  const stats = el("div", { class: "stats" });
  const fields = {};
  for (const [key, label] of [["verdict", "last"], ["score", "score"], ["fps", "inspected"], ["dropped", "dropped"],
                              ["seq", "frame"], ["reconnects", "reconnects"], ["model", "model"]]) {
    const cell = el("div", {}, label + ": ");
    fields[key] = el("span", { class: key });
    cell.append(fields[key]);
    stats.append(cell);
  }
  const detail = el("div", { class: "detail-line" });
  root.append(head, img, stats, detail);
  const tile = { id, root, state, img, fields, detail, collect: null, streamed: false, refresh: null };
  // A stream cut (daemon restart, camera reloaded) or a snapshot that failed: open it again later.
  img.addEventListener("error", () => {
    clearTimeout(tile.refresh);
    tile.refresh = setTimeout(() => { if (tiles.get(id) === tile) openPicture(tile); }, 2000);
  });
  // A snapshot tile asks for the next picture once this one is shown.
  img.addEventListener("load", () => {
    if (!tile.streamed && tiles.get(id) === tile) tile.refresh = setTimeout(() => openPicture(tile), snapshotMs);
  });
  tiles.set(id, tile);
  openPicture(tile);
  return tile;
}

function collectRow(id) {
  const row = el("div", { class: "collect" });
  const result = el("span", { class: "muted" });
  for (const label of ["ok", "defect"]) {
    const b = el("button", { type: "button", "data-label": label }, "save as " + label);
    b.addEventListener("click", async () => {
      result.textContent = "saving…";
      try {
        const r = await fetch("/api/collect", { method: "POST", headers: { "Content-Type": "application/json",
          "X-Inspectd-Collect": "1" }, body: JSON.stringify({ camera: id, label }) });
        const text = r.ok ? "saved " + (await r.json()).saved : "not saved: " + (await r.text());
        result.textContent = text;
      } catch (e) { result.textContent = "not saved: " + e; }
    });
    row.append(b);
  }
  row.append(result);
  return row;
}

function updateTile(tile, cam) {
  tile.state.textContent = cam.state;
  tile.state.className = "state " + cam.state;
  const last = cam.last;
  tile.fields.verdict.textContent = last ? (last.is_defect ? "DEFECT" : "ok") : "–";
  tile.fields.verdict.className = "verdict " + (last ? (last.is_defect ? "defect" : "ok") : "");
  tile.fields.score.textContent = last ? last.score.toFixed(3) + " (threshold " + last.threshold.toFixed(2) + ")" : "–";
  tile.fields.fps.textContent = cam.fps.toFixed(1) + " frames/s";
  tile.fields.dropped.textContent = cam.dropped_fps.toFixed(1) + "/s (" + cam.dropped + " in all)";
  tile.fields.seq.textContent = last ? "#" + last.frame_seq + (last.age_s > 2 ? ", " + last.age_s.toFixed(0) + " s ago" : "") : "–";
  tile.fields.reconnects.textContent = String(cam.reconnects);
  const m = cam.model || {};
  tile.fields.model.textContent = m.id ? m.id + (m.name && m.name !== m.id ? " (" + m.name + ")" : "") : "–";
  tile.fields.model.title = m.sha256 ? "sha256 " + m.sha256 : "";
  tile.detail.textContent = cam.state === "up" ? "" : (cam.state === "down" ? "reconnecting: " : "") + (cam.detail || "");
  tile.root.classList.toggle("defect", Boolean(last && last.is_defect));
  if (collect && !tile.collect) { tile.collect = collectRow(cam.id); tile.root.append(tile.collect); }
}

function updateFilter(ids) {
  const select = document.getElementById("camera-filter");
  const have = new Set([...select.options].map((o) => o.value).filter(Boolean));
  if (ids.length === have.size && ids.every((id) => have.has(id))) return;
  const chosen = select.value;
  while (select.options.length > 1) select.remove(1);
  for (const id of ids) select.append(el("option", { value: id }, id));
  select.value = ids.includes(chosen) ? chosen : "";
}

async function refreshState() {
  try {
    const s = await getJSON("/api/state");
    collect = s.collect;
    setMapMode(s.map || "relative");
    snapshotMs = Math.max(200, 1000 / s.max_fps);
    if ((runId !== null && s.run_id !== runId) || !answering) {
      for (const tile of tiles.values()) openPicture(tile); // the daemon restarted or came back: new streams
    }
    runId = s.run_id;
    answering = true;
    const ids = [...new Set(s.cameras.map((c) => (c.model || {}).id).filter(Boolean))];
    const model = ids.length > 1 ? "models " + ids.join(", ") : (s.model && s.model.name ? "model " + s.model.name : "model loading");
    document.getElementById("summary").textContent = model + " · " + s.fps.toFixed(1) + " frames/s inspected · inspectd " +
      s.version + (s.saturated ? " · inspection saturated (frames dropped): live pictures slowed to 1/s"
                               : " · live pictures at most " + s.max_fps + "/s");
    const cameraIds = s.cameras.map((c) => c.id);
    for (const [id, tile] of tiles) {
      if (!cameraIds.includes(id)) { clearTimeout(tile.refresh); tile.img.removeAttribute("src"); tile.root.remove(); tiles.delete(id); }
    }
    const container = document.getElementById("cameras");
    for (const cam of s.cameras) {
      const tile = tiles.get(cam.id) || makeTile(cam.id);
      if (!tile.root.isConnected) container.append(tile.root);
      updateTile(tile, cam);
    }
    updateFilter(cameraIds);
  } catch (e) {
    answering = false;
    document.getElementById("summary").textContent = "daemon not answering (" + e.message + "); retrying";
  }
}

// The map the daemon draws ([ui] map): relative to each frame's mask threshold, or the calibrated probability.
const LEGENDS = {
  relative: ["map: out", "in", "the map blended into each defective frame, relative to its own mask threshold: " +
    "green is where the regions are cut, yellow to red inside them, blue outside; ok frames show no map"],
  probability: ["map: p 0", "1", "the calibrated defect probability sigmoid(cam_logits), blended into each picture"],
};
let mapMode = "relative";

function setMapMode(mode) {
  if (!(mode in LEGENDS)) return;
  mapMode = mode;
  const [low, high, title] = LEGENDS[mode];
  document.getElementById("legend-low").textContent = low;
  document.getElementById("legend-high").textContent = high;
  document.getElementById("legend").title = title;
}

function showDetailMap(id, mode) {
  document.getElementById("detail-overlay").src = "/defect/overlay?" + id + "&" + q("map", mode);
  const other = mode === "relative" ? "probability" : "relative";
  const link = document.getElementById("detail-other-map");
  link.textContent = other === "probability" ? "show the probability map" : "show the map relative to the mask threshold";
  link.dataset.map = other;
  link.dataset.id = id;
}

function openDetail(d) {
  const dialog = document.getElementById("detail");
  document.getElementById("detail-title").textContent = d.camera + " · frame #" + d.frame_seq + " · score " +
    Number(d.score).toFixed(3) + " · " + d.captured_at;
  const id = q("id", d.id);
  showDetailMap(id, mapMode);
  document.getElementById("detail-collect").hidden = !collect;
  if (collect) openPainter(d.id);
  document.getElementById("detail-save-mask").dataset.id = d.id;
  document.getElementById("detail-save-result").textContent = "";
  document.getElementById("detail-frame").src = "/defect/frame?" + id;
  document.getElementById("detail-frame-link").href = "/defect/frame?" + id;
  document.getElementById("detail-mask").src = "/defect/mask?" + id;
  document.getElementById("detail-mask-link").href = "/defect/mask?" + id;
  const pre = document.getElementById("detail-header");
  pre.textContent = "loading…";
  getJSON("/api/defect?" + id).then((h) => { pre.textContent = JSON.stringify(h, null, 2); })
    .catch((e) => { pre.textContent = String(e); });
  if (!dialog.open) dialog.showModal();
}

// The mask painter: the defect's frame with a canvas of its size over it, red where the mask is. It starts from
// the published regions; pointer strokes paint or erase; the save sends the canvas as a PNG (red = defect).
const painter = { id: null, last: null };

function painterCanvas() { return document.getElementById("painter-mask"); }

async function painterFromRegions() {
  const canvas = painterCanvas();
  const ctx = canvas.getContext("2d");
  ctx.globalCompositeOperation = "source-over";
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const regions = new Image();
  regions.src = "/defect/regions?" + q("id", painter.id);
  try { await regions.decode(); } catch (e) { return; } // no regions published: an empty mask
  const work = el("canvas", { width: canvas.width, height: canvas.height });
  const wctx = work.getContext("2d");
  wctx.drawImage(regions, 0, 0, canvas.width, canvas.height);
  ctx.putImageData(binaryMask(wctx.getImageData(0, 0, canvas.width, canvas.height), (px, i) => px[i] > 127), 0, 0);
}

// Every pixel opaque red where `on` says so, transparent elsewhere: what is shown and what is saved.
function binaryMask(image, on) {
  const px = image.data;
  for (let i = 0; i < px.length; i += 4) {
    const set = on(px, i);
    px[i] = set ? 255 : 0; px[i + 1] = 0; px[i + 2] = 0; px[i + 3] = set ? 255 : 0;
  }
  return image;
}

function openPainter(id) {
  painter.id = id;
  painter.last = null;
  document.getElementById("painter-result").textContent = "";
  const frame = document.getElementById("painter-frame");
  frame.onload = () => {
    const canvas = painterCanvas();
    canvas.width = frame.naturalWidth;
    canvas.height = frame.naturalHeight;
    painterFromRegions();
  };
  frame.src = "/defect/frame?" + q("id", id);
}

function canvasPoint(e) {
  const canvas = painterCanvas();
  const box = canvas.getBoundingClientRect();
  return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
}

function stroke(from, to) {
  const ctx = painterCanvas().getContext("2d");
  const erase = document.querySelector("input[name=brush]:checked").value === "erase";
  ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = "#ff0000";
  ctx.lineWidth = Number(document.getElementById("brush-size").value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.arc(to[0], to[1], ctx.lineWidth / 2, 0, 2 * Math.PI); // a click alone leaves a dot
  ctx.fill();
  ctx.beginPath();
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(to[0], to[1]);
  ctx.stroke();
}

async function savePainted() {
  const result = document.getElementById("painter-result");
  const canvas = painterCanvas();
  // Antialiased edges are half transparent: cut at half, so the mask saved is the one shown, with no faint rim.
  const out = el("canvas", { width: canvas.width, height: canvas.height });
  const image = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  out.getContext("2d").putImageData(binaryMask(image, (px, i) => px[i + 3] >= 128), 0, 0);
  result.textContent = "saving…";
  try {
    const r = await fetch("/api/collect-defect", { method: "POST", headers: { "Content-Type": "application/json",
      "X-Inspectd-Collect": "1" }, body: JSON.stringify({ id: painter.id, mask: out.toDataURL("image/png") }) });
    result.textContent = r.ok ? "saved " + (await r.json()).saved + " with the painted mask" : "not saved: " + (await r.text());
  } catch (err) { result.textContent = "not saved: " + err; }
}

function setUpPainter() {
  const canvas = painterCanvas();
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    painter.last = canvasPoint(e);
    stroke(painter.last, painter.last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!painter.last) return;
    const point = canvasPoint(e);
    stroke(painter.last, point);
    painter.last = point;
  });
  for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { painter.last = null; });
  const size = document.getElementById("brush-size");
  size.addEventListener("input", () => { document.getElementById("brush-size-value").textContent = size.value; });
  document.getElementById("painter-regions").addEventListener("click", painterFromRegions);
  document.getElementById("painter-clear").addEventListener("click", () => {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
  });
  document.getElementById("painter-save").addEventListener("click", savePainted);
}

function defectItem(d) {
  const item = el("li", { "data-id": d.id, "data-camera": d.camera });
  const img = el("img", { alt: "defect on " + d.camera, loading: "lazy" });
  img.src = "/defect/thumb?" + q("id", d.id);
  const caption = el("div", { class: "caption" });
  caption.append(el("span", {}, d.camera + " #" + d.frame_seq), el("span", {}, "score " + Number(d.score).toFixed(2)),
                 el("span", { class: "muted" }, (d.captured_at || "").slice(11, 19) + " UTC"));
  item.append(img, caption);
  item.addEventListener("click", () => openDetail(d));
  return item;
}

async function refreshDefects() {
  const camera = document.getElementById("camera-filter").value;
  try {
    const r = await getJSON("/api/defects" + (camera ? "?" + q("camera", camera) : ""));
    // Update in place: entries already shown keep their element (a click never lands on a moved entry),
    // new ones are added at the top, the ones that fell off the list go.
    const list = document.getElementById("recent");
    const shown = new Map([...list.children].map((li) => [li.getAttribute("data-id"), li]));
    const wanted = new Set(r.defects.map((d) => d.id));
    for (const [id, li] of shown) if (!wanted.has(id)) li.remove();
    let next = list.firstChild;
    for (const d of r.defects) {
      const li = shown.get(d.id);
      if (li && li.isConnected) { next = li.nextSibling; continue; }
      list.insertBefore(defectItem(d), next);
    }
    document.getElementById("recent-empty").hidden = r.defects.length > 0;
  } catch (e) { /* the state poll reports an unreachable daemon */ }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("detail-close").addEventListener("click", () => document.getElementById("detail").close());
  setUpPainter();
  document.getElementById("detail-save-mask").addEventListener("click", async (e) => {
    const result = document.getElementById("detail-save-result");
    result.textContent = "saving…";
    try {
      const r = await fetch("/api/collect-defect", { method: "POST", headers: { "Content-Type": "application/json",
        "X-Inspectd-Collect": "1" }, body: JSON.stringify({ id: e.target.dataset.id }) });
      result.textContent = r.ok ? "saved " + (await r.json()).saved + " with its mask" : "not saved: " + (await r.text());
    } catch (err) { result.textContent = "not saved: " + err; }
  });
  document.getElementById("detail-other-map").addEventListener("click", (e) => {
    e.preventDefault();
    showDetailMap(e.target.dataset.id, e.target.dataset.map);
  });
  document.getElementById("camera-filter").addEventListener("change", refreshDefects);
  // Each poll is asked for again only once the last one answered: a slow daemon never gets a pile of them.
  const every = (poll, ms) => { const run = () => poll().finally(() => setTimeout(run, ms)); run(); };
  every(refreshState, STATE_EVERY_MS);
  every(refreshDefects, DEFECTS_EVERY_MS);
});
