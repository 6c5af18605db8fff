// Live loss chart on the pack's training nodes, fed by the "finetune.progress" events the server pushes
// while a run trains ({node, run, step, total, loss, lr, it_per_s}). Nothing is stored: a reload starts empty.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MAX_POINTS = 2000;
const CHART_HEIGHT = 90;

function ensureChart(node) {
  if (!node.__ftLoss) node.__ftLoss = { run: null, points: [], last: null };
  return node.__ftLoss;
}

function drawChart(node, ctx) {
  const state = node.__ftLoss;
  if (!state || !state.points.length) return;
  const w = node.size[0] - 20;
  const y0 = node.size[1] - CHART_HEIGHT - 8;
  const pts = state.points;
  let lo = Infinity, hi = -Infinity;
  for (const p of pts) { lo = Math.min(lo, p); hi = Math.max(hi, p); }
  if (hi - lo < 1e-12) { hi = lo + 1; }
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(10, y0, w, CHART_HEIGHT);
  ctx.strokeStyle = "#7fb0ff";
  ctx.lineWidth = 1;
  ctx.beginPath();
  pts.forEach((p, i) => {
    const x = 10 + (pts.length === 1 ? w / 2 : (i / (pts.length - 1)) * w);
    const y = y0 + CHART_HEIGHT - ((p - lo) / (hi - lo)) * (CHART_HEIGHT - 14) - 4;
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  const d = state.last;
  ctx.fillStyle = "#ddd";
  ctx.font = "11px sans-serif";
  ctx.fillText(`${d.run}  step ${d.step}/${d.total}  loss ${d.loss.toFixed(4)}  ${d.it_per_s} it/s`, 14, y0 + 12);
  ctx.restore();
}

app.registerExtension({
  name: "finetune.lossChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("FT_Train")) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) drawChart(this, ctx);
      return r;
    };
  },
  setup() {
    const onProgress = ({ detail }) => {
      if (!detail || detail.node == null) return;
      const id = String(detail.node).split(":").pop();
      const node = app.graph?.getNodeById(Number(id)) ?? app.graph?.getNodeById(id);
      if (!node) return;
      const state = ensureChart(node);
      if (state.run !== detail.run) { state.run = detail.run; state.points = []; }
      state.points.push(detail.loss);
      if (state.points.length > MAX_POINTS) state.points.splice(0, state.points.length - MAX_POINTS);
      state.last = detail;
      if (node.size[1] < CHART_HEIGHT + 200) node.setSize([node.size[0], node.size[1] + CHART_HEIGHT + 16]);
      node.setDirtyCanvas(true, false);
    };
    api.addEventListener("finetune.progress", onProgress);
  },
});
