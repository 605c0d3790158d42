"""`--dry-run --accelerate_config FILE`: every shipped accelerate config is valid and plans for its
processes; a broken one fails (exit 2) naming the key; GradCache under DeepSpeed is refused."""

import importlib.util
import json
from pathlib import Path

import pytest

from mmfast.train.cli import train_main

REPOSITORY = Path(__file__).parents[2]
CONFIGS = REPOSITORY / "examples" / "configs"
SHIPPED = {
    "accelerate-ddp.yaml": "DDP (MULTI_GPU), 8 process(es) on 1 machine(s), mixed_precision bf16",
    "accelerate-fsdp.yaml": "FSDP2, wrap TRANSFORMER_BASED_WRAP",
    "accelerate-zero2.yaml": "ZeRO-2 from examples/configs/deepspeed-zero2.json",
    "accelerate-zero3.yaml": "ZeRO-3 from examples/configs/deepspeed-zero3.json",
}


@pytest.fixture(autouse=True)
def from_the_repository(monkeypatch):
    monkeypatch.chdir(REPOSITORY)  # the DeepSpeed files are referenced relative to the repository root


def _dry_run(capsys, *argv):
    status = train_main(["--dry-run", *argv])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def test_every_shipped_config_has_a_case():
    assert {p.name for p in CONFIGS.glob("accelerate-*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_is_valid_and_sets_the_processes(name, capsys):
    status, out, err = _dry_run(
        capsys, "--accelerate_config", str(CONFIGS / name), "--per_device_train_batch_size", "16"
    )
    assert status == 0, err
    assert SHIPPED[name] in out and "dry run: valid" in out
    assert "contrastive batch: 128 (16 per device × 8 process(es), gathered across devices)" in out
    assert "(of which cross-device: " in out
    # the default run is fp32 in its own config: the accelerate file's bf16 applies, and the plan says so
    assert "the run uses the accelerate config's mixed_precision bf16" in out
    deepspeed_missing = importlib.util.find_spec("deepspeed") is None
    assert ("deepspeed is not installed here" in out) == ("zero" in name and deepspeed_missing)


def test_num_processes_replaces_the_files(capsys):
    status, out, _ = _dry_run(capsys, "--accelerate_config", str(CONFIGS / "accelerate-ddp.yaml"),
                              "--num_processes", "4", "--per_device_train_batch_size", "16")  # fmt: skip
    assert status == 0 and "--num_processes 4 replaces the file's 8" in out
    assert "contrastive batch: 64 (16 per device × 4 process(es)" in out


def test_gradient_accumulation_warning_stays(capsys):
    status, out, _ = _dry_run(capsys, "--accelerate_config", str(CONFIGS / "accelerate-fsdp.yaml"),
                              "--gradient_accumulation_steps", "4", "--bf16", "true")  # fmt: skip
    assert status == 0 and "gradient_accumulation_steps=4 averages gradients" in out
    assert "the run uses" not in out  # bf16 in both: no precision warning


def test_gradcache_under_fsdp_is_noted_and_under_deepspeed_refused(capsys):
    gradcache = ["--per_device_train_batch_size", "16", "--gradcache_mini_batch_size", "4"]
    status, out, _ = _dry_run(capsys, "--accelerate_config", str(CONFIGS / "accelerate-fsdp.yaml"), *gradcache)
    assert status == 0 and "GradCache under FSDP2 (proven on CPU processes, not on GPUs)" in out
    assert "gradcache_fsdp_sync last_mini_batch: the gradients stay unsharded" in " ".join(out.split())
    status, out, _ = _dry_run(capsys, "--accelerate_config", str(CONFIGS / "accelerate-fsdp.yaml"), *gradcache,
                              "--gradcache_fsdp_sync", "every_mini_batch")  # fmt: skip
    assert status == 0 and "every_mini_batch: the gradients are reduce-scattered" in " ".join(out.split())
    status, _, err = _dry_run(capsys, "--accelerate_config", str(CONFIGS / "accelerate-fsdp.yaml"), *gradcache,
                              "--gradcache_fsdp_sync", "sometimes")  # fmt: skip
    assert status == 2 and "gradcache_fsdp_sync must be last_mini_batch or every_mini_batch, got 'sometimes'" in err
    for zero in ("accelerate-zero2.yaml", "accelerate-zero3.yaml"):
        status, _, err = _dry_run(capsys, "--accelerate_config", str(CONFIGS / zero), *gradcache)
        assert status == 2 and "DeepSpeed with gradcache_mini_batch_size 4" in err


def _ddp_with(tmp_path, replace: str, by: str) -> Path:
    text = (CONFIGS / "accelerate-ddp.yaml").read_text()
    assert replace in text
    broken = tmp_path / "accelerate.yaml"
    broken.write_text(text.replace(replace, by))
    return broken


BROKEN = {
    "distributed_type": ("distributed_type: MULTI_GPU", "distributed_type: MULTI_GPUS", "MULTI_GPUS"),
    "megatron": ("distributed_type: MULTI_GPU", "distributed_type: MEGATRON_LM", "distributed_type: MEGATRON_LM"),
    "num_processes": ("num_processes: 8", "num_processes: 0", "num_processes: must be a positive integer"),
    "num_machines": ("num_machines: 1", "num_machines: 3", "num_machines: must be a positive divisor"),
    "mixed_precision": ("mixed_precision: bf16", "mixed_precision: bf32", "mixed_precision: must be one of"),
    "unknown key": ("debug: false", "debug: false\nnum_gpus: 8", "unknown keys (['num_gpus'])"),
    "fsdp key": ("debug: false", "debug: false\nfsdp_config:\n  fsdp_sharding: FULL_SHARD",
                 "fsdp_config: unknown key(s) fsdp_sharding"),
    "not yaml": ("debug: false", "debug: [false", "does not parse"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config_names_the_field(case, tmp_path, capsys):
    replace, by, named = BROKEN[case]
    status, _, err = _dry_run(capsys, "--accelerate_config", str(_ddp_with(tmp_path, replace, by)))
    assert status == 2 and named in err, err


def test_broken_deepspeed_file_names_it(tmp_path, capsys):
    text = (CONFIGS / "accelerate-zero3.yaml").read_text()
    ds = tmp_path / "ds.json"
    config = tmp_path / "accelerate.yaml"
    config.write_text(text.replace("examples/configs/deepspeed-zero3.json", str(ds)))
    status, _, err = _dry_run(capsys, "--accelerate_config", str(config))
    assert status == 2 and f"deepspeed_config_file: {ds} does not exist" in err
    ds.write_text("{not json")
    status, _, err = _dry_run(capsys, "--accelerate_config", str(config))
    assert status == 2 and "is not valid JSON" in err
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    status, _, err = _dry_run(capsys, "--accelerate_config", str(config))
    assert status == 2 and "got stage 1" in err
    ds.write_text(json.dumps({"bf16": {"enabled": "auto"}}))
    status, _, err = _dry_run(capsys, "--accelerate_config", str(config))
    assert status == 2 and "has no zero_optimization.stage" in err


def test_missing_accelerate_config(tmp_path, capsys):
    status, _, err = _dry_run(capsys, "--accelerate_config", str(tmp_path / "nope.yaml"))
    assert status == 2 and "nope.yaml: no such file" in err
    assert train_main(["--dry-run", "--accelerate_config"]) == 2
    assert "--accelerate_config needs a file" in capsys.readouterr().err


def test_fsdp_wraps_the_backbones_layers():
    from accelerate.utils.dataclasses import get_module_class_from_name

    from mmfast.train.default import default_backbone
    from mmfast.train.encoder import Encoder

    encoder = Encoder.from_pretrained(str(default_backbone()))
    names = encoder._no_split_modules
    assert names and "Qwen2VLDecoderLayer" in names
    assert all(get_module_class_from_name(encoder, name) is not None for name in names)
