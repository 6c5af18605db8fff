"""The canvas as a user sees it: the real ComfyUI and its real front end in headless Chromium.

Runs when COMFYUI_PATH is set and a Chromium (``$CHROMIUM``, else ``chromium`` on PATH) and the ``playwright``
package are found; skipped with the reason otherwise. Never run ``playwright install`` (it downloads a browser):
Debian's ``chromium`` package and pip's ``playwright`` are enough. Screenshots go to ``$FT_ARTIFACTS`` (default: the
test's temporary folder); the path is printed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from comfy_server import PACK, ComfyServer, comfyui_path, skip_reason


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

#: bounding boxes of every node (title bar included) and the pairs that overlap
OVERLAPS = """() => {
  const boxes = app.graph._nodes.map(n => { const b = new Float32Array(4); n.getBounding(b, true);
                                             return {id: n.id, type: n.type, b: Array.from(b)}; });
  const pairs = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, c] = [boxes[i].b, boxes[j].b];
    if (a[0] < c[0] + c[2] && c[0] < a[0] + a[2] && a[1] < c[1] + c[3] && c[1] < a[1] + a[3])
      pairs.push(`${boxes[i].type}#${boxes[i].id} x ${boxes[j].type}#${boxes[j].id}`);
  }
  return pairs;
}"""

#: each training node's chart: where it is (canvas space), whether it is inside its node above the preview area,
#: whether another node covers it, and whether its pixels are drawn (not one flat colour)
CHARTS = """() => app.graph._nodes.filter(n => n.__ftCanvas).map(n => {
  const w = n.widgets.find(w => w.name === 'ft_chart');
  const top = n.pos[1] + (w.y ?? w.last_y ?? 0), bottom = top + 154;
  const covered = app.graph._nodes.filter(o => o !== n).some(o => { const b = new Float32Array(4);
    o.getBounding(b, true); return n.pos[0] < b[0] + b[2] && b[0] < n.pos[0] + n.size[0] && top < b[1] + b[3]
    && b[1] < bottom; });
  const c = n.__ftCanvas, ctx = c.getContext('2d');
  let distinct = 0;
  if (c.width && c.height) { const d = ctx.getImageData(0, 0, c.width, c.height).data, seen = new Set();
    for (let i = 0; i < d.length; i += 4 * 7) seen.add(`${d[i]},${d[i + 1]},${d[i + 2]}`); distinct = seen.size; }
  return {id: n.id, points: n.__ftChart?.points.length ?? 0, kept: n.properties?.ft_chart?.points?.length ?? 0,
          run: n.__ftChart?.run, total: n.__ftChart?.total, covered, distinct,
          roomBelow: n.pos[1] + n.size[1] - bottom, visibleWidgets: n.widgets.filter(x => n.isWidgetVisible ?
            n.isWidgetVisible(x) : !x.hidden).length, allWidgets: n.widgets.length};
})"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-web")
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    srv = ComfyServer(base).start()
    yield srv
    srv.stop()


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
    """One page of the front end, with the checks' console and page errors recorded."""

    def __init__(self, browser, server):
        self.server, self.errors = server, []
        self.ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
        self.page = self.ctx.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(m.text) if "Error loading extension" in m.text else None)
        self.open()

    def open(self) -> None:
        self.page.goto(self.server.url, wait_until="load")
        self.page.wait_for_function(READY, timeout=60_000)

    def reload(self) -> None:
        self.page.reload(wait_until="load")
        self.page.wait_for_function(READY, timeout=60_000)

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg) if arg is not None else self.page.evaluate(expr)

    def load(self, path: Path) -> None:
        self.js("([wf, name]) => app.loadGraphData(wf, true, true, name)", [json.loads(path.read_text()), path.stem])

    def run(self, timeout: float = 600) -> float:
        """Queue the loaded workflow as the Run button does; wait for it; return its seconds."""
        self.server.post("/free", {"free_memory": True})  # a cached prompt would not run again
        self.js(RECORD)
        t0 = time.time()
        self.js("() => app.queuePrompt(0, 1)")
        self.page.wait_for_function("window.__ft.done !== null", timeout=timeout * 1000, polling=250)
        done = self.js("() => [window.__ft.done, window.__ft.error]")
        assert done[0] == "success", f"the workflow failed in the page: {json.dumps(done[1])[:3000]}"
        self.page.wait_for_timeout(600)  # let the last frames draw
        return time.time() - t0

    def screenshot(self, path: Path, node: int | None = None) -> None:
        """The whole graph fitted to the page, or one node at full size (its chart and preview readable)."""
        if node is None:
            self.js("() => app.extensionManager?.command?.execute?.('Comfy.Canvas.FitView')")
        else:
            self.js("""(id) => { const n = app.graph.getNodeById(id), ds = app.canvas.ds; ds.scale = 1;
                ds.offset = [-n.pos[0] + 420, -n.pos[1] + 60]; app.canvas.setDirty(true, true); }""", node)
        self.page.wait_for_timeout(500)
        self.page.screenshot(path=str(path))

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
        _check_runs_panel(page, run, steps, final_loss, artefacts)
        for url in ("/api/workflow_templates/comfyui-finetune/toy_train_lora.jpg",
                    "/extensions/comfyui-finetune/docs/FT_TrainLoRA.md"):
            assert page.js("(u) => fetch(u).then(r => r.status)", url) == 200, url
        assert not page.errors, page.errors
    finally:
        page.close()


def _check_runs_panel(page: Page, run: str, steps: int, final_loss: float, artefacts: Path) -> None:
    tabs = page.js("() => app.extensionManager.getSidebarTabs().map(t => t.id)")
    if "finetune-runs" not in tabs:
        pytest.fail(f"the runs panel is not registered as a sidebar tab (tabs: {tabs})")
    page.page.click(".finetune-runs-tab-button")
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
    page.page.screenshot(path=str(artefacts / "runs_panel.png"))


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
        assert not page.errors, page.errors
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
        assert not page.errors, page.errors
    finally:
        page.close()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_layouts_do_not_overlap_after_a_run(server, browser, artefacts, path):
    page = Page(browser, server)
    try:
        page.load(path)
        assert page.js(OVERLAPS) == [], "overlapping before the run"
        seconds = page.run()
        overlaps = page.js(OVERLAPS)
        charts = page.js(CHARTS)
        print(f"{path.stem}: ran in {seconds:.1f} s in the browser; overlapping pairs after the run: {len(overlaps)}")
        page.screenshot(artefacts / f"{path.stem}.png")
        assert overlaps == [], overlaps
        for c in charts:
            assert not c["covered"] and c["roomBelow"] >= 256 and c["points"] > 0, c
        assert not page.errors, page.errors
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
        assert not page.errors, page.errors
    finally:
        page.close()
