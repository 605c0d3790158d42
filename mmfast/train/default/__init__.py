"""The embedded default: a tiny multimodal LLM built from its config and procedurally generated data
written in the real public formats, so that the default run exercises the same code as a real one.

`mmfast-train` with no model and no data trains `default_backbone()` on `default_data()` with the
hyperparameters of `PROFILE` (a randomly initialised tiny model learns from scratch, so it wants a
larger learning rate and batch than the recipes' published ones for pretrained 2B–8B backbones).
Both are built once into `$MMFAST_HOME` (default `~/.cache/mmfast`) and reused; several processes
asking at once (DDP ranks) are safe: each builds a private folder and the first rename wins.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

from .synthetic import DefaultData, cache_home, default_data

__all__ = [
    "BACKBONE",
    "EVALUATION",
    "MULTI_VECTOR_EVALUATION",
    "MULTI_VECTOR_TASKS",
    "PROFILE",
    "DefaultData",
    "default_backbone",
    "descends_from_default",
    "default_corpus",
    "default_data",
]

# The default backbone: Qwen2-VL turns a 64-px image into 4 tokens (2×2 merged patches of 14 px at
# the processor's 56–64 px bounds), the fewest of the tiny families, so a step is cheapest.
BACKBONE = {"family": "qwen2_vl", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "vision_layers": 2,
            "vision_width": 32, "vision_heads": 2, "image_size": 56, "seed": 0}  # fmt: skip
BACKBONE_VERSION = 2

# Hyperparameters of the default run (every one can be overridden on the command line). The README's
# "Why the default learns" has the measurements behind them.
PROFILE = {
    "per_device_train_batch_size": 64,
    "gradcache_mini_batch_size": 0,
    # From scratch a tiny model wants a large step: at 200 steps 3e-4 reached 41% t2i R@1, 1e-3 62%.
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "lr_scheduler_type": "cosine",
    # Warm-up in steps, not a fraction of the run: Adam's first full-size steps collapse this model's embeddings
    # to one point (every cosine -> 1) and it takes a while to leave it, so a short run warms up as long as the
    # 400-step one. A 50-step run with 5% (3 steps): loss 11.9 -> 13.3 and R@1 1.0%; with 20: 7.4% (README).
    "warmup_steps": 20,
    "max_steps": 400,
    "logging_steps": 10,
    "save_steps": 400,
    "lora": False,
    "freeze_vision_tower": False,
    "seed": 0,
    # A model this small is all per-op overhead: a second thread only spin-waits (10x slower on a busy machine).
    "cpu_threads": 1,
}

# The default run evaluates as it trains, unless the config file or command line says how to evaluate
# (`arguments.with_default_evaluation`): held-out Flickr- and Urban1K-style R@1 every 50 steps, drawn beside the
# loss in the examples' loss.png. A multi-vector (ColPali) run is scored on the visual-document set only (its
# NDCG@5): MaxSim ranks nothing else. The 400-step run's 8 evaluations take 2-4 s each (README).
MULTI_VECTOR_TASKS = ("visdoc",)
EVALUATION = {"eval_strategy": "steps", "eval_steps": 50, "eval_tasks": ["retrieval"]}
MULTI_VECTOR_EVALUATION = {**EVALUATION, "eval_tasks": list(MULTI_VECTOR_TASKS)}

PROMPT_TEXTS = (
    "Summary above sentence in one word:",
    "Summary above image in one word:",
    "Represent the given video.",
    "Find me an video that matches the given caption:",
)


def default_corpus(data: DefaultData) -> list[str]:
    """Every text of the default training data plus the recipes' prompts: the tokenizer's corpus."""
    texts = list(PROMPT_TEXTS)
    for path in data.train_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [row["qry"], row["pos_text"], row.get("neg_text", "")]
    with open(data.nli, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            texts += [row["sent0"], row["sent1"], row["hard_neg"]]
    return [t for t in texts if t]


def default_backbone(root: str | os.PathLike | None = None) -> Path:
    """The tiny default backbone (seeded, deterministic), built on first use into `root`."""
    from .model import build_tiny_backbone

    target = Path(root) if root is not None else cache_home() / f"default-backbone-v{BACKBONE_VERSION}"
    stamp = {"version": BACKBONE_VERSION, **BACKBONE}
    if (target / "mmfast_default.json").is_file() and json.loads((target / "mmfast_default.json").read_text()) == stamp:
        return target
    if target.exists():
        raise FileExistsError(f"{target} holds something other than the default backbone v{BACKBONE_VERSION}")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    options = {k: v for k, v in BACKBONE.items() if k != "family"}
    build_tiny_backbone(BACKBONE["family"], scratch, corpus=default_corpus(default_data()), **options)
    (scratch / "mmfast_default.json").write_text(json.dumps(stamp) + "\n")
    try:
        os.rename(scratch, target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)  # another process renamed its copy first
    return target


def descends_from_default(model: str | os.PathLike) -> bool:
    """Whether the folder `model` is the default backbone (its `mmfast_default.json` stamp) or an encoder
    trained from it, following each saved encoder's `base_model` back (UniME's stage 2 starts from stage
    1's output). A hub id, a foreign folder or an unreadable file: False."""
    folder, seen = Path(model), set()
    while folder.is_dir() and folder.resolve() not in seen:
        seen.add(folder.resolve())
        if (folder / "mmfast_default.json").is_file():
            return True
        try:
            base = json.loads((folder / "mmfast_encoder.json").read_text()).get("base_model")
        except (OSError, ValueError, AttributeError):
            return False
        if not isinstance(base, str):
            return False
        folder = folder / base  # relative to the encoder's folder, as the encoder saves it
    return False
