"""Resume the way HF users do: `--resume_from_checkpoint True` (or `latest`) finds the newest complete
checkpoint; a run SIGKILLed while it saves or while it steps resumes onto the uninterrupted trajectory."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmfast.train import checkpoints
from mmfast.train.cli import train, train_main

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("killed_run_worker.py")
STEPS = 6


def _argv(output_dir, *extra):
    return ["--output_dir", str(output_dir), "--per_device_train_batch_size", "12", "--logging_steps", "1",
            "--save_steps", "2", "--max_steps", str(STEPS), "--report_to", "none", "--cpu_threads", "1",
            "--disable_tqdm", "True", *extra]  # fmt: skip


def _losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run's losses."""
    losses = _losses(train(_argv(tmp_path_factory.mktemp("whole"))))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _kill(output_dir, moment, step):
    run = subprocess.run([sys.executable, str(WORKER), moment, str(step), *_argv(output_dir)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == -9, run.stderr[-3000:]


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, whole, caplog):
    out = tmp_path / "run"
    _kill(out, "save", 4)
    # The interrupted save is not among the checkpoints: the newest one is the complete checkpoint-2.
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-2"]
    assert (out / ".partial" / "checkpoint-4" / "optimizer.pt").is_file()
    with caplog.at_level(logging.WARNING, logger="mmfast.train.checkpoints"):
        resumed = train(_argv(out, "--resume_from_checkpoint", "True"))
    assert "passing over" in caplog.text and "checkpoint-4: a save that was interrupted" in caplog.text
    assert f"from {out / 'checkpoint-2'}" in caplog.text
    assert _losses(resumed) == whole
    # The resumed run's own saves are published, and the interrupted one is cleared away.
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (out / ".partial").exists()
    assert all(not checkpoints.missing_parts(p) for p in checkpoints.checkpoint_folders(out))


def test_a_run_killed_inside_a_step_resumes_with_latest(tmp_path, whole):
    out = tmp_path / "run"
    _kill(out, "step", 5)
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-2", "checkpoint-4"]
    resumed = train(_argv(out, "--resume_from_checkpoint", "latest"))
    assert _losses(resumed) == whole


def _complete_checkpoint(tmp_path):
    """A run directory with checkpoints 2 and 4 (complete), from a short run."""
    out = tmp_path / "run"
    train(_argv(out, "--max_steps", "4"))
    return out


def test_incomplete_folders_are_passed_over_and_named_as_an_error(tmp_path, caplog, capsys):
    out = _complete_checkpoint(tmp_path)
    # A folder of a later step that a save never finished (as the stock Trainer leaves one), and a
    # checkpoint whose optimizer file was cut short after it was published.
    broken = out / "checkpoint-6"
    broken.mkdir()
    (broken / "mmfast_encoder.json").write_text("{}")
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="mmfast.train.checkpoints"):
        found = checkpoints.resolve_resume("True", out)
    assert found == str(out / "checkpoint-2")
    assert "checkpoint-6 is incomplete" in caplog.text and "trainer_state.json" in caplog.text
    assert "optimizer.pt (cut short: 100 of" in caplog.text

    for named, missing in ((broken, "optimizer.pt"), (out / "checkpoint-4", "optimizer.pt (cut short")):
        assert train_main(_argv(out, "--resume_from_checkpoint", str(named))) == 2
        err = capsys.readouterr().err
        assert f"--resume_from_checkpoint {named}: {named} is incomplete" in err and missing in err
        assert "Traceback" not in err
    assert train_main(_argv(out, "--resume_from_checkpoint", str(out / "checkpoint-9"))) == 2
    assert "checkpoint-9: no such folder" in capsys.readouterr().err


def test_true_without_a_complete_checkpoint_is_an_error(tmp_path, capsys):
    assert train_main(_argv(tmp_path / "empty", "--resume_from_checkpoint", "True")) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint in --output_dir" in err and "Traceback" not in err


def test_save_total_limit_keeps_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    # An incomplete folder of a later step (a stock Trainer's interrupted save): the Trainer's own
    # rotation by step would keep it as the newest and delete the run's complete checkpoints.
    (out / "checkpoint-99").mkdir(parents=True)
    train(_argv(out, "--save_total_limit", "1"))
    names = [p.name for p in checkpoints.checkpoint_folders(out)]
    assert names == [f"checkpoint-{STEPS}", "checkpoint-99"]
    assert not checkpoints.missing_parts(out / f"checkpoint-{STEPS}")
    manifest = json.loads((out / f"checkpoint-{STEPS}" / checkpoints.MANIFEST_NAME).read_text())
    assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(manifest["files"])
    assert os.path.getsize(out / f"checkpoint-{STEPS}" / "optimizer.pt") == manifest["files"]["optimizer.pt"]
