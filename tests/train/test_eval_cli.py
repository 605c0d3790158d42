"""mmfast-eval on the embedded default: the untrained backbone when nothing was trained, results.json
in the documented shape, and a second run that embeds nothing (the cache)."""

import json

import pytest

from mmfast.train.encoder import Encoder
from mmfast.train.evaluate.cli import eval_main

pytestmark = pytest.mark.slow


def test_eval_default_retrieval_then_cached(tmp_path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)  # no runs/llave here: the untrained default is evaluated, and says so
    out = tmp_path / "eval"
    argv = ["--task", "retrieval", "--output", str(out), "--no_progress"]
    assert eval_main(argv) == 0
    captured = capsys.readouterr()
    assert "t2i R@1" in captured.out
    results = json.loads((out / "results.json").read_text())
    for name in ("flickr30k", "urban1k"):
        for metric in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@10"):
            assert 0.0 <= results["retrieval"][name][metric] <= 100.0
    assert results["retrieval"]["flickr30k"]["num_captions"] == 5 * results["retrieval"]["flickr30k"]["num_images"]

    encode_calls = request.getfixturevalue("encode_calls")  # counting from here on
    assert eval_main(argv) == 0
    assert encode_calls == []  # every input came from the on-disk cache
    assert json.loads((out / "results.json").read_text()) == results


def test_eval_user_errors(tmp_path, capsys):
    assert eval_main(["--data", str(tmp_path / "nothing.parquet"), "--output", str(tmp_path)]) == 2
    assert "name its --task" in capsys.readouterr().err


def test_every_task_end_to_end_on_a_tiny_generated_set_with_the_tiny_default_model(tmp_path):
    from mmfast.train import evaluate_default
    from mmfast.train.default import default_backbone
    from mmfast.train.default.synthetic import Sizes, generate

    data = generate(tmp_path / "data", sizes=Sizes.tiny())
    encoder = Encoder.from_pretrained(default_backbone())
    results = evaluate_default(encoder, data=data, output_dir=tmp_path / "eval", show_progress=False)
    assert set(results) == {"mmeb", "retrieval", "sugarcrepe", "video", "visdoc", "nli"}
    nli = results["nli"]["nli"]
    assert (nli["num_rows"], nli["num_candidates"]) == (8, 16) and 0 <= nli["p2e_R@1"] <= 100
    datasets = results["mmeb"]["datasets"]
    assert datasets and all(d["num_pred"] > 0 and 0 <= d["acc"] <= 100 for d in datasets.values())
    assert {"classification", "vqa", "retrieval", "grounding"} <= set(results["mmeb"]["meta_tasks"])
    assert {d["split"] for d in datasets.values()} == {"ind", "ood"}
    assert results["mmeb"]["ind"]["acc"] >= 0 and results["mmeb"]["ood"]["acc"] >= 0
    assert all((tmp_path / "eval" / f"{name}_score.json").is_file() for name in datasets)
    assert 0 <= results["retrieval"]["flickr30k"]["t2i_R@1"] <= 100
    assert 0 <= results["sugarcrepe"]["sugarcrepe"]["overall"]["acc"] <= 100
    assert results["video"]["msrvtt"]["t2v_MdR"] >= 1
    documents = results["visdoc"]["documents"]
    assert documents["num_queries"] == documents["num_pages"] == 8 and 0 <= documents["ndcg_linear@5"] <= 100
    assert (tmp_path / "eval" / "visdoc" / "documents_score.json").is_file()
