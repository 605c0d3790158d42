"""`rank_alignment`: what a rank adds so that its FSDP collectives match every other rank's (a blank image, a
placeholder negatives side, placeholder mini-batches), and that none of it changes what the step computes. In
one process: the loss, every embedding and every gradient of a GradCache step are bit-identical with the
additions and without; the RNG is left where it was. On 2 FSDP ranks: test_fsdp_train.py."""

import pytest
import torch
from PIL import Image

import mmfast
from mmfast.train.data import Input
from mmfast.train.encoder import Encoder
from mmfast.train.grad_cache import grad_cache_step
from mmfast.train.mini_batches import MiniBatches
from mmfast.train.placeholder import IMAGE_PLACEHOLDER
from mmfast.train.rank_alignment import SIDES, AlignedMiniBatches, Alignment, align

TEXT, IMAGE, NEGATIVES, NEGATIVE_IMAGE = (False,) * 4, (True, False, False, False), (0, 0, 1, 0), (0, 0, 1, 1)


def test_each_rank_adds_what_another_rank_runs_and_it_lacks():
    # rank 0: 2 mini-batches, the first with image queries and hard negatives; rank 1: 3, its last with an image
    # among its negatives.
    rank0, rank1 = [(1, 0, 1, 0), TEXT], [TEXT, TEXT, NEGATIVE_IMAGE]
    every = [rank0, rank1]
    assert align(rank0, every) == [Alignment(), Alignment(), Alignment(SIDES, ("negatives",), real=False)]
    assert align(rank1, every) == [Alignment(("negatives",), ("query",)), Alignment(), Alignment()]
    # Ranks that agree add nothing; a rank with fewer mini-batches and no negatives anywhere, no negatives side.
    assert align(rank0, [rank0, rank0]) == [Alignment()] * 2
    assert align([IMAGE], [[IMAGE], [IMAGE, TEXT]]) == [Alignment(), Alignment(("query", "target"), (), real=False)]


def rows(with_image: bool) -> list[tuple[Input, ...]]:
    image = "IMAGE" if with_image else None
    text = f"{IMAGE_PLACEHOLDER} a photo" if with_image else "a caption"
    return [(Input(f"{text} {i}", image), Input(f"the answer {i}")) for i in range(5)]


@pytest.fixture
def encoder_and_rows(tiny_dirs, monkeypatch):
    encoder = Encoder.from_pretrained(tiny_dirs["qwen2_vl"]).train()
    # Dropout in every attention (the tiny model has none): the additions must not move a real pass's masks.
    dropouts = [m for m in encoder.modules() if hasattr(m, "attention_dropout")]
    assert dropouts
    for module in dropouts:
        module.attention_dropout = 0.1
    # The rows' images, made up here (MiniBatches loads each image from its path when it builds a side).
    monkeypatch.setattr("mmfast.train.mini_batches.load_image", lambda path: Image.new("RGB", (60, 50), (9, 99, 199)))
    return encoder, rows(with_image=True)[:3] + rows(with_image=False)[3:]


def step(encoder, mini_batches, aligned: list[Alignment] | None):
    """A GradCache step of `encoder` on `mini_batches`, with `aligned` additions (None: none); returns the loss,
    the embeddings, every parameter's gradient (None as zeros) and the RNG state after it."""
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    forward = encoder
    if aligned is not None:
        mini_batches = AlignedMiniBatches(mini_batches, aligned)

        def forward(pair):
            return encoder(pair[0], blank_image_sides=pair[1].blank_image_sides,
                           placeholder_sides=pair[1].placeholder_sides)  # fmt: skip

    def loss_fn(embeddings):
        return mmfast.contrastive_loss(embeddings["query"], embeddings["target"], embeddings.get("negatives"),
                                       temperature=0.05)  # fmt: skip

    loss, embeddings = grad_cache_step(forward, mini_batches, loss_fn)
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in encoder.named_parameters()}
    return loss, embeddings, grads, torch.get_rng_state()


def test_placeholder_sides_and_mini_batches_change_nothing_the_step_computes(encoder_and_rows):
    encoder, batch = encoder_and_rows
    mini_batches = MiniBatches(encoder.builder, batch, [(0, 2), (2, 5)])
    plain_loss, plain, plain_grads, plain_rng = step(encoder, mini_batches, None)
    # What a rank with no hard negatives and 2 mini-batches adds beside a rank with 3, image negatives in each.
    additions = [Alignment(("negatives",), ("negatives",)), Alignment(("negatives",), ("query", "negatives")),
                 Alignment(SIDES, ("query", "negatives"), real=False)]  # fmt: skip
    loss, embeddings, grads, rng = step(encoder, mini_batches, additions)
    assert torch.equal(loss, plain_loss)
    assert embeddings.keys() == {"query", "target", "negatives"} and embeddings["negatives"].shape == (0, 64)
    for side, embedding in plain.items():
        assert torch.equal(embeddings[side], embedding), side
    # The additions ran the backbone and the vision tower, forward and backward: every parameter they reach
    # has a gradient, the real rows' (zero where only the additions reach).
    assert all(torch.equal(grads[n], g) for n, g in plain_grads.items()), [
        n for n, g in plain_grads.items() if not torch.equal(grads[n], g)
    ]
    assert torch.equal(rng, plain_rng)


def test_placeholder_passes_reach_what_a_real_side_reaches_and_draw_no_random_numbers(encoder_and_rows):
    """A placeholder side's embedding has no rows, yet its backward reaches every parameter its pass ran (what
    keeps FSDP's reduce-scatters in step), with zero gradients; and, unlike a real pass, it draws no random
    numbers (dropout)."""
    encoder, _ = encoder_and_rows
    texts = encoder.prepare([Input("a cat"), Input("two dogs")])
    placeholder = encoder.prepare([Input("placeholder")])
    reached, drew = {}, {}
    for name, options in (("real", {}), ("placeholder", {"placeholder_sides": ("target",)})):
        encoder.zero_grad(set_to_none=True)
        before = torch.get_rng_state()
        embeddings = encoder({"target": texts if name == "real" else placeholder}, **options)
        drew[name] = not torch.equal(torch.get_rng_state(), before)
        embeddings["target"].sum().backward()
        reached[name] = {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}
    assert drew == {"real": True, "placeholder": False}
    assert reached["placeholder"].keys() == reached["real"].keys() and reached["real"]
    assert all(grad.abs().max() == 0 for grad in reached["placeholder"].values())
