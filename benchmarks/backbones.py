"""Tiny backbones per family: build time, parameters, image tokens per image, one training step, and
how fast each learns text-to-image retrieval.

    HF_HUB_OFFLINE=1 python benchmarks/backbones.py --threads 1 --json benchmarks/results/backbones.json
    HF_HUB_OFFLINE=1 python benchmarks/backbones.py --threads 1 --hidden 128 --layers 4 --image-size 112
    HF_HUB_OFFLINE=1 python benchmarks/backbones.py --threads 1 --probe 90 --family qwen2_vl llava

The step is what the embedded default trains: a batch of 16 rows, 8 captions and 8 images with the
E5-V instruction, through `processor_inputs` + `last_hidden_state`, last-token pooling and InfoNCE
(caption i against image i) with `mmfast.contrastive_loss`, then backward; the forward time includes
`processor_inputs` (tokenizing, image processing). The median of `--repeats` steps after one warm-up is
reported.

`--probe SECONDS` trains each multimodal family (full fine-tune, AdamW) for that many seconds of step
time on fresh renders of 72 scenes (6 colours x 3 shapes x 4 corners, jittered) and reports text-to-image
R@1 over fresh renders of all 72 scenes, six times along the way. It is a quick stand-in for the embedded
default's data, to compare families; the default's own figures come from its trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import mmfast  # noqa: E402
from mmfast.train.backbones import (  # noqa: E402
    last_hidden_state,
    load_backbone,
    processor_inputs,
    rewrite_image_tokens,
    vision_tower,
)
from mmfast.train.default.model import BUILDABLE, build_tiny_backbone, default_corpus  # noqa: E402
from mmfast.train.default.tokenizer import train_tokenizer  # noqa: E402
from mmfast.train.processors import tokenizer_of  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, median_times, write_json  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 40, 180), "orange": (240, 140, 20)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
CORNERS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
SCENES = [(colour, shape, corner) for colour in COLOURS for shape in SHAPES for corner in CORNERS]
TEXT_PROMPT = "{}\nSummary above sentence in one word:"
IMAGE_PROMPT = "<|image_1|>\nSummary above image in one word:"


def caption(scene) -> str:
    colour, shape, corner = scene
    return f"a {colour} {shape} at the {corner}"


def render(scene, size: int, rng: random.Random) -> Image.Image:
    colour, shape, corner = scene
    image = Image.new("RGB", (size, size), (255, 255, 255))
    radius = rng.randint(size // 8, size // 5)
    x = CORNERS[corner][0] * size // 2 + size // 4 + rng.randint(-3, 3)
    y = CORNERS[corner][1] * size // 2 + size // 4 + rng.randint(-3, 3)
    box, draw = (x - radius, y - radius, x + radius, y + radius), ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=COLOURS[colour])
    return image


def pair_batch(family, scenes, image_size: int, rng: random.Random):
    """Captions first, then their images (a text-only family gets the captions again, reworded)."""
    texts = [TEXT_PROMPT.format(caption(scene)) for scene in scenes]
    if not family.multimodal:
        return texts + [TEXT_PROMPT.format("there is " + caption(scene)) for scene in scenes], []
    image_prompt = rewrite_image_tokens(IMAGE_PROMPT, family)
    return texts + [image_prompt] * len(scenes), [render(scene, image_size, rng) for scene in scenes]


def embed(model, processor, family, texts, images):
    batch = processor_inputs(processor, family, texts, images, padding_side="left")
    return mmfast.last_token_pool(last_hidden_state(model, family, batch), batch["attention_mask"])


def image_tokens_per_image(processor, family, image_size: int) -> int:
    if not family.multimodal:
        return 0
    batch = processor_inputs(processor, family, [family.image_token], [render(SCENES[0], image_size, random.Random())])
    return int((batch["input_ids"] == tokenizer_of(processor).convert_tokens_to_ids(family.image_fill_token)).sum())


def contrastive_loss(model, processor, family, texts, images):
    embeddings = embed(model, processor, family, texts, images)
    pairs = len(texts) // 2
    return mmfast.contrastive_loss(embeddings[:pairs], embeddings[pairs:], temperature=0.05, symmetric=True)


def step_functions(model, processor, family, texts, images):
    state = {}

    def forward():
        state["loss"] = contrastive_loss(model, processor, family, texts, images)

    def backward():
        state.pop("loss").backward()
        model.zero_grad(set_to_none=True)

    return forward, backward


def build(family_name: str, tokenizer, args, work: Path):
    start = time.perf_counter()
    folder = build_tiny_backbone(
        family_name, work / family_name, tokenizer=tokenizer, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=args.heads, vision_layers=args.vision_layers, vision_width=args.vision_width,
        image_size=args.image_size,
    )  # fmt: skip
    return folder, time.perf_counter() - start


def measure(family_name: str, tokenizer, args, work: Path) -> dict:
    folder, build_s = build(family_name, tokenizer, args, work)
    start = time.perf_counter()
    model, processor, family = load_backbone(folder)
    load_s = time.perf_counter() - start
    texts, images = pair_batch(family, SCENES[: args.batch // 2], args.image_size, random.Random(0))
    tower = vision_tower(model.train(), family)
    row = {
        "family": family_name,
        "hidden": args.hidden,
        "layers": args.layers,
        "image_size": args.image_size,
        "params": sum(p.numel() for p in model.parameters()),
        "vision_params": sum(p.numel() for p in tower.parameters()) if tower is not None else 0,
        "image_tokens": image_tokens_per_image(processor, family, args.image_size),
        "seq_len": processor_inputs(processor, family, texts, images)["input_ids"].shape[1],
        "build_s": build_s,
        "load_s": load_s,
    }
    row.update(median_times(*step_functions(model, processor, family, texts, images), args.repeats))
    return row


def retrieval_at_1(model, processor, family, image_size: int) -> float:
    rng = random.Random(123)  # the same held-out renders at every evaluation
    images = [render(scene, image_size, rng) for scene in SCENES]
    image_prompt = rewrite_image_tokens(IMAGE_PROMPT, family)
    model.eval()
    with torch.no_grad():
        queries = embed(model, processor, family, [TEXT_PROMPT.format(caption(s)) for s in SCENES], [])
        chunks = [images[i : i + 24] for i in range(0, len(images), 24)]
        candidates = torch.cat([embed(model, processor, family, [image_prompt] * len(c), c) for c in chunks])
    model.train()
    return ((queries @ candidates.T).argmax(dim=1) == torch.arange(len(SCENES))).float().mean().item()


def probe(family_name: str, tokenizer, args, work: Path) -> dict:
    model, processor, family = load_backbone(build(family_name, tokenizer, args, work)[0])
    optimizer = torch.optim.AdamW(model.train().parameters(), lr=args.lr, weight_decay=0.0)
    rng, steps, step_time, log = random.Random(0), 0, 0.0, []
    while True:
        if step_time >= len(log) * args.probe / 6:
            log.append({"seconds": round(step_time, 1), "steps": steps,
                        "r_at_1": retrieval_at_1(model, processor, family, args.image_size)})  # fmt: skip
            if len(log) == 7:
                break
        start = time.perf_counter()
        texts, images = pair_batch(family, rng.sample(SCENES, args.batch // 2), args.image_size, rng)
        optimizer.zero_grad()
        contrastive_loss(model, processor, family, texts, images).backward()
        optimizer.step()
        steps += 1
        step_time += time.perf_counter() - start
    return {"family": family_name, "hidden": args.hidden, "layers": args.layers, "image_size": args.image_size,
            "batch": args.batch, "lr": args.lr, "steps_per_s": steps / step_time, "log": log}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=list(BUILDABLE), choices=list(BUILDABLE))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--vision-width", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=16, help="rows per step: half captions, half images")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--probe", type=float, metavar="SECONDS", help="train this long and report R@1 instead")
    parser.add_argument("--lr", type=float, default=3e-4, help="probe learning rate (1e-3 collapsed here)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokenizer = train_tokenizer([*default_corpus(), *(caption(scene) for scene in SCENES)])
    print(f"# {machine()} | tokenizer trained in {time.perf_counter() - start:.3f} s, {len(tokenizer)} tokens")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        if args.probe:
            for name in (name for name in args.family if name != "causal_lm"):
                rows.append(probe(name, tokenizer, args, Path(work)))
                print(json.dumps(rows[-1]), flush=True)
        else:
            print("family            params  vision  img tok  seq  build s  load s  fwd ms  bwd ms  fwd+bwd ms")
            for name in args.family:
                r = measure(name, tokenizer, args, Path(work))
                rows.append(r)
                print(f"{name:16s} {r['params']:7d} {r['vision_params']:7d} {r['image_tokens']:8d} {r['seq_len']:4d} "
                      f"{r['build_s']:8.2f} {r['load_s']:7.2f} {r['fwd_ms']:7.1f} {r['bwd_ms']:7.1f} "
                      f"{r['fwd_bwd_ms']:10.1f}", flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
