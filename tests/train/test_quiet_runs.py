"""A run says what the user can act on and no more: a short run with the user's own data logs the loss
often enough to draw its curve, and `--no_progress` / `--disable_tqdm` hide transformers' weight-loading
bar too."""

import pytest

from mmfast.train.arguments import parse_arguments
from mmfast.train.command import progress_bars
from mmfast.train.default import PROFILE, default_backbone, default_data
from mmfast.train.evaluate.cli import eval_main
from mmfast.train.run import build_trainer

pytestmark = pytest.mark.slow


def _own_data_run(tmp_path, *extra):
    data = default_data()
    argv = ["--model_name_or_path", str(default_backbone()), "--data", str(data.train_spec),
            "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "run"), "--save_strategy", "no",
            "--report_to", "none", "--cpu_threads", "1", *extra]  # fmt: skip
    return parse_arguments(argv, profile=PROFILE)


def test_a_short_run_with_own_data_logs_every_step(tmp_path):
    arguments = _own_data_run(tmp_path, "--max_steps", "3")
    assert arguments.training.logging_steps == 0.02  # the embedded default's profile does not apply to own data
    trainer = build_trainer(arguments)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3]


def test_no_progress_hides_the_weight_loading_bar(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    assert eval_main(["--model", str(default_backbone()), "--task", "retrieval", "--output", str(tmp_path),
                      "--no_progress"]) == 0  # fmt: skip
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "embedding" not in captured.err
    assert f"writing results to {tmp_path}" in captured.out
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process
    with progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()


def test_lora_raises_no_future_warning_the_user_cannot_act_on(tmp_path):
    import warnings

    from mmfast.train.encoder import Encoder

    encoder = Encoder.from_pretrained(default_backbone())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # was: transformers' `is_gradient_checkpointing` deprecation
        encoder.add_adapter(r=4, alpha=8)
        encoder.save_pretrained(tmp_path / "adapter")
        assert Encoder.from_pretrained(tmp_path / "adapter").is_adapter


def test_no_progress_hides_datasets_bar_as_a_held_out_file_converts(tmp_path, capfd):
    import json

    import datasets
    from PIL import Image

    was_on = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()  # the bar would show: the flag must hide it
    try:
        for i in range(3):
            Image.new("RGB", (8, 8), (80 * i, 20, 20)).save(tmp_path / f"{i}.jpg")
        data = tmp_path / "heldout.jsonl"  # a new file: datasets converts it, with its "Generating" bar
        data.write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": f"picture {i}"}) + "\n" for i in range(3)))
        assert eval_main(["--model", str(default_backbone()), "--task", "retrieval", "--data", str(data),
                          "--output", str(tmp_path / "out"), "--no_progress"]) == 0  # fmt: skip
        err = capfd.readouterr().err
        assert "Generating train split" not in err and "embedding" not in err
        assert datasets.is_progress_bar_enabled()  # restored for the rest of the process
    finally:
        (datasets.enable_progress_bars if was_on else datasets.disable_progress_bars)()
