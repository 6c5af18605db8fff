"""A damaged run is recovered (issue 36): a resume takes the newest checkpoint that is whole (its files match the
sizes and sha256 digests its manifest.json recorded last) and reads, says which newer ones it skipped and why (the
log and status.json), and continues from there exactly as an undamaged run would; with none usable it is an error
naming the run folder, what is wrong with each checkpoint and the fix. Checkpoints of older versions (a manifest
without digests) resume when they read. A resume asking for fewer steps than the run has done is an error, never a
status "step 4 of 3". keep_best's best checkpoint is read back by the same rules. Through the node and the shell."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_finetune.__main__ import main
from comfyui_finetune.nodes import host
from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.nodes.train import FT_TrainLoRA
from comfyui_finetune.trainers.runs import integrity
from comfyui_finetune.trainers.runs.integrity import DamagedCheckpoint
from comfyui_finetune.trainers.runs.run_dir import RunDir, load_checkpoint, newest_usable

KEPT = Path(__file__).parent / "data" / "run_before_families" / "cut"


def toy_set():
    return FT_ToyDataset().execute("purple", "star", 4, "a sks star", 0, "narrow")[0]


def lora(toy, **kw):
    args = dict(steps=4, learning_rate=1e-3, batch_size=2, rank=4, alpha=4.0, seed=0, target_modules="attention",
                train_text_encoder=False, text_encoder_lr=0.0, run_name="whole", save_every=2)
    args.update(kw)
    return FT_TrainLoRA().execute(toy, toy_set(), **args)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, toy):
    """A finished 4-step toy LoRA run with checkpoints step-2 and step-4, never touched (tests damage copies)."""
    saved = dict(host._fallback)
    root = tmp_path_factory.mktemp("whole")
    host.set_folders(output=root / "output", models=root / "models", input=root / "input")
    try:
        log = lora(toy)[2]
    finally:
        host._fallback.update(saved)
    return root / "output" / "finetune" / log.run


@pytest.fixture
def copy_of(whole, folders):
    """``copy_of(name)``: a copy of the whole run in this test's output folder."""
    def make(name: str = "hurt") -> Path:
        return Path(shutil.copytree(whole, folders["output"] / "finetune" / name))

    return make


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def logged_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]


def same_lora(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "not the same LoRA"


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def garble(path: Path) -> None:
    """Other bytes in the middle of the file, its size unchanged (a bad sector, a bit flip)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 32] = os.urandom(32)
    path.write_bytes(bytes(data))


def as_older_version(run: Path) -> None:
    """Manifests as the pack wrote them before digests: the file names only."""
    for m in (run / "checkpoints").glob("step-*/manifest.json"):
        old = json.loads(m.read_text())
        m.write_text(json.dumps({"step": old["step"], "method": old["method"], "files": old["files"]}))


def resumed_exactly(run: Path, log, whole: Path, frm: int) -> None:
    """The resume continued from step ``frm`` and ended where the undamaged run did, to the bit."""
    assert log.resumed_from == frm and log.steps == 4
    assert logged_steps(run) == [1, 2, 3, 4]
    assert (status(run)["status"], status(run)["step"], status(run)["total"]) == ("finished", 4, 4)
    same_lora(whole / "lora.safetensors", run / "lora.safetensors")
    assert integrity.problems(run / "checkpoints" / "step-4") == [], "the damaged checkpoint is written anew"


# ------------------------------------------------------------------------- a damaged newest checkpoint --
DAMAGE = {  # what is done to checkpoints/step-4, and what the warning must say
    "cut short": (lambda c: cut(c / "trainable.safetensors"),
                  ["trainable.safetensors is cut short", "manifest.json says"]),
    "garbage bytes": (lambda c: garble(c / "state.pt"), ["state.pt holds other bytes than were written", "sha256"]),
    "missing state": (lambda c: (c / "state.pt").unlink(), ["state.pt is missing"]),
    "longer": (lambda c: (c / "log.json").write_text((c / "log.json").read_text() + "  "),
               ["log.json is longer than written"]),
    "manifest garbage": (lambda c: (c / "manifest.json").write_bytes(b"\x00\xff" * 40),
                         ["manifest.json cannot be read"]),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), ["has no manifest.json"]),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_continues_from_the_one_before(toy, whole, copy_of,
                                                                                          caplog, kind):
    damage, says = DAMAGE[kind]
    run = copy_of()
    damage(run / "checkpoints" / "step-4")
    with caplog.at_level(logging.WARNING):
        log = lora(toy, resume_run=run.name)[2]
    warnings = status(run)["warnings"]
    assert len(warnings) == 1, warnings
    for text in [str(run / "checkpoints" / "step-4"), "skipped the damaged checkpoint", "Resumed from step-2", *says]:
        assert text in warnings[0], (text, warnings[0])
    assert warnings[0] in caplog.text
    resumed_exactly(run, log, whole, 2)


def test_every_checkpoint_damaged_is_an_error_naming_the_run_each_damage_and_the_fix(toy, copy_of):
    run = copy_of()
    garble(run / "checkpoints" / "step-2" / "trainable.safetensors")
    (run / "checkpoints" / "step-4" / "log.json").unlink()
    before = status(run)
    with pytest.raises(DamagedCheckpoint) as e:
        lora(toy, resume_run=run.name, steps=6)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    for text in [f"resume_run {run.name!r}", str(run / "checkpoints"), "step-4: log.json is missing",
                 "step-2: trainable.safetensors holds other bytes", "Start a new run (empty resume_run",
                 "leave out --resume", "the damaged folders can be deleted"]:
        assert text in msg, (text, msg)
    assert status(run) == before, "nothing was trained, the status is as it was"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]


# -------------------------------------------------------------------------------- older checkpoints --
def test_checkpoints_of_an_older_version_resume_when_they_read(toy, whole, copy_of, caplog):
    run = copy_of()
    as_older_version(run)
    with caplog.at_level(logging.WARNING):
        log = lora(toy, resume_run=run.name)[2]
    assert log.resumed_from == 4 and log.steps == 4 and "warnings" not in status(run)
    assert "damaged" not in caplog.text
    same_lora(whole / "lora.safetensors", run / "lora.safetensors")
    man = json.loads((run / "checkpoints" / "step-4" / "manifest.json").read_text())
    assert man["format"] == integrity.FORMAT and set(man["checks"]) == set(integrity.FILES), "rewritten with digests"


@pytest.mark.parametrize("damage, says", [
    (lambda c: cut(c / "state.pt"), "state.pt cannot be read"),
    (lambda c: (c / "trainable.safetensors").write_bytes(os.urandom(4000)),
     "trainable.safetensors cannot be read (SafetensorError"),
], ids=["cut pickle", "garbage safetensors"])
def test_an_older_checkpoint_that_does_not_read_is_skipped(toy, whole, copy_of, damage, says):
    run = copy_of()
    as_older_version(run)
    damage(run / "checkpoints" / "step-4")
    log = lora(toy, resume_run=run.name)[2]
    [warning] = status(run)["warnings"]
    assert says in warning and str(run / "checkpoints" / "step-4") in warning, warning
    resumed_exactly(run, log, whole, 2)


def test_the_kept_run_of_an_older_version_reads_as_whole(tmp_path):
    """tests/data/run_before_families (a manifest without digests) is whole; test_shell resumes it to the bit."""
    run = RunDir(Path(shutil.copytree(KEPT, tmp_path / "cut")))
    step, folder, (trainable, state, rows), skipped = newest_usable(run)
    assert (step, folder.name, skipped) == (3, "step-3", [])
    assert trainable and [r["step"] for r in rows] == [1, 2, 3] and "optimizer" in state


def test_a_state_file_without_the_training_state_is_named(tmp_path):
    folder = tmp_path / "checkpoints" / "step-1"
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(folder / "trainable.safetensors"))
    torch.save({"optimizer": {}}, folder / "state.pt")
    (folder / "log.json").write_text("[]")
    (folder / "manifest.json").write_text(json.dumps({"step": 1, "method": "lora", "files": list(integrity.FILES)}))
    with pytest.raises(DamagedCheckpoint, match="step-1: state.pt lacks lr_scheduler, rng, data"):
        load_checkpoint(folder)
    with pytest.raises(DamagedCheckpoint, match=r"resume_run '[^']+' cannot resume: no checkpoint in .* is usable "
                                                r"\(step-1: state.pt lacks"):
        newest_usable(RunDir(tmp_path))


# ------------------------------------------------------------------------------------ what is written --
def test_each_file_is_hashed_as_it_is_written_and_reads_back_the_same(tmp_path):
    """A checkpoint written with its digests reads back the same, for every dtype a
    trainable state may hold; the manifest's sizes and digests are those of the files on disk."""
    from comfyui_finetune.trainers.runs.run_dir import save_checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(5),
               "flag": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "strided": torch.randn(4, 6, generator=g).t()}
    run = RunDir.create(tmp_path, "w")
    state = {"optimizer": {"state": {}}, "lr_scheduler": {}, "rng": torch.Generator().get_state(), "data": {}}
    folder = save_checkpoint(run, 1, "lora", tensors, state, [{"step": 1, "loss": 0.5}])
    man = json.loads((folder / "manifest.json").read_text())
    for name in integrity.FILES:
        assert man["checks"][name] == integrity.file_digest(folder / name), name
    back, st, rows = load_checkpoint(folder)
    assert back.keys() == tensors.keys() and rows == [{"step": 1, "loss": 0.5}]
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


# --------------------------------------------------------------------------- fewer steps than done --
def test_a_resume_asking_for_fewer_steps_than_done_is_an_error_not_the_longer_run(toy, copy_of):
    run = copy_of()
    before = (status(run), logged_steps(run), sorted(p.name for p in (run / "checkpoints").iterdir()))
    with pytest.raises(ValueError) as e:
        lora(toy, resume_run=run.name, steps=3)
    msg = str(e.value)
    for text in [f"resume_run {run.name!r} has already trained 4 steps", "more than steps 3", "set steps above 4",
                 f"use the run's result as it is (lora.safetensors in {run})"]:
        assert text in msg, (text, msg)
    assert before == (status(run), logged_steps(run), sorted(p.name for p in (run / "checkpoints").iterdir()))
    assert status(run)["step"] <= status(run)["total"], "never 'step 4 of 3'"


def test_a_resume_asking_for_the_steps_done_gives_the_run_back_as_it_is(toy, whole, copy_of):
    run = copy_of()
    log = lora(toy, resume_run=run.name, steps=4)[2]
    assert log.resumed_from == 4 and log.steps == 4 and logged_steps(run) == [1, 2, 3, 4]
    same_lora(whole / "lora.safetensors", run / "lora.safetensors")


# ----------------------------------------------------------------------------------------- the shell --
def shell(run: Path, *args) -> int:
    return main(["train", str(run / "config.json"), "--resume", "--device", "cpu",
                 "--out", str(run.parent.parent), *map(str, args)])


def test_the_shell_resumes_past_a_damaged_checkpoint(whole, copy_of, capsys, caplog):
    run = copy_of()
    cut(run / "checkpoints" / "step-4" / "state.pt")
    with caplog.at_level(logging.WARNING):
        assert shell(run) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "finished" and report["step"] == 4
    [warning] = status(run)["warnings"]
    assert "state.pt is cut short" in warning and str(run / "checkpoints" / "step-4") in warning
    assert warning in caplog.text
    assert logged_steps(run) == [1, 2, 3, 4]
    same_lora(whole / "lora.safetensors", run / "lora.safetensors")


def test_the_shell_names_a_run_with_no_usable_checkpoint_and_the_fix(copy_of, capsys):
    run = copy_of()
    for step in (2, 4):
        cut(run / "checkpoints" / f"step-{step}" / "trainable.safetensors")
    assert shell(run, "--steps", 6) == 2
    err = capsys.readouterr().err
    for text in ["error: resume_run", str(run / "checkpoints"), "step-2: trainable.safetensors is cut short",
                 "step-4: trainable.safetensors is cut short", "leave out --resume"]:
        assert text in err, (text, err)


def test_the_shell_refuses_fewer_steps_than_done(copy_of, capsys):
    run = copy_of()
    assert shell(run, "--steps", 2) == 2
    err = capsys.readouterr().err
    assert "has already trained 4 steps, more than steps 2" in err and "--steps in the shell" in err, err
    assert (status(run)["step"], status(run)["total"]) == (4, 4)


# ------------------------------------------------------------------------------------------ keep_best --
def kohya(trainable: dict) -> dict:
    """A LoRA checkpoint's tensors under the result's kohya names (as tests/test_keep_best.py reads them)."""
    from comfyui_finetune.trainers.methods.lora import kohya_key

    out = {}
    for k, v in trainable.items():
        part, rest = k.split(".", 1)
        kind = "lora_down" if ".lora_A." in rest else "lora_up"
        mod = rest.split(".lora_A.")[0] if kind == "lora_down" else rest.split(".lora_B.")[0]
        out[f"{kohya_key(part, mod)}.{kind}.weight"] = v
    return out


@pytest.mark.parametrize("damaged, result", [({1}, 3), ({1, 3}, 2), ({1, 2, 3}, 4)])
def test_keep_best_skips_a_damaged_best_checkpoint_for_the_next_best(toy, tmp_path, monkeypatch, damaged, result):
    """Scores 0.9, 0.5, 0.7, 0.1 at steps 1-4: the best is step 1, then 3, then 2; the last step's weights are in
    memory. Damaged checkpoints are passed over, each named with what is wrong."""
    from comfyui_finetune.trainers.config.recipes import LoRARecipe
    from comfyui_finetune.trainers.loop import validation
    from comfyui_finetune.trainers.loop.training import Callbacks
    from comfyui_finetune.trainers.methods.lora import train_lora

    scores = iter([0.9, 0.5, 0.7, 0.1])
    monkeypatch.setattr(validation, "pictures", lambda *a, **k: torch.zeros(1, 8, 8, 3))
    monkeypatch.setattr(validation, "reference_pictures", lambda *a: None)
    monkeypatch.setattr(validation.BestKeeper, "score",
                        lambda self, imgs, prompt: {"clip_t": 0.0, "clip_i": 0.0, "score": next(scores)})
    kept = {}

    def on_checkpoint(step, folder):
        kept[step] = load_file(str(folder / "trainable.safetensors"))
        if step in damaged:
            garble(folder / "state.pt")

    recipe = LoRARecipe(steps=4, batch_size=2, seed=0, rank=4, save_every=1, validation_prompt="a sks star",
                        keep_best="clip_i", run_name="best")
    run = RunDir.create(tmp_path, "best")
    with torch.inference_mode(False):
        t = train_lora(recipe, toy, toy_set(), run, Callbacks(on_checkpoint=on_checkpoint),
                       scorer=type("Scorer", (), {"image_size": 8})())
    st = status(run.path)
    assert t.best_step == st["best_step"] == result and st["best_score"] == [0.9, 0.5, 0.7, 0.1][result - 1]
    assert len(st["warnings"]) == len(damaged)
    for step, warning in zip(sorted(damaged, key=lambda s: [0.9, 0.5, 0.7, 0.1][s - 1], reverse=True),
                             st["warnings"]):
        assert f"keep_best: skipped the damaged checkpoint {run.path / 'checkpoints'}/step-{step}: state.pt holds " \
               "other bytes" in warning and "the next best is the result instead" in warning, warning
    want = kohya(kept[result])
    assert all(torch.equal(t.result.state[k], want[k]) for k in want), "the result is that checkpoint's LoRA"
