// The chart on the pack's training nodes: loss per step (raw and smoothed) and the learning rate, with step / total,
// it/s and time left. It updates live from the "finetune.progress" events (at most a few per second, each carrying
// every step since the previous one), and it is kept: the node's ui output carries the run's loss history, which is
// stored in the node's properties, so the chart comes back after a reload, in a reopened workflow and from the queue
// history. After a reload during a run, the steps before it are read back from the run's log.jsonl.
// With keep_best, each save point's score ("finetune.score" events, kept with the history) is drawn as a dot on its
// own scale, and the best step (the checkpoint that becomes the result) is marked.
// The chart is a DOM widget: it has its own place among the widgets, and ComfyUI draws previews below it. Its canvas
// is drawn at the size it is shown at (times devicePixelRatio): the classic canvas gives it a fixed row, Nodes 2.0
// stretches it to the node's free height.
// The advanced loop options (the inputs the schema marks "advanced") are folded away. Where the front end folds them
// itself (Nodes 2.0 on front ends whose widgets carry visibility.surfaces: its "Show advanced inputs" button at the
// node's foot), the pack leaves it to the front end. Elsewhere (the classic canvas, whose layout keeps a row for an
// advanced input even while it is not drawn; the older front ends' Nodes 2.0, which shows them all) the pack's own
// button shows or hides them.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MAX_POINTS = 2000; // live points kept per node (thinned evenly beyond)
const KEPT_POINTS = 400; // points stored in the workflow (the ui output already holds at most this many)
const HEIGHT = 150; // the chart's height on the canvas (CSS pixels)
const ROW_MARGIN = 20; // what a DOM widget's row adds around its element on the canvas
const SMOOTH = 0.9; // exponential smoothing of the loss line
const stats = { events: 0, points: 0, draws: 0, restored: 0, backfilled: 0, scores: 0 };
window.finetuneChartStats = stats; // read by the browser test

function isTrainer(name) {
  return name.startsWith("FT_Train");
}

function thin(points, limit) {
  if (points.length <= limit) return points;
  const out = [];
  for (let i = 0; i < limit; i++) out.push(points[Math.round((i * (points.length - 1)) / (limit - 1))]);
  return out;
}

function fmtTime(s) {
  if (!isFinite(s) || s < 0) return "?";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function fmtNum(v) {
  if (v == null || !isFinite(v)) return "?";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toFixed(4);
}

function chartOf(node) {
  if (!node.__ftChart) {
    node.__ftChart = { run: null, total: 0, points: [], scores: [], best: null, last: null, pending: false };
  }
  return node.__ftChart;
}

function draw(node) {
  const st = chartOf(node);
  st.pending = false;
  const canvas = node.__ftCanvas;
  if (!canvas) return;
  // the size the canvas is shown at (CSS pixels); the backing store follows it, so nothing is stretched
  const w = Math.max(100, canvas.clientWidth || node.size[0] - 20);
  const h = Math.max(60, canvas.clientHeight || HEIGHT);
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  const pts = st.points;
  if (!pts.length) {
    ctx.fillStyle = "#999";
    ctx.fillText("loss chart: queue the workflow to train", 8, 16);
    return;
  }
  stats.draws++;
  const top = 20, bottom = h - 14, left = 6, right = w - 6;
  const s0 = pts[0][0], s1 = Math.max(pts[pts.length - 1][0], st.total || 0, s0 + 1);
  let lo = Infinity, hi = -Infinity, lrHi = 0;
  for (const p of pts) {
    if (isFinite(p[1])) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); }
    lrHi = Math.max(lrHi, p[2] || 0);
  }
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-12) hi = lo + 1e-6;
  const X = (s) => left + ((s - s0) / (s1 - s0 || 1)) * (right - left);
  const Y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  // learning rate: dashed, scaled to its own maximum
  if (lrHi > 0) {
    ctx.strokeStyle = "rgba(255,200,90,0.7)";
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    pts.forEach((p, i) => {
      const y = bottom - ((p[2] || 0) / lrHi) * (bottom - top);
      i ? ctx.lineTo(X(p[0]), y) : ctx.moveTo(X(p[0]), y);
    });
    ctx.stroke();
    ctx.setLineDash([]);
  }
  // raw loss: thin and faint
  ctx.strokeStyle = "rgba(127,176,255,0.45)";
  ctx.lineWidth = 1;
  ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
  ctx.stroke();
  // smoothed loss (debiased exponential average)
  ctx.strokeStyle = "#7fb0ff";
  ctx.lineWidth = 2;
  ctx.beginPath();
  let avg = 0;
  pts.forEach((p, i) => {
    avg = SMOOTH * avg + (1 - SMOOTH) * p[1];
    const y = Y(avg / (1 - Math.pow(SMOOTH, i + 1)));
    i ? ctx.lineTo(X(p[0]), y) : ctx.moveTo(X(p[0]), y);
  });
  ctx.stroke();
  ctx.lineWidth = 1;
  // keep_best: each save point's score on its own scale, the best step ringed and marked with a line
  const sc = st.scores.filter((p) => isFinite(p[1]));
  if (sc.length) {
    let sLo = Math.min(...sc.map((p) => p[1])), sHi = Math.max(...sc.map((p) => p[1]));
    if (sHi - sLo < 1e-9) { sLo -= 0.01; sHi += 0.01; }
    const SY = (v) => bottom - 6 - ((v - sLo) / (sHi - sLo)) * (bottom - top - 22); // below the scale's label
    ctx.strokeStyle = "rgba(120,220,140,0.8)";
    ctx.fillStyle = "rgb(120,220,140)";
    ctx.beginPath();
    sc.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), SY(p[1])) : ctx.moveTo(X(p[0]), SY(p[1]))));
    ctx.stroke();
    for (const p of sc) {
      ctx.beginPath();
      ctx.arc(X(p[0]), SY(p[1]), 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
    const best = sc.find((p) => p[0] === st.best);
    if (best) {
      ctx.setLineDash([2, 3]);
      ctx.beginPath();
      ctx.moveTo(X(best[0]), top);
      ctx.lineTo(X(best[0]), bottom);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(X(best[0]), SY(best[1]), 5, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.lineWidth = 1;
      const label = `best: step ${best[0]}`;
      const lw = ctx.measureText(label).width;
      const ly = SY(best[1]) + (SY(best[1]) + 18 < bottom ? 16 : -8);
      ctx.fillText(label, X(best[0]) + 8 + lw > right ? X(best[0]) - 8 - lw : X(best[0]) + 8, ly);
    }
    const t = `keep_best score ${fmtNum(sLo)}-${fmtNum(sHi)}`;
    ctx.fillText(t, (left + right) / 2 - ctx.measureText(t).width / 2, top + 10);
  }
  // text: run, step / total, loss, speed, time left; axis ends
  const last = pts[pts.length - 1];
  const d = st.last;
  let head = `${st.run ?? ""}  step ${last[0]}/${st.total || "?"}  loss ${fmtNum(last[1])}`;
  if (d && d.step < d.total) head += `  ${d.it_per_s} it/s  ${fmtTime(d.eta_s)} left`;
  else if (st.seconds) head += `  done in ${fmtTime(st.seconds)}`;
  ctx.fillStyle = "#ddd";
  ctx.fillText(head, 8, 14);
  ctx.fillStyle = "#999";
  ctx.fillText(`${fmtNum(hi)}`, left + 2, top + 10);
  ctx.fillText(`${fmtNum(lo)}`, left + 2, bottom - 2);
  ctx.fillText("loss (raw, smoothed)", left + 2, h - 2);
  if (lrHi > 0) {
    ctx.fillStyle = "rgba(255,200,90,0.9)";
    const t = `lr (max ${fmtNum(lrHi)})`;
    ctx.fillText(t, right - ctx.measureText(t).width - 2, h - 2);
  }
}

function schedule(node) {
  const st = chartOf(node);
  if (st.pending) return;
  st.pending = true;
  requestAnimationFrame(() => draw(node));
}

function keep(node) {
  const st = chartOf(node);
  node.properties = node.properties || {};
  node.properties.ft_chart = { run: st.run, total: st.total, seconds: st.seconds ?? null,
                               points: thin(st.points, KEPT_POINTS), scores: st.scores, best_step: st.best };
  // tell the front end the workflow changed, so the browser's copy (restored on reload) holds the chart
  // (captureCanvasState where the front end has it: checkState is its deprecated name)
  const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
  if (typeof tracker?.captureCanvasState === "function") tracker.captureCanvasState();
  else tracker?.checkState?.();
}

function restore(node, saved) {
  if (!saved || !Array.isArray(saved.points)) return;
  const st = chartOf(node);
  st.run = saved.run ?? null;
  st.total = saved.total ?? 0;
  st.seconds = saved.seconds ?? null;
  st.points = saved.points.filter((p) => Array.isArray(p) && p.length >= 2).map((p) => [+p[0], +p[1], +(p[2] ?? 0)]);
  st.scores = (Array.isArray(saved.scores) ? saved.scores : []).filter((p) => Array.isArray(p) && p.length >= 2)
    .map((p) => [+p[0], +p[1], p[2] ?? null, p[3] ?? null]);
  st.best = saved.best_step ?? null;
  st.last = null;
  schedule(node);
}

async function backfill(node, run, before) {
  // a run that was already going when the page was (re)loaded: its earlier steps come from its log.jsonl
  try {
    const res = await api.fetchApi(`/finetune/runs/${encodeURIComponent(run)}/log.jsonl`);
    if (!res.ok) return;
    const rows = (await res.text()).split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
    const st = chartOf(node);
    if (st.run !== run) return;
    const older = rows.filter((r) => r.step < before).map((r) => [r.step, r.loss, r.lr ?? 0]);
    st.points = thin(older.concat(st.points.filter((p) => p[0] >= before)), MAX_POINTS);
    const scored = rows.filter((r) => r.step < before && r.score != null)
      .map((r) => [r.step, r.score, r.clip_t ?? null, r.clip_i ?? null]);
    st.scores = scored.concat(st.scores.filter((p) => p[0] >= before));
    if (st.best == null && scored.length) st.best = scored.reduce((a, b) => (b[1] > a[1] ? b : a))[0];
    stats.backfilled++;
    schedule(node);
  } catch (e) {
    console.debug("finetune: no log to backfill the chart from", e);
  }
}

// The chart's row: a box that takes the row's height (a fixed row on the canvas, the node's free height in Nodes 2.0),
// with the canvas laid over it, so the canvas's own size never feeds back into the layout.
function addChart(node) {
  const box = document.createElement("div");
  box.className = "ft-loss-chart-box";
  box.style.cssText = `position: relative; width: 100%; height: 100%; min-height: ${HEIGHT}px; overflow: hidden;`;
  const canvas = document.createElement("canvas");
  canvas.className = "ft-loss-chart";
  canvas.style.cssText = "position: absolute; inset: 0; width: 100%; height: 100%; display: block;";
  box.append(canvas);
  node.__ftCanvas = canvas;
  const widget = node.addDOMWidget("ft_chart", "ft_chart", box, {
    serialize: false, getMinHeight: () => HEIGHT + ROW_MARGIN, getMaxHeight: () => HEIGHT + ROW_MARGIN,
  });
  widget.serialize = false;
  if (typeof ResizeObserver === "function") {
    let seen = "";
    new ResizeObserver(() => { // redraw at the new size (a resized node, Nodes 2.0 switched on or off)
      const size = `${canvas.clientWidth}x${canvas.clientHeight}x${window.devicePixelRatio || 1}`;
      if (size !== seen) (seen = size, schedule(node));
    }).observe(box);
  }
  addAdvancedFold(node);
  schedule(node);
}

function vueNodes() {
  return !!window.LiteGraph?.vueNodesMode;
}

// whether the front end itself folds this "advanced" input in Nodes 2.0 (vue) or on the canvas
function frontEndFolds(widget, vue) {
  const surfaces = widget.visibility?.surfaces;
  return !!surfaces && surfaces[vue ? "vueNode" : "canvas"] === "advanced";
}

function setHidden(widget, hidden) {
  widget.hidden = hidden; // the canvas
  if (widget.options) widget.options.hidden = hidden; // the older front ends' Nodes 2.0 read it here
}

function addAdvancedFold(node) {
  const advanced = (node.widgets ?? []).filter((w) => w.options?.advanced);
  if (!advanced.length) return;
  // folded: hidden widgets take no room and keep their values (saved and queued)
  const shown = () => !!node.properties?.ft_show_advanced;
  const label = () => `${shown() ? "Hide" : "Show"} advanced options (${advanced.length})`;
  const advancedHeight = () => advanced.reduce((sum, w) => sum + (w.computedHeight || 24), 0);
  const button = node.addWidget("button", "ft_advanced", null, () => {
    node.properties = node.properties || {};
    node.properties.ft_show_advanced = !shown();
    apply(true);
  }, { serialize: false });
  button.serialize = false;
  let tier = false; // whether the pack marked them "advanced" on the canvas surface (below)
  // vue: whether the node is (about to be) drawn by Nodes 2.0
  const apply = (resize, vue = vueNodes()) => {
    if (tier) for (const w of advanced) w.advanced = false; // undo it before asking who folds them now
    tier = false;
    if (frontEndFolds(advanced[0], vue)) {
      // the front end's own toggle shows them: nothing of the pack's in the way
      for (const w of advanced) setHidden(w, false);
      setHidden(button, true);
      if (vue) {
        // the front end sizes a Nodes 2.0 node by its canvas rows too (and grows it to that on load): while they are
        // folded, the canvas tier keeps them out of that size, so the node does not grow over its neighbours
        for (const w of advanced) w.advanced = true;
        tier = true;
      }
      node.setDirtyCanvas(true, true);
      return;
    }
    for (const w of advanced) setHidden(w, !shown());
    setHidden(button, false);
    button.label = label();
    if (resize && !vue) { // showing grows the node by the folded widgets' height; hiding gives it back
      const before = node.size[1];
      const h = node.computeSize()[1];
      node.setSize([node.size[0], shown() ? Math.max(h, before) : Math.max(h, before - advancedHeight())]);
    }
    node.setDirtyCanvas(true, true);
  };
  node.__ftAdvanced = apply;
  apply(false);
}

function nodeFor(detail) {
  if (!detail || detail.node == null) return null;
  const id = String(detail.node).split(":").pop();
  return app.graph?.getNodeById(Number(id)) ?? app.graph?.getNodeById(id) ?? null;
}

function onProgress({ detail }) {
  const node = nodeFor(detail);
  if (!node || !node.__ftCanvas) return;
  stats.events++;
  const st = chartOf(node);
  const points = Array.isArray(detail.points) && detail.points.length ? detail.points
    : [[detail.step, detail.loss, detail.lr]];
  if (st.run !== detail.run || (st.points.length && points[0][0] <= st.points[0][0])) {
    // a new run on this node (or the same run restarted): start over, and fetch what came before this event
    st.run = detail.run;
    st.points = [];
    st.scores = [];
    st.best = null;
    st.seconds = null;
    if (points[0][0] > 1) backfill(node, detail.run, points[0][0]);
  }
  st.total = detail.total;
  st.last = detail;
  for (const p of points) st.points.push([+p[0], +p[1], +(p[2] ?? 0)]);
  stats.points += points.length;
  if (st.points.length > MAX_POINTS) st.points = thin(st.points, MAX_POINTS / 2);
  schedule(node);
}

function onScore({ detail }) {
  const node = nodeFor(detail);
  if (!node || !node.__ftCanvas) return;
  const st = chartOf(node);
  if (st.run !== detail.run) return; // the step's progress event came first and set the run
  stats.scores++;
  st.scores = st.scores.filter((p) => p[0] !== detail.step);
  st.scores.push([+detail.step, +detail.score, detail.clip_t ?? null, detail.clip_i ?? null]);
  st.best = detail.best_step ?? st.best;
  schedule(node);
}

app.registerExtension({
  name: "finetune.lossChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isTrainer(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      addChart(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const r = onConfigure?.apply(this, arguments);
      restore(this, info?.properties?.ft_chart);
      if (info?.properties?.ft_chart) stats.restored++;
      this.__ftAdvanced?.(false);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const kept = message?.finetune_chart?.[0];
      if (kept) {
        restore(this, kept);
        keep(this);
      }
      return r;
    };
  },
  setup() {
    api.addEventListener("finetune.progress", onProgress);
    api.addEventListener("finetune.score", onScore);
    // Nodes 2.0 switched on or off: who folds the advanced options may change. Told before the front end redraws the
    // nodes (so it sizes them with the right rows), and once more after it has switched.
    app.ui?.settings?.addEventListener?.("Comfy.VueNodes.Enabled.change", (e) => {
      const nodes = () => app.graph?.nodes ?? app.graph?._nodes ?? [];
      for (const node of nodes()) node.__ftAdvanced?.(false, !!e.detail?.value);
      setTimeout(() => { for (const node of nodes()) node.__ftAdvanced?.(false); }, 50);
    });
  },
});
