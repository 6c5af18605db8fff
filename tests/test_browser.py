"""The canvas as a user sees it: the real ComfyUI and its real front end in headless Chromium.

Runs when COMFYUI_PATH is set and a Chromium (``$CHROMIUM``, else ``chromium`` on PATH) and the ``playwright``
package are found; skipped with the reason otherwise. Never run ``playwright install`` (it downloads a browser):
Debian's ``chromium`` package and pip's ``playwright`` are enough. Screenshots go to ``$FT_ARTIFACTS`` (default: the
test's temporary folder); the path is printed.

Two front ends: the one ComfyUI pins ("pinned"), and the one ``$COMFYUI_FRONTEND_ROOT`` points at ("newest": an
unpacked comfyui-frontend-package's ``static`` folder, served with ``--front-end-root``; skipped with the reason when
unset). One ComfyUI per front end. The whole-workflow checks (every example run, keep_best, the event flood, the reload
and the runs panel after a 200-step training) run on the pinned front end in classic mode, the examples also on the
newest; every front end in both modes (classic, and Nodes 2.0: ``Comfy.VueNodes.Enabled``) gets the training node's
checks: the chart drawn and updating at its shown size, one advanced-options toggle that shows and hides them, the
dataset's thumbnails and the text panels, the runs tab, no overlapping nodes, no page error and no warning or
deprecation notice from the pack's files.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from comfy_server import PACK, ComfyServer, comfyui_path, front_end_root, front_end_skip_reason, skip_reason


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _why_skip() -> str | None:
    if comfyui_path() is None:
        return skip_reason()
    if _chromium() is None:
        return "no Chromium found (set $CHROMIUM, or install Debian's chromium package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; never run 'playwright install')"
    return None


pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(_why_skip() is not None,
                                                                       reason=_why_skip() or "")]

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
            "Comfy.Notification.ShowVersionUpdates": False}
READY = ("!!(window.app && app.graph && app.canvas && window.comfyAPI.api.api.clientId"
         " && window.comfyAPI.api.api.socket?.readyState === 1 && app.extensionManager?.workflow?.activeWorkflow)")
EXAMPLES = sorted(p for p in (PACK / "example_workflows").glob("*.json"))
FRONT_ENDS = ["pinned", "newest"]  # the front end ComfyUI pins; the one $COMFYUI_FRONTEND_ROOT points at
MODES = {"classic": False, "nodes2": True}  # Comfy.VueNodes.Enabled
#: the sidebar tab's button: data-testid on newer front ends, the class <id>-tab-button on older ones
RUNS_TAB = '[data-testid="finetune-runs-tab-button"], .finetune-runs-tab-button'

#: installed before the page's own scripts: every console message that is a deprecation or "[ComfyUI Notice]", or a
#: warning or error that names the pack, with the stack it was logged from (the pack's files show in it)
CONSOLE_HOOK = """(() => {
  const rec = window.__ftConsole = [];
  for (const level of ['warn', 'error', 'log', 'info']) {
    const original = console[level].bind(console);
    console[level] = (...args) => {
      try {
        const text = args.map(a => typeof a === 'string' ? a : (a && a.message) || String(a)).join(' ');
        if (/deprecat|\\[ComfyUI Notice\\]/i.test(text) || (/finetune/i.test(text) && /warn|error/.test(level))) {
          const stack = String(new Error().stack || '').split('\\n').slice(2, 14).join('\\n');
          rec.push({level, text: text.slice(0, 600), stack});
        }
      } catch (e) { /* never break the page's logging */ }
      return original(...args);
    };
  }
})();"""

#: the page's own record of what reached it (installed before a workflow is queued)
RECORD = """() => {
  const api = window.comfyAPI.api.api;
  const rec = window.__ft = {progress: 0, previews: 0, executed: [], done: null, error: null, prompt: null};
  api.addEventListener('finetune.progress', () => rec.progress++);
  api.addEventListener('b_preview', () => rec.previews++);
  api.addEventListener('executed', (e) => rec.executed.push(String(e.detail.node)));
  api.addEventListener('execution_success', () => rec.done = 'success');
  api.addEventListener('execution_error', (e) => { rec.done = 'error'; rec.error = e.detail; });
  const queue = api.queuePrompt.bind(api);
  api.queuePrompt = async (...args) => {
    rec.sent = args[1]?.output ?? null;
    try { const r = await queue(...args); rec.prompt = r.prompt_id; return r; }
    catch (e) { rec.done = 'error'; rec.error = String(e); throw e; }
  };
}"""

#: bounding boxes of every node (title bar included; a Nodes 2.0 node's size is its element's) and the pairs that
#: overlap, each with whether the pack's web code made the upper one that tall: it has the chart or a text panel, and
#: no pictures (a node showing pictures is sized by the front end)
OVERLAPS = """() => {
  const boxes = app.graph._nodes.map(n => { const b = new Float32Array(4); n.getBounding(b, true);
    return {id: n.id, type: n.type, b: Array.from(b),
            pack: !!n.__ftCanvas || !!n.widgets?.some(w => w.name === 'ft_result' && !w.hidden),
            pictures: (app.nodeOutputs?.[String(n.id)]?.images?.length ?? 0) > 0
              || (app.nodePreviewImages?.[String(n.id)]?.length ?? 0) > 0}; });
  const pairs = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, c] = [boxes[i].b, boxes[j].b];
    if (a[0] < c[0] + c[2] && c[0] < a[0] + a[2] && a[1] < c[1] + c[3] && c[1] < a[1] + a[3]) {
      const upper = a[1] <= c[1] ? boxes[i] : boxes[j];
      pairs.push({pair: `${boxes[i].type}#${boxes[i].id} x ${boxes[j].type}#${boxes[j].id}`,
                  by: [Math.min(a[0] + a[2] - c[0], c[0] + c[2] - a[0]),
                       Math.min(a[1] + a[3] - c[1], c[1] + c[3] - a[1])].map(Math.round),
                  pack: upper.pack && !upper.pictures});
    }
  }
  return pairs;
}"""

#: each training node's chart: where it is (canvas space), whether it is inside its node above the preview area,
#: whether another node covers it, whether its pixels are drawn (not one flat colour), and whether its backing store
#: has the size it is shown at (times devicePixelRatio: nothing stretched)
CHARTS = """() => app.graph._nodes.filter(n => n.__ftCanvas).map(n => {
  const w = n.widgets.find(w => w.name === 'ft_chart');
  const top = n.pos[1] + (w.y ?? w.last_y ?? 0), bottom = top + (w.computedHeight ?? 170);
  const covered = app.graph._nodes.filter(o => o !== n).some(o => { const b = new Float32Array(4);
    o.getBounding(b, true); return n.pos[0] < b[0] + b[2] && b[0] < n.pos[0] + n.size[0] && top < b[1] + b[3]
    && b[1] < bottom; });
  const c = n.__ftCanvas, ctx = c.getContext('2d'), dpr = window.devicePixelRatio || 1;
  let distinct = 0;
  if (c.width && c.height) { const d = ctx.getImageData(0, 0, c.width, c.height).data, seen = new Set();
    for (let i = 0; i < d.length; i += 4 * 7) seen.add(`${d[i]},${d[i + 1]},${d[i + 2]}`); distinct = seen.size; }
  return {id: n.id, points: n.__ftChart?.points.length ?? 0, kept: n.properties?.ft_chart?.points?.length ?? 0,
          run: n.__ftChart?.run, total: n.__ftChart?.total, covered, distinct,
          shown: [c.clientWidth, c.clientHeight], backing: [c.width, c.height],
          unstretched: !!c.clientWidth && Math.abs(c.width - Math.round(c.clientWidth * dpr)) <= 1
            && Math.abs(c.height - Math.round(c.clientHeight * dpr)) <= 1,
          roomBelow: n.pos[1] + n.size[1] - bottom, visibleWidgets: n.widgets.filter(x => n.isWidgetVisible ?
            n.isWidgetVisible(x) : !x.hidden).length, allWidgets: n.widgets.length};
})"""

#: is widget `name` of node `id` (the chart's canvas, or a DOM widget's element) seen: has it a size, and is it what
#: is on top at its centre? (the view must show it: Page.focus)
SEEN = """([id, name]) => { const n = app.graph.getNodeById(id), w = n.widgets.find(w => w.name === name);
  const el = name === 'ft_chart' ? n.__ftCanvas : w?.element; if (!el) return {seen: false, why: 'no element'};
  const r = el.getBoundingClientRect(); if (!r.width || !r.height) return {seen: false, why: `${r.width}x${r.height}`};
  const top = document.elementFromPoint(r.left + r.width / 2, r.top + Math.min(r.height / 2, 20));
  return {seen: !!top && (top === el || el.contains(top) || top === el.parentElement),
          on_top: top ? `${top.tagName}.${top.className}` : 'nothing',
          size: [Math.round(r.width), Math.round(r.height)]};
}"""

#: the advanced inputs of node `id` that are shown: on the canvas (isWidgetVisible), or, with Nodes 2.0, in its element
ADVANCED_SHOWN = """(id) => {
  const n = app.graph.getNodeById(id), el = document.querySelector(`[data-node-id="${id}"]`);
  const names = n.widgets.filter(w => w.options?.advanced).map(w => w.name);
  const rows = el ? [...el.querySelectorAll('.lg-node-widget')].map(r => r.innerText.split('\\n')[0].trim()) : null;
  const shown = rows ? names.filter(x => rows.includes(x)) : names.filter(x => {
    const w = n.widgets.find(w => w.name === x); return n.isWidgetVisible ? n.isWidgetVisible(w) : !w.hidden; });
  return {all: names.length, shown: shown.length, size: [n.size[0], n.size[1]]}; }"""


class Servers:
    """One ComfyUI per front end, started when a test first needs it and stopped at the module's end."""

    def __init__(self, base: Path):
        self.base, self.started = base, {}

    def __call__(self, front_end: str) -> ComfyServer:
        if front_end not in self.started:
            base = self.base / front_end
            (base / "user" / "default").mkdir(parents=True)
            (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
            flags = ["--front-end-root", str(front_end_root())] if front_end == "newest" else []
            srv = ComfyServer(base, *flags).start()
            srv.front_end = front_end
            self.started[front_end] = srv
        return self.started[front_end]

    def stop(self) -> None:
        for srv in self.started.values():
            srv.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s = Servers(tmp_path_factory.mktemp("comfy-web"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(servers):
    """ComfyUI with the front end it pins (the whole-workflow checks)."""
    return servers("pinned")


@pytest.fixture(scope="module", params=FRONT_ENDS)
def front_end(request) -> str:
    if request.param == "newest" and front_end_root() is None:
        pytest.skip(front_end_skip_reason())
    return request.param


@pytest.fixture(params=list(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=_chromium(), args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("FT_ARTIFACTS") or tmp_path_factory.mktemp("browser-artefacts"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {out}")
    return out


class Page:
    """One page of the front end in classic mode or with Nodes 2.0, with the checks' console and page errors and the
    pack's console notices recorded."""

    def __init__(self, browser, server, mode: str = "classic"):
        self.server, self.mode, self.errors, self.notices = server, mode, [], []
        server.post("/settings/Comfy.VueNodes.Enabled", MODES[mode])  # how the user sets it, before the page opens
        self.ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
        self.ctx.add_init_script(CONSOLE_HOOK)
        self.page = self.ctx.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(m.text) if "Error loading extension" in m.text else None)
        self.open()

    def _ready(self) -> None:
        self.page.wait_for_function(READY, timeout=60_000)
        vue = self.js("() => !!LiteGraph.vueNodesMode")
        assert vue == MODES[self.mode], f"Nodes 2.0 is {'on' if vue else 'off'} in a {self.mode} page"

    def open(self) -> None:
        self.page.goto(self.server.url, wait_until="load")
        self._ready()

    def reload(self) -> None:
        self._collect()
        self.page.reload(wait_until="load")
        self._ready()

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg) if arg is not None else self.page.evaluate(expr)

    def load(self, path: Path) -> None:
        self.js("([wf, name]) => app.loadGraphData(wf, true, true, name)", [json.loads(path.read_text()), path.stem])

    def run(self, timeout: float = 1200) -> float:
        """Queue the loaded workflow as the Run button does; wait for it; return its seconds. (toy_dreambooth takes
        about 7 minutes on a busy 2-core machine, up to 14 when other tests share it.)"""
        self.server.post("/free", {"free_memory": True})  # a cached prompt would not run again
        self.js(RECORD)
        t0 = time.time()
        self.js("() => app.queuePrompt(0, 1)")
        try:
            self.page.wait_for_function("window.__ft.done !== null", timeout=timeout * 1000, polling=250)
        except Exception:
            self.server.post("/interrupt", {})  # the next test's prompt must not wait behind this one
            raise
        done = self.js("() => [window.__ft.done, window.__ft.error]")
        assert done[0] == "success", f"the workflow failed in the page: {json.dumps(done[1])[:3000]}"
        self.page.wait_for_timeout(600)  # let the last frames draw
        return time.time() - t0

    def focus(self, node: int, y: float = 0, at: float = 60) -> None:
        """Show node `node` at full size: canvas-space offset `y` inside it at `at` px from the page's top."""
        self.js("""([id, y, at]) => { const n = app.graph.getNodeById(id), ds = app.canvas.ds; ds.scale = 1;
            ds.offset = [-n.pos[0] + 420, -n.pos[1] - y + at]; app.canvas.setDirty(true, true); }""", [node, y, at])
        self.page.wait_for_timeout(500)

    def screenshot(self, path: Path, node: int | None = None) -> None:
        """The whole graph fitted to the page, or one node at full size (its chart and preview readable)."""
        self.page.mouse.move(1000, 4)  # the empty top bar: no tooltip over the picture
        if node is None:
            self.js("() => app.extensionManager?.command?.execute?.('Comfy.Canvas.FitView')")
            self.page.wait_for_timeout(500)
        else:
            self.focus(node)
        self.page.screenshot(path=str(path))

    def _collect(self) -> None:
        got = self.js("() => (window.__ftConsole ?? []).splice(0)")
        self.notices += [n for n in got if "/extensions/comfyui-finetune/" in n["stack"]
                         or "finetune" in n["text"].lower() or "[ComfyUI Notice]" in n["text"]]

    def assert_clean(self) -> None:
        """No page error, no extension that failed to load, no warning or deprecation notice from the pack (a
        "[ComfyUI Notice]" is an internal module imported by an extension, and the pack is the only one here)."""
        self._collect()
        assert not self.errors, self.errors
        assert not self.notices, "\n\n".join(f"{n['level']}: {n['text']}\n{n['stack']}" for n in self.notices)

    def close(self) -> None:
        self.ctx.close()


def _train_node(page: Page) -> int:
    return page.js("() => app.graph._nodes.find(n => n.type.startsWith('FT_Train')).id")


def test_train_lora_chart_previews_reload_and_runs_panel(server, browser, artefacts):
    page = Page(browser, server)
    try:
        assert page.js("() => app.extensions.map(e => e.name)").count("finetune.lossChart") == 1
        example = PACK / "example_workflows" / "toy_train_lora.json"
        page.load(example)
        nid = _train_node(page)
        before = page.js(CHARTS)[0]
        # a short node: the advanced loop options are folded away until "Show advanced options"
        assert before["visibleWidgets"] < before["allWidgets"] - 15, before
        seconds = page.run()
        steps = page.js(f"() => app.graph.getNodeById({nid}).widgets.find(w => w.name === 'steps').value")
        stats = page.js("() => window.finetuneChartStats")
        record = page.js("() => window.__ft")
        print(f"toy_train_lora in the browser: {seconds:.1f} s, {record['progress']} progress events for {steps} "
              f"steps, {record['previews']} previews")
        sent = record["sent"][str(nid)]["inputs"]
        assert sent["optimizer"] == "adamw" and sent["save_every"] == 50, sent  # folded options are still queued
        assert stats["points"] == steps, stats  # every step reached the chart, events throttled
        assert 1 <= record["progress"] <= steps, record
        assert record["previews"] >= 1, record  # validation pictures arrived while it trained
        chart = next(c for c in page.js(CHARTS) if c["id"] == nid)
        assert chart["points"] == steps and chart["kept"] == steps and chart["run"], chart
        assert chart["distinct"] > 5, chart  # drawn: not a blank rectangle
        assert not chart["covered"], chart
        assert chart["roomBelow"] >= 256, chart  # the preview has its own area under the chart
        assert chart["unstretched"], chart
        assert page.js(OVERLAPS) == []
        assert page.js(f"() => (app.nodeOutputs['{nid}']?.images ?? []).length") >= 1  # the last validation pictures
        page.screenshot(artefacts / "toy_train_lora.png")
        page.screenshot(artefacts / "toy_train_lora_node.png", node=nid)
        run = chart["run"]
        page.page.wait_for_timeout(1500)  # the front end stores the open workflow in the browser a moment later

        page.reload()  # the workflow comes back from the browser's storage, and with it the chart
        chart = next(c for c in page.js(CHARTS) if c["id"] == nid)
        assert chart["points"] == steps and chart["run"] == run, chart
        assert chart["distinct"] > 5, chart
        assert page.js("() => window.finetuneChartStats.restored") >= 1
        page.screenshot(artefacts / "toy_train_lora_after_reload.png", node=nid)
        final_loss = page.js(f"() => app.graph.getNodeById({nid}).__ftChart.points.at(-1)[1]")
        _check_runs_panel(page, run, steps, final_loss, artefacts / "runs_panel.png")
        for url in ("/api/workflow_templates/comfyui-finetune/toy_train_lora.jpg",
                    "/extensions/comfyui-finetune/docs/FT_TrainLoRA.md"):
            assert page.js("(u) => fetch(u).then(r => r.status)", url) == 200, url
        page.assert_clean()
    finally:
        page.close()


def _check_runs_panel(page: Page, run: str, steps: int, final_loss: float, shot: Path) -> None:
    tabs = page.js("() => app.extensionManager.getSidebarTabs().map(t => t.id)")
    if "finetune-runs" not in tabs:
        pytest.fail(f"the runs panel is not registered as a sidebar tab (tabs: {tabs})")
    page.page.locator(RUNS_TAB).first.click()  # the tab's button, found by its data-testid (or older class)
    page.page.wait_for_selector(f'.ft-run[data-run="{run}"]', timeout=20_000)
    row = page.js("""(run) => { const el = document.querySelector(`.ft-run[data-run="${run}"]`);
        return {status: el.querySelector('.ft-run-status')?.textContent ?? '',
                loss: Number(el.querySelector('.ft-run-loss')?.dataset.loss), text: el.textContent,
                steps: el.querySelector('.ft-run-steps')?.textContent ?? '',
                curve: Number(el.querySelector('canvas.ft-run-curve')?.dataset.points ?? 0),
                samples: el.querySelectorAll('img.ft-run-sample').length}; }""", run)
    assert row["status"] == "finished", row
    assert abs(row["loss"] - final_loss) < 1e-9, (row, final_loss)  # the run's last logged loss, from disk
    assert row["steps"].startswith(f"{steps} / {steps}") and row["curve"] > 1 and row["samples"] >= 1, row
    page.page.screenshot(path=str(shot))


def _check_sound_in_runs_panel(page: Page, shot: Path) -> None:
    """A sound model's run: the runs panel offers its validation sounds to listen to, served as audio/wav."""
    page.page.locator(RUNS_TAB).first.click()
    sel = '.ft-run[data-run^="toy_sound_lora"] audio.ft-run-sound'
    page.page.wait_for_selector(sel, timeout=20_000)
    sources = page.js(f"() => [...document.querySelectorAll('{sel}')].map(a => a.src)")
    assert sources and all(s.endswith(".wav") for s in sources), sources
    head = page.js("async (u) => { const r = await fetch(u); return [r.status, r.headers.get('content-type'), "
                   "(await r.arrayBuffer()).byteLength]; }", sources[0])
    assert head[0] == 200 and head[1] == "audio/wav" and head[2] > 16000, head  # 8192 samples of 16-bit PCM
    page.page.screenshot(path=str(shot))


def test_keep_best_scores_and_the_best_step_on_the_chart(server, browser, artefacts):
    """keep_best on the toy LoRA (a Load CLIP Scorer linked in the page, a save point every 50 steps): each save
    point's score reaches the chart live, the best step is marked, and both are kept through a reload."""
    page = Page(browser, server)
    try:
        page.load(PACK / "example_workflows" / "toy_train_lora.json")
        nid = _train_node(page)
        page.js("""(nid) => { const t = app.graph.getNodeById(nid), s = LiteGraph.createNode('FT_LoadCLIPScorer');
            s.pos = [t.pos[0], t.pos[1] + t.size[1] + 40]; app.graph.add(s);
            s.connect(0, t, t.inputs.findIndex(i => i.name === 'scorer'));
            const set = (k, v) => { t.widgets.find(w => w.name === k).value = v; };
            set('keep_best', 'clip_i'); set('run_name', 'toy_keep_best'); }""", nid)
        page.run()
        got = page.js(f"""() => {{ const n = app.graph.getNodeById({nid}), st = n.__ftChart;
            return {{scores: st.scores, best: st.best, kept: n.properties.ft_chart.scores,
                     keptBest: n.properties.ft_chart.best_step, live: window.finetuneChartStats.scores}}; }}""")
        print(f"keep_best on the chart: {got['scores']} best {got['best']}")
        assert [p[0] for p in got["scores"]] == [50, 100, 150, 200], got
        assert got["live"] >= 4, got  # each score arrived as its own event while the run went on
        best = max(got["scores"], key=lambda p: p[1])
        assert got["best"] == got["keptBest"] == best[0] and got["kept"] == got["scores"], got
        row = next(r for r in server.get("/finetune/runs")["runs"] if r["name"] == "toy_keep_best")
        assert row["best_step"] == best[0] and row["ranking"] == "clip_i", row  # the runs panel shows it
        page.screenshot(artefacts / "toy_keep_best_node.png", node=nid)
        page.page.wait_for_timeout(1500)
        page.reload()
        again = page.js(f"() => {{ const st = app.graph.getNodeById({nid}).__ftChart; return [st.scores, st.best]; }}")
        assert again == [got["scores"], got["best"]], again
        page.assert_clean()
    finally:
        page.close()


def test_chart_takes_a_flood_of_events(server, browser):
    """Frames per second of the page while synthetic progress events arrive at 4 (what a training node sends), 50, 500
    and 2000 a second (printed; the page must keep drawing)."""
    page = Page(browser, server)
    try:
        page.load(PACK / "example_workflows" / "toy_train_lora.json")
        nid = _train_node(page)
        measured = page.js("""async (nid) => {
          const api = window.comfyAPI.api.api, out = {};
          for (const rate of [4, 50, 500, 2000]) {
            let frames = 0, running = true, step = 0;
            const tick = () => { frames++; if (running) requestAnimationFrame(tick); };
            requestAnimationFrame(tick);
            const t0 = performance.now();
            const every = Math.max(20, 1000 / rate), burst = Math.max(1, Math.round(rate * every / 1000));
            const timer = setInterval(() => { for (let k = 0; k < burst; k++) { step++;
              api.dispatchEvent(new CustomEvent('finetune.progress', {detail: {node: String(nid), run: 'flood',
                step, total: 100000, loss: Math.random(), lr: 1e-4, it_per_s: 10, eta_s: 100,
                points: [[step, Math.random(), 1e-4]]}})); } }, every);
            await new Promise(r => setTimeout(r, 2000));
            clearInterval(timer); running = false;
            out[rate] = {fps: Math.round(frames * 1000 / (performance.now() - t0)), events: step};
          }
          return out; }""", nid)
        print(f"chart under synthetic events (events/s: page fps): {measured}")
        assert measured["4"]["fps"] >= 10, measured
        assert measured["500"]["fps"] >= 5, measured  # 125 times what a training node sends
        page.assert_clean()
    finally:
        page.close()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_layouts_do_not_overlap_after_a_run(servers, front_end, browser, artefacts, path):
    """Every example, run in the page (classic mode) on each front end: no two nodes overlap once its charts, text
    panels and previews are shown."""
    page = Page(browser, servers(front_end))
    try:
        page.load(path)
        assert page.js(OVERLAPS) == [], "overlapping before the run"
        from comfyui_finetune import workflows

        if workflows.needs_comfyui(json.loads((PACK / "example_workflows" / "api" / path.name).read_text())):
            pytest.skip(f"{path.stem} needs a model file the pack cannot ship; tests/test_comfyui.py runs it on a "
                        "random-weight stand-in")
        seconds = page.run()
        overlaps = page.js(OVERLAPS)
        charts = page.js(CHARTS)
        print(f"{path.stem} ({front_end}): ran in {seconds:.1f} s in the browser; overlapping pairs after the run: "
              f"{len(overlaps)}")
        page.screenshot(artefacts / f"{path.stem}_{front_end}.png")
        assert overlaps == [], overlaps
        if path.stem == "toy_sound_lora":
            _check_sound_in_runs_panel(page, artefacts / f"runs_panel_sound_{front_end}.png")
        for c in charts:
            assert not c["covered"] and c["roomBelow"] >= 256 and c["points"] > 0, c
            page.focus(c["id"])  # a chart off the page is not drawn at its size until it is shown
            c = next(x for x in page.js(CHARTS) if x["id"] == c["id"])
            assert c["unstretched"] and c["distinct"] > 5, c
        page.assert_clean()
    finally:
        page.close()


def test_example_layouts_with_nodes_2(servers, front_end, browser, artefacts):
    """Every example loaded with Nodes 2.0 on (each node then takes the size of its element): no node that the pack's
    web code sizes (the training nodes with their chart and folded advanced options) overlaps the one below it.
    Overlaps between other nodes come from the examples' own spacing (Nodes 2.0's rows are taller than the canvas's)
    or from the pictures the front end shows in a node: printed, and written to nodes2_overlaps_<front end>.json."""
    page = Page(browser, servers(front_end), "nodes2")
    try:
        found = {}
        for path in EXAMPLES:
            page.load(path)
            page.page.wait_for_timeout(800)  # Nodes 2.0 measures its elements a frame or two later
            found[path.stem] = page.js(OVERLAPS)
            if page.js(CHARTS):
                page.screenshot(artefacts / f"{path.stem}_{front_end}_nodes2.png")
        others = {k: [o["pair"] + f" by {o['by'][0]}x{o['by'][1]} px" for o in v if not o["pack"]]
                  for k, v in found.items() if any(not o["pack"] for o in v)}
        (artefacts / f"nodes2_overlaps_{front_end}.json").write_text(json.dumps(others, indent=1))
        print(f"with Nodes 2.0 on the {front_end} front end, overlaps between nodes the pack does not size: {others}")
        pack = {k: [o for o in v if o["pack"]] for k, v in found.items() if any(o["pack"] for o in v)}
        assert not pack, pack
        page.assert_clean()
    finally:
        page.close()


def test_a_workflow_saved_with_the_old_checkpointing_switch_runs_in_the_page(server, browser):
    """gradient_checkpointing was a true / false switch before it became auto / on / off: a saved workflow holds
    false where the combo now is. Loaded, the combo widget takes the raw value; queued, the node's VALIDATE_INPUTS
    accepts it (ComfyUI's own combo check would refuse it) and the run succeeds."""
    page = Page(browser, server)
    try:
        wf = json.loads((PACK / "example_workflows" / "toy_train_lora.json").read_text())
        page.js("([wf, name]) => app.loadGraphData(wf, true, true, name)", [wf, "old_switch"])
        held = page.js("""() => {
          const node = app.graph._nodes.find(n => n.type === "FT_TrainLoRA");
          const w = name => node.widgets.find(w => w.name === name);
          w("steps").value = 20;
          w("gradient_checkpointing").value = false;   // what an older saved workflow puts there
          return [w("gradient_checkpointing").value, w("gradient_checkpointing").options.values]; }""")
        assert held == [False, ["auto", "on", "off"]], held
        seconds = page.run()
        print(f"toy_train_lora with gradient_checkpointing false (the old switch): ran in {seconds:.1f} s")
        page.assert_clean()
    finally:
        page.close()


def _toggle_advanced(page: Page, nid: int) -> str:
    """Click the advanced-options toggle that node `nid` shows, as a user does: the front end's own ("Show advanced
    inputs" at a Nodes 2.0 node's foot) or the pack's button (a canvas widget, or a Nodes 2.0 button). Exactly one
    must be there. Returns which."""
    node = f'[data-node-id="{nid}"]'
    native = page.page.locator(f'{node} [data-testid="advanced-inputs-button"]')
    pack_dom = page.page.locator(f"{node} button", has_text="advanced options")
    pack_canvas = page.js(f"""() => {{ const n = app.graph.getNodeById({nid}), w = n.widgets.find(w => w.name ===
        'ft_advanced'); return !LiteGraph.vueNodesMode && !!w && !w.hidden && n.isWidgetVisible(w); }}""")
    found = {"front end's own": native.count(), "pack's (Nodes 2.0)": pack_dom.count(),
             "pack's (canvas)": int(pack_canvas)}
    assert sum(found.values()) == 1, f"advanced-options toggles shown: {found}"
    which = next(k for k, v in found.items() if v)
    if which == "pack's (canvas)":
        y = page.js(f"() => app.graph.getNodeById({nid}).widgets.find(w => w.name === 'ft_advanced').y")
        page.focus(nid, y, 400)
        x, y = page.js(f"""() => {{ const n = app.graph.getNodeById({nid}), w = n.widgets.find(w => w.name ===
            'ft_advanced'), p = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + w.y + 10]),
            r = app.canvas.canvas.getBoundingClientRect(); return [r.left + p[0], r.top + p[1]]; }}""")
        page.page.mouse.click(x, y)
    else:
        button = (native if native.count() else pack_dom).first
        top = button.evaluate("(b) => b.getBoundingClientRect().top")
        scale = page.js("() => app.canvas.ds.scale")
        page.js("(dy) => { app.canvas.ds.offset[1] += dy; app.canvas.setDirty(true, true); }", (500 - top) / scale)
        page.page.wait_for_timeout(500)
        button.click()
    page.page.wait_for_timeout(700)
    return which


def _check_advanced_toggle(page: Page, shot: Path) -> str:
    """A training node added in free space: its advanced options folded, one toggle shows them, and hides them again."""
    nid = page.js("""() => { const n = LiteGraph.createNode('FT_TrainLoRA');
        n.pos = [Math.max(...app.graph._nodes.map(o => o.pos[0] + o.size[0])) + 300, 0]; app.graph.add(n);
        return n.id; }""")
    page.focus(nid)
    folded = page.js(ADVANCED_SHOWN, nid)
    assert folded["all"] >= 15 and folded["shown"] == 0, folded
    which = _toggle_advanced(page, nid)
    shown = page.js(ADVANCED_SHOWN, nid)
    assert shown["shown"] == shown["all"], (which, shown)
    page.screenshot(shot, node=nid)
    _toggle_advanced(page, nid)
    again = page.js(ADVANCED_SHOWN, nid)
    assert again["shown"] == 0, (which, again)
    if page.mode == "classic":
        assert again["size"][1] < shown["size"][1], (shown, again)  # hiding gives the room back
    page.js(f"() => app.graph.remove(app.graph.getNodeById({nid}))")
    return which


def test_training_node_in_every_front_end_and_mode(servers, front_end, mode, browser, artefacts):
    """The toy LoRA workflow (30 steps) on each front end, classic and with Nodes 2.0: the chart is seen on the
    training node, drawn at the size it is shown at, and updates while it trains; one toggle shows and hides the
    advanced options; the dataset's thumbnails and the text panels are shown; the runs tab (found by its data-testid)
    lists the run; the chart comes back after a reload; no node overlaps another; no page error and no warning or
    deprecation notice from the pack's files."""
    tag = f"{front_end}_{mode}"
    page = Page(browser, servers(front_end), mode)
    try:
        page.load(PACK / "example_workflows" / "toy_train_lora.json")
        toggle = _check_advanced_toggle(page, artefacts / f"advanced_shown_{tag}.png")
        nid, did = _train_node(page), page.js("() => app.graph._nodes.find(n => n.type === 'FT_ToyDataset').id")
        steps, run = 30, f"toy_lora_{tag}"
        page.js("""([id, steps, run]) => { const n = app.graph.getNodeById(id);
            const set = (k, v) => { const w = n.widgets.find(w => w.name === k); w.value = v; w.callback?.(v); };
            set('steps', steps); set('validation_every', 15); set('save_every', 15); set('run_name', run); }""",
                [nid, steps, run])
        page.focus(nid)
        before = next(c for c in page.js(CHARTS) if c["id"] == nid)
        assert before["unstretched"] and before["distinct"] > 1, before  # the placeholder, drawn at its size
        page.js("""() => { window.__ftDraws = []; window.comfyAPI.api.api.addEventListener('finetune.progress',
            () => window.__ftDraws.push(window.finetuneChartStats.draws)); }""")
        seconds = page.run()
        record, draws = page.js("() => window.__ft"), page.js("() => window.__ftDraws")
        assert record["progress"] >= 2 and draws[-1] > draws[0], (record["progress"], draws)  # drawn as it trained
        page.focus(nid)
        chart = next(c for c in page.js(CHARTS) if c["id"] == nid)
        assert chart["points"] == steps and chart["run"] == run and chart["distinct"] > 5, chart
        assert chart["unstretched"], chart
        seen = page.js(SEEN, [nid, "ft_chart"])
        assert seen["seen"], seen
        if mode == "classic":
            assert not chart["covered"] and chart["roomBelow"] >= 256, chart
        page.screenshot(artefacts / f"train_node_{tag}.png", node=nid)
        # the dataset's thumbnails, and the text panels (model, dataset, where the LoRA was saved)
        assert len(page.js(f"() => app.nodeOutputs['{did}']?.images ?? []")) >= 1
        page.focus(did, 300)
        thumbs = page.js(f"""() => {{ const n = app.graph.getNodeById({did}), el = document.querySelector(
            '[data-node-id="{did}"]'); const imgs = el ? [...el.querySelectorAll('img')] : (n.imgs ?? []);
            return imgs.filter(i => i.complete && i.naturalWidth > 0).length; }}""")
        assert thumbs >= 1, thumbs
        page.screenshot(artefacts / f"dataset_node_{tag}.png", node=did)
        texts = page.js("""() => app.graph._nodes.filter(n => n.widgets?.some(w => w.name === 'ft_result' && !w.hidden))
            .map(n => [n.id, n.type, n.widgets.find(w => w.name === 'ft_result').element.value])""")
        assert {t[1] for t in texts} >= {"FT_LoadBaseModel", "FT_ToyDataset", "FT_SaveLoRA"}, texts
        for tid, ttype, value in texts:
            assert value.strip(), (ttype, value)
            page.focus(tid)
            seen = page.js(SEEN, [tid, "ft_result"])
            assert seen["seen"], (ttype, seen)
        overlaps = page.js(OVERLAPS)
        print(f"{tag}: 30 steps in {seconds:.1f} s, toggle: {toggle}, chart {chart['shown']} px "
              f"(backing {chart['backing']}), overlapping pairs: {overlaps}")
        if mode == "classic":
            assert overlaps == [], overlaps
        else:  # Nodes 2.0: the nodes the pack sizes; other nodes' spacing: test_example_layouts_with_nodes_2
            assert [o for o in overlaps if o["pack"]] == [], overlaps
        page.page.wait_for_timeout(1500)  # the front end stores the open workflow in the browser a moment later
        page.reload()
        again = next(c for c in page.js(CHARTS) if c["id"] == nid)
        assert again["points"] == steps and again["run"] == run, again
        final_loss = page.js(f"() => app.graph.getNodeById({nid}).__ftChart.points.at(-1)[1]")
        _check_runs_panel(page, run, steps, final_loss, artefacts / f"runs_panel_{tag}.png")
        page.assert_clean()
    finally:
        page.close()
