"""The runs panel's read-only routes (nodes/routes.py): the listing of a folder of hand-written fake runs is exact,
every way out of the runs folder is refused (called directly and, when aiohttp is installed, through aiohttp's own
URL decoding), and markup from a run's files always goes out as text. No torch, no ComfyUI."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import sys
import threading
import types

import pytest
from comfyui_finetune.nodes import routes
from comfyui_finetune.nodes.routes import Refused, list_runs, run_file

MARKUP = "<script>alert(1)</script>"


def write(path, text, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    os.utime(path, (mtime, mtime))


def lines(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def config(method, name, dataset):
    return json.dumps({"format": 1, "method": method, "recipe": {"steps": 10, "run_name": name},
                       "model": {"family": "toy", "name": "toy", "source": "toy (built-in)"},
                       "dataset": {"name": dataset, "images": 4}})


@pytest.fixture
def runs(tmp_path):
    """output/finetune/ with five runs, folders that are no runs, and links; plus a secret file outside."""
    root = tmp_path / "output" / "finetune"
    outside = tmp_path / "secret"
    write(outside / "passwd.txt", "secret", 1)
    write(outside / "config.json", "{}", 1)
    write(tmp_path / "output" / "other.json", "{}", 1)

    a = root / "lora-cat"
    write(a / "config.json", config("lora", "lora-cat", "cats"), 800)
    write(a / "status.json", json.dumps({"status": "finished", "time": 1000.0, "started": 900.0, "step": 10,
                                         "total": 10, "best_step": 5, "best_score": 0.75, "ranking": "clip_i"}),
          1000)
    write(a / "log.jsonl", lines([{"step": i, "loss": 1.0 / i, "lr": 1e-3, "seconds": 0.1} for i in range(1, 11)]),
          990)
    for name in ("step-5-0.png", "step-10-1.png", "step-10-0.png", "notes.png"):
        write(a / "samples" / name, b"\x89PNG fake", 950)
    write(a / "checkpoints" / "step-10" / "manifest.json", "{}", 990)
    write(a / "checkpoints" / "step-5" / "state.pt", b"", 900)  # no manifest: incomplete
    write(a / "lora.safetensors", b"", 995)
    write(a / "captions.txt", "<b>bold</b>", 995)

    b = root / "ti-running"
    write(b / "config.json", config("textual_inversion", "ti", "toy-purple-star"), 2000)
    write(b / "status.json", json.dumps({"status": "running", "time": 2010.0, "started": 2000.0, "step": 3,
                                         "total": 100}), 2010)
    write(b / "log.jsonl", lines([{"step": i, "loss": 0.5} for i in (1, 2, 3)]) + '{"step": 4, "lo', 2011)

    c = root / "failed-run"
    write(c / "config.json", config("lora", MARKUP, MARKUP), 1500)
    write(c / "status.json", json.dumps({"status": "failed", "time": 1510.0, "started": 1500.0, "step": 1,
                                         "total": 10, "error": "FloatingPointError: the loss became nan"}), 1510)
    write(c / "log.jsonl", lines([{"step": 1, "loss": 0.25}, {"step": 2, "loss": float("nan")}]), 1510)

    d = root / "no-status"
    write(d / "config.json", config("controlnet", "cn", "shapes"), 500)

    e = root / "big"
    write(e / "status.json", json.dumps({"status": "cancelled", "time": 3100.0, "started": 3000.0, "step": 1000,
                                         "total": 2000}), 3100)
    write(e / "log.jsonl", lines([{"step": i, "loss": float(i)} for i in range(1, 1001)]), 3100)

    write(root / "class_images" / "abc" / "0.png", b"", 10)  # DreamBooth's cache: no run
    write(root / "reports" / "r.csv", "a,b", 10)
    write(root / ".hidden" / "status.json", '{"status": "finished"}', 10)
    os.symlink(a, root / "link-to-run")
    os.symlink(outside, root / "link-out")
    os.symlink(outside / "passwd.txt", a / "samples" / "step-11-0.png")  # a picture name leading out
    os.symlink(outside / "config.json", a / "leak.json")
    os.symlink(a / "config.json", a / "same.json")  # a link inside the run is fine
    return root


def test_the_listing_of_fake_runs_is_exact(runs):
    got = list_runs(runs)
    assert [r["name"] for r in got] == ["big", "ti-running", "failed-run", "lora-cat", "no-status"]
    common = {"model": "toy", "model_source": "toy (built-in)", "family": "toy", "images": 4, "error": None,
              "sample_step": None, "samples": [], "sounds": [], "last_checkpoint": None, "results": [], "best_step": None,
              "best_score": None, "ranking": None}
    assert got[3] == {**common, "name": "lora-cat", "method": "lora", "dataset": "cats", "status": "finished",
                      "step": 10, "total": 10, "final_loss": 0.1, "started": 900.0, "updated": 1000.0,
                      "curve": [[i, 1.0 / i] for i in range(1, 11)], "sample_step": 10,
                      "samples": ["samples/step-10-0.png", "samples/step-10-1.png"], "last_checkpoint": 10,
                      "results": ["lora.safetensors"], "best_step": 5, "best_score": 0.75, "ranking": "clip_i"}
    assert got[1] == {**common, "name": "ti-running", "method": "textual_inversion", "dataset": "toy-purple-star",
                      "status": "running", "step": 3, "total": 100, "final_loss": 0.5, "started": 2000.0,
                      "updated": 2011.0, "curve": [[1, 0.5], [2, 0.5], [3, 0.5]]}
    assert got[2] == {**common, "name": "failed-run", "method": "lora", "dataset": MARKUP, "status": "failed",
                      "error": "FloatingPointError: the loss became nan", "step": 1, "total": 10,
                      "final_loss": 0.25, "started": 1500.0, "updated": 1510.0, "curve": [[1, 0.25]]}
    assert got[4] == {**common, "name": "no-status", "method": "controlnet", "dataset": "shapes",
                      "status": "unknown", "step": 0, "total": 10, "final_loss": None, "started": 500.0,
                      "updated": 500.0, "curve": []}
    big = got[0]
    assert big["status"] == "cancelled" and big["step"] == 1000 and big["total"] == 2000
    assert big["method"] is None and big["model"] is None and big["final_loss"] == 1000.0
    assert len(big["curve"]) == 200 and big["curve"][0] == [1, 1.0] and big["curve"][-1] == [1000, 1000.0]
    assert [p[0] for p in big["curve"]] == sorted({p[0] for p in big["curve"]})
    assert list_runs(runs.parent / "nothing-here") == []


def test_run_files_are_served_from_the_run_folder(runs):
    a = runs / "lora-cat"
    assert run_file(runs, "lora-cat", "config.json") == (a / "config.json").resolve()
    assert run_file(runs, "lora-cat", "samples/step-10-0.png") == (a / "samples/step-10-0.png").resolve()
    assert run_file(runs, "lora-cat", "checkpoints/step-10/manifest.json").name == "manifest.json"
    assert run_file(runs, "lora-cat", "same.json") == (a / "config.json").resolve()
    assert run_file(runs, "link-to-run", "log.jsonl") == (a / "log.jsonl").resolve()
    assert routes.file_body(run_file(runs, "lora-cat", "captions.txt")) == (b"<b>bold</b>", "text/plain; charset=utf-8")
    assert routes.file_body(run_file(runs, "lora-cat", "log.jsonl"))[1] == "text/plain; charset=utf-8"
    assert routes.file_body(run_file(runs, "lora-cat", "samples/step-5-0.png")) == (b"\x89PNG fake", "image/png")


def test_a_sound_runs_samples_list_and_serve_their_sound(tmp_path):
    run = tmp_path / "finetune" / "sound"
    (run / "samples").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": 4, "total": 4}))
    for name in ("step-0-0", "step-4-0", "step-4-1"):
        (run / "samples" / f"{name}.png").write_bytes(b"\x89PNG fake")
    for name in ("step-0-0", "step-4-1"):
        (run / "samples" / f"{name}.wav").write_bytes(b"RIFF fake")
    (got,) = list_runs(tmp_path / "finetune")
    assert got["samples"] == ["samples/step-4-0.png", "samples/step-4-1.png"]
    assert got["sounds"] == ["samples/step-4-1.wav"]
    assert routes.file_body(run_file(tmp_path / "finetune", "sound", "samples/step-0-0.wav")) == (b"RIFF fake",
                                                                                                 "audio/wav")


LONG = "a" * 5000
#: (run, file) pairs that must be refused; each leaves, or could leave, the run folder
ESCAPES = [
    ("lora-cat", "../failed-run/config.json"),
    ("lora-cat", "../../other.json"),
    ("lora-cat", "samples/../../failed-run/config.json"),
    ("lora-cat", "%2e%2e/failed-run/config.json"),
    ("lora-cat", "%2E%2E/%2E%2E/other.json"),
    ("lora-cat", "%252e%252e/failed-run/config.json"),
    ("lora-cat", "%25252e%25252e/other.json"),
    ("lora-cat", "..%2ffailed-run%2fconfig.json"),
    ("lora-cat", "..%252ffailed-run%252fconfig.json"),
    ("lora-cat", "..\\failed-run\\config.json"),
    ("lora-cat", "%5c..%5cother.json"),
    ("lora-cat", "/etc/passwd.txt"),
    ("lora-cat", "%2fetc%2fpasswd.txt"),
    ("lora-cat", "C:/Windows/win.ini.txt"),
    ("lora-cat", "C:%5cWindows%5cwin.ini.txt"),
    ("lora-cat", "samples/step-11-0.png"),  # a link leading out
    ("lora-cat", "leak.json"),  # a link leading out
    ("lora-cat", "config.json\x00.png"),
    ("lora-cat", "config.json%00.png"),
    ("lora-cat", LONG + ".json"),
    ("lora-cat", "/".join(["samples"] * 400) + "/x.png"),
    ("lora-cat", "./config.json"),
    ("lora-cat", "samples//step-5-0.png"),
    ("lora-cat", ".hidden.json"),
    ("lora-cat", "lora.safetensors"),
    ("lora-cat", "checkpoints/step-5/state.pt"),
    ("lora-cat", "config.json.html"),
    ("lora-cat", "samples/step-5-0.png\n.txt"),
    ("..", "other.json"),
    ("%2e%2e", "other.json"),
    ("%252e%252e", "other.json"),
    ("link-out", "passwd.txt"),
    ("link-out", "config.json"),
    (".hidden", "status.json"),
    ("/tmp", "passwd.txt"),
    ("lora-cat/..", "other.json"),
    ("..\\..", "other.json"),
    ("", "config.json"),
    ("nope", "config.json"),
    (LONG, "config.json"),
    ("lora-cat\x00", "config.json"),
]


@pytest.mark.parametrize("run,rel", ESCAPES, ids=[f"{i}" for i in range(len(ESCAPES))])
def test_every_way_out_is_refused(runs, run, rel):
    with pytest.raises(Refused) as e:
        run_file(runs, run, rel)
    assert e.value.status in (400, 404) and "secret" not in str(e.value)


def test_markup_in_a_config_is_json_text(runs):
    body, ctype = routes.file_body(run_file(runs, "failed-run", "config.json"))
    assert ctype == "application/json; charset=utf-8" and b"<" not in body and b">" not in body
    assert json.loads(body)["recipe"]["run_name"] == MARKUP
    listing = routes.dumps({"runs": list_runs(runs)})
    assert "<" not in listing and "NaN" not in listing
    assert json.loads(listing)["runs"][2]["dataset"] == MARKUP
    assert routes.dumps({"x": float("nan"), "y": [float("inf")]}) == '{"x": null, "y": [null]}'


def test_register_does_nothing_outside_comfyui(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert routes.register() is False
    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": None})
    monkeypatch.setitem(sys.modules, "server", fake)
    assert routes.register() is False


# ------------------------------------------------------------------------------------------ through aiohttp --
@pytest.fixture
def served(runs, monkeypatch):
    """The routes on a real aiohttp server (a loopback port, its own thread), added as ComfyUI would add them: to
    ``PromptServer.instance.routes`` by :func:`routes.register`, the runs folder coming from the host."""
    web = pytest.importorskip("aiohttp.web")
    from comfyui_finetune.nodes import host

    monkeypatch.setattr(host, "output_dir", lambda: runs.parent)
    instance = types.SimpleNamespace(routes=web.RouteTableDef())
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=instance)))
    assert routes.register() is True and routes.register() is False  # once only
    assert {r.method for r in instance.routes} == {"GET"}
    app = web.Application()
    app.add_routes(instance.routes)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def get(path: str, method: str = "GET"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest(method, path, skip_accept_encoding=True)  # the path goes out byte for byte
        conn.endheaders()
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        conn.close()
        return out

    yield get
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def test_the_listing_over_http(served, runs):
    status, headers, body = served("/finetune/runs")
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert json.loads(body) == json.loads(routes.dumps({"runs": list_runs(runs)}))
    assert b"<" not in body
    status, headers, body = served("/finetune/runs/lora-cat/samples/step-10-0.png")
    assert (status, headers["Content-Type"], body) == (200, "image/png", b"\x89PNG fake")
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = served("/finetune/runs/lora-cat/captions.txt")
    assert (status, headers["Content-Type"], body) == (200, "text/plain; charset=utf-8", b"<b>bold</b>")
    status, headers, body = served("/finetune/runs/failed-run/config.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json") and b"<" not in body
    assert json.loads(body)["dataset"]["name"] == MARKUP
    assert served("/finetune/runs", "POST")[0] == 405
    assert served("/finetune/runs/lora-cat/config.json", "DELETE")[0] == 405


def quote_raw(text: str) -> str:
    """A URL path as an attacker would send it: bytes that cannot go raw on the wire %-encoded, the rest as is."""
    return "".join(c if 32 < ord(c) < 127 and c not in "#?" else "%" + "%".join(f"{b:02X}" for b in c.encode())
                   for c in text)


@pytest.mark.parametrize("run,rel", ESCAPES, ids=[f"{i}" for i in range(len(ESCAPES))])
def test_every_way_out_is_refused_over_http(served, run, rel):
    status, headers, body = served(f"/finetune/runs/{quote_raw(run)}/{quote_raw(rel)}")
    assert status in (400, 404), body[:200]
    if headers["Content-Type"].startswith("application/json"):
        assert "error" in json.loads(body)
    else:  # aiohttp's own 404: no route matched (an empty run name, a newline)
        assert status == 404 and (run == "" or run.startswith("/") or "\n" in rel)
    assert b"secret" not in body and b"{}" != body


@pytest.mark.parametrize("path", ["/finetune/runs/lora-cat/%2e%2e/%2e%2e/other.json", "/finetune/runs/%2e%2e/other.json",
                                  "/finetune/runs/lora-cat/..%2f..%2fother.json", "/finetune/runs/link-out/passwd.txt",
                                  "/finetune/runs/lora-cat/%2e%2e%5c%2e%2e%5cother.json",
                                  "/finetune/runs/lora-cat/%252e%252e%252f%252e%252e%252fother.json",
                                  "/finetune/runs/lora-cat/config.json%00.png", "/finetune/runs/lora-cat/" + "b" * 5000,
                                  "/finetune/runs/lora-cat//" + "etc/passwd.txt", "/finetune/runs/lora-cat/%ff.json"])
def test_encoded_paths_over_http(served, path):
    status, _, body = served(path)
    assert status in (400, 404), body[:200]
    assert b"secret" not in body


# ------------------------------------------------------------------------------------ template thumbnails --
def test_template_thumbnails_are_the_example_jpgs_only(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"jpg")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    assert routes.template_thumbnail("a", tmp_path) == tmp_path / "a.jpg"
    for name in ("b", "link", "../a", "..", ".hidden", "a.json", "", "a/../a", "x" * 200):
        with pytest.raises(routes.Refused):
            routes.template_thumbnail(name, tmp_path)
    shipped = sorted(p.stem for p in routes.EXAMPLES.glob("*.json"))
    assert shipped and all(routes.template_thumbnail(n).is_file() for n in shipped)  # every example has one


def test_thumbnails_win_over_a_comfyui_that_serves_only_json(served):
    """Newer ComfyUI answers /workflow_templates/<pack>/<file> itself, .json only (app/custom_node_manager.py
    @fcd026b), registered after the custom nodes' routes, and copies every route under /api: the pack's longer route
    must answer the front end's thumbnail requests there."""
    web = pytest.importorskip("aiohttp.web")
    pack = routes.EXAMPLES.parent.name
    table = web.RouteTableDef()
    routes.add_template_routes(table)

    @table.get("/workflow_templates/{module_name}/{filename}")
    async def comfyui_0_38(request):
        if not request.match_info["filename"].endswith(".json"):
            raise web.HTTPNotFound()
        return web.json_response({"from": "comfyui"})

    app = web.Application()
    app.add_routes([web.RouteDef(r.method, "/api" + r.path, r.handler, r.kwargs) for r in table])
    app.add_routes(table)

    async def ask(path):
        from aiohttp.test_utils import make_mocked_request

        request = make_mocked_request("GET", path, app=app)
        match = await app.router.resolve(request)
        request._match_info = match
        response = await match.handler(request)
        return response.status, getattr(response, "body", b"")

    loop = asyncio.new_event_loop()
    try:
        status, body = loop.run_until_complete(ask(f"/api/workflow_templates/{pack}/toy_train_lora.jpg"))
        assert status == 200 and body == (routes.EXAMPLES / "toy_train_lora.jpg").read_bytes()
        status, body = loop.run_until_complete(ask(f"/api/workflow_templates/{pack}/toy_train_lora.json"))
        assert status == 200 and b"comfyui" in body
        assert loop.run_until_complete(ask(f"/api/workflow_templates/{pack}/nothing.jpg"))[0] == 404
    finally:
        loop.close()
    status, headers, body = served(f"/workflow_templates/{pack}/toy_train_lora.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert served(f"/workflow_templates/{pack}/..%2fREADME.jpg")[0] == 404
