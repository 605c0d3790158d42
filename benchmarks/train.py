"""Training steps of the embedded default against the contrastive batch: time and the process's peak memory.

    python benchmarks/train.py --batch 64 256 1024 --mini-batch 32 --json benchmarks/results/train.json
    python benchmarks/train.py --providers mmfast --batch 64 1024 4096 16384 --mini-batch 64 --image-rows 20000

Providers (each case in a fresh process, so its peak memory is its own):
  mmfast     GradCache (mini-batches of --mini-batch rows) + the fused loss
  reference  GradCache + the float64 reference loss (it holds the B × N score matrix)
  naive      one autograd graph over the whole batch + the reference loss (no GradCache)
  mmfast-keep  mmfast, but each mini-batch's inputs built in GradCache's first pass are kept (on the
             CPU) for its second, instead of being built again (the alternative mmfast did not take)
These run as a user runs `mmfast-train`: the default profile, `--max_steps` 1 + --repeats through
`Trainer.train()` (data loader, collator, steps). `--image-rows N` trains on N generated text→image
rows (the default data's MSCOCO_t2i subset, generated once under /tmp), so a batch of up to N
distinct rows is drawn; without it, on the default data (3,000 rows).
Against sentence-transformers (--providers mmfast-text st-cached), on a tiny text-only Qwen2 built from
its config, E5-V's NLI triplets (one hard negative per row), τ 0.05, last-token pooling, no prompt:
  mmfast-text  the e5v recipe's step: GradCache + the fused loss (full fine-tune)
  st-cached    sentence-transformers' CachedMultipleNegativesRankingLoss (GradCache with a
               [mini-batch, N] score block per mini-batch), scale 1/τ, the same mini-batch and rows
               (past the 2000 rows of the default NLI set, rows repeat)
Data scaling (`--data-scaling ROWS...`): a one-step `mmfast-train` on a generated text-only MMEB-train
JSONL of each size (the embedded default model, vlm2vec recipe, batch 64), run as a user runs it (a
fresh `python -m mmfast.train` process): its wall time (start to exit, so the time to the first step
and the tiny model's save), its CPU time (user + system: steadier than the wall time on a loaded
machine) and its peak RSS (ru_maxrss of the child). `cold`: an empty datasets cache (HF_DATASETS_CACHE,
a fresh folder per size), `warm`: the same data started again on that cache. An untimed run first
builds the embedded default model.
`--python` runs another checkout's interpreter (e.g. main's .venv, for "before"):
    python benchmarks/train.py --data-scaling 10000 2000000 --json benchmarks/results/train_data_scaling.json
    python benchmarks/train.py --data-scaling 10000 2000000 --python /work/main/.venv/bin/python --label main
Memory: `peak_rss_mib` is the whole process's peak resident memory (ru_maxrss at its end: the model,
optimizer state, data and every batch's inputs included), `device_peak_mib` the accelerator's
allocator peak where there is one; `extra_peak_mib` (text providers only) is the high-water mark of
the timed steps over what was resident before them. step s is the median of the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import _status_kib, machine, write_json  # noqa: E402

TEXT_PROVIDERS = ("mmfast-text", "st-cached")
TEXT_TEMPERATURE = 0.05
PROVIDERS = {
    "mmfast": lambda mini: ["--gradcache_mini_batch_size", str(mini)],
    "reference": lambda mini: ["--gradcache_mini_batch_size", str(mini), "--loss_backend", "reference"],
    "naive": lambda mini: ["--gradcache_mini_batch_size", "0", "--loss_backend", "reference"],
    "mmfast-keep": lambda mini: ["--gradcache_mini_batch_size", str(mini)],
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
    return build_trainer(parse_arguments(argv))


def sentence_transformers_step(backbone: Path, mini: int, examples):
    """(model, step): sentence-transformers on the same backbone and rows; step() runs forward + backward."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses, modules  # 6.x's paths (the old ones warn)

    transformer = modules.Transformer(str(backbone), max_seq_length=512, tokenizer_args={"padding_side": "right"})
    pooling = modules.Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    model = SentenceTransformer(modules=[transformer, pooling, modules.Normalize()], device="cpu")
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


IMAGE_SET_ROOT = Path("/tmp/mmfast-bench-train-images")


def image_set(rows: int) -> Path:
    """A --data spec of `rows` generated text→image rows (the default data's MSCOCO_t2i subset, the
    others one row each at weight 0), generated once."""
    from mmfast.train.default.sizes import Sizes
    from mmfast.train.default.synthetic import generate

    root = IMAGE_SET_ROOT / f"t2i-{rows}"
    spec = root / "train" / "t2i.json"
    if not spec.is_file():
        scratch = root.with_name(root.name + f".{os.getpid()}")
        sizes = Sizes(train_classification=1, train_vqa=1, train_t2i=rows, train_i2t=1, train_grounding=1)
        generate(scratch, sizes=sizes)
        (scratch / "train" / "t2i.json").write_text(
            json.dumps({"MSCOCO_t2i": {"path": "MSCOCO_t2i.jsonl", "image_dir": ".."}})
        )
        scratch.rename(root)
    return spec


def peak_memory() -> dict:
    """The whole process's peak resident memory (and the device's allocator peak, where there is one)."""
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class StepTimes(TrainerCallback):
    """Times each optimizer step."""

    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def keeping_inputs(collator):
    """The collator, giving mini-batches that keep each side's inputs from their first build (before
    placing them) for GradCache's second pass: images decoded once per step, and the inputs of the
    whole batch held until the step ends."""
    from mmfast.train.mini_batches import MiniBatches

    class KeptMiniBatches(MiniBatches):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kept = {}

        def _build(self, sides):
            key = tuple(sides)
            if key not in self.kept:
                self.kept[key] = MiniBatches(self.builder, [], [])._build(sides)
            return self.kept[key] if self.place is None else self.place(self.kept[key])

    def collate(examples):
        batch = collator(examples)
        lazy = batch["mini_batches"]
        batch["mini_batches"] = KeptMiniBatches(lazy.builder, lazy.rows, lazy.bounds)
        return batch

    collate.builder = collator.builder
    return collate


def image_child(provider: str, batch: int, mini: int, repeats: int, image_rows: int | None) -> dict:
    """`mmfast-train` as a user runs it, for 1 + repeats steps: the process's peak memory at the end."""
    import torch

    from mmfast.train import build_trainer, parse_arguments
    from mmfast.train.arguments import to_tokens
    from mmfast.train.default import PROFILE

    argv = ["--output_dir", "/tmp/mmfast-bench-train", "--per_device_train_batch_size", str(batch),
            "--max_steps", str(1 + repeats), "--report_to", "none", "--save_strategy", "no",
            "--logging_steps", "1", *PROVIDERS[provider](mini)]  # fmt: skip
    if image_rows:
        # The default profile's hyperparameters on the generated set (a profile applies only without --data).
        argv = [*to_tokens(PROFILE), "--data", str(image_set(image_rows)), *argv]
    trainer = build_trainer(parse_arguments(argv, profile=PROFILE))
    if provider == "mmfast-keep":
        trainer.data_collator = keeping_inputs(trainer.data_collator)
    timer = StepTimes()
    trainer.add_callback(timer)
    trainer.train()
    seconds = statistics.median(timer.times[1:] or timer.times)
    return {"provider": provider, "batch": batch, "mini_batch": 0 if provider == "naive" else mini,
            "image_rows": image_rows or 0, "steps": len(timer.times), "step_s": seconds,
            "samples_per_s": batch / seconds, **peak_memory(), "threads": torch.get_num_threads()}  # fmt: skip


def child(provider: str, batch: int, mini: int, repeats: int, image_rows: int | None) -> dict:
    if provider not in TEXT_PROVIDERS:
        return image_child(provider, batch, mini, repeats, image_rows)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    # The default NLI set has 2000 rows: the sampler gets a batch it can fill; the step's rows cycle.
    backbone = text_backbone(Path("/tmp/mmfast-bench-train"))
    trainer = text_trainer(backbone, min(batch, 1024), mini, "/tmp/mmfast-bench-train")
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
    return {"provider": provider, "batch": batch, "mini_batch": mini, "step_s": seconds,
            "samples_per_s": batch / seconds, "extra_peak_mib": (peak - baseline) / 1024,
            **peak_memory(), "threads": torch.get_num_threads()}  # fmt: skip


DATA_ROOT = Path("/tmp/mmfast-bench-data")
TOPICS = ("a red bicycle", "the stock market", "mountain weather", "a jazz concert", "ancient rome", "protein folding")


def text_mmeb_jsonl(rows: int) -> Path:
    """A text-only MMEB-train JSONL of `rows` rows (about 200 bytes a row), written once."""
    path = DATA_ROOT / f"Text_{rows}.jsonl"
    if not path.is_file():
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}")
        with open(scratch, "w") as f:
            for i in range(rows):
                topic = TOPICS[i % len(TOPICS)]
                f.write(json.dumps({
                    "qry": f"Represent the given sentence for retrieval: note {i} about {topic}, written plainly",
                    "qry_image_path": "", "pos_text": f"passage {i}: {topic}, described in a few more words {i % 97}",
                    "pos_image_path": "", "neg_text": "", "neg_image_path": "",
                }) + "\n")  # fmt: skip
        scratch.rename(path)
    return path


def one_step_run(python: str, data: Path, cache: Path, output_dir: Path) -> dict:
    """`python -m mmfast.train` for one step on `data`: wall seconds and the child's peak RSS."""
    command = [python, "-m", "mmfast.train", "--recipe", "vlm2vec", "--data", str(data), "--max_steps", "1",
               "--per_device_train_batch_size", "64", "--output_dir", str(output_dir), "--save_strategy", "no",
               "--report_to", "none"]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd="/tmp", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    err = child.stderr.read().decode()
    child.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def data_scaling(sizes: list[int], python: str, label: str) -> list[dict]:
    """Cold then warm one-step runs per data size (see the module docstring)."""
    import shutil
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="mmfast-bench-cache-") as scratch:  # untimed: the default built once
        one_step_run(python, text_mmeb_jsonl(10_000), Path(scratch) / "datasets", Path(scratch) / "out")
    print(f"{'code':8s} {'rows':>9s} {'start':6s} {'seconds':>8s} {'CPU s':>7s} {'peak MiB':>9s}")
    for size in sizes:
        data = text_mmeb_jsonl(size)
        with tempfile.TemporaryDirectory(prefix="mmfast-bench-cache-") as scratch:
            cache, output_dir = Path(scratch) / "datasets", Path(scratch) / "out"
            for start in ("cold", "warm"):
                row = {"code": label, "rows": size, "start": start, **one_step_run(python, data, cache, output_dir)}
                rows.append(row)
                print(f"{label:8s} {size:9d} {start:6s} {row['seconds']:8.1f} {row['cpu_seconds']:7.1f} "
                      f"{row['peak_rss_mib']:9.0f}", flush=True)  # fmt: skip
            shutil.rmtree(cache, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--mini-batch", type=int, default=32)
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=2, help="steps after the first (timed)")
    parser.add_argument("--image-rows", type=int, help="train on this many generated text→image rows")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--data-scaling",
        type=int,
        nargs="+",
        metavar="ROWS",
        help="one-step runs on text-only MMEB-train JSONLs of these sizes (module docstring)",
    )
    parser.add_argument("--python", default=sys.executable, help="--data-scaling: the interpreter to run")
    parser.add_argument("--label", default="this", help="--data-scaling: the code's name in the table")
    parser.add_argument("--child", nargs=2, metavar=("PROVIDER", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.mini_batch, args.repeats, args.image_rows)))
        return
    if args.data_scaling:
        print(machine())
        rows = data_scaling(args.data_scaling, args.python, args.label)
        if args.json:
            write_json(args.json, rows)
        return
    if args.image_rows:
        image_set(args.image_rows)  # generated once, before any case is measured
    print(machine())
    print(
        f"{'provider':12s} {'batch':>6s} {'mini':>5s} {'step s':>8s} {'samples/s':>10s} {'peak MiB':>9s} "
        f"{'extra MiB':>10s}"
    )
    rows = []
    for batch in args.batch:
        for provider in args.providers:
            command = [sys.executable, __file__, "--child", provider, str(batch), "--mini-batch", str(args.mini_batch),
                       "--repeats", str(args.repeats)]  # fmt: skip
            if args.image_rows:
                command += ["--image-rows", str(args.image_rows)]
            run = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if run.returncode:
                print(f"{provider:12s} {batch:6d}  failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append(row)
            extra = f"{row['extra_peak_mib']:10.1f}" if "extra_peak_mib" in row else f"{'-':>10s}"
            print(f"{provider:12s} {batch:6d} {row['mini_batch']:5d} {row['step_s']:8.2f} {row['samples_per_s']:10.1f} "
                  f"{row['peak_rss_mib']:9.1f} {extra}", flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
