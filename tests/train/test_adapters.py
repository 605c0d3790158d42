"""Adapters round-trip: LoRA and DoRA trained → saved → base plus adapter → merged → merged saved → loaded,
each giving the trained encoder's embeddings (text and image inputs, fp32); and UniME stage 1 → stage 2,
where training on from a checkpoint folds it into the base and the stage-2 adapter reloads over it.

Measured: the reloaded adapter gives the trained embeddings exactly, the merge within 1.2e-7 (fp32
rounding of W + BA), the reloaded merge the merge exactly; the untrained base is 0.2 away, so the
comparisons can fail. Before the fix, a stage-2 adapter reloaded over the original backbone (not stage
1's weights): 0.19 away from the trained stage 2.
"""

import shutil

import pytest
import torch
from PIL import Image

from mmfast.train.encoder import Encoder
from tests.train.test_trainer import _trainer

pytestmark = pytest.mark.slow
TEXTS = ["a red circle", "<|image_1|>\nRepresent the given image.", "two blue squares at the top left", "<|image_1|> a"]
IMAGES = [None, Image.new("RGB", (64, 64), (200, 30, 30)), None, Image.new("RGB", (60, 90), (20, 130, 30))]
# Two steps at a high rate, so the adapter moves the embeddings well past the tolerances.
# No warm-up: the default profile's 20 warm-up steps would leave two steps' adapter next to the base model.
TRAIN = ["--max_steps", "2", "--save_strategy", "no", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
         "--warmup_steps", "0"]  # fmt: skip


def _embed(encoder):
    return encoder.encode(TEXTS, IMAGES, show_progress=False)


def _trained(out, *extra):
    trainer = _trainer(out, *TRAIN, *extra)
    trainer.train()
    trainer.save_model()
    return trainer.model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_save_load_merge_round_trip(tmp_path, use_dora):
    trained = _trained(tmp_path / "adapter", "--lora", "True", "--use_dora", str(use_dora))
    assert trained.is_adapter and trained.model.peft_config["default"].use_dora is use_dora
    assert any("lora_magnitude_vector" in name for name, _ in trained.named_parameters()) is use_dora
    want = _embed(trained)

    loaded = Encoder.from_pretrained(tmp_path / "adapter")
    assert loaded.is_adapter and loaded.encoder_config.adapter
    torch.testing.assert_close(_embed(loaded), want, rtol=0, atol=1e-6)
    merged = loaded.merged()
    assert not merged.is_adapter
    got_merged = _embed(merged)
    torch.testing.assert_close(got_merged, want, rtol=0, atol=1e-6)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = Encoder.from_pretrained(tmp_path / "merged")
    assert not reloaded.is_adapter and not reloaded.encoder_config.adapter
    torch.testing.assert_close(_embed(reloaded), got_merged, rtol=0, atol=1e-6)
    base = Encoder.from_pretrained(loaded.encoder_config.base_model)
    assert (_embed(base) - want).abs().max() > 1e-2


@pytest.mark.parametrize("stage1", ["full", "lora"])
def test_unime_stage2_continues_from_stage1(tmp_path, stage1):
    """Stage 2 starts from stage 1's embeddings (its adapter merged first); the saved stage 2 reloads
    over stage 1's weights, not the original backbone's."""
    first = _trained(tmp_path / "stage1", "--recipe", "unime-stage1", "--lora", str(stage1 == "lora"))
    assert first.is_adapter is (stage1 == "lora")
    stage1_embeddings = _embed(first)
    trainer = _trainer(tmp_path / "stage2", *TRAIN, "--recipe", "unime-stage2", "--model_name_or_path",
                       str(tmp_path / "stage1"))  # fmt: skip
    second = trainer.model
    assert second.is_adapter  # stage 2's own fresh adapter, over stage 1 merged
    torch.testing.assert_close(_embed(second), stage1_embeddings, rtol=0, atol=1e-6)
    trainer.train()
    trainer.save_model()
    stage2_embeddings = _embed(second)
    assert (stage2_embeddings - stage1_embeddings).abs().max() > 1e-2
    torch.testing.assert_close(_embed(Encoder.from_pretrained(tmp_path / "stage2")), stage2_embeddings, rtol=0, atol=0)
    if stage1 == "lora":
        # The stage-2 folder names stage 1's adapter; without it, the reload says so.
        assert Encoder.from_pretrained(tmp_path / "stage2").encoder_config.merged_adapters == (
            str(tmp_path / "stage1"),
        )
        shutil.move(tmp_path / "stage1", tmp_path / "moved")
        with pytest.raises(
            FileNotFoundError, match="stage1, merged into the base; that folder holds no adapter_config.json"
        ):
            Encoder.from_pretrained(tmp_path / "stage2")


def test_an_adapter_over_an_unsaved_merge_is_refused_at_save(tmp_path):
    trained = _trained(tmp_path / "adapter", "--lora", "True")
    want = _embed(trained)
    assert trained.adapter_source is None  # trained in memory: the trainer's save does not make it a source
    over_merge = trained.merged()
    over_merge.add_adapter(r=2, alpha=4)
    with pytest.raises(ValueError, match="merged before it was ever saved"):
        over_merge.save_pretrained(tmp_path / "refused")
    over_merge.merged().save_pretrained(tmp_path / "full")  # a full model holds every merge: fine
    torch.testing.assert_close(_embed(Encoder.from_pretrained(tmp_path / "full")), want, rtol=0, atol=1e-6)
