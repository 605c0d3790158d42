"""Evaluator metrics against independent computations on hand-made embeddings, and the cache."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from PIL import Image

import mmfast
from mmfast.train.evaluate import (
    EmbeddingCache,
    cross_modal_metrics,
    first_candidate_ranks,
    mean_rank,
    median_rank,
    model_fingerprint,
    precision_at_1,
    recall_at_k,
    retrieval_ranks,
)
from tests.train.evaluate_helpers import FakeEncoder, make_image


def argmax_is_first(row: list[float]) -> bool:
    return int(np.argmax(np.array(row))) == 0  # numpy: the first maximal index, as VLM2Vec


def test_precision_at_1_hand_made_ties():
    scores = torch.tensor([[3.0, 1, 2], [2, 2, 0], [1, 2, 2], [0, 0, 0], [1, 5, 9]])
    lengths = torch.tensor([3, 3, 3, 3, 1])  # the last row has one real candidate; 5 and 9 are padding
    assert first_candidate_ranks(scores, lengths).tolist() == [1, 1, 3, 1, 1]
    result = precision_at_1(scores, lengths)
    assert result == {"acc": 80.0, "num_correct": 4, "num_pred": 5}


def test_precision_at_1_matches_argmax_with_many_ties():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (61, 7), generator=generator).float()  # small integers: ties everywhere
    lengths = torch.randint(1, 8, (61,), generator=generator)
    expected = sum(argmax_is_first(row[:n].tolist()) for row, n in zip(scores, lengths, strict=True))
    result = precision_at_1(scores, lengths)
    assert result["num_correct"] == expected and result["num_pred"] == 61
    assert result["acc"] == pytest.approx(100 * expected / 61)


def reference_ranks(texts, items, text_item, present):
    """Full score matrix, plain loops: (text→item ranks, item→text ranks); a missing item's queries
    rank gallery size + 1 (and are misses at every k)."""
    scores = (texts.double() @ items.double().T).tolist()
    num_texts, num_items = len(scores), len(scores[0])
    t2i = []
    for t in range(num_texts):
        target = text_item[t]
        row = [scores[t][i] for i in range(num_items) if present[i]]
        t2i.append(1 + sum(s > scores[t][target] for s in row) if present[target] else num_items + 1)
    i2t = []
    for i in range(num_items):
        own = [scores[t][i] for t in range(num_texts) if text_item[t] == i]
        best = max(own)
        i2t.append(1 + sum(scores[t][i] > best for t in range(num_texts)) if present[i] else num_texts + 1)
    return t2i, i2t


@pytest.mark.parametrize("missing", [None, 2], ids=["all-present", "image2-missing"])
def test_recall_five_captions_per_image(missing):
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(-2, 3, (9, 5), generator=generator).float()
    images[4] = images[1]  # duplicate images: exact ties in both directions
    texts = images.repeat_interleave(5, dim=0) + torch.randint(-2, 3, (45, 5), generator=generator).float()
    texts[7] = texts[3]
    text_item = torch.arange(45) // 5  # caption j belongs to image j // 5
    present = torch.ones(9, dtype=torch.bool)
    if missing is not None:
        present[missing] = False
    metrics = cross_modal_metrics(texts, images, text_item, item_present=present)
    t2i, i2t = reference_ranks(texts, images, text_item.tolist(), present.tolist())
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        found = [i for i in range(len(ranks)) if present[text_item[i] if name == "t2i" else i]]
        for k in (1, 5, 10):
            assert metrics[f"{name}_R@{k}"] == pytest.approx(100 * sum(ranks[i] <= k for i in found) / len(ranks))
        assert metrics[f"{name}_MdR"] == pytest.approx(statistics.median(ranks))
        assert metrics[f"{name}_MnR"] == pytest.approx(statistics.mean(ranks))


def test_image_to_text_hit_is_any_caption():
    # Image 0 matches only its fifth caption; image 1's own captions score 0.8, below 1.0 on image 0's first four.
    images = torch.tensor([[1.0, 0], [0, 1]])
    texts = torch.tensor([[0, 1.0]] * 4 + [[1.0, 0]] + [[0.6, 0.8]] * 5)
    metrics = cross_modal_metrics(texts, images, torch.arange(10) // 5)
    # image→text ranks [1, 5]; text→image ranks [2, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert (metrics["i2t_R@1"], metrics["i2t_R@5"], metrics["i2t_MdR"], metrics["i2t_MnR"]) == (50.0, 100.0, 3.0, 3.0)
    assert (metrics["t2i_R@1"], metrics["t2i_R@5"], metrics["t2i_MdR"]) == (60.0, 100.0, 1.0)
    assert metrics["t2i_MnR"] == pytest.approx(1.4)


def test_ranks_median_and_mean():
    ranks = torch.tensor([4, 1, 2, 10])
    assert median_rank(ranks) == 3.0 and mean_rank(ranks) == 4.25
    assert median_rank(torch.tensor([5, 1, 3])) == 3.0
    assert recall_at_k(ranks, (1, 2, 5)) == {1: 25.0, 2: 50.0, 5: 75.0}


def test_similarity_topk_semantics():
    query = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    gallery = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0.5, 0.5]])
    result = mmfast.similarity_topk(query, gallery, 9, target=torch.tensor([[1, -1], [3, 0], [2, 3]]))
    assert result.indices.shape == (3, 4)  # k clamped to the gallery
    assert result.indices[0].tolist() == [0, 1, 3, 2]  # ties go to the lower gallery index
    assert result.values[0].tolist() == [1.0, 1.0, 0.5, 0.0]
    assert result.target_rank.tolist() == [1, 2, 1]  # 1 + the number strictly above the best target


def test_retrieval_ranks_rejects_bad_targets():
    query, gallery = torch.ones(2, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="targets must index the gallery"):
        retrieval_ranks(query, gallery, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="-1 pads a set"):
        retrieval_ranks(query, gallery, torch.tensor([[0, -1], [-1, -1]]))
    with pytest.raises(ValueError, match="share D"):
        retrieval_ranks(query, torch.ones(4, 2), torch.tensor([0, 1]))


def test_cache_embeds_each_unique_input_once(tmp_path):
    encoder = FakeEncoder()
    image = make_image(tmp_path / "a.png", 11)
    cache = EmbeddingCache(encoder, show_progress=False)
    out = cache.embed(["x", "y", "x", "x"], [image, None, image, None])
    assert out.shape == (4, 6) and torch.equal(out[0], out[2]) and not torch.equal(out[0], out[3])
    assert encoder.inputs == [("x", 11), ("y", None), ("x", None)]
    cache.embed(["y"])
    assert (cache.num_encoded, cache.num_reused, encoder.calls) == (3, 2, 1)


def test_disk_cache_second_run_embeds_nothing(tmp_path):
    images = [make_image(tmp_path / f"{w}.png", w) for w in (8, 9, 10)]
    texts = ["a", "b", "c"]
    first_encoder = FakeEncoder()
    first = EmbeddingCache(first_encoder, tmp_path / "cache", show_progress=False, block_size=2).embed(texts, images)
    assert first_encoder.calls == 2  # two blocks, two shards
    again = FakeEncoder()
    cache = EmbeddingCache(again, tmp_path / "cache", show_progress=False)
    assert torch.equal(cache.embed(texts, images), first)
    assert again.calls == 0 and cache.num_encoded == 0 and cache.num_reused == 3
    # A replaced image file (new size and mtime) is embedded again; the rest is not.
    make_image(images[1], 21)
    cache.embed(texts, images)
    assert again.inputs == [("b", 21)]


def test_disk_cache_keyed_by_model(tmp_path):
    encoder = FakeEncoder()
    before = model_fingerprint(encoder)
    EmbeddingCache(encoder, tmp_path, show_progress=False).embed(["a"])
    with torch.no_grad():
        encoder.model.weight[1, 2] += 1e-3  # one training step's worth of change
    assert model_fingerprint(encoder) != before
    encoder.calls = 0
    EmbeddingCache(encoder, tmp_path, show_progress=False).embed(["a"])
    assert encoder.calls == 1


def test_cache_bounds_images_held_in_memory(monkeypatch):
    from mmfast.train.evaluate import cache as cache_module

    class Source:  # an ImageSource: loaded only when embedded
        def __init__(self, width):
            self.width = width

        def cache_key(self):
            return f"source {self.width}"

        def load(self):
            return Image.new("RGB", (self.width, 2))

    monkeypatch.setattr(cache_module, "MAX_LOADED", 2)
    encoder = FakeEncoder()
    cache = EmbeddingCache(encoder, show_progress=False, block_size=4)
    cache.embed(["t"] * 7 + ["p0", "p1", "p2"], [Source(w) for w in range(30, 37)] + [None] * 3)
    # Blocks of at most two loaded sources, or four inputs: [2 src] [2 src] [2 src] [1 src + 3 texts].
    assert encoder.calls == 4 and [w for _, w in encoder.inputs] == [*range(30, 37), None, None, None]


def test_fingerprint_covers_buffers_and_config():
    encoder = FakeEncoder()
    encoder.model.register_buffer("mask", torch.tensor([True, False]))
    encoder.model.register_buffer("positions", torch.arange(5))
    before = model_fingerprint(encoder)
    encoder.model.positions[4] = 7
    after = model_fingerprint(encoder)
    encoder.config = type(encoder.config)(text_prompt="query: {text}")
    assert len({before, after, model_fingerprint(encoder)}) == 3


def test_cache_interrupted_run_keeps_finished_blocks(tmp_path):
    failing = FakeEncoder()  # the same class and weights as the one resuming: the same model key
    working = failing.encode

    def encode(texts, images=None, **kw):
        if failing.calls == 1:
            raise RuntimeError("out of memory")
        return working(texts, images, **kw)

    failing.encode = encode
    with pytest.raises(RuntimeError, match="out of memory"):
        EmbeddingCache(failing, tmp_path, show_progress=False, block_size=2).embed(["a", "b", "c", "d"])
    resumed = FakeEncoder()
    EmbeddingCache(resumed, tmp_path, show_progress=False, block_size=2).embed(["a", "b", "c", "d"])
    assert [text for text, _ in resumed.inputs] == ["c", "d"]


def test_cache_bad_inputs(tmp_path):
    class NoModel:
        def encode(self, texts, images=None, **kw):
            return torch.ones(len(texts), 2)

    with pytest.raises(ValueError, match="cannot fingerprint NoModel"):
        EmbeddingCache(NoModel(), tmp_path)
    named = EmbeddingCache(NoModel(), tmp_path, model_key="no-model/v1", show_progress=False)
    named.embed(["a"])
    shard = next(named.directory.glob("embeddings-*.pt"))
    assert named.directory.parent == tmp_path
    shard.write_bytes(b"not a shard")
    with pytest.raises(ValueError, match=f"shard {shard} cannot be read"):
        EmbeddingCache(NoModel(), tmp_path, model_key="no-model/v1")

    class NaN(FakeEncoder):
        def encode(self, texts, images=None, **kw):
            out = super().encode(texts, images, **kw)
            out[1, 0] = float("nan")
            return out

    with pytest.raises(ValueError, match="non-finite embeddings for 1 of 2 inputs .*'b'"):
        EmbeddingCache(NaN(), show_progress=False).embed(["a", "b"])
    with pytest.raises(FileNotFoundError, match="image file not found: .*gone.png"):
        EmbeddingCache(FakeEncoder(), show_progress=False).embed(["a"], [tmp_path / "gone.png"])
    with pytest.raises(TypeError, match="encoder must have an encode"):
        EmbeddingCache(object())
