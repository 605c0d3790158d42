"""VLM2Vec: InfoNCE over in-batch and hard negatives (τ 0.02), LoRA r16 α64 (DoRA), GradCache.

    python examples/train_vlm2vec.py                       # the embedded default: train, evaluate before/after
    python examples/train_vlm2vec.py --max_steps 20        # any mmfast-train argument passes through
    python examples/train_vlm2vec.py --data train.jsonl --image_dir IMAGES      # your MMEB-train rows
    python examples/train_vlm2vec.py --config examples/configs/vlm2vec-qwen2-vl-2b.yaml --dry-run --num_processes 8
    torchrun --nproc-per-node 8 examples/train_vlm2vec.py --config examples/configs/vlm2vec-qwen2-vl-2b.yaml

The data: MMEB-train rows (qry, qry_image_path, pos_text, pos_image_path, optional neg_text and
neg_image_path) in .jsonl or .parquet files, image paths relative to --image_dir. With no --data and
no --model_name_or_path: the embedded default (a tiny Qwen2-VL and a generated mini-MMEB, no download),
evaluated on its held-out sets before and after; the table, <output_dir>/results.json and loss.png.
"""

import sys

from mmfast.train import build_trainer
from mmfast.train.example import Example, run


def main(argv=None) -> int:
    # the example's own flags: --dry-run, --heldout_tasks, --heldout_size; the rest is mmfast-train's
    example = Example("vlm2vec", argv)
    if example.dry_run:
        return example.plan()  # checks the config (fields, paths, model class, batches) without weights
    # recipe defaults < the embedded default's profile < --config < the command line
    trainer = build_trainer(example.arguments())
    example.evaluate("before", trainer.model)  # the held-out sets (the default run; --heldout_tasks for others)
    example.fit(trainer)  # transformers.Trainer.train, then the encoder is saved into --output_dir
    example.evaluate("after", trainer.model)
    return example.report(trainer)  # the before/after table, results.json and loss.png in --output_dir


if __name__ == "__main__":
    sys.exit(run(main))
