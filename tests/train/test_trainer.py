"""The trainer end to end on the embedded default: train, checkpoint, reload, resume exactly, CLI errors."""

import json

import pytest
import torch
from transformers import TrainerCallback

from mmfast.train.arguments import parse_arguments
from mmfast.train.cli import train_main
from mmfast.train.default import PROFILE
from mmfast.train.encoder import Encoder
from mmfast.train.run import build_trainer

pytestmark = pytest.mark.slow
SHORT = ["--per_device_train_batch_size", "12", "--logging_steps", "1", "--save_steps", "2", "--report_to", "none"]


def _trainer(output_dir, *extra):
    return build_trainer(parse_arguments(["--output_dir", str(output_dir), *SHORT, *extra], profile=PROFILE))


def _losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


class StopAt(TrainerCallback):
    """Ends training after `step` optimizer steps, as if the run had been killed after its checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_default_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(out, "--max_steps", "3")
    trainer.train()
    trainer.save_model()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3
    for entry in logged:
        assert entry["peak_memory_mb"] > 0 and entry["samples_per_second"] > 0 and entry["skipped_rows"] == 0
        assert torch.isfinite(torch.tensor(entry["loss"]))
    encoder = Encoder.from_pretrained(out)
    embedding = encoder.encode(["a red circle", "<|image_1|>"], [None, _image()], show_progress=False)
    assert embedding.shape == (2, encoder.config.text_config.hidden_size)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))
    # The reloaded model is the trained one, not the initial backbone.
    trained = trainer.model.encode(["a red circle"], show_progress=False)
    torch.testing.assert_close(encoder.encode(["a red circle"], show_progress=False), trained)


def test_resume_continues_the_same_trajectory(tmp_path):
    steps = ["--max_steps", "4"]
    whole = _trainer(tmp_path / "whole", *steps)
    whole.train()
    killed = _trainer(tmp_path / "killed", *steps)
    killed.add_callback(StopAt(2))
    killed.train()
    assert max(_losses(killed)) == 2
    resumed = _trainer(tmp_path / "killed", *steps)
    resumed.train(resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-2"))
    # The resumed state carries the killed run's first two losses; steps 3 and 4 are new.
    assert _losses(resumed) == _losses(whole) and sorted(_losses(whole)) == [1, 2, 3, 4]
    for name, param in whole.model.named_parameters():
        torch.testing.assert_close(resumed.model.get_parameter(name), param, rtol=0, atol=0, msg=name)


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    assert train_main(["--recipe", "nope", "--output_dir", str(tmp_path)]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert train_main(["--data", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path)]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qry": "q", "pos_text": "p"}\n')
    assert train_main(["--data", str(bad), "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "qry_image_path" in err


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (200, 30, 30))


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_grad_cache_on_a_real_backbone_with_lora_dropout_and_checkpointing(tmp_path, chunks):
    """GradCache × gradient checkpointing × LoRA dropout: the same gradients as one graph over the
    same mini-batches (the dropout masks are replayed)."""
    from mmfast.train.grad_cache import full_batch_step, grad_cache_step

    trainer = _trainer(tmp_path, "--lora", "True", "--lora_dropout", "0.3", "--gradient_checkpointing", "True",
                       "--gradcache_mini_batch_size", str(8 // chunks), "--per_device_train_batch_size", "8",
                       "--max_steps", "1")  # fmt: skip
    encoder = trainer.model
    encoder.activation_checkpointing_enable()
    assert encoder.is_activation_checkpointing
    encoder.train()
    examples = [trainer.train_dataset[i * 97] for i in range(8)]
    mini_batches = trainer.data_collator(examples)["mini_batches"]
    assert len(mini_batches) == chunks

    def grads_of(step):
        encoder.zero_grad()
        torch.manual_seed(11)
        loss, _ = step(encoder, mini_batches, trainer.objective)
        return loss, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    ref_loss, ref = grads_of(full_batch_step)
    got_loss, got = grads_of(grad_cache_step)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert ref and got.keys() == ref.keys()
    for name, grad in ref.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _group_ids(sides) -> torch.Tensor:
    """Ids by equal (text, image), computed apart from the collator's hashing."""
    seen = {}
    return torch.tensor([seen.setdefault((side.text, side.image), len(seen)) for side in sides])


def test_duplicate_positives_are_masked_by_default_and_the_option_turns_it_off(tmp_path):
    """MMEB classification-like rows: several queries share a label text as their positive. By default
    the copies leave each other's softmax (the loss equals the reference given ids by content), the
    count is logged, and --mask_duplicate_candidates False restores the plain loss."""
    from dataclasses import asdict, replace

    from mmfast.reference import contrastive_loss_reference
    from mmfast.train.data import Input
    from mmfast.train.grad_cache import concatenate
    from mmfast.train.losses import Objective

    trainer = _trainer(tmp_path / "on", "--max_steps", "1", "--gradcache_mini_batch_size", "4")
    examples = [trainer.train_dataset[i * 97] for i in range(8)]
    labels = ["a photo of a circle", "a photo of a square"]
    examples = [replace(e, positive=Input(labels[i % 2])) if i < 5 else e for i, e in enumerate(examples)]
    examples[7] = replace(examples[7], query=examples[6].query)  # a repeated query, for the symmetric half
    batch = trainer.data_collator(examples)
    encoder = trainer.model.eval()
    with torch.no_grad():
        embeddings = concatenate([encoder(mini_batch) for mini_batch in batch["mini_batches"]])
    candidates = [e.positive for e in examples] + [side for e in examples for side in e.negatives]
    candidate_ids, query_ids = _group_ids(candidates), _group_ids([e.query for e in examples])
    options = {k: v for k, v in asdict(trainer.objective.options).items() if k not in ("backend", "cross_device")}
    assert options["symmetric"]  # the default recipe (LLaVE) is symmetric: query ids are used too
    inputs = [embeddings[side].double() for side in ("query", "target", "negatives") if side in embeddings]
    inputs += [None] * (3 - len(inputs))
    expected = contrastive_loss_reference(*inputs, candidate_ids=candidate_ids, query_ids=query_ids, **options)
    plain = contrastive_loss_reference(*inputs, **options)

    masked = trainer.objective(embeddings, None, batch["ids"])
    torch.testing.assert_close(masked.double(), expected, rtol=1e-5, atol=1e-6)
    off = Objective(trainer.objective.options, mask_duplicates=False)(embeddings, None, batch["ids"])
    torch.testing.assert_close(off.double(), plain, rtol=1e-5, atol=1e-6)
    assert masked < off  # fewer negatives
    rows = torch.arange(8)
    count = (candidate_ids[None, :] == candidate_ids[rows, None]).sum() + (query_ids[None] == query_ids[:, None]).sum()
    # Each of rows 0, 2, 4 masks 2 copies, rows 1 and 3 one each, and queries 6 and 7 each other (≥ 10).
    assert trainer.objective.masked_candidates(batch["ids"], 8) == int(count) - 16
    assert int(count) - 16 >= 10

    # Training logs the count per step (here with GradCache); the option turns masking and the log off.
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all(e["masked_candidates"] >= 0 for e in logged)
    unmasked = _trainer(tmp_path / "off", "--max_steps", "1", "--mask_duplicate_candidates", "False")
    assert not unmasked.objective.mask_duplicates
    unmasked.train()
    assert all("masked_candidates" not in e for e in unmasked.state.log_history)


def test_a_short_default_run_learns_from_the_first_steps(tmp_path):
    """Issue 24 item 8: `mmfast-train --max_steps 50` on the default. Adam's first full-size steps collapse the
    tiny model's embeddings to one point; with a 3-step warm-up (5% of 50) the run stayed there (loss 11.9 ->
    13.3, grad norm ~0.01, held-out t2i R@1 1.0%). The profile's warm-up is now 20 steps whatever the length."""
    from mmfast.train.default import default_data
    from mmfast.train.evaluate import evaluate_retrieval
    from mmfast.train.evaluate.default_sets import CAPTION_PROMPT, IMAGE_PROMPT

    trainer = build_trainer(parse_arguments(
        ["--output_dir", str(tmp_path), "--max_steps", "50", "--logging_steps", "5", "--save_strategy", "no",
         "--report_to", "none", "--disable_tqdm", "True"], profile=PROFILE))  # fmt: skip

    def t2i_r1():
        scores = evaluate_retrieval(trainer.model, default_data().flickr, name="flickr30k", text_prompt=CAPTION_PROMPT,
                                    image_prompt=IMAGE_PROMPT, show_progress=False)  # fmt: skip
        return scores["retrieval"]["flickr30k"]["t2i_R@1"]

    before = t2i_r1()
    trainer.train()
    after = t2i_r1()
    losses = list(_losses(trainer).values())
    assert after >= 4.0 and after > 3 * before, (before, after)  # chance: 1 in 256 images, 0.39%
    assert losses[-1] < max(losses) - 0.5, losses  # the loss comes down from the collapse within the run
