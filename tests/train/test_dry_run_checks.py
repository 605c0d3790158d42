"""`--dry-run` runs the run's own checks: each mistake that makes training fail is a dry-run error (exit 2)
with the message training gives, printed once."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mmfast.train.cli import train_main


def _row(image="a.jpg", query="<|image_1|>\nRepresent the given image.", positive="a red square"):
    return {"qry": query, "qry_image_path": image, "pos_text": positive, "pos_image_path": ""}


@pytest.fixture
def data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(images / "a.jpg")
    (tmp_path / "elsewhere").mkdir()

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    return tmp_path, str(images), write


def _message(err: str, program: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith(f"{program}: error: ")]
    return line.removeprefix(f"{program}: error: ")


def _cases(data):
    tmp_path, images, write = data
    rows = write("Rows.jsonl", [_row() for _ in range(32)])
    out = ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    return {
        "images under another folder": (["--data", rows, "--image_dir", str(tmp_path / "elsewhere"), *out],
                                        "subset 'Rows' has no usable row"),
        "an empty file": (["--data", write("Empty.jsonl", []), "--image_dir", images, *out],
                          "subset 'Empty' has no usable row"),
        "fewer rows than a batch": (["--data", rows, "--image_dir", images, "--per_device_train_batch_size", "64",
                                     *out], "an epoch would hold no batch: 32 examples, batch_size 64"),
        "a missing checkpoint": (["--data", rows, "--image_dir", images, "--per_device_train_batch_size", "8",
                                  "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-5"), *out],
                                 "checkpoint-5: no such folder"),
        "an eval strategy": (["--data", rows, "--image_dir", images, "--eval_strategy", "steps", *out],
                             "--eval_strategy steps: mmfast-train takes no eval dataset"),
        "two images in a row, strict": (["--data", write("Two.jsonl", [_row(query="<|image_1|> <|image_1|>")] * 2),
                                         "--image_dir", images, "--strict", "True", *out],
                                        "Two.jsonl, row 0: several <|image_1|> in one query"),
    }  # fmt: skip


CASES = ("images under another folder", "an empty file", "fewer rows than a batch", "a missing checkpoint",
         "an eval strategy", "two images in a row, strict")  # fmt: skip


def test_every_case_is_run():
    assert set(CASES) == set(_cases((Path("/nonexistent"), "", lambda *args: "")))


@pytest.mark.parametrize("case", CASES)
def test_what_training_rejects_the_dry_run_rejects_with_the_same_message(data, case, capsys):
    argv, expected = _cases(data)[case]
    assert train_main(argv) == 2
    trained = capsys.readouterr()
    message = _message(trained.err, "mmfast-train")
    assert expected in message, message

    assert train_main([*argv, "--dry-run"]) == 2
    dry = capsys.readouterr()
    assert _message(dry.err, "mmfast-train --dry-run") == message
    assert message not in dry.out  # printed once, on stderr
    assert "dry run: NOT valid: 1 error(s)" in dry.out


def test_a_reporting_backend_that_is_not_installed_is_an_error(data, capsys):
    from transformers.integrations import get_available_reporting_integrations

    if "tensorboard" in get_available_reporting_integrations():
        pytest.skip("tensorboard is installed here")
    _, images, write = data
    argv = ["--data", write("R.jsonl", [_row()] * 8), "--image_dir", images, "--report_to", "tensorboard"]
    assert train_main(argv) == 2
    message = _message(capsys.readouterr().err, "mmfast-train")
    assert message.startswith("--report_to tensorboard: not installed here (pip install tensorboard)")
    assert train_main([*argv, "--dry-run"]) == 2
    assert _message(capsys.readouterr().err, "mmfast-train --dry-run") == message


def test_a_skipped_row_is_a_warning_and_the_run_is_valid(data, capsys):
    tmp_path, images, write = data
    rows = [_row() for _ in range(16)] + [_row(query="<|image_1|> <|image_1|>")]
    argv = ["--data", write("S.jsonl", rows), "--image_dir", images, "--per_device_train_batch_size", "8",
            "--output_dir", str(tmp_path / "out"), "--dry-run"]  # fmt: skip
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "S: 1 mmeb file(s); 17 row(s) read, 16 usable" in out
    assert "several <|image_1|> in one query: 1, first: " in out and "dry run: valid" in out
