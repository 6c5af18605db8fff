"""A run's folder while it trains and after: log.jsonl grows every few seconds (not only at checkpoints), status.json
says running / finished / cancelled / failed with the error, a resume never logs a step twice, and the runs panel's
Resume graph (nodes/resume.py) validates and continues the run only when it rebuilds the dataset exactly."""
from __future__ import annotations

import json

import pytest
from comfyui_finetune.nodes.datasets import FT_DatasetFromImages, FT_ToyDataset
from comfyui_finetune.trainers.runs import run_dir as runs_mod
from comfyui_finetune.trainers.loop.training import Callbacks, train
from comfyui_finetune.trainers.methods.lora import LoRAMethod
from comfyui_finetune.trainers.config.recipes import TrainConfig
from comfyui_finetune.trainers.runs.run_dir import RunDir


def toy_set(n=4):
    return FT_ToyDataset().execute("purple", "star", n, "a sks star", 0, "narrow")[0]


def on_disk(run: RunDir) -> tuple[list[int], dict]:
    path = run.path / "log.jsonl"
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []
    return steps, json.loads((run.path / "status.json").read_text())


def go(toy, run, steps, **kw):
    return train(toy.clone(), toy_set(), LoRAMethod(4, 4.0), TrainConfig(steps=steps, batch_size=2, save_every=0),
                 run, **kw)


def test_the_log_is_on_disk_while_the_run_goes(toy, folders, monkeypatch):
    monkeypatch.setattr(runs_mod.LogWriter, "EVERY", 0.0)
    seen = []
    run = RunDir.create(folders["output"] / "finetune", "live")
    go(toy, run, 4, callbacks=Callbacks(on_step=lambda info: seen.append((info.step, *on_disk(run)))))
    # at step k the rows of the steps before it are on disk (row k may still gain scores during its own step)
    assert [(k, steps) for k, steps, _ in seen] == [(1, []), (2, [1]), (3, [1, 2]), (4, [1, 2, 3])]
    assert [(s["status"], s["step"], s["total"]) for _, _, s in seen[1:]] == [("running", k - 1, 4) for k in (2, 3, 4)]
    steps, status = on_disk(run)
    assert steps == [1, 2, 3, 4] and status["status"] == "finished" and status["step"] == 4


def test_without_waiting_rows_are_written_at_checkpoints_and_the_end(toy, folders):
    seen = []
    run = RunDir.create(folders["output"] / "finetune", "slow")
    go(toy, run, 3, callbacks=Callbacks(on_step=lambda info: seen.append(on_disk(run)[0])))
    assert seen == [[], [], []] and on_disk(run)[0] == [1, 2, 3]


def test_resume_logs_no_step_twice_and_keeps_the_start(toy, folders):
    run = RunDir.create(folders["output"] / "finetune", "again")
    state = {"n": 0}

    def should_stop():
        return state["n"] >= 3

    def on_step(info):
        state["n"] = info.step

    first = go(toy, run, 6, callbacks=Callbacks(on_step=on_step, should_stop=should_stop))
    assert first.cancelled and first.step == 3
    steps, status = on_disk(run)
    assert steps == [1, 2, 3] and status["status"] == "cancelled"
    rows = (run.path / "log.jsonl").read_text().splitlines()
    with (run.path / "log.jsonl").open("a") as f:  # a later attempt got further, then was killed mid-line
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "lo')
    second = go(toy, run, 6, resume=True)
    assert second.resumed_from == 3 and second.step == 6 and [r["step"] for r in second.log] == [1, 2, 3, 4, 5, 6]
    steps, after = on_disk(run)
    assert steps == [1, 2, 3, 4, 5, 6] and after["status"] == "finished"
    assert (run.path / "log.jsonl").read_text().splitlines()[:3] == rows
    assert after["started"] == status["started"] and after["time"] > status["time"]


def test_a_failure_is_recorded_with_its_error(toy, folders):
    def on_step(info):
        if info.step == 2:
            raise ValueError("boom at two")

    run = RunDir.create(folders["output"] / "finetune", "broken")
    with pytest.raises(ValueError, match="boom"):
        go(toy, run, 5, callbacks=Callbacks(on_step=on_step))
    steps, status = on_disk(run)
    assert steps == [1, 2] and status["status"] == "failed" and status["error"] == "ValueError: boom at two"
    assert [s for s, _ in run.checkpoints()] == [2]


# ------------------------------------------------------------------------------------------ Resume graph --
def lora_node(model, dataset, **kw):
    from comfyui_finetune.nodes.train import FT_TrainLoRA

    args = {"steps": 3, "learning_rate": 1e-3, "batch_size": 2, "rank": 4, "alpha": 4.0, "seed": 0,
            "target_modules": "attention", "train_text_encoder": False, "text_encoder_lr": 0.0, "run_name": "panel",
            "save_every": 0}
    return FT_TrainLoRA().execute(model, dataset, **{**args, **kw})


def test_the_resume_graph_validates_and_continues_the_run(toy, folders):
    from comfyui_finetune import runner
    from comfyui_finetune.nodes.resume import resume_workflow

    log = lora_node(toy, FT_ToyDataset().execute("purple", "star", 4, "a sks star", 3, "broad",
                                                 repeats=2)[0])[2]
    folder = folders["output"] / "finetune" / log.run
    got = resume_workflow(folder)
    assert got["reason"] is None and got["name"] == f"resume {log.run}", got["reason"]
    prompt = got["prompt"]
    assert runner.validate(prompt) == []
    assert prompt["1"]["inputs"]["model_name"] == "toy (built-in)"
    assert prompt["2"]["class_type"] == "FT_ToyDataset"
    toy_inputs = {"color": "purple", "shape": "star", "count": 4, "caption": "a sks star", "seed": 3, "geometry": "broad"}
    assert toy_inputs.items() <= prompt["2"]["inputs"].items()
    assert prompt["2"]["inputs"]["repeats"] == 2
    train_node = next(n for n in prompt.values() if n["class_type"] == "FT_TrainLoRA")
    assert train_node["inputs"]["resume_run"] == log.run and train_node["inputs"]["rank"] == 4
    train_node["inputs"]["steps"] = 5  # train further, as a user would
    runner.run(prompt)
    steps, status = on_disk(RunDir(folder))
    assert steps == [1, 2, 3, 4, 5] and status["status"] == "finished"


def test_no_resume_graph_when_the_dataset_cannot_be_rebuilt(toy, folders):
    import torch
    from comfyui_finetune.nodes.resume import resume_workflow

    pics = torch.rand(4, 32, 32, 3)
    log = lora_node(toy, FT_DatasetFromImages().execute(pics, "a sks star")[0], run_name="from-graph")[2]
    got = resume_workflow(folders["output"] / "finetune" / log.run)
    assert got["prompt"] is None and "not recorded" in got["reason"]
    assert got["shell"] == f"python -m comfyui_finetune train output/finetune/{log.run}/config.json --resume"
