"""Tiny backbones per family: build time, parameters, image tokens per image, and one training step.

    HF_HUB_OFFLINE=1 python benchmarks/backbones.py --json benchmarks/results/backbones.json
    HF_HUB_OFFLINE=1 python benchmarks/backbones.py --hidden 128 --layers 4 --image-size 112 --threads 1

The step is what the embedded default trains: a batch of 16 rows, 8 captions and 8 images with an
instruction, through `processor_inputs` + `last_hidden_state`, last-token pooling and InfoNCE
(caption i against image i) with `mmfast.contrastive_loss`, then backward. The median of `--repeats`
steps after one warm-up is reported.
"""

from __future__ import annotations

import argparse
import os
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

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def shape_image(index: int, size: int) -> Image.Image:
    colour = list(COLOURS.values())[index % len(COLOURS)]
    image = Image.new("RGB", (size, size), (255, 255, 255))
    corner = (index // len(COLOURS)) % 4
    x, y = (corner % 2) * size // 2, (corner // 2) * size // 2
    ImageDraw.Draw(image).ellipse((x + 2, y + 2, x + size // 2 - 2, y + size // 2 - 2), fill=colour)
    return image


def batch_rows(family, pairs: int, image_size: int):
    captions = [f"a {list(COLOURS)[i % 4]} circle at corner {i // 4 % 4}" for i in range(pairs)]
    if family.multimodal:
        prompts = [rewrite_image_tokens("<|image_1|>\nSummary above image in one word:", family)] * pairs
        images = [shape_image(i, image_size) for i in range(pairs)]
    else:
        prompts, images = [f"the {c}. Summary above sentence in one word:" for c in captions], []
    return captions + prompts, images


def image_tokens_per_image(processor, family, image_size: int) -> int:
    if not family.multimodal:
        return 0
    batch = processor_inputs(processor, family, [family.image_token], [shape_image(0, image_size)])
    return int((batch["input_ids"] == tokenizer_of(processor).convert_tokens_to_ids(family.image_fill_token)).sum())


def step_functions(model, family, batch, pairs: int):
    state = {}

    def forward():
        hidden = last_hidden_state(model, family, batch)
        embeddings = mmfast.last_token_pool(hidden, batch["attention_mask"])
        state["loss"] = mmfast.contrastive_loss(embeddings[:pairs], embeddings[pairs:], temperature=0.05)

    def backward():
        state.pop("loss").backward()
        model.zero_grad(set_to_none=True)

    return forward, backward


def measure(family_name: str, tokenizer, args, work: Path) -> dict:
    start = time.perf_counter()
    folder = build_tiny_backbone(
        family_name, work / family_name, tokenizer=tokenizer, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=args.heads, vision_layers=args.vision_layers, vision_width=args.vision_width,
        image_size=args.image_size,
    )  # fmt: skip
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    model, processor, family = load_backbone(folder)
    load_s = time.perf_counter() - start
    model.train()
    pairs = args.batch // 2
    texts, images = batch_rows(family, pairs, args.image_size)
    batch = processor_inputs(processor, family, texts, images, padding_side="left")
    tower = vision_tower(model, family)
    row = {
        "family": family_name,
        "hidden": args.hidden,
        "layers": args.layers,
        "image_size": args.image_size,
        "params": sum(p.numel() for p in model.parameters()),
        "vision_params": sum(p.numel() for p in tower.parameters()) if tower is not None else 0,
        "image_tokens": image_tokens_per_image(processor, family, args.image_size),
        "seq_len": batch["input_ids"].shape[1],
        "build_s": build_s,
        "load_s": load_s,
    }
    row.update(median_times(*step_functions(model, family, batch, pairs), args.repeats))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=list(BUILDABLE), choices=list(BUILDABLE))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--vision-width", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokenizer = train_tokenizer(default_corpus())
    print(f"# {machine()} | tokenizer trained in {time.perf_counter() - start:.3f} s, {len(tokenizer)} tokens")
    print("family            params  vision  img tok  seq  build s  load s  fwd ms  bwd ms  fwd+bwd ms")
    rows = []
    with tempfile.TemporaryDirectory() as work:
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
