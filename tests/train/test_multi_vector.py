"""Multi-vector (ColPali / ColQwen2) encoders: token vectors with their mask, the projection head saved
and loaded with the encoder, the colpali recipe's GradCache exact against one graph."""

import pytest
import torch

from mmfast import LateInteractionLossOptions
from mmfast.train.arguments import parse_arguments
from mmfast.train.default import PROFILE
from mmfast.train.encoder import PROJECTION_NAME, Encoder, token_mask
from mmfast.train.grad_cache import concatenate, full_batch_step, grad_cache_step, split_like
from mmfast.train.losses import Objective
from mmfast.train.run import build_trainer

TEXTS = ["a red circle", "<|image_1|> a page", "two blue squares on a long grey line"]


def _image():
    from PIL import Image

    return Image.new("RGB", (56, 84), (200, 30, 30))


def _batch(encoder):
    from mmfast.train.data import Input

    items = [Input(text, None if "<|image_1|>" not in text else "<given>") for text in TEXTS]
    images = [None if item.image is None else _image() for item in items]
    return encoder.prepare(items, images)


def test_token_vectors_are_unit_at_real_tokens_and_zero_at_padding(tiny_dirs):
    encoder = Encoder.from_pretrained(tiny_dirs["qwen2_vl"], multi_vector=True)
    batch = _batch(encoder)
    vectors, mask = encoder.embed_tokens(batch)
    assert vectors.shape == (*batch["attention_mask"].shape, 128) and mask.dtype == torch.bool
    assert torch.equal(mask, batch["attention_mask"].bool()) and not mask.all()  # the texts pad
    norms = vectors.norm(dim=-1)
    torch.testing.assert_close(norms[mask], torch.ones_like(norms[mask]))
    assert (vectors[~mask] == 0).all()
    assert torch.equal(token_mask(vectors), mask)
    assert torch.equal(encoder({"query": batch})["query"], vectors)
    vectors.sum().backward()
    assert encoder.projection.weight.grad is not None and encoder.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_projection_head_round_trips_with_the_encoder(tiny_dirs, tmp_path, adapter):
    encoder = Encoder.from_pretrained(tiny_dirs["qwen2_vl"], multi_vector=True, multi_vector_dim=24)
    if adapter:
        encoder.add_adapter(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        encoder.projection.weight.normal_()  # not the fresh head a reload would draw
    encoder.eval()
    batch = _batch(encoder)
    expected = encoder.embed_tokens(batch)[0]
    encoder.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / PROJECTION_NAME).is_file()
    torch.manual_seed(123)  # another fresh head, were the saved one not read
    loaded = Encoder.from_pretrained(tmp_path / "saved").eval()
    assert loaded.encoder_config.multi_vector and loaded.encoder_config.multi_vector_dim == 24
    assert loaded.is_adapter == adapter
    torch.testing.assert_close(loaded.embed_tokens(batch)[0], expected, rtol=0, atol=0)
    loaded.projection.weight.data.zero_()
    loaded.load_weights(tmp_path / "saved")  # a resume reads the head too
    torch.testing.assert_close(loaded.embed_tokens(batch)[0], expected, rtol=0, atol=0)


def test_a_head_of_another_size_is_named(tiny_dirs, tmp_path):
    Encoder.from_pretrained(tiny_dirs["qwen2_vl"], multi_vector=True, multi_vector_dim=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{PROJECTION_NAME} does not fit this encoder's head"):
        Encoder.from_pretrained(tmp_path, multi_vector_dim=16)
    with pytest.raises(ValueError, match="multi_vector_dim must be a positive integer, got 0"):
        Encoder.from_pretrained(tmp_path, multi_vector_dim=0)


def test_mask_non_image_embeddings_keeps_a_page_s_image_tokens_only(tiny_dirs, tmp_path):
    """ColQwen2's option: the image row keeps its <|image_pad|> tokens only (not <|vision_start|>, <|vision_end|>
    or its text), the text rows every real token; the option is saved with the encoder."""
    plain = Encoder.from_pretrained(tiny_dirs["qwen2_vl"], multi_vector=True)
    encoder = Encoder.from_pretrained(tiny_dirs["qwen2_vl"], multi_vector=True, mask_non_image_embeddings=True)
    encoder.projection.load_state_dict(plain.projection.state_dict())
    batch = _batch(encoder)
    vectors, mask = encoder.embed_tokens(batch)
    pad_id = encoder.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_row = TEXTS.index("<|image_1|> a page")
    attention = batch["attention_mask"].bool()
    assert torch.equal(mask[image_row], batch["input_ids"][image_row] == pad_id)
    assert 0 < mask[image_row].sum() < attention[image_row].sum()  # the markers and the text are left out
    text_rows = [i for i in range(len(TEXTS)) if i != image_row]
    assert torch.equal(mask[text_rows], attention[text_rows])
    assert torch.equal(token_mask(vectors), mask) and (vectors[~mask] == 0).all()
    # the kept tokens' vectors are the plain encoder's: only the mask differs
    torch.testing.assert_close(vectors[mask], plain.embed_tokens(batch)[0][mask], rtol=0, atol=0)
    encoder.save_pretrained(tmp_path)
    assert Encoder.from_pretrained(tmp_path).encoder_config.mask_non_image_embeddings


def test_mask_non_image_embeddings_needs_multi_vector(tiny_dirs):
    with pytest.raises(ValueError, match="mask_non_image_embeddings masks token vectors: it needs multi_vector"):
        Encoder.from_pretrained(tiny_dirs["qwen2_vl"], mask_non_image_embeddings=True)
    with pytest.raises(ValueError, match="mask_non_image_embeddings must be true or false, got 'yes'"):
        Encoder.from_pretrained(tiny_dirs["qwen2_vl"], multi_vector=True, mask_non_image_embeddings="yes")


def test_embed_tokens_needs_a_multi_vector_encoder(tiny_dirs):
    encoder = Encoder.from_pretrained(tiny_dirs["qwen2_vl"])
    with pytest.raises(ValueError, match="embed_tokens needs a multi-vector encoder"):
        encoder.embed_tokens(_batch(encoder))


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_colpali_recipe_grad_cache_equals_one_graph(tmp_path, chunks):
    """The colpali recipe on the embedded default: LoRA (with dropout), the projection head and the
    late-interaction loss; GradCache over mini-batches padded to different lengths gives the
    gradients of one graph over the same mini-batches."""
    run = parse_arguments(
        ["--output_dir", str(tmp_path), "--recipe", "colpali", "--per_device_train_batch_size", "8",
         "--gradcache_mini_batch_size", str(8 // chunks), "--lora", "True", "--lora_dropout", "0.3", "--max_steps", "1",
         "--report_to", "none"], profile=PROFILE,
    )  # fmt: skip
    trainer = build_trainer(run)
    encoder = trainer.model
    assert encoder.is_adapter and encoder.projection is not None
    assert isinstance(trainer.objective.options, LateInteractionLossOptions)
    encoder.train()
    examples = [trainer.train_dataset[i * 97] for i in range(8)]
    mini_batches = trainer.data_collator(examples)["mini_batches"]
    assert len(mini_batches) == chunks

    def grads_of(step):
        encoder.zero_grad()
        torch.manual_seed(11)
        loss, embeddings = step(encoder, mini_batches, trainer.objective)
        return loss, embeddings, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    ref_loss, ref_embeddings, ref = grads_of(full_batch_step)
    got_loss, got_embeddings, got = grads_of(grad_cache_step)
    assert ref_embeddings["query"].dim() == 3 and torch.isfinite(ref_loss)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert ref and got.keys() == ref.keys() and "projection.weight" in ref
    for name, grad in ref.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_late_interaction_objective_reads_padding_from_zero_tokens():
    """The objective's masks are the zero tokens concatenate pads with: padding changes nothing."""
    gen = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(5, 3, 8, generator=gen, dtype=torch.float64), dim=-1)
    target = torch.nn.functional.normalize(torch.randn(5, 4, 8, generator=gen, dtype=torch.float64), dim=-1)
    objective = Objective(LateInteractionLossOptions(loss="infonce", temperature=0.1))
    plain = objective({"query": query, "target": target})
    padded = objective({"query": torch.nn.functional.pad(query, (0, 0, 0, 2)),
                        "target": torch.nn.functional.pad(target, (0, 0, 0, 3))})  # fmt: skip
    torch.testing.assert_close(padded, plain, rtol=1e-14, atol=0)  # the tiles change, not the terms
    shorter = objective({"query": query, "target": target[:, :2]})
    assert not torch.allclose(shorter, plain)


def test_grad_cache_pads_token_vectors_and_splits_their_gradients_back():
    short, long = torch.randn(2, 3, 4), torch.randn(3, 5, 4)
    joined = concatenate([{"query": short}, {"query": long}])["query"]
    assert joined.shape == (5, 5, 4) and (joined[:2, 3:] == 0).all()
    assert torch.equal(joined[:2, :3], short) and torch.equal(joined[2:], long)
    grads = {"query": torch.randn(5, 5, 4)}
    for parts in ([{"query": short}, {"query": long}], [{"query": (2, 3)}, {"query": (3, 5)}]):
        first, second = split_like(grads, parts)
        assert torch.equal(first["query"], grads["query"][:2, :3]) and torch.equal(second["query"], grads["query"][2:])


@pytest.mark.slow
def test_mmfast_eval_scores_a_saved_multi_vector_model_on_visdoc_by_maxsim(tiny_dirs, tmp_path, capsys):
    """mmfast-eval --task visdoc with a saved multi-vector encoder: its NDCG@5 and recall are those of
    a float64 MaxSim ranking of the encoder's own token vectors, computed here by hand."""
    import json
    import math

    from mmfast.train.default.synthetic import Sizes, generate
    from mmfast.train.evaluate.cli import eval_main
    from mmfast.train.evaluate.visdoc import PAGE_TEXT, QUERY_INSTRUCTION, _table, relevant_pages, resolve_image

    data = generate(tmp_path / "data", sizes=Sizes.tiny())
    encoder = Encoder.from_pretrained(tiny_dirs["qwen2_vl"], multi_vector=True)
    encoder.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--task", "visdoc", "--data", str(data.visdoc), "--output",
            str(tmp_path / "eval"), "--no_progress"]  # fmt: skip
    assert eval_main(argv) == 0, capsys.readouterr().err
    scores = json.loads((tmp_path / "eval" / "results.json").read_text())["visdoc"]["documents"]

    root = data.visdoc
    queries, pages = _table(root, "queries"), _table(root, "corpus")
    relevant = relevant_pages(_table(root, "qrels"), root)
    images = [resolve_image(root, page["image"], "page").load() for page in pages]  # inline PNG bytes
    loaded = Encoder.from_pretrained(tmp_path / "model")
    q = loaded.encode([f"{QUERY_INSTRUCTION} {row['query']}" for row in queries], show_progress=False).double()
    p = loaded.encode([PAGE_TEXT] * len(images), images, show_progress=False).double()
    tokens = torch.einsum("qtd,gsd->qgts", q, p).masked_fill(~token_mask(p)[None, :, None, :], -math.inf)
    maxsim = (tokens.amax(dim=3) * token_mask(q)[:, None, :]).sum(dim=2)
    order = maxsim.sort(dim=1, descending=True, stable=True).indices[:, :5].tolist()
    ndcg = []
    for row, ranked in zip(queries, order, strict=True):
        grades = relevant[str(row["query-id"])]
        gains = [grades.get(str(pages[i]["corpus-id"]), 0) for i in ranked]
        ideal = sorted(grades.values(), reverse=True)[:5]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        ndcg.append(dcg / sum(g / math.log2(r + 2) for r, g in enumerate(ideal)))
    assert scores["ndcg_linear@5"] == pytest.approx(100 * sum(ndcg) / len(ndcg), abs=1e-6)
    assert scores["num_queries"] == len(queries) and scores["num_pages"] == len(pages)


def test_the_embedded_default_trains_colpali_with_infonce_and_the_published_loss_otherwise(tiny_dirs, tmp_path):
    """The pairwise loss collapses the tiny default to its ln 2 minimum (README, "Why the multi-vector default
    learns"): a run on the embedded default takes the recipe's default_run_loss; a model or data of one's own,
    ColPali's pairwise loss. Either way a page is scored by its image tokens only."""
    common = ["--recipe", "colpali", "--output_dir", str(tmp_path), "--report_to", "none"]
    default = parse_arguments(common, profile=PROFILE)
    assert (default.loss.loss, default.loss.temperature) == ("infonce", 0.02)
    own = parse_arguments([*common, "--model_name_or_path", str(tiny_dirs["qwen2_vl"])], profile=PROFILE)
    assert (own.loss.loss, own.loss.temperature) == ("pairwise", 1.0)
    assert parse_arguments([*common, "--temperature", "0.05"], profile=PROFILE).loss.temperature == 0.05
    assert default.model.mask_non_image_embeddings and own.model.mask_non_image_embeddings
    # GradCache is the recipe's default (4 mini-batches of its 32 rows); the embedded default's profile runs one graph
    assert (own.training.per_device_train_batch_size, own.training.gradcache_mini_batch_size) == (32, 8)
    assert default.training.gradcache_mini_batch_size == 0
    with pytest.raises(ValueError, match="--mask_non_image_embeddings masks token vectors: recipe llave"):
        build_trainer(parse_arguments(["--recipe", "llave", "--mask_non_image_embeddings", "true", "--output_dir",
                                       str(tmp_path), "--report_to", "none"], profile=PROFILE))  # fmt: skip


def test_the_fresh_head_and_adapter_are_drawn_from_the_run_s_seed(tmp_path):
    """Two builds of one run (any RNG state before) give the same head and LoRA weights, so every rank
    of a data-parallel run, and a rerun, starts from the same model; another --seed, another head."""
    from mmfast.train.run import build_encoder

    argv = ["--recipe", "colpali", "--output_dir", str(tmp_path), "--report_to", "none", "--lora", "true"]
    run = parse_arguments(argv, profile=PROFILE)
    first = build_encoder(run)
    torch.rand(7)  # the global RNG moved on
    second = build_encoder(run)
    assert first.is_adapter and "projection.weight" in dict(first.named_parameters())
    fresh = {n: p for n, p in first.named_parameters() if "lora_" in n or n.startswith("projection.")}
    assert fresh and all(torch.equal(p, dict(second.named_parameters())[n]) for n, p in fresh.items())
    other = build_encoder(parse_arguments([*argv, "--seed", "1"], profile=PROFILE))
    assert not torch.equal(other.projection.weight, first.projection.weight)
