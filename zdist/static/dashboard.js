// zdist dashboard: polls the Center's JSON API once a second and redraws.
(function () {
  "use strict";

  const POLL_MS = 1000;
  const STREAM_WINDOW = 60; // seconds shown in the task stream
  const STREAM_KEEP = 5000; // most task entries kept in the page

  const state = {
    seq: null,          // newest task-stream entry we have
    tasks: [],          // task-stream entries, oldest first
    workers: [],        // latest /api/workers list
    clockOffset: 0,     // server time - browser time, seconds
    plot: null,
    heartbeatTimeout: 5,
  };

  // ------------------------------------------------------------ formatting

  function fmtBytes(n) {
    if (n === null || n === undefined || isNaN(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
  }

  function fmtInt(n) {
    if (n === null || n === undefined || isNaN(n)) return "–";
    return Math.round(Number(n)).toLocaleString("en-US");
  }

  function fmtRate(r) {
    if (r === null || r === undefined || isNaN(r)) return "–";
    r = Number(r);
    if (r === 0) return "0";
    if (r < 10) return r.toFixed(1);
    return fmtInt(r);
  }

  function fmtDuration(s) {
    if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 1) + " ms";
    if (s < 120) return s.toFixed(2) + " s";
    return (s / 60).toFixed(1) + " min";
  }

  function fmtAge(s) {
    if (s < 60) return s.toFixed(1) + " s ago";
    if (s < 3600) return (s / 60).toFixed(1) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }

  function fmtClock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setCard(id, value, text) {
    const node = document.getElementById(id);
    node.dataset.value = String(value);
    node.textContent = text;
  }

  // Stable colours per task group (function name).
  const palette = ["#2f6fde", "#e8833a", "#2ca58d", "#c94f7c", "#8a63d2", "#d4b106", "#3aa3c9", "#7c8b2f", "#b5533c", "#5c6bc0"];
  const groupColors = new Map();
  function colorOf(group) {
    if (!groupColors.has(group)) {
      let h = 0;
      for (let i = 0; i < group.length; i++) h = (h * 31 + group.charCodeAt(i)) >>> 0;
      let c = palette[groupColors.size % palette.length];
      if (groupColors.size >= palette.length) c = "hsl(" + (h % 360) + ",55%,52%)";
      groupColors.set(group, c);
    }
    return groupColors.get(group);
  }

  function serverNow() { return Date.now() / 1000 + state.clockOffset; }

  // ------------------------------------------------------------ workers and totals

  function renderWorkers(data) {
    state.workers = data.workers;
    state.heartbeatTimeout = data.heartbeat_timeout || 5;
    document.getElementById("center-address").textContent = data.center;
    const t = data.totals;
    setCard("total-workers", t.workers, fmtInt(t.workers));
    setCard("total-cores", t.ncores, fmtInt(t.ncores));
    setCard("total-keys", t.nkeys, fmtInt(t.nkeys));
    setCard("total-bytes", t.nbytes, fmtBytes(t.nbytes));
    setCard("total-memory", t.memory, fmtBytes(t.memory));
    setCard("total-executing", t.executing, fmtInt(t.executing));
    state.workerQueued = t.queued || 0;  // renderActivity adds the tasks clients hold back
    setCard("total-done", t.tasks_done, fmtInt(t.tasks_done));
    setCard("total-erred", t.tasks_failed, fmtInt(t.tasks_failed));
    setCard("total-rate", t.task_rate, fmtRate(t.task_rate));

    const tbody = document.querySelector("#workers tbody");
    const rows = [];
    for (const w of data.workers) {
      const tr = el("tr", { "data-address": w.address });
      const addr = el("td"); addr.appendChild(el("code", null, w.address)); tr.appendChild(addr);
      tr.appendChild(el("td", null, w.name === w.address ? "–" : w.name)); // unnamed workers are known by address
      tr.appendChild(el("td", { class: "num" }, fmtInt(w.ncores)));
      tr.appendChild(el("td", { class: "num", "data-field": "executing" }, fmtInt(w.executing)));
      tr.appendChild(el("td", { class: "num", "data-field": "queued" }, fmtInt(w.queued)));
      tr.appendChild(el("td", { class: "num", "data-field": "tasks_done" }, fmtInt(w.tasks_done)));
      tr.appendChild(el("td", { class: "num" + (w.tasks_failed ? " failed" : ""), "data-field": "tasks_failed" }, fmtInt(w.tasks_failed)));
      tr.appendChild(el("td", { class: "num" }, fmtRate(w.task_rate)));
      tr.appendChild(el("td", { class: "num" }, fmtInt(w.nkeys)));
      tr.appendChild(el("td", { class: "num" }, fmtBytes(w.nbytes)));
      tr.appendChild(memoryCell(w));
      tr.appendChild(el("td", { class: "num" }, fmtBytes(w.bytes_on_disk)));
      tr.appendChild(el("td", { class: "num" }, fmtBytes(w.bytes_fetched)));
      tr.appendChild(el("td", { class: "num" }, fmtBytes(w.bytes_served)));
      tr.appendChild(el("td", { class: "num" + (w.restarts ? " restarted" : ""), "data-field": "restarts" }, fmtInt(w.restarts)));
      const stale = w.last_seen_age > state.heartbeatTimeout / 2;
      tr.appendChild(el("td", { class: "num" + (stale ? " stale" : "") }, fmtAge(w.last_seen_age)));
      rows.push(tr);
    }
    if (!rows.length) {
      const tr = el("tr", { class: "empty" });
      tr.appendChild(el("td", { colspan: "16" }, "No workers registered"));
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    renderPlacement(data.workers);
  }

  function bar(parts, total) {
    const node = el("div", { class: "bar" });
    for (const [cls, n, label] of parts) {
      if (!n || !total) continue;
      const span = el("span", { class: cls, title: label });
      span.style.width = (100 * n / total).toFixed(2) + "%";
      node.appendChild(span);
    }
    return node;
  }

  // A worker's process memory against its limit (no limit: against the most any worker uses).
  function memoryCell(w) {
    const td = el("td", { "data-field": "memory" });
    const limit = w.memory_limit || 0;
    const scale = limit || Math.max(1, ...state.workers.map(x => x.memory || 0));
    const high = limit && w.memory > 0.7 * limit;
    td.appendChild(bar([[high ? "memory high" : "memory", Math.min(w.memory || 0, scale), fmtBytes(w.memory)]], scale));
    td.appendChild(document.createTextNode(fmtBytes(w.memory) + " / " + (limit ? fmtBytes(limit) : "no limit")));
    if (w.status && w.status !== "running") td.appendChild(el("span", { class: "restarted" }, " " + w.status));
    return td;
  }

  function renderPlacement(workers) {
    const box = document.getElementById("placement");
    const most = Math.max(1, ...workers.map(w => (w.nbytes || 0)));
    const rows = workers.filter(w => w.nkeys || w.nbytes).map(w => {
      const row = el("div", { class: "group", "data-address": w.address });
      row.appendChild(el("div", { class: "name", title: w.address }, w.name === w.address ? w.address : w.name));
      const disk = Math.min(w.bytes_on_disk || 0, w.nbytes || 0);
      row.appendChild(bar([["done", (w.nbytes || 0) - disk, "in memory"], ["disk", disk, "on disk"]], most));
      row.appendChild(el("div", { class: "counts" }, fmtInt(w.nkeys) + " keys · " + fmtBytes(w.nbytes) + (disk ? " (" + fmtBytes(disk) + " on disk)" : "")));
      return row;
    });
    if (!rows.length) rows.push(el("div", { class: "empty-note" }, "No data held"));
    box.replaceChildren(...rows);
  }

  // ------------------------------------------------------------ task groups and transfers

  function renderActivity(data) {
    const box = document.getElementById("groups");
    const groups = data.groups.slice(0, 20);
    const rows = groups.map(g => {
      const row = el("div", { class: "group", "data-group": g.group, "data-done": String(g.done), "data-total": String(g.total),
                              "data-executing": String(g.executing), "data-queued": String(g.queued + (g.waiting || 0)), "data-erred": String(g.erred) });
      row.appendChild(el("div", { class: "name", title: g.group }, g.label));
      row.appendChild(bar([["done", g.done, "done"], ["erred", g.erred, "erred"], ["executing", g.executing, "executing"], ["queued", g.queued, "queued"], ["waiting", g.waiting, "not yet sent"]], g.total));
      let text = fmtInt(g.done) + " / " + fmtInt(g.total) + " done";
      if (g.executing) text += " · " + fmtInt(g.executing) + " executing";
      if (g.queued || g.waiting) text += " · " + fmtInt(g.queued + (g.waiting || 0)) + " queued";
      if (g.erred) text += " · " + fmtInt(g.erred) + " erred";
      row.appendChild(el("div", { class: "counts" }, text));
      return row;
    });
    if (!rows.length) rows.push(el("div", { class: "empty-note" }, "No tasks yet"));
    box.replaceChildren(...rows);

    const queued = (state.workerQueued || 0) + data.waiting;
    setCard("total-queued", queued, fmtInt(queued));
    setCard("total-moved", data.bytes_moved, fmtBytes(data.bytes_moved));
    const tbody = document.querySelector("#transfers tbody");
    const trs = data.transfers.slice(0, 20).map(t => {
      const tr = el("tr");
      tr.appendChild(el("td", { title: t.from }, t.from_name));
      tr.appendChild(el("td", { title: t.to }, t.to_name));
      tr.appendChild(el("td", { class: "num" }, fmtBytes(t.bytes)));
      return tr;
    });
    if (!trs.length) {
      const tr = el("tr", { class: "empty" });
      tr.appendChild(el("td", { colspan: "3" }, "No transfers yet"));
      trs.push(tr);
    }
    tbody.replaceChildren(...trs);
  }

  // ------------------------------------------------------------ tasks per second

  function plotWidth() {
    return Math.max(300, document.getElementById("rate-plot").clientWidth);
  }

  function renderRates(data) {
    const running = data.running.map(v => (v === null || v === undefined ? null : v));
    const series = [data.times, data.done_per_s, running];
    if (!state.plot) {
      const opts = {
        width: plotWidth(),
        height: 240,
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true }, rate: { auto: true, range: (u, min, max) => [0, Math.max(1, max * 1.1)] },
                  run: { auto: true, range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
        axes: [
          { stroke: "#6b7385", grid: { stroke: "#eef0f4" } },
          { scale: "rate", label: "done / s", stroke: "#2f6fde", grid: { stroke: "#eef0f4" }, size: 60 },
          { scale: "run", side: 1, label: "executing", stroke: "#e8833a", grid: { show: false }, size: 60 },
        ],
        series: [
          {},
          { label: "done / s", scale: "rate", stroke: "#2f6fde", width: 2, fill: "rgba(47,111,222,0.12)", value: (u, v) => v === null ? "–" : fmtRate(v) },
          { label: "executing", scale: "run", stroke: "#e8833a", width: 1.5, value: (u, v) => v === null ? "–" : fmtInt(v) },
        ],
      };
      state.plot = new uPlot(opts, series, document.getElementById("rate-plot"));
    } else {
      state.plot.setData(series);
    }
  }

  // ------------------------------------------------------------ task stream

  function addTasks(data) {
    if (data.tasks.length) {
      state.tasks.push(...data.tasks);
      if (state.tasks.length > STREAM_KEEP) state.tasks.splice(0, state.tasks.length - STREAM_KEEP);
    }
    state.seq = data.seq;
    const horizon = serverNow() - STREAM_WINDOW - 5;
    let drop = 0;
    while (drop < state.tasks.length && state.tasks[drop].stop < horizon) drop++;
    if (drop) state.tasks.splice(0, drop);
  }

  const streamGeom = { rows: [], left: 150, top: 4, rowH: 0, width: 0, height: 0, t0: 0, t1: 0, boxes: [] };

  function drawStream() {
    const canvas = document.getElementById("stream");
    const dpr = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth, cssH = canvas.clientHeight;
    if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
      canvas.width = Math.round(cssW * dpr);
      canvas.height = Math.round(cssH * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);

    const workers = state.workers.map(w => w.address);
    for (const t of state.tasks) if (!workers.includes(t.worker)) workers.push(t.worker);
    const names = new Map(state.workers.map(w => [w.address, w.name]));
    for (const t of state.tasks) if (!names.has(t.worker)) names.set(t.worker, t.name);

    const left = 150, right = 8, top = 4, bottom = 22;
    const plotW = Math.max(10, cssW - left - right);
    const plotH = Math.max(10, cssH - top - bottom);
    const rowH = workers.length ? Math.min(40, plotH / workers.length) : plotH;
    const t1 = serverNow(), t0 = t1 - STREAM_WINDOW;
    const x = t => left + ((t - t0) / STREAM_WINDOW) * plotW;
    Object.assign(streamGeom, { left, top, rowH, t0, t1, rows: workers, boxes: [] });

    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    // Rows.
    workers.forEach((address, i) => {
      const y = top + i * rowH;
      ctx.fillStyle = i % 2 ? "#fafbfc" : "#f3f5f8";
      ctx.fillRect(left, y, plotW, rowH);
      ctx.fillStyle = "#1d2330";
      let label = names.get(address) || address;
      if (label !== address) label = label + "";
      while (ctx.measureText(label).width > left - 12 && label.length > 4) label = label.slice(0, -2) + "…";
      ctx.fillText(label, 4, y + rowH / 2);
    });
    // Time ticks.
    ctx.fillStyle = "#6b7385";
    ctx.strokeStyle = "#e3e6ec";
    ctx.textAlign = "center";
    for (let s = 0; s <= STREAM_WINDOW; s += 10) {
      const xx = x(t0 + s);
      ctx.beginPath(); ctx.moveTo(xx, top); ctx.lineTo(xx, top + plotH); ctx.stroke();
      ctx.fillText(s === STREAM_WINDOW ? "now" : "-" + (STREAM_WINDOW - s) + " s", Math.min(Math.max(xx, left + 12), cssW - 14), top + plotH + 11);
    }
    ctx.textAlign = "left";
    // Tasks.
    const rowOf = new Map(workers.map((w, i) => [w, i]));
    for (const t of state.tasks) {
      if (t.stop < t0) continue;
      const i = rowOf.get(t.worker);
      const x0 = Math.max(left, x(t.start)), x1 = Math.min(left + plotW, x(t.stop));
      const w = x1 - x0 > 3 ? x1 - x0 - 1 : Math.max(1, x1 - x0); // a hairline between neighbours
      const y = top + i * rowH + 2, h = Math.max(2, rowH - 4);
      ctx.fillStyle = t.ok ? colorOf(t.group) : "#d64545";
      ctx.fillRect(x0, y, w, h);
      streamGeom.boxes.push([x0, y, w, h, t]);
    }
    if (!state.tasks.length) {
      ctx.fillStyle = "#6b7385";
      ctx.textAlign = "center";
      ctx.fillText("no tasks in the last minute", left + plotW / 2, top + plotH / 2);
      ctx.textAlign = "left";
    }
    drawLegend();
  }

  function drawLegend() {
    const counts = new Map();
    for (const t of state.tasks) counts.set(t.group, (counts.get(t.group) || 0) + 1);
    const legend = document.getElementById("stream-legend");
    const items = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 12).map(([group, n]) => {
      const span = el("span");
      const sw = el("span", { class: "swatch" });
      sw.style.background = colorOf(group);
      span.appendChild(sw);
      span.appendChild(document.createTextNode(group + " (" + fmtInt(n) + ")"));
      return span;
    });
    legend.replaceChildren(...items);
  }

  function onStreamHover(ev) {
    const canvas = document.getElementById("stream");
    const tip = document.getElementById("stream-tip");
    const rect = canvas.getBoundingClientRect();
    const mx = ev.clientX - rect.left, my = ev.clientY - rect.top;
    let hit = null;
    for (let i = streamGeom.boxes.length - 1; i >= 0; i--) {
      const [x0, y0, w, h, t] = streamGeom.boxes[i];
      if (mx >= x0 - 1 && mx <= x0 + w + 1 && my >= y0 && my <= y0 + h) { hit = t; break; }
    }
    if (!hit) { tip.hidden = true; return; }
    tip.textContent = hit.key + " · " + hit.name + " · " + fmtDuration(hit.duration) + (hit.ok ? "" : " · failed");
    tip.hidden = false;
    tip.style.left = Math.min(mx + 12, rect.width - tip.offsetWidth - 4) + "px";
    tip.style.top = (my + 14) + "px";
  }

  function renderRecent() {
    const tbody = document.querySelector("#recent tbody");
    const recent = state.tasks.slice(-200).sort((a, b) => b.stop - a.stop).slice(0, 15);
    const rows = recent.map(t => {
      const tr = el("tr");
      tr.appendChild(el("td", null, fmtClock(t.stop)));
      tr.appendChild(el("td", null, t.name));
      const key = el("td", { class: "key", title: t.key });
      key.appendChild(el("code", null, t.key));
      tr.appendChild(key);
      tr.appendChild(el("td", { class: "num" }, fmtDuration(t.duration)));
      tr.appendChild(el("td", { class: t.ok ? "ok" : "failed" }, t.ok ? "ok" : "failed"));
      return tr;
    });
    if (!rows.length) {
      const tr = el("tr", { class: "empty" });
      tr.appendChild(el("td", { colspan: "5" }, "No tasks in the last minute"));
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  // ------------------------------------------------------------ polling

  function setLive(ok, message) {
    const dot = document.getElementById("live-dot");
    dot.className = "dot " + (ok ? "live" : "down");
    document.getElementById("live-text").textContent = message;
  }

  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store" });
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  async function tick() {
    try {
      const streamPath = "/api/task-stream" + (state.seq === null ? "?limit=2000" : "?after=" + state.seq);
      const [workers, tasks, stream, activity] = await Promise.all([
        getJSON("/api/workers"), getJSON("/api/tasks?window=300"), getJSON(streamPath), getJSON("/api/activity")]);
      state.clockOffset = workers.time - Date.now() / 1000;
      renderWorkers(workers);
      renderActivity(activity);
      renderRates(tasks);
      addTasks(stream);
      drawStream();
      renderRecent();
      setLive(true, "live · " + fmtClock(workers.time).slice(0, 8));
    } catch (err) {
      setLive(false, "no answer from the Center (" + err.message + ")");
    } finally {
      setTimeout(tick, POLL_MS);
    }
  }

  window.addEventListener("resize", () => {
    if (state.plot) state.plot.setSize({ width: plotWidth(), height: 240 });
    drawStream();
  });
  document.getElementById("stream").addEventListener("mousemove", onStreamHover);
  document.getElementById("stream").addEventListener("mouseleave", () => { document.getElementById("stream-tip").hidden = true; });
  tick();
})();
