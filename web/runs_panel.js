// The "Fine-tune runs" sidebar tab: every run under output/finetune/, newest first, with its status (running /
// finished / cancelled / failed with the error), steps, final loss, loss curve, latest validation pictures and
// config, and two actions: copy the config as JSON, and load a workflow that resumes the run. Everything comes from
// the pack's read-only routes (GET /finetune/runs, /finetune/runs/<run>/<file>, /finetune/runs/<run>/resume_workflow;
// nodes/routes.py). While the tab is open the list refreshes every few seconds when a run is running, and at once
// when a run starts or writes its validation pictures ("finetune.preview": the pack listens to every event it sends,
// so the front end never warns of an unknown message type).
// Every text that comes from a file goes in through textContent, never as HTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const FAST_MS = 3000; // refresh while a run is running
const SLOW_MS = 20000; // refresh otherwise
const STALE_S = 180; // a "running" run that has written nothing for this long may have been killed
const METHODS = { lora: "LoRA", textual_inversion: "Textual Inversion", dreambooth: "DreamBooth", controlnet: "ControlNet" };
const state = { fetches: 0, runs: [], error: null, renders: 0, copied: null, loaded: null, mounted: false };
window.finetuneRunsPanel = state; // read by the browser test

const CSS = `
.ft-runs-panel { display: flex; flex-direction: column; gap: 8px; padding: 8px; height: 100%; overflow-y: auto;
  box-sizing: border-box; font-size: 13px; }
.ft-runs-header { display: flex; align-items: center; gap: 8px; }
.ft-runs-title { font-weight: 600; flex: 1; }
.ft-runs-state { opacity: 0.7; font-size: 12px; }
.ft-runs-empty { opacity: 0.7; }
.ft-run { border: 1px solid rgba(128,128,128,0.35); border-radius: 6px; padding: 8px; display: flex;
  flex-direction: column; gap: 4px; }
.ft-run-head { display: flex; align-items: baseline; gap: 8px; }
.ft-run-name { font-weight: 600; flex: 1; overflow-wrap: anywhere; }
.ft-run-status { font-size: 11px; padding: 1px 6px; border-radius: 8px; border: 1px solid currentColor; }
.ft-status-running { color: #3b9ae1; } .ft-status-finished { color: #3fae5a; }
.ft-status-cancelled { color: #d89b28; } .ft-status-failed { color: #e0504c; } .ft-status-unknown { opacity: 0.6; }
.ft-run-meta, .ft-run-times { font-size: 12px; opacity: 0.85; overflow-wrap: anywhere; }
.ft-run-error { color: #e0504c; font-size: 12px; white-space: pre-wrap; overflow-wrap: anywhere; }
.ft-run-curve { width: 100%; height: 60px; display: block; }
.ft-run-samples { display: flex; gap: 4px; flex-wrap: wrap; }
.ft-run-sample { width: 64px; height: 64px; object-fit: contain; image-rendering: pixelated;
  border: 1px solid rgba(128,128,128,0.35); border-radius: 3px; }
.ft-run-sounds { display: flex; flex-direction: column; gap: 2px; }
.ft-run-sound { width: 100%; height: 28px; }
.ft-run-actions { display: flex; gap: 6px; flex-wrap: wrap; }
.ft-run-actions button, .ft-runs-refresh { font-size: 12px; padding: 2px 8px; cursor: pointer; border-radius: 4px;
  border: 1px solid rgba(128,128,128,0.5); background: transparent; color: inherit; }
.ft-run-message { font-size: 12px; white-space: pre-wrap; overflow-wrap: anywhere; }
.ft-run-message code { user-select: all; }
.ft-run-config { font-size: 11px; max-height: 240px; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere;
  margin: 0; padding: 4px; background: rgba(128,128,128,0.12); border-radius: 4px; }
`;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = String(text);
  return e;
}

function runURL(run, path) {
  const parts = [encodeURIComponent(run), ...String(path).split("/").map(encodeURIComponent)];
  return `/finetune/runs/${parts.join("/")}`;
}

function fmtLoss(v) {
  if (v == null || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(3) : v.toFixed(4);
}

function ago(t) {
  if (!t) return "?";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return new Date(t * 1000).toLocaleString();
}

function drawCurve(canvas, points) {
  canvas.dataset.points = String(points.length);
  canvas.hidden = points.length < 2;
  const w = Math.max(100, canvas.clientWidth || 240), h = 60, dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  if (points.length < 2) return;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const X = (x) => 2 + ((x - x0) / Math.max(x1 - x0, 1e-12)) * (w - 4);
  const Y = (y) => h - 3 - ((y - y0) / Math.max(y1 - y0, 1e-12)) * (h - 6);
  ctx.strokeStyle = "#3b9ae1";
  ctx.lineWidth = 1.25;
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
  ctx.stroke();
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (e) {
    const ta = el("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.appendChild(ta);
    ta.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch (e2) {
      ok = false;
    }
    ta.remove();
    return ok;
  }
}

async function getJSON(path) {
  const res = await api.fetchApi(path);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `${res.status} ${res.statusText}`);
  return body;
}

function say(card, text, kind) {
  const box = card.querySelector(".ft-run-message");
  box.replaceChildren();
  box.dataset.kind = kind || "info";
  if (Array.isArray(text)) text.forEach((t) => box.append(typeof t === "string" ? document.createTextNode(t) : t));
  else box.textContent = text;
}

async function copyConfig(card, run) {
  try {
    const cfg = await getJSON(runURL(run, "config.json"));
    const text = JSON.stringify(cfg, null, 1);
    state.copied = text;
    const ok = await copyText(text);
    say(card, ok ? "Config copied as JSON." : "Could not copy to the clipboard; the config is shown below.");
    if (!ok) showConfig(card, run, text);
  } catch (e) {
    say(card, `Could not read config.json: ${e.message}`, "error");
  }
}

async function showConfig(card, run, text) {
  const pre = card.querySelector(".ft-run-config");
  if (!pre.hidden && text == null) {
    pre.hidden = true;
    return;
  }
  try {
    pre.textContent = text ?? JSON.stringify(await getJSON(runURL(run, "config.json")), null, 1);
    pre.hidden = false;
  } catch (e) {
    say(card, `Could not read config.json: ${e.message}`, "error");
  }
}

async function resume(card, run) {
  try {
    const wf = await getJSON(runURL(run, "resume_workflow"));
    if (wf.prompt) {
      await app.loadApiJson(wf.prompt, wf.name);
      state.loaded = { run, name: wf.name, nodes: Object.keys(wf.prompt).length };
      say(card, `Loaded "${wf.name}": raise steps on the training node to train further, then queue it.`);
    } else {
      say(card, [`No workflow can resume this run exactly: ${wf.reason}. From a shell in ComfyUI's folder: `,
        el("code", "ft-run-shell", wf.shell)], "warn");
    }
  } catch (e) {
    say(card, `Could not build the workflow: ${e.message}`, "error");
  }
}

function makeCard(run) {
  const card = el("div", "ft-run");
  card.dataset.run = run.name;
  const head = el("div", "ft-run-head");
  head.append(el("span", "ft-run-name", run.name), el("span", "ft-run-status"));
  const meta = el("div", "ft-run-meta");
  meta.append(el("span", "ft-run-method"), document.createTextNode(" · "), el("span", "ft-run-model"),
    document.createTextNode(" · "), el("span", "ft-run-steps"), document.createTextNode(" · "),
    el("span", "ft-run-loss"));
  const actions = el("div", "ft-run-actions");
  const buttons = [["ft-run-copy", "Copy config", () => copyConfig(card, run.name)],
    ["ft-run-show-config", "Config", () => showConfig(card, run.name)],
    ["ft-run-resume", "Resume", () => resume(card, run.name)]];
  for (const [cls, label, fn] of buttons) {
    const b = el("button", cls, label);
    b.type = "button";
    b.addEventListener("click", fn);
    actions.append(b);
  }
  const pre = el("pre", "ft-run-config");
  pre.hidden = true;
  card.append(head, meta, el("div", "ft-run-times"), el("div", "ft-run-error"), el("canvas", "ft-run-curve"),
    el("div", "ft-run-samples"), el("div", "ft-run-sounds"), actions, el("div", "ft-run-message"), pre);
  return card;
}

function updateCard(card, run) {
  const stale = run.status === "running" && run.updated && Date.now() / 1000 - run.updated > STALE_S;
  card.dataset.status = run.status;
  card.dataset.step = String(run.step ?? 0);
  card.dataset.loss = run.final_loss == null ? "" : String(run.final_loss);
  card.classList.toggle("ft-run-stale", !!stale);
  const status = card.querySelector(".ft-run-status");
  status.textContent = stale ? `${run.status} (no update for ${ago(run.updated).replace(" ago", "")})` : run.status;
  status.className = `ft-run-status ft-status-${run.status}`;
  card.querySelector(".ft-run-method").textContent = METHODS[run.method] || run.method || "?";
  const model = card.querySelector(".ft-run-model");
  model.textContent = run.model || run.model_source || "?";
  model.title = run.model_source || "";
  const steps = card.querySelector(".ft-run-steps");
  steps.textContent = `${run.step ?? 0}${run.total ? ` / ${run.total}` : ""} steps`;
  steps.dataset.step = String(run.step ?? 0);
  steps.dataset.total = String(run.total ?? "");
  const loss = card.querySelector(".ft-run-loss");
  loss.textContent = `loss ${fmtLoss(run.final_loss)}`;
  loss.dataset.loss = run.final_loss == null ? "" : String(run.final_loss);
  let ck = run.last_checkpoint != null ? ` · checkpoint at step ${run.last_checkpoint}` : "";
  if (run.best_step != null) {
    const score = run.best_score != null ? ` (${run.ranking || "score"} ${Number(run.best_score).toFixed(4)})` : "";
    ck += ` · best step ${run.best_step}${score}`;
  }
  const ds = run.dataset ? ` · data ${run.dataset}${run.images != null ? ` (${run.images})` : ""}` : "";
  card.querySelector(".ft-run-times").textContent = `started ${ago(run.started)} · updated ${ago(run.updated)}${ck}${ds}`;
  const err = card.querySelector(".ft-run-error");
  err.textContent = run.error || "";
  err.hidden = !run.error;
  const canvas = card.querySelector(".ft-run-curve");
  const key = JSON.stringify([run.curve.length, run.curve[run.curve.length - 1]]);
  if (canvas.dataset.key !== key || !canvas.width) {
    canvas.dataset.key = key;
    requestAnimationFrame(() => drawCurve(canvas, run.curve));
  }
  const box = card.querySelector(".ft-run-samples");
  const skey = run.samples.join("|");
  if (box.dataset.key !== skey) {
    box.dataset.key = skey;
    box.replaceChildren(...run.samples.map((file) => {
      const img = el("img", "ft-run-sample");
      img.dataset.file = file;
      img.alt = `${run.name} ${file}`;
      img.title = `step ${run.sample_step}`;
      img.loading = "lazy";
      img.src = api.apiURL(runURL(run.name, file));
      return img;
    }));
  }
  const sounds = card.querySelector(".ft-run-sounds");  // a sound model's samples: their sound, to listen to
  const akey = (run.sounds || []).join("|");
  if (sounds.dataset.key !== akey) {
    sounds.dataset.key = akey;
    sounds.replaceChildren(...(run.sounds || []).map((file) => {
      const audio = el("audio", "ft-run-sound");
      audio.controls = true;
      audio.preload = "none";
      audio.dataset.file = file;
      audio.title = `step ${run.sample_step}: ${file.split("/").pop()}`;
      audio.src = api.apiURL(runURL(run.name, file));
      return audio;
    }));
  }
}

function mount(root) {
  root.replaceChildren();
  const panel = el("div", "ft-runs-panel");
  const style = el("style", null, CSS);
  const header = el("div", "ft-runs-header");
  const refreshBtn = el("button", "ft-runs-refresh", "Refresh");
  refreshBtn.type = "button";
  const info = el("span", "ft-runs-state");
  header.append(el("span", "ft-runs-title", "Fine-tune runs"), info, refreshBtn);
  const empty = el("div", "ft-runs-empty", "No runs yet: a training node's run appears here (output/finetune/).");
  empty.hidden = true;
  const list = el("div", "ft-runs-list");
  panel.append(style, header, empty, list);
  root.append(panel);
  const cards = new Map();
  let timer = null, alive = true, busy = false;

  async function refresh() {
    if (!alive || busy) return;
    busy = true;
    clearTimeout(timer);
    try {
      const { runs } = await getJSON("/finetune/runs");
      state.fetches += 1;
      state.runs = runs;
      state.error = null;
      info.textContent = `${runs.length} run${runs.length === 1 ? "" : "s"}`;
      const seen = new Set();
      runs.forEach((run) => {
        seen.add(run.name);
        let card = cards.get(run.name);
        if (!card) cards.set(run.name, (card = makeCard(run)));
        updateCard(card, run);
        list.append(card); // in the listing's order: newest first
      });
      for (const [name, card] of cards) if (!seen.has(name)) (card.remove(), cards.delete(name));
      empty.hidden = runs.length > 0;
      state.renders += 1;
    } catch (e) {
      state.error = String(e.message || e);
      info.textContent = `could not list runs: ${state.error}`;
    } finally {
      busy = false;
      const running = state.runs.some((r) => r.status === "running");
      if (alive) timer = setTimeout(refresh, running ? FAST_MS : SLOW_MS);
    }
  }

  // a run that starts while the tab is open shows up at once
  const onProgress = (e) => {
    const run = state.runs.find((r) => r.name === e.detail?.run);
    if (!run || run.status !== "running") refresh();
  };
  api.addEventListener("finetune.progress", onProgress);
  refreshBtn.addEventListener("click", refresh);
  refreshNow = refresh;
  state.mounted = true;
  refresh();
  return () => {
    alive = false;
    state.mounted = false;
    refreshNow = null;
    clearTimeout(timer);
    api.removeEventListener("finetune.progress", onProgress);
  };
}

let unmount = null;
let refreshNow = null; // the open tab's refresh
app.registerExtension({
  name: "comfyui_finetune.runs_panel",
  async setup() {
    // new validation pictures of a run: the open tab shows them at once
    api.addEventListener("finetune.preview", () => refreshNow?.());
    const manager = app.extensionManager;
    if (!manager?.registerSidebarTab) {
      console.warn("comfyui-finetune: this front end has no sidebar tabs; the runs panel is not shown");
      return;
    }
    manager.registerSidebarTab({
      id: "finetune-runs",
      icon: "pi pi-chart-line",
      title: "Fine-tune runs",
      tooltip: "Fine-tune runs: status, loss, samples, config, resume",
      type: "custom",
      render: (root) => {
        if (unmount) unmount();
        unmount = mount(root);
      },
      destroy: () => {
        if (unmount) unmount();
        unmount = null;
      },
    });
  },
});
