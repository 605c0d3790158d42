"""Tiny backbones of every family, built once per session from their configs (no download)."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# The Arrow caches `datasets` writes for the tests' data files go to a folder of this session (set before
# anything imports datasets, which reads it once), not into the user's ~/.cache/huggingface/datasets.
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mmfast-test-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

from mmfast.train.default.model import BUILDABLE, build_tiny_backbone, default_corpus  # noqa: E402
from mmfast.train.default.tokenizer import train_tokenizer  # noqa: E402
from mmfast.train.encoder import Encoder  # noqa: E402

# Every buildable family, and the text-only family once more on a Llama language model.
CASES = (*BUILDABLE, "causal_lm_llama")


@pytest.fixture(scope="session")
def shared_tokenizer():
    return train_tokenizer(default_corpus())


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, shared_tokenizer):
    root = tmp_path_factory.mktemp("tiny_backbones")
    dirs = {name: build_tiny_backbone(name, root / name, tokenizer=shared_tokenizer) for name in BUILDABLE}
    dirs["causal_lm_llama"] = build_tiny_backbone(
        "causal_lm", root / "causal_lm_llama", tokenizer=shared_tokenizer, text_model="llama"
    )
    return dirs


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small are all per-op overhead: a second intra-op thread only adds spin-waiting, which on a
    # shared 2-core machine made a step 10-100x slower (benchmarks/backbones.py --threads 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def mmfast_home(tmp_path_factory):
    """The embedded default (data and backbone) is built once per session into a private folder (chosen
    by tests/conftest.py, shared by every xdist worker), unless the caller points MMFAST_HOME at a
    prepared one."""
    if "MMFAST_HOME" not in os.environ:
        os.environ["MMFAST_HOME"] = str(tmp_path_factory.mktemp("mmfast_home"))
    yield os.environ["MMFAST_HOME"]


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """The number of inputs of every `Encoder.encode` call from here on (the calls still run)."""
    calls, original = [], Encoder.encode

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", counting)
    return calls
