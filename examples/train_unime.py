"""UniME in two stages: (1) distil a text teacher's in-batch similarities into the MLLM's language side
(KL, text only, precomputed teacher embeddings); (2) from stage 1's model, contrastive training with a
false-negative margin (β 0.1) and the top-8 hard negatives (τ 0.02); on the embedded default the margin alone
(the recipe's default_run_loss: top-8 holds the tiny model at ln 9, README).

    python examples/train_unime.py                       # the embedded default, both stages, evaluated before/after
    python examples/train_unime.py --max_steps 20        # any mmfast-train argument passes through (both stages)
    python examples/train_unime.py --config examples/configs/unime-stage1-llava-v1.6-mistral-7b.yaml \
        --stage2_config examples/configs/unime-stage2-llava-v1.6-mistral-7b.yaml --dry-run --num_processes 8

Stage 1 writes <output_dir>/stage1, stage 2 starts from it and writes <output_dir>. Stage 1's data: text
pairs (an NLI CSV) plus a teacher file with one (query, positive) embedding row per data row (.safetensors
or .npy; UniME's teacher is NV-Embed-v2, the embedded default's all-MiniLM-L6-v2). Stage 2's data:
MMEB-train rows. With no --config: the embedded default for both stages; the table has a column per stage.
"""

import sys

from mmfast.train import build_trainer
from mmfast.train.example import Example, run


def main(argv=None) -> int:
    # its own flags: --dry-run, --heldout_tasks, --heldout_size, --stage2_config; the rest is mmfast-train's
    example = Example("unime-stage1", argv, output_dir="runs/unime")
    if example.config and not example.stage2_config:
        raise ValueError("with --config (stage 1), give stage 2's too: --stage2_config FILE")
    stages = (("unime-stage1", None), ("unime-stage2", example.stage2_config))
    if example.dry_run:
        return example.plan(*stages)  # both stages' configs checked without weights
    stage1 = build_trainer(example.arguments("unime-stage1", output_subdir="stage1"))
    example.evaluate("before", stage1.model)
    example.fit(stage1, "stage 1")  # text-only distillation; the encoder is saved into <output_dir>/stage1
    example.evaluate("after stage 1", stage1.model)
    stage2 = build_trainer(example.arguments("unime-stage2", model=stage1.args.output_dir,
                                              config=example.stage2_config, output_subdir=""))  # fmt: skip
    example.fit(stage2, "stage 2")  # from stage 1's encoder (its LoRA merged in), into <output_dir>
    example.evaluate("after", stage2.model)
    return example.report(stage1, stage2, labels=("stage 1", "stage 2"))


if __name__ == "__main__":
    sys.exit(run(main))
