"""MMEB-V2's visual-document retrieval on files in the published BEIR layout (queries/, corpus/ with HF's
inline image bytes, qrels/ with graded scores), with a fake encoder; scores checked by hand."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from PIL import Image

from mmfast.train.evaluate import evaluate, format_table, write_results
from mmfast.train.evaluate.mmeb_v2_metrics import KS, METRICS
from mmfast.train.evaluate.visdoc import PAGE_TEXT, QUERY_INSTRUCTION, evaluate_visdoc
from tests.train.evaluate_helpers import FakeEncoder, axis, unit, write_parquet

QUIET = {"show_progress": False}


def png(width: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, 9), (width, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_beir(root):
    queries = [
        {"query-id": "q1", "query": "chart of sales", "language": "english"},
        {"query-id": "q2", "query": "revenue table", "language": "english"},
        {"query-id": "q3", "query": "nothing relevant", "language": "english"},
        {"query-id": "q4", "query": "tableau des revenus", "language": "french"},
    ]
    write_parquet(root / "queries" / "test-00000-of-00001.parquet", queries)
    corpus = [{"corpus-id": f"p{i}", "image": {"bytes": png(30 + i), "path": f"p{i}.png"}} for i in range(4)]
    corpus.append({"corpus-id": "p4", "image": {"bytes": None, "path": "missing.png"}})
    write_parquet(root / "corpus" / "test-00000-of-00002.parquet", corpus[:2])
    write_parquet(root / "corpus" / "test-00001-of-00002.parquet", corpus[2:])
    qrels = [
        {"query-id": "q1", "corpus-id": "p0", "score": 2},
        {"query-id": "q1", "corpus-id": "p1", "score": 1},
        {"query-id": "q2", "corpus-id": "p1", "score": 1},
        {"query-id": "q2", "corpus-id": "p1", "score": 0},  # a repeated pair keeps its highest score
        {"query-id": "q2", "corpus-id": "p2", "score": 0},  # not relevant (V2 keeps scores > 0)
        {"query-id": "q3", "corpus-id": "p3", "score": 0},
        {"query-id": "q4", "corpus-id": "p4", "score": 1},  # its page's image is missing
    ]
    write_parquet(root / "qrels" / "test-00000-of-00001.parquet", qrels)
    return {
        f"{QUERY_INSTRUCTION} chart of sales": axis(0), f"{QUERY_INSTRUCTION} revenue table": axis(1),
        ("image", 30): axis(0), ("image", 31): unit(1, 1, 0, 0, 0, 0), ("image", 32): axis(1), ("image", 33): axis(2),
    }  # fmt: skip


def test_visdoc_scores_by_hand_and_v2_score_file(tmp_path):
    vectors = write_beir(tmp_path / "ViDoRe_test")
    encoder = FakeEncoder(vectors)
    part = evaluate_visdoc(encoder, tmp_path / "ViDoRe_test", language="english", output_dir=tmp_path / "o", **QUIET)
    scores = part["visdoc"]["ViDoRe_test"]
    # q1 ranks its grade-2 and grade-1 pages first and second (ideal); q2 finds its page second.
    assert scores["ndcg_linear@5"] == pytest.approx(100 * (1 + 1 / math.log2(3)) / 2)
    assert scores["hit@1"] == 50.0 and scores["recall@1"] == 25.0 and scores["mrr@5"] == 75.0
    assert (scores["num_queries"], scores["num_queries_without_relevant_page"], scores["num_pages"]) == (2, 1, 4)
    assert scores["num_missing_images"] == 1
    assert (PAGE_TEXT, 30) in encoder.inputs and PAGE_TEXT.startswith("<|image_1|> ")
    saved = json.loads((tmp_path / "o" / "visdoc" / "ViDoRe_test_score.json").read_text())
    assert list(saved) == [f"{m}@{k}" for m in METRICS for k in KS] + ["num_pred", "num_data"]
    assert saved["ndcg_linear@5"] == pytest.approx(scores["ndcg_linear@5"] / 100) and saved["num_pred"] == 2
    # Graded: exponential gains weigh the grade-2 page more; q1 is ideal in both.
    assert saved["ndcg_exponential@5"] == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_all_languages_and_the_task_entry(tmp_path):
    vectors = write_beir(tmp_path / "set")
    results = evaluate(FakeEncoder(vectors), "visdoc", tmp_path / "set", output_dir=tmp_path / "o", name="S", **QUIET)
    scores = results["visdoc"]["S"]
    assert scores["num_queries"] == 3 and scores["hit@5"] == pytest.approx(200 / 3)  # q4's page is missing: a miss
    assert "Visual-document retrieval" in format_table(results)
    assert json.loads(write_results(results, tmp_path / "o")["json"].read_text())["visdoc"]["S"]["num_pages"] == 4


def test_visdoc_layout_errors(tmp_path):
    write_beir(tmp_path / "set")
    for file in (tmp_path / "set" / "qrels").glob("*"):
        file.unlink()
    with pytest.raises(FileNotFoundError, match="no qrels/\\*.parquet"):
        evaluate_visdoc(FakeEncoder(), tmp_path / "set", **QUIET)
    write_parquet(tmp_path / "set" / "qrels" / "test.parquet", [{"query-id": "q1", "corpus-id": "p0"}])
    with pytest.raises(ValueError, match="missing column\\(s\\) \\['score'\\]"):
        evaluate_visdoc(FakeEncoder(), tmp_path / "set", **QUIET)
    write_parquet(tmp_path / "set" / "qrels" / "test.parquet", [{"query-id": "q1", "corpus-id": "p0", "score": "x"}])
    with pytest.raises(ValueError, match="qrels row 0: score must be a number"):
        evaluate_visdoc(FakeEncoder(), tmp_path / "set", **QUIET)
    write_parquet(tmp_path / "set" / "qrels" / "test.parquet", [{"query-id": "q1", "corpus-id": "p0", "score": 1}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        evaluate_visdoc(FakeEncoder(), tmp_path / "set", strict=True, **QUIET)


class FakeMultiVectorEncoder(FakeEncoder):
    """Token vectors [n, L, D], zero-padded to the longest input of the call (as Encoder.encode's)."""

    def vector(self, text, width):
        tokens = super().vector(text, width)
        return tokens if tokens.dim() == 2 else tokens[None]

    def encode(self, texts, images=None, *, batch_size=32, show_progress=True):
        self.calls += 1
        images = [None] * len(texts) if images is None else list(images)
        rows = []
        for text, image in zip(texts, images, strict=True):
            width = None if image is None else (image if isinstance(image, Image.Image) else Image.open(image)).size[0]
            rows.append(self.vector(text, width))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True) if rows else torch.zeros(0, 1, self.dim)


def test_multi_vector_encoder_is_scored_by_maxsim_through_the_cache(tmp_path):
    write_beir(tmp_path / "set")
    e = [axis(i) for i in range(6)]
    tokens = {
        f"{QUERY_INSTRUCTION} chart of sales": [e[0], e[3]], f"{QUERY_INSTRUCTION} revenue table": [e[1]],
        ("image", 30): [e[0], e[3]], ("image", 31): [e[0], e[1], e[2]], ("image", 32): [e[1]], ("image", 33): [e[2]],
    }  # fmt: skip
    # MaxSim: q1 scores p0 2, p1 1, p2 and p3 0; q2 ties p1 and p2 at 1 (the lower corpus index, p1, first).
    results = []
    for _ in range(2):  # the second run reads every embedding from the cache's shards
        encoder = FakeMultiVectorEncoder(tokens)
        part = evaluate_visdoc(encoder, tmp_path / "set", language="english", cache=tmp_path / "cache", **QUIET)
        results.append((part["visdoc"]["set"], encoder.calls))
    scores = results[0][0]
    assert scores["ndcg_linear@5"] == pytest.approx(100.0) and scores["hit@1"] == 100.0
    assert scores["recall@1"] == pytest.approx(75.0)  # q1 has two relevant pages
    assert results[1][0] == scores and results[0][1] > 0 and results[1][1] == 0
