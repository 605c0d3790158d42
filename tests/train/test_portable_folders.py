"""A saved encoder or adapter names its base portably (a hub id when it came from one, else a path
relative to the folder), so a folder copied elsewhere still loads; `mmfast-eval` writes next to the
model only when asked."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmfast.train.default import default_backbone
from mmfast.train.encoder import Encoder
from mmfast.train.evaluate.cli import eval_output
from mmfast.train.model_source import portable_source, resolve_source

TEXTS = ["a red circle", "two blue squares at the top left"]


def _embed(encoder):
    return encoder.encode(TEXTS, show_progress=False)


def test_an_adapter_copied_with_its_base_loads_elsewhere(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(default_backbone(), tree / "base")
    encoder = Encoder.from_pretrained(tree / "base")
    encoder.add_adapter(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh adapter changes nothing (B = 0): move it so a wrong base would show
        for name, parameter in encoder.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    want = _embed(encoder)
    encoder.save_pretrained(tree / "runs" / "adapter")
    saved = tree / "runs" / "adapter"
    assert json.loads((saved / "mmfast_encoder.json").read_text())["base_model"] == "../../base"
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == "../../base"
    readme = (saved / "README.md").read_text()
    assert str(tmp_path) not in readme and "base_model:" not in readme

    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(tree, moved)  # the original absolute paths are gone
    loaded = Encoder.from_pretrained(moved / "runs" / "adapter")
    assert loaded.is_adapter and loaded.encoder_config.base_model == str(moved / "base")
    torch.testing.assert_close(_embed(loaded), want, rtol=0, atol=1e-6)
    # saved again from its new place, it names the base relative to the new folder
    loaded.save_pretrained(moved / "adapter-again")
    assert json.loads((moved / "adapter-again" / "mmfast_encoder.json").read_text())["base_model"] == "../base"


def test_a_full_model_records_its_source_relative_to_its_folder(tmp_path):
    encoder = Encoder.from_pretrained(default_backbone())
    encoder.save_pretrained(tmp_path / "a" / "model")
    recorded = json.loads((tmp_path / "a" / "model" / "mmfast_encoder.json").read_text())["base_model"]
    assert recorded.startswith("../") and not Path(recorded).is_absolute()
    shutil.move(tmp_path / "a" / "model", tmp_path / "b")
    torch.testing.assert_close(_embed(Encoder.from_pretrained(tmp_path / "b")), _embed(encoder), rtol=0, atol=0)


def test_portable_source_names(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert portable_source(str(snapshot), tmp_path / "out") == "Qwen/Qwen2-VL-2B-Instruct"
    assert portable_source("Qwen/Qwen2-VL-2B-Instruct", tmp_path / "out") == "Qwen/Qwen2-VL-2B-Instruct"
    (tmp_path / "out" / "base").mkdir(parents=True)
    assert portable_source(str(tmp_path / "out" / "base"), tmp_path / "out") == "./base"
    assert portable_source(str(tmp_path / "out"), tmp_path / "out") == "."
    assert resolve_source("./base", tmp_path / "out") == str(tmp_path / "out" / "base")
    assert resolve_source("../x", tmp_path / "out") == str(tmp_path / "x")
    assert resolve_source("Qwen/Qwen2-VL-2B-Instruct", tmp_path) == "Qwen/Qwen2-VL-2B-Instruct"
    assert resolve_source("/abs/model", tmp_path) == "/abs/model"  # folders saved before keep loading


def test_eval_writes_next_to_the_model_only_when_asked(tmp_path):
    model = str(tmp_path / "model")
    (tmp_path / "model").mkdir()
    assert eval_output(None, model, next_to_model=False) == "eval"
    assert eval_output("results", model, next_to_model=False) == "results"
    assert eval_output(None, model, next_to_model=True) == str(tmp_path / "model" / "eval")
    with pytest.raises(ValueError, match="--output and --output_next_to_model"):
        eval_output("results", model, next_to_model=True)
    with pytest.raises(ValueError, match="--output_next_to_model: the model Qwen/Qwen2-VL-2B-Instruct is not a folder"):
        eval_output(None, "Qwen/Qwen2-VL-2B-Instruct", next_to_model=True)
