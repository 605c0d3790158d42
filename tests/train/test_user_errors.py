"""A new user's mistakes: every model path error is one line naming the path and what is wrong, before
anything loads (CLI, `mmfast-eval`, `Encoder.from_pretrained`), and `Encoder.encode` takes one string and
quotes the text the user wrote in its errors."""

import pytest
import torch
from PIL import Image

from mmfast.train.cli import train_main
from mmfast.train.default import default_backbone
from mmfast.train.encoder import Encoder
from mmfast.train.evaluate.cli import eval_main

NOT_CACHED = "mmfast-tests/no-such-model"


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Repo id must be" not in err and "internet connection" not in err, err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


@pytest.fixture
def no_config_folder(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _cases(tmp_path, no_config_folder):
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"")
    return [
        (str(tmp_path / "runs" / "lavae"), "no such folder"),
        ("./my-model-typo", "no such folder"),
        (str(no_config_folder), "a folder without mmfast_encoder.json, adapter_config.json or config.json, so not a "
                                "model folder"),
        (str(a_file), "a file, not a model folder"),
        (NOT_CACHED, "no such folder here, and not a hub model in the local cache (mmfast never downloads); get it "
                     f"with `hf download {NOT_CACHED}`, or give the path of a local copy"),
    ]  # fmt: skip


def test_model_path_errors_are_one_line_before_the_data_loads(tmp_path, no_config_folder, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the model path was checked")

    monkeypatch.setattr("mmfast.train.run.load_training_data", no_loading)
    for path, problem in _cases(tmp_path, no_config_folder):
        status = train_main(["--model_name_or_path", path, "--output_dir", str(tmp_path / "out")])
        line = _error(capsys)
        assert status == 2 and line == f"mmfast-train: error: --model_name_or_path {path}: {problem}", line


def test_eval_and_from_pretrained_name_the_path(tmp_path, no_config_folder, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path, problem in _cases(tmp_path, no_config_folder):
        assert eval_main(["--model", path, "--no_progress"]) == 2
        assert _error(capsys) == f"mmfast-eval: error: --model {path}: {problem}"
        with pytest.raises((FileNotFoundError, NotADirectoryError)) as error:
            Encoder.from_pretrained(path)
        assert str(error.value) == f"model {path}: {problem}"


@pytest.fixture(scope="module")
def encoder():
    return Encoder.from_pretrained(default_backbone())


def _image():
    return Image.new("RGB", (64, 64), (30, 200, 30))


def test_encode_takes_one_string_as_sentence_transformers_does(encoder):
    one = encoder.encode("a red circle", show_progress=False)
    batch = encoder.encode(["a red circle", "a blue square"], show_progress=False)
    assert one.shape == (batch.shape[1],)
    torch.testing.assert_close(one, batch[0], rtol=1e-5, atol=1e-6)
    with_image = encoder.encode("<|image_1|> a green picture", _image(), show_progress=False)
    torch.testing.assert_close(
        with_image, encoder.encode(["<|image_1|> a green picture"], [_image()], show_progress=False)[0]
    )
    with pytest.raises(TypeError, match="one image"):
        encoder.encode("a red circle", [_image()])


def test_encode_errors_quote_what_the_user_wrote(encoder):
    # An empty text without an image is an error (it has no tokens to embed), never a crash inside transformers.
    with pytest.raises(ValueError, match=r"texts\[0\] is empty and has no image"):
        encoder.encode(["", "a red circle"], show_progress=False)
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        encoder.encode(["a red circle", "   "], show_progress=False)
    with pytest.raises(ValueError) as error:
        encoder.encode(["a cat", "<|image_1|> a dog"], show_progress=False)
    assert str(error.value) == "texts[1] '<|image_1|> a dog': <|image_1|> without an image (images[1] is None)"
    with pytest.raises(ValueError) as error:
        encoder.encode(["<|image_1|><|image_1|> two"], [_image()], show_progress=False)
    assert "texts[0] '<|image_1|><|image_1|> two': several <|image_1|> in one input" in str(error.value)
    assert "vision_start" not in str(error.value)
    # An empty text with an image is the image's embedding.
    assert encoder.encode([""], [_image()], show_progress=False).shape[0] == 1
