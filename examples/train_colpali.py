"""ColPali / ColQwen2: multi-vector embeddings (every token projected to 128-d and normalised), scored by
MaxSim through mmfast.late_interaction_loss.

    python examples/train_colpali.py                       # the embedded default: train, evaluate before/after
    python examples/train_colpali.py --max_steps 20        # any mmfast-train argument passes through
    python examples/train_colpali.py --data train.jsonl --image_dir IMAGES     # your (query, page image) rows
    python examples/train_colpali.py --config examples/configs/colqwen2-qwen2-vl-2b.yaml --dry-run --num_processes 8

With a model or data of one's own, the colpali recipe: ColPali's pairwise late-interaction loss (softplus
of the hardest in-batch negative against the positive, τ 1), LoRA r32 α32 dropout 0.1, batch 32 in
GradCache mini-batches of 8, lr 5e-5, a page scored by its image tokens only
(examples/configs/colqwen2-qwen2-vl-2b.yaml: ColQwen2 on Qwen2-VL-2B). The data: MMEB-train rows (qry,
pos_image_path: a query and its page; optional neg_image_path) in .jsonl or .parquet files.

With no --data and no --model_name_or_path, the embedded default: a tiny Qwen2-VL from scratch, full
fine-tune (no LoRA), InfoNCE τ 0.02 (colpali-engine's ColbertLoss: from scratch the pairwise loss
collapses to ln 2; README, "Why the multi-vector default learns"), batch 64 in one graph (no GradCache),
lr 1e-3, 400 steps, on the generated data's MSCOCO_t2i caption → picture rows; evaluated before and
after on the default's held-out visual-document set (captions of rendered pages; NDCG@5, recall@k)
through mmfast.late_interaction_topk; the table, results.json and loss.png.
"""

import sys

from mmfast.train import build_trainer
from mmfast.train.example import Example, run


def main(argv=None) -> int:
    # the example's own flags: --dry-run, --heldout_tasks, --heldout_size; the rest is mmfast-train's
    example = Example("colpali", argv)
    if example.dry_run:
        return example.plan()  # checks the config (fields, paths, model class, batches) without weights
    # recipe defaults < the embedded default's profile < --config < the command line
    trainer = build_trainer(example.arguments())
    example.evaluate("before", trainer.model)  # a multi-vector model: the visual-document set only
    example.fit(trainer)  # transformers.Trainer.train, then the encoder is saved into --output_dir
    example.evaluate("after", trainer.model)
    return example.report(trainer)  # the before/after table, results.json and loss.png in --output_dir


if __name__ == "__main__":
    sys.exit(run(main))
