"""One training step of the embedded default against the contrastive batch: time and peak memory.

    python benchmarks/train.py --batch 64 256 1024 --mini-batch 32 --json benchmarks/results/train.json

Providers (each case in a fresh process, so peak memory is its own):
  mmfast     GradCache (mini-batches of --mini-batch rows) + the fused loss
  reference  GradCache + the float64 reference loss (it holds the B × N score matrix)
  naive      one autograd graph over the whole batch + the reference loss (no GradCache)
Against sentence-transformers (--providers mmfast-text st-cached), on a tiny text-only Qwen2 built from
its config, E5-V's NLI triplets (one hard negative per row), τ 0.05, last-token pooling, no prompt:
  mmfast-text  the e5v recipe's step: GradCache + the fused loss (full fine-tune)
  st-cached    sentence-transformers' CachedMultipleNegativesRankingLoss (GradCache with a
               [mini-batch, N] score block per mini-batch), scale 1/τ, the same mini-batch and rows
               (past the 2000 rows of the default NLI set, rows repeat)
Peak memory is the resident high-water mark of the timed steps over what was resident before them
(VmHWM after clear_refs), so the model, optimizer state and data are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import _status_kib, machine, write_json  # noqa: E402

TEXT_PROVIDERS = ("mmfast-text", "st-cached")
TEXT_TEMPERATURE = 0.05
PROVIDERS = {
    "mmfast": lambda mini: ["--gradcache_mini_batch_size", str(mini)],
    "reference": lambda mini: ["--gradcache_mini_batch_size", str(mini), "--loss_backend", "reference"],
    "naive": lambda mini: ["--gradcache_mini_batch_size", "0", "--loss_backend", "reference"],
    "mmfast-text": lambda mini: ["--gradcache_mini_batch_size", str(mini)],
    "st-cached": lambda mini: ["--gradcache_mini_batch_size", str(mini)],
}


def text_backbone(root: Path) -> Path:
    """A tiny text-only Qwen2 (the default's sizes and tokenizer), built once under root."""
    from mmfast.train.default.model import build_tiny_backbone, default_corpus
    from mmfast.train.default.tokenizer import train_tokenizer

    folder = root / "text-backbone"
    if not (folder / "config.json").is_file():
        build_tiny_backbone("causal_lm", folder, tokenizer=train_tokenizer(default_corpus()))
    return folder


def text_trainer(backbone: Path, batch: int, mini: int, output_dir: str):
    """The e5v recipe on `backbone`, full fine-tune, no prompt (so both sides embed the same tokens); one
    thread, as the embedded default (a second thread only spins on a model this small)."""
    from mmfast.train import build_trainer, parse_arguments

    argv = ["--recipe", "e5v", "--model_name_or_path", str(backbone), "--lora", "False", "--text_prompt", "{text}",
            "--max_length", "512", "--padding_side", "right", "--output_dir", output_dir,
            "--per_device_train_batch_size", str(batch), "--gradcache_mini_batch_size", str(mini),
            "--max_steps", "1", "--report_to", "none", "--cpu_threads", "1"]  # fmt: skip
    return build_trainer(*parse_arguments(argv))


def sentence_transformers_step(backbone: Path, mini: int, examples):
    """(model, step): sentence-transformers on the same backbone and rows; step() runs forward + backward."""
    from sentence_transformers import SentenceTransformer, losses, models

    transformer = models.Transformer(str(backbone), max_seq_length=512, tokenizer_args={"padding_side": "right"})
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    loss = losses.CachedMultipleNegativesRankingLoss(model, scale=1 / TEXT_TEMPERATURE, mini_batch_size=mini)
    columns = ([e.query.text for e in examples], [e.positive.text for e in examples],
               [e.negatives[0].text for e in examples])  # fmt: skip
    features = [model.tokenize(column) for column in columns]
    model.train()

    def step():
        value = loss([dict(f) for f in features], None)
        value.backward()
        return value.detach()

    return model, step


def child(provider: str, batch: int, mini: int, repeats: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from mmfast.train import build_trainer, parse_arguments
    from mmfast.train.default import PROFILE

    if provider in TEXT_PROVIDERS:
        # The default NLI set has 2000 rows: the sampler gets a batch it can fill; the step's rows cycle.
        backbone = text_backbone(Path("/tmp/mmfast-bench-train"))
        trainer = text_trainer(backbone, min(batch, 1024), mini, "/tmp/mmfast-bench-train")
    else:
        argv = ["--output_dir", "/tmp/mmfast-bench-train", "--per_device_train_batch_size", str(batch),
                "--max_steps", "1", "--report_to", "none", *PROVIDERS[provider](mini)]  # fmt: skip
        trainer = build_trainer(*parse_arguments(argv, profile=PROFILE))
    examples = [trainer.train_dataset[i % len(trainer.train_dataset)] for i in range(batch)]
    if provider == "st-cached":
        model, st_step = sentence_transformers_step(backbone, mini, examples)
        del trainer

        def step():
            st_step()
    else:
        step_inputs = trainer.data_collator(examples)
        trainer.current_gradient_accumulation_steps = 1
        model = trainer.model

        def step():
            trainer.training_step(model, step_inputs)

    step()  # warm-up: kernels loaded, buffers sized
    model.zero_grad(set_to_none=False)
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=False)
    peak = _status_kib("VmHWM")
    seconds = statistics.median(times)
    return {"provider": provider, "batch": batch, "mini_batch": 0 if provider == "naive" else mini,
            "step_s": seconds, "samples_per_s": batch / seconds, "extra_peak_mib": (peak - baseline) / 1024,
            "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--mini-batch", type=int, default=32)
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("PROVIDER", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.mini_batch, args.repeats)))
        return
    print(machine())
    print(f"{'provider':10s} {'batch':>6s} {'mini':>5s} {'step s':>8s} {'samples/s':>10s} {'extra MiB':>10s}")
    rows = []
    for batch in args.batch:
        for provider in args.providers:
            command = [sys.executable, __file__, "--child", provider, str(batch), "--mini-batch", str(args.mini_batch),
                       "--repeats", str(args.repeats)]  # fmt: skip
            run = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if run.returncode:
                print(f"{provider:10s} {batch:6d}  failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{provider:10s} {batch:6d} {row['mini_batch']:5d} {row['step_s']:8.2f} {row['samples_per_s']:10.1f} "
                  f"{row['extra_peak_mib']:10.1f}", flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
