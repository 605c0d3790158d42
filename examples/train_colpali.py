"""ColPali / ColQwen2: multi-vector embeddings (every token projected to 128-d and normalised), scored by
MaxSim, trained with ColPali's pairwise late-interaction loss (softplus of the hardest in-batch negative
against the positive), LoRA r32 α32 on a Qwen2-VL backbone, GradCache.

    python examples/train_colpali.py                       # the embedded default: train, evaluate before/after
    python examples/train_colpali.py --max_steps 20        # any mmfast-train argument passes through
    python examples/train_colpali.py --data train.jsonl --image_dir IMAGES     # your (query, page image) rows

The data: MMEB-train rows (qry, pos_image_path: a query and its page; optional neg_image_path) in
.jsonl or .parquet files. With no --data and no --model_name_or_path: the embedded default (a tiny
Qwen2-VL and its generated data), evaluated before and after on the default's held-out visual-document
set (NDCG@5, recall@k) through mmfast.late_interaction_topk; the table, results.json and loss.png.
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
