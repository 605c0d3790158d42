"""mmfast-mine: mined negatives equal a float64 brute-force reference (top-k, the positive and its copies
skipped, the false-negative ratio applied), the files it writes are read by the trainer, a batch order
trains (and shards over ranks like one process), and bad input is an error naming the file and row."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from mmfast.similarity_topk import similarity_topk
from mmfast.train.batch_order import BatchOrderSampler, read_batch_order, write_batch_order
from mmfast.train.collator import content_id
from mmfast.train.data import Example, Input
from mmfast.train.data_report import DataReport
from mmfast.train.data_spec import load_data
from mmfast.train.default import default_backbone
from mmfast.train.default.sizes import Sizes
from mmfast.train.default.synthetic import generate
from mmfast.train.mine import MineOptions, _rows_by_file, build_batches, main, mine_negatives, mine_subset


def reference(query, gallery, positive, k, ratio):
    """Float64 brute force: every score, best first (ties: lower index), positive and false negatives out."""
    scores = query.double() @ gallery.double().T
    out = []
    for q in range(query.shape[0]):
        pos = scores[q, positive[q]].item()
        order = sorted(range(gallery.shape[0]), key=lambda g: (-scores[q, g].item(), g))
        kept = [g for g in order if g != positive[q] and (ratio is None or scores[q, g].item() <= ratio * pos)]
        out.append(kept[:k] + [-1] * (k - len(kept[:k])))
    return torch.tensor(out)


def near_copies(rows, dim, generator):
    """Unit vectors with near-copies: some gallery items sit close to a query's positive (false negatives)."""
    base = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)
    noise = 0.15 * torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    return base, torch.nn.functional.normalize(base + noise, dim=1)


@pytest.mark.parametrize("ratio", [0.9, 0.97, None])
@pytest.mark.parametrize("k", [1, 5, 25, 60])
def test_mined_negatives_equal_a_float64_brute_force_reference(k, ratio):
    generator = torch.Generator().manual_seed(k)
    gallery, close = near_copies(37, 7, generator)
    gallery = torch.cat([gallery, close[:20]])  # items 37.. are near-copies of 0..19: likely false negatives
    positive = torch.randint(0, 37, (29,), generator=generator)
    query = torch.nn.functional.normalize(
        gallery[positive] + 0.3 * torch.randn(29, 7, generator=generator, dtype=torch.float64), dim=1
    )
    mined = mine_negatives(query, gallery, positive, k, ratio)
    expected = reference(query, gallery, positive, k, ratio)
    torch.testing.assert_close(mined.indices, expected, rtol=0, atol=0)
    assert not (mined.indices == positive[:, None]).any()
    scores = query @ gallery.T
    valid = expected >= 0
    torch.testing.assert_close(mined.scores[valid], scores.gather(1, expected.clamp(min=0))[valid])
    assert mined.scores[~valid].isnan().all()
    torch.testing.assert_close(mined.positive_scores, scores.gather(1, positive[:, None])[:, 0])
    if ratio is not None:
        assert (mined.scores[valid] <= (ratio * mined.positive_scores[:, None]).expand_as(valid)[valid]).all()
        assert mined.dropped.sum() > 0  # the near-copies were there to be dropped
    if k == 60:  # more than the gallery: the rest is -1
        assert (expected == -1).any()


@pytest.mark.parametrize("budget", [None, 16])
def test_the_search_goes_deeper_past_dropped_false_negatives(budget, monkeypatch):
    """Every query's first 30 candidates are near-copies of its positive: all dropped, so the k kept ones
    lie past the first search's depth (2k + 1); with a small budget of results, rows go a few at a time."""
    if budget is not None:
        monkeypatch.setattr("mmfast.train.mine.DEPTH_BUDGET", budget)
    generator = torch.Generator().manual_seed(0)
    anchor, _ = near_copies(1, 9, generator)
    copies = torch.nn.functional.normalize(anchor + 0.01 * torch.randn(30, 9, generator=generator, dtype=torch.float64),
                                           dim=1)  # fmt: skip
    others = torch.nn.functional.normalize(torch.randn(20, 9, generator=generator, dtype=torch.float64), dim=1)
    gallery = torch.cat([anchor, copies, others])
    query = torch.nn.functional.normalize(anchor + 0.05 * torch.randn(4, 9, generator=generator, dtype=torch.float64),
                                          dim=1)  # fmt: skip
    positive = torch.zeros(4, dtype=torch.int64)
    mined = mine_negatives(query, gallery, positive, 3, 0.9)
    torch.testing.assert_close(mined.indices, reference(query, gallery, positive, 3, 0.9), rtol=0, atol=0)
    assert (mined.indices > 30).all() and (mined.dropped == 30).all()


def kernel_search_reference(query, gallery, positive, k, ratio):
    """What mining computed before its exact scan: similarity_topk's whole ranking (its float32 scores, ties
    to the lower index), then each row's first k eligible; dropped: the ineligible non-positives ranked
    before the last kept one (all of them when none is kept)."""
    top = similarity_topk(query, gallery, gallery.shape[0])
    values = top.values.double()
    positive_scores = (query.double() * gallery[positive].double()).sum(dim=1)
    indices = torch.full((query.shape[0], k), -1, dtype=torch.int64)
    scores = torch.full((query.shape[0], k), float("nan"), dtype=torch.float64)
    dropped = torch.zeros(query.shape[0], dtype=torch.int64)
    for q in range(query.shape[0]):
        not_positive = top.indices[q] != positive[q]
        eligible = not_positive if ratio is None else not_positive & (values[q] <= ratio * positive_scores[q])
        kept = eligible.nonzero()[:k, 0]
        indices[q, : len(kept)], scores[q, : len(kept)] = top.indices[q, kept], values[q, kept]
        last = int(kept[-1]) if len(kept) else gallery.shape[0] - 1
        dropped[q] = (~eligible & not_positive)[: last + 1].sum()
    return indices, scores, positive_scores, dropped


@pytest.mark.parametrize("tile", [None, 16 * 37])
@pytest.mark.parametrize(("k", "ratio", "items"), [(1, 0.9, 301), (4, 0.5, 301), (7, None, 301), (7, 0.9, 6)])
def test_mining_float32_embeddings_equals_the_kernel_search_ties_included(k, ratio, items, tile, monkeypatch):
    """float32 embeddings as the cache gives them, with many exactly tied scores (small integers / 4): the
    mined negatives, their scores and the dropped counts are bit for bit what a search at the gallery's full
    depth by similarity_topk picks (the search past the dropped candidates is a masked scan of the gallery in
    tiles, several of them with `tile`, its last row block short)."""
    if tile is not None:
        monkeypatch.setattr("mmfast.train.mine.SCAN_TILE", tile)
    generator = torch.Generator().manual_seed(k)
    gallery = torch.randint(-2, 3, (items, 5), generator=generator).float() / 4
    query = torch.randint(-2, 3, (45, 5), generator=generator).float() / 4
    positive = torch.randint(0, items, (45,), generator=generator)
    mined = mine_negatives(query, gallery, positive, k, ratio)
    indices, scores, positive_scores, dropped = kernel_search_reference(query, gallery, positive, k, ratio)
    assert torch.equal(mined.indices, indices) and torch.equal(mined.dropped, dropped)
    assert torch.equal(mined.scores.nan_to_num(9.0), scores.nan_to_num(9.0))
    assert torch.equal(mined.positive_scores, positive_scores)
    assert (dropped > 0).any() if ratio is not None else (dropped == 0).all()
    assert (indices == -1).any() == (items < k + 1)


@pytest.mark.parametrize(("columns", "merge_every", "block"), [(3, 2, 64), (7, 64, 2), (64, 1, 4), (64, 3, 2)])
@pytest.mark.parametrize(("k", "ratio"), [(1, 0.9), (4, 0.5), (7, None)])
def test_the_exact_scan_in_many_tiles_equals_the_kernel_search_and_float64(k, ratio, columns, merge_every, block,
                                                                           monkeypatch):  # fmt: skip
    """The exact scan alone, over every row, in narrow tiles (the last one no wider than k with 3 columns: 301 =
    3 x 100 + 1), row blocks of 16 with a short last one, the best k merged every `merge_every` tiles, and each
    tile's top-k searched in its best blocks of `block` columns (64-column tiles; 7 is no multiple of 2, and the
    last tiles are narrower: a plain top-k): float32 scores with many exact ties give bit for bit the full-depth
    kernel search; float64 embeddings give the float64 brute force."""
    from mmfast.train.mine import _scan_rows

    monkeypatch.setattr("mmfast.train.mine.SCAN_COLUMNS", columns)
    monkeypatch.setattr("mmfast.train.mine.SCAN_TILE", 16 * columns)
    monkeypatch.setattr("mmfast.train.mine.SCAN_MERGE_EVERY", merge_every)
    monkeypatch.setattr("mmfast.train.mine.SCAN_BLOCK", block)

    def scan(query, gallery, positive):
        positive_scores = (query.double() * gallery[positive].double()).sum(dim=1)
        threshold = None if ratio is None else ratio * positive_scores
        indices = torch.full((query.shape[0], k), -1, dtype=torch.int64)
        scores = torch.full((query.shape[0], k), float("nan"), dtype=torch.float64)
        dropped = torch.full((query.shape[0],), -1, dtype=torch.int64)
        _scan_rows(torch.arange(query.shape[0]), query, gallery, positive, threshold, k, indices, scores, dropped)
        return indices, scores, dropped

    generator = torch.Generator().manual_seed(columns * k)
    gallery = torch.randint(-2, 3, (301, 5), generator=generator).float() / 4
    query = torch.randint(-2, 3, (45, 5), generator=generator).float() / 4
    positive = torch.randint(0, 301, (45,), generator=generator)
    indices, scores, dropped = scan(query, gallery, positive)
    expected_indices, expected_scores, _, expected_dropped = kernel_search_reference(query, gallery, positive, k, ratio)
    assert torch.equal(indices, expected_indices) and torch.equal(dropped, expected_dropped)
    assert torch.equal(scores.nan_to_num(9.0), expected_scores.nan_to_num(9.0))
    assert (dropped > 0).any() if ratio is not None else (dropped == 0).all()

    gallery, close = near_copies(53, 7, generator)
    gallery = torch.cat([gallery, close[:30]])  # near-copies of items 0..29: likely false negatives
    positive = torch.randint(0, 53, (39,), generator=generator)
    query = torch.nn.functional.normalize(
        gallery[positive] + 0.3 * torch.randn(39, 7, generator=generator, dtype=torch.float64), dim=1
    )
    indices, scores, _ = scan(query, gallery, positive)
    expected = reference(query, gallery, positive, k, ratio)
    assert torch.equal(indices, expected)
    valid = expected >= 0
    torch.testing.assert_close(scores[valid], (query @ gallery.T).gather(1, expected.clamp(min=0))[valid])
    assert scores[~valid].isnan().all()


@pytest.mark.parametrize(("probe", "kernel_rows"), [(1, 1), (8, 8), (10**6, 45)])
def test_rows_after_a_mostly_rescanned_probe_go_straight_to_the_scan(probe, kernel_rows, monkeypatch):
    """When most of the first `probe` rows need the exact scan, the other rows skip the kernel's search (here
    every row drops its best candidates); the result is the same bit for bit, ties and dropped counts included."""
    import mmfast.train.mine as mine

    searched = []
    kernel = mine.similarity_topk

    def counted_search(q, g, k, **options):
        searched.append(len(q))
        return kernel(q, g, k, **options)

    monkeypatch.setattr(mine, "similarity_topk", counted_search)
    monkeypatch.setattr(mine, "SCAN_PROBE_ROWS", probe)
    generator = torch.Generator().manual_seed(3)
    gallery = torch.randint(-2, 3, (301, 5), generator=generator).float() / 4
    query = torch.randint(-2, 3, (45, 5), generator=generator).float() / 4
    positive = torch.randint(0, 301, (45,), generator=generator)
    mined = mine_negatives(query, gallery, positive, 4, 0.2)
    indices, scores, positive_scores, dropped = kernel_search_reference(query, gallery, positive, 4, 0.2)
    assert torch.equal(mined.indices, indices) and torch.equal(mined.dropped, dropped)
    assert torch.equal(mined.scores.nan_to_num(9.0), scores.nan_to_num(9.0))
    assert sum(searched) == kernel_rows and (dropped > 0).float().mean() > 0.6


def fake_embed(inputs):
    """Deterministic unit embeddings from an input's content (text and image): copies embed alike."""
    rows = []
    for i in inputs:
        seed = int.from_bytes(hashlib.sha256(f"{i.text}\0{i.image}".encode()).digest()[:4], "little")
        rows.append(torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def test_mine_subset_skips_the_positive_and_its_copies():
    labels = [f"label {i % 7}" for i in range(30)]  # 30 rows, 7 distinct positives: each shared by 4-5 rows
    examples = [Example(Input(f"query {i}"), Input(labels[i]), (), "s", "f.jsonl", i) for i in range(30)]
    mined = mine_subset(examples, fake_embed, MineOptions(k=3, false_negative_ratio=None))
    gallery = [Input(f"label {i}") for i in range(7)]
    expected = reference(fake_embed([e.query for e in examples]), fake_embed(gallery),
                         [i % 7 for i in range(30)], 3, None)  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(mined.neighbours), expected, rtol=0, atol=0)
    for example, negatives in zip(examples, mined.negatives, strict=True):
        assert len(negatives) == 3 and len({n.text for n in negatives}) == 3
        assert all(content_id(n) != content_id(example.positive) for n in negatives)


def test_rows_are_grouped_by_their_file_in_order_however_it_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["a.jsonl", str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl"), "b.jsonl", "./a.jsonl"]
    examples = [Example(Input(f"query {i}"), Input("p"), (), "s", name, i) for i, name in enumerate(names)]
    assert _rows_by_file(examples) == {str(tmp_path / "a.jsonl"): [0, 2, 4], str(tmp_path / "b.jsonl"): [1, 3]}


def test_build_batches_keeps_mutual_hard_negatives_together():
    rng = np.random.default_rng(0)
    # Four groups of 8 rows, each row's negatives in its own group: a batch of 8 should be one group.
    positive = np.arange(32)
    neighbours = np.stack([8 * (r // 8) + rng.choice([j for j in range(8) if j != r % 8], 3, replace=False)
                           for r in range(32)])  # fmt: skip
    batches = build_batches(positive, neighbours, 8, seed=0)
    assert sorted(int(r) for b in batches for r in b) == list(range(32))
    together = np.mean([len({int(r) // 8 for r in b}) == 1 for b in batches])
    assert together >= 0.75, batches
    # One row per distinct positive while it can: 12 rows over 3 positives make batches of 3 distinct ones.
    batches = build_batches(np.arange(12) % 3, np.tile([[1, 2], [0, 2], [0, 1]], (4, 1)), 3, seed=1)
    assert len(batches) == 4 and all(sorted(b % 3) == [0, 1, 2] for b in batches)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root / "data", sizes=dataclasses.replace(Sizes.tiny(), train_t2i=24, train_i2t=16))
    spec = root / "spec.json"  # two subsets that train, with different formats of negatives (images, texts)
    spec.write_text(json.dumps({s: {"path": f"data/train/{s}.jsonl", "image_dir": "data"}
                                for s in ("MSCOCO_t2i", "MSCOCO_i2t")}))  # fmt: skip
    return spec


@pytest.fixture(scope="module")
def mined(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mined")
    argv = ["--model", str(default_backbone()), "--data", str(tiny_data), "--output_dir", str(out), "--k", "2",
            "--false_negative_ratio", "0.99", "--batch_order", "8", "--no_progress", "--cpu_threads", "1"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_the_mined_files_are_read_by_the_trainer_and_equal_the_reference(tiny_data, mined):
    from mmfast.train.encoder import Encoder
    from mmfast.train.evaluate.cache import EmbeddingCache

    source = load_data(tiny_data)
    loaded = DataReport()
    got = load_data(mined / "mixture.json", report=loaded)  # the trainer's loader
    assert got.mixture.names == source.mixture.names and got.mixture.sizes == source.mixture.sizes
    assert loaded.total == 0
    report = json.loads((mined / "mine_report.json").read_text())
    # The embeddings the run cached, read back: the same vectors, ranked by brute force in float64.
    cache = EmbeddingCache(Encoder.from_pretrained(default_backbone()), mined / "embedding_cache", show_progress=False)
    for name, offset, size in zip(source.mixture.names, source.mixture.offsets, source.mixture.sizes, strict=True):
        before, after = source.mixture.items[offset : offset + size], got.mixture.items[offset : offset + size]
        gallery, positive = [], []
        for e in before:
            if e.positive not in gallery:
                gallery.append(e.positive)
            positive.append(gallery.index(e.positive))
        embed = lambda inputs: cache.embed([i.text for i in inputs], [i.image for i in inputs])  # noqa: E731
        expected = reference(embed([e.query for e in before]), embed(gallery), positive, 2, 0.99)
        assert cache.num_encoded == 0  # every input came from the run's cache
        for e_before, e_after, row in zip(before, after, expected.tolist(), strict=True):
            assert (e_after.query, e_after.positive) == (e_before.query, e_before.positive)
            assert e_after.negatives == tuple(gallery[g] for g in row if g >= 0)
        assert report["subsets"][name]["rows"] == size
    # Image negatives are written relative to the image folder, like the row's own paths.
    row = json.loads((mined / "MSCOCO_t2i" / "MSCOCO_t2i.jsonl").read_text().splitlines()[0])
    assert isinstance(row["neg_image_path"], list) and row["neg_image_path"][0].startswith("images/MSCOCO_t2i/")


def test_the_batch_order_names_mined_rows_in_batches_of_one_subset(mined):
    header, batches = read_batch_order(mined / "batch_order.jsonl")
    assert header["batch_size"] == 8 and len(batches) == 24 // 8 + 16 // 8
    for _, batch in batches:
        assert len({n for n, _ in batch}) == 1  # one subset (one file here) per batch


def test_a_batch_order_shards_over_ranks_as_one_process_sees_it(tmp_path):
    examples = [Example(Input(f"q{i}"), Input(f"p{i}"), (), "s", str(tmp_path / "a.jsonl"), i) for i in range(20)]
    path = tmp_path / "order.jsonl"
    write_batch_order(path, [tmp_path / "a.jsonl"], [[(0, r) for r in range(b, 20, 5)] for b in range(5)], 4)
    one = BatchOrderSampler(path, examples, 4, seed=3)
    one.set_epoch(1)
    two = BatchOrderSampler(path, examples, 2, seed=3, num_replicas=2)
    two.set_epoch(1)
    ranks = [list(BatchSamplerShard(two, num_processes=2, process_index=r)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == list(one)
    assert sorted(map(sorted, one)) == sorted(sorted(range(b, 20, 5)) for b in range(5))
    one.set_epoch(2)
    assert list(one) != [a + b for a, b in zip(*ranks, strict=True)]  # another epoch, another order


HEADER = '{"mmfast_batch_order": 1, "batch_size": 2, "files": ["F"]}'


@pytest.mark.parametrize(
    "lines, message",
    [
        ([HEADER, "[[0, 1], [0, 1]]"], "line 2 holds a row twice"),
        ([HEADER, "[[0, 1]]"], "line 2 holds 1 rows"),
        ([HEADER, "", "[[0, 1], [3, 0]]"], "line 3: [3, 0]"),
        ([HEADER, "[[0, 1], [0"], "line 2 is not JSON"),
        (['{"batch_size": 2}'], "line 1 is not a batch order header"),
    ],
)
def test_a_bad_batch_order_names_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "order.jsonl"
    path.write_text("\n".join(lines).replace('"F"', json.dumps(str(tmp_path / "a.jsonl"))) + "\n")
    with pytest.raises(ValueError, match="order.jsonl") as error:
        read_batch_order(path)
    assert message in str(error.value)


def test_a_batch_order_that_does_not_fit_the_run_is_an_error(tmp_path):
    examples = [Example(Input(f"q{i}"), Input(f"p{i}"), (), "s", str(tmp_path / "a.jsonl"), i) for i in range(4)]
    path = tmp_path / "order.jsonl"
    write_batch_order(path, [tmp_path / "a.jsonl"], [[(0, 0), (0, 9)]], 2)
    with pytest.raises(ValueError, match=r"line 2 names row 9 of .*a\.jsonl, which is not in the training data"):
        BatchOrderSampler(path, examples, 2)
    with pytest.raises(ValueError, match=r"per_device_train_batch_size 2 x 2 process\(es\) = 4"):
        BatchOrderSampler(path, examples, 2, num_replicas=2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "0"], "--k must be an integer >= 1"),
        (["--false_negative_ratio", "-1"], "--false_negative_ratio must be a number > 0"),
        (["--batch_order", "1000"], "--batch_order 1000: no subset of weight > 0 has that many rows"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_bad_arguments_are_one_line_errors(tiny_data, tmp_path, capsys, argv, message):
    base = ["--model", str(default_backbone()), "--data", str(tiny_data), "--output_dir", str(tmp_path / "out"),
            "--no_progress", "--cache", "none"]  # fmt: skip
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_rows_name_the_file_and_row(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    row = {"qry": "a query", "qry_image_path": "", "pos_text": "a positive", "pos_image_path": ""}
    data.write_text(json.dumps(row) + "\n" + json.dumps(row | {"pos_text": 3}) + "\n")
    argv = ["--model", str(default_backbone()), "--data", str(data), "--output_dir", str(tmp_path / "out"),
            "--no_progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}: row 1, column 'pos_text' is int" in err and "Traceback" not in err
    nli = tmp_path / "nli.csv"
    nli.write_text("sent0,sent1,hard_neg\na,b,c\nd,e,f\n")
    assert main(["--model", str(default_backbone()), "--data", str(nli), "--output_dir", str(tmp_path / "o2"),
                 "--k", "3", "--no_progress"]) == 2  # fmt: skip
    assert "use --k 1" in capsys.readouterr().err
    data.write_text(json.dumps(row) + "\n" + json.dumps(row | {"pos_text": ""}) + "\n")
    assert main(argv + ["--strict"]) == 2
    assert f"{data}, row 1" in capsys.readouterr().err


def test_nli_triplets_get_a_mined_hard_neg(tmp_path):
    nli = tmp_path / "nli.csv"
    nli.write_text("sent0,sent1,hard_neg\n" + "".join(f"query {i},answer {i},\n" for i in range(9)))
    out = tmp_path / "out"
    assert main(["--model", str(default_backbone()), "--data", str(nli), "--output_dir", str(out), "--k", "1",
                 "--false_negative_ratio", "none", "--no_progress", "--cache", "none"]) == 0  # fmt: skip
    got = load_data(out / "mixture.json").mixture.items
    assert len(got) == 9 and all(len(e.negatives) == 1 for e in got)
    assert all(e.negatives[0].text.startswith("answer ") and e.negatives[0] != e.positive for e in got)


def test_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--k", "--false_negative_ratio", "--batch_order", "--model", "--cache", "NV-Retriever"):
        assert flag in out


def _train_argv(mined, output_dir, *extra):
    return ["--data", str(mined / "mixture.json"), "--batch_order", str(mined / "batch_order.jsonl"),
            "--output_dir", str(output_dir), "--per_device_train_batch_size", "8", "--logging_steps", "1",
            "--max_steps", "6", "--save_steps", "2", "--learning_rate", "1e-3", "--report_to", "none",
            "--cpu_threads", "1", "--disable_tqdm", "True", *extra]  # fmt: skip


def _losses(state):
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.mark.slow
def test_a_run_on_a_batch_order_resumes_onto_the_uninterrupted_trajectory(mined, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mmfast.train.cli import train

    whole = train(_train_argv(mined, tmp_path / "whole"))
    expected = _losses({"log_history": whole.state.log_history})
    assert sorted(expected) == list(range(1, 7))  # 5 batches an epoch: step 6 is the second epoch's first
    out = tmp_path / "run"
    worker = Path(__file__).with_name("killed_run_worker.py")
    killed = subprocess.run([sys.executable, str(worker), "step", "5", *_train_argv(mined, out)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(_train_argv(mined, out, "--resume_from_checkpoint", "latest"))
    assert _losses({"log_history": resumed.state.log_history}) == expected


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_on_a_batch_order_train_as_one_process(mined, tmp_path):
    from mmfast.train.cli import train
    from tests.train.torchrun import torchrun

    argv = _train_argv(mined, tmp_path / "two", "--max_steps", "3", "--save_steps", "3")
    argv[argv.index("--per_device_train_batch_size") + 1] = "4"  # 2 ranks x 4 = the batch order's 8
    done = torchrun("-m", "mmfast.train", *argv, cwd=tmp_path)
    assert "contrastive batch: 8 (4 per device × 2 process(es), gathered across devices)" in done.stderr
    two = _losses(json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text()))
    one = train(_train_argv(mined, tmp_path / "one", "--max_steps", "3", "--save_steps", "3"))
    one = _losses({"log_history": one.state.log_history})
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in one:  # the same rows per step, and the same updates: the same losses
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, two, one)


def test_the_entry_point_is_main():
    import importlib
    import re
    from pathlib import Path

    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    module, name = re.search(r'^mmfast-mine = "([\w.]+):(\w+)"$', pyproject, re.M).groups()
    assert getattr(importlib.import_module(module), name) is main
