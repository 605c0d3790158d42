"""E5-V: text-only training on NLI triplets, contradictions as hard negatives, τ 0.05, one-word prompts.

    python examples/train_e5v.py                         # the embedded default: train, evaluate before/after
    python examples/train_e5v.py --max_steps 20          # any mmfast-train argument passes through
    python examples/train_e5v.py --data nli_for_simcse.csv                    # your sent0, sent1, hard_neg CSV
    python examples/train_e5v.py --config examples/configs/e5v-llama3-llava-next-8b.yaml --dry-run --num_processes 8
    torchrun --nproc-per-node 8 examples/train_e5v.py --config examples/configs/e5v-llama3-llava-next-8b.yaml

Only the language side trains (on text), yet the embeddings are multimodal: the image prompt
"<image> Summary above image in one word:" lands images next to the sentences, which the held-out
image-text sets measure. With no --data and no --model_name_or_path: the embedded default (a tiny
Qwen2-VL and generated NLI triplets), evaluated before and after; the table, results.json, loss.png.
"""

import sys

from mmfast.train import build_trainer
from mmfast.train.example import Example, run


def main(argv=None) -> int:
    # the example's own flags: --dry-run, --heldout_tasks, --heldout_size; the rest is mmfast-train's
    example = Example("e5v", argv)
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
