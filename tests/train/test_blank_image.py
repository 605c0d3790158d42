"""`Encoder.forward(..., blank_image_sides=...)`: the vision tower runs over one blank image before a side's
backbone pass, weighted zero (what lets FSDP ranks without images join the vision tower's collectives,
test_fsdp_train.py). The embeddings are unchanged bit for bit, and the parameters that get a gradient are the
ones an image row gives one (under FSDP the root unit's reduce-scatter holds exactly those, on every rank),
the image-only ones with zeros."""

import pytest
import torch
from PIL import Image

from mmfast.train.data import Input
from mmfast.train.encoder import Encoder
from mmfast.train.placeholder import IMAGE_PLACEHOLDER

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next", "llava")


def gradients(encoder, sides, **options) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    encoder.zero_grad(set_to_none=True)
    embeddings = encoder(sides, **options)
    sum(e.sum() for e in embeddings.values()).backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return {side: e.detach() for side, e in embeddings.items()}, grads


@pytest.mark.parametrize("family", FAMILIES)
def test_blank_image_pass_leaves_embeddings_and_reaches_what_an_image_reaches(tiny_dirs, family):
    encoder = Encoder.from_pretrained(tiny_dirs[family]).train()
    if not encoder.takes_blank_image:
        pytest.fail(f"{family}: no blank image pass")
    texts = encoder.prepare([Input("a cat on a mat"), Input("three dogs")])
    image = encoder.prepare([Input(f"{IMAGE_PLACEHOLDER} a photo")], [Image.new("RGB", (64, 48), (200, 30, 90))])
    plain, plain_grads = gradients(encoder, {"query": texts})
    blank, blank_grads = gradients(encoder, {"query": texts}, blank_image_sides=("query",))
    torch.testing.assert_close(blank["query"], plain["query"], rtol=0, atol=0)
    _, image_grads = gradients(encoder, {"query": image})
    assert blank_grads.keys() == image_grads.keys(), sorted(set(blank_grads) ^ set(image_grads))
    for name, grad in blank_grads.items():
        expected = plain_grads.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, expected, rtol=0, atol=0, msg=name)
