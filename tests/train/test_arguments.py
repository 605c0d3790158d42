"""The recipe's loss options under command-line overrides (no model is built)."""

from dataclasses import replace

import pytest

from mmfast import ContrastiveLossOptions
from mmfast.train.arguments import parse_arguments
from mmfast.train.recipes import get_recipe


def _loss(tmp_path, *argv):
    # 2 processes: the recipes gather across devices, which a single process resolves off
    return parse_arguments(["--output_dir", str(tmp_path), *argv], processes=2).loss


def test_no_override_keeps_the_recipe_loss(tmp_path):
    """On the embedded default (no model, no data) the recipe's default_run_loss where it has one
    (UniME stage 2: the margin without top-8), else its loss."""
    for recipe in ("llave", "vlm2vec", "unime-stage2", "e5v", "unime-stage1"):
        run = parse_arguments(["--output_dir", str(tmp_path), "--recipe", recipe], processes=2)
        loss = run.recipe.default_run_loss or run.recipe.loss
        assert run.loss == loss and run.recipe is get_recipe(recipe)
        single = parse_arguments(["--output_dir", str(tmp_path), "--recipe", recipe], processes=1)
        assert single.loss == replace(loss, cross_device=False)
    assert get_recipe("unime-stage2").default_run_loss == replace(get_recipe("unime-stage2").loss, topk=None)


def test_each_override_replaces_one_field(tmp_path):
    base = ContrastiveLossOptions(temperature=0.02, hardness=9.0, symmetric=True, cross_device=True)
    assert _loss(tmp_path) == base
    assert _loss(tmp_path, "--hardness", "0") == ContrastiveLossOptions(0.02, True, 0.0, cross_device=True)
    assert _loss(tmp_path, "--temperature", "0.05").temperature == 0.05
    assert _loss(tmp_path, "--symmetric", "False").symmetric is False
    unime = _loss(tmp_path, "--recipe", "unime-stage2", "--topk", "3", "--false_negative_margin", "0.2")
    assert (unime.topk, unime.false_negative_margin, unime.temperature) == (3, 0.2, 0.02)


def test_bad_overrides_are_errors_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        _loss(tmp_path, "--temperature", "0")
    with pytest.raises(ValueError, match="--hardness.*unime-stage1 distils"):
        _loss(tmp_path, "--recipe", "unime-stage1", "--hardness", "1")


def _help(capsys, monkeypatch, *argv) -> str:
    from mmfast.train.cli import train_main

    monkeypatch.setenv("COLUMNS", "400")  # one line per option's help
    assert train_main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def _default(text: str, option: str) -> str:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"--{option} "))
    described = " ".join(lines[start : start + 2])
    return described.rsplit("(default: ", 1)[1].split(")")[0]


def test_help_lists_every_option_with_the_defaults_the_run_uses(capsys, monkeypatch):
    text = _help(capsys, monkeypatch)
    for option in ("--config FILE", "--dry-run", "--num_processes N", "--accelerate_config FILE"):
        assert option in text
    # The embedded default's profile, not the Trainer's own defaults (batch 8, lr 5e-5, 3 epochs, linear).
    assert _default(text, "per_device_train_batch_size") == "64"
    assert _default(text, "learning_rate") == "0.001"
    assert _default(text, "max_steps") == "400"
    assert _default(text, "lr_scheduler_type") == "cosine"
    assert "attention and MLP" in text
    # With a recipe and data of one's own, the recipe's published defaults; the command line wins.
    text = _help(capsys, monkeypatch, "--recipe", "vlm2vec", "--data", "x.jsonl", "--learning_rate", "3e-5")
    assert _default(text, "learning_rate") == "3e-05" and _default(text, "recipe") == "vlm2vec"
    assert _default(text, "per_device_train_batch_size") == "128"
    # The loss options show the recipe's values (not None), under the command line's overrides.
    assert _default(text, "temperature") == "0.02" and _default(text, "symmetric") == "False"
    text = _help(capsys, monkeypatch, "--recipe", "unime-stage2", "--temperature", "0.05")
    assert _default(text, "temperature") == "0.05" and _default(text, "topk") == "8"
    assert _default(text, "false_negative_margin") == "0.1"
