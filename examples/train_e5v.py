"""E5-V: text-only training on NLI triplets, contradictions as hard negatives, τ 0.05, one-word prompts.

    python examples/train_e5v.py                         # the embedded default: train, evaluate before/after
    python examples/train_e5v.py --max_steps 20          # any mmfast-train argument passes through
    python examples/train_e5v.py --data nli_for_simcse.csv                    # your sent0, sent1, hard_neg CSV
    python examples/train_e5v.py --config examples/configs/e5v-llama3-llava-next-8b.yaml --dry-run --num_processes 8
    torchrun --nproc-per-node 8 examples/train_e5v.py --config examples/configs/e5v-llama3-llava-next-8b.yaml

Only the language side trains (on text). On a pretrained MLLM the embeddings are then multimodal: the
image prompt "<image> Summary above image in one word:" lands images next to the sentences, through
the alignment the MLLM learnt in pretraining. With no --data and no --model_name_or_path: the embedded
default (a tiny Qwen2-VL from a random init and generated NLI triplets), evaluated before and after on
held-out NLI triplets it never saw (premise -> entailment R@1; entailment closer than contradiction),
which is what its text training learns, and on the image-text sets, which stay at chance: a model
trained from scratch has no image-text alignment to transfer (that needs a pretrained MLLM). The
table, results.json, loss.png.
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
