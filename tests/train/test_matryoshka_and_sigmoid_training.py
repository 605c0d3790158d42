"""The trainer with `--matryoshka_dims` and `--loss sigmoid` on the embedded default: GradCache equals one graph
(the sigmoid loss's scale and bias included), a resumed sigmoid run ends where the uninterrupted one does, and
the prefixes a Matryoshka model is trained for are what `Encoder.encode(dim=)` and `mmfast-eval --dims` give."""

import json

import pytest
import torch

from mmfast.train.arguments import parse_arguments
from mmfast.train.default import PROFILE
from mmfast.train.encoder import SIGMOID_PARAMETERS_NAME, Encoder
from mmfast.train.evaluate.cli import eval_main
from mmfast.train.mini_batches import MiniBatching
from mmfast.train.run import build_trainer

pytestmark = pytest.mark.slow
SHORT = ["--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_steps", "2", "--report_to", "none",
         "--cpu_threads", "1"]  # fmt: skip


def _trainer(output_dir, *extra):
    return build_trainer(parse_arguments(["--output_dir", str(output_dir), *SHORT, *extra], profile=PROFILE))


@pytest.mark.parametrize(
    "loss",
    [("--matryoshka_dims", "8", "24", "64", "--matryoshka_weights", "2", "1", "0.5"), ("--loss", "sigmoid")],
    ids=["matryoshka", "sigmoid"],
)
def test_the_trainers_grad_cache_step_equals_one_graph(tmp_path, loss):
    """The trainer's own step, GradCache (mini-batches of 3) against one graph over the same rows: the same
    loss and the same gradient for every parameter, the sigmoid loss's logit scale and bias included."""
    trainer = _trainer(tmp_path, *loss, "--gradcache_mini_batch_size", "3", "--max_steps", "1")
    trainer.current_gradient_accumulation_steps = 1
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["mini_batches"]) == 3

    def step(mini_batching):
        trainer.mini_batching = mini_batching
        trainer.model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = trainer.training_step(trainer.model, batch)
        return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    got_loss, got = step(MiniBatching(rows=3))
    ref_loss, ref = step(MiniBatching())  # the same three mini-batches, forwarded into one graph
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert ref and got.keys() == ref.keys()
    if "sigmoid" in loss:
        assert {"sigmoid_parameters.log_scale", "sigmoid_parameters.bias"} <= ref.keys()
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


class StopAt:
    """Ends training after `step` optimizer steps, as if the run had been killed after its checkpoint."""

    def __init__(self, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step >= step
                return control

        self.callback = Stop()


def test_a_resumed_sigmoid_run_ends_with_the_scale_and_bias_of_the_uninterrupted_one(tmp_path):
    steps = ["--loss", "sigmoid", "--siglip_bias_init", "-8", "--max_steps", "4", "--warmup_steps", "0"]
    whole = _trainer(tmp_path / "whole", *steps)
    whole.train()
    killed = _trainer(tmp_path / "killed", *steps)
    killed.add_callback(StopAt(2).callback)
    killed.train()
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    assert (checkpoint / SIGMOID_PARAMETERS_NAME).is_file()
    resumed = _trainer(tmp_path / "killed", *steps)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final, initial = whole.model.sigmoid_parameters, (torch.tensor(10.0).log(), torch.tensor(-8.0))
    assert not torch.equal(final.log_scale.detach(), initial[0]) and not torch.equal(final.bias.detach(), initial[1])
    for name, param in whole.model.named_parameters():
        torch.testing.assert_close(resumed.model.get_parameter(name), param, rtol=0, atol=0, msg=name)
    # A checkpoint that lost them is an error, not a silent restart from the initial values: the checkpoint's
    # manifest names the file, and the encoder's own load refuses a folder without it.
    (checkpoint / SIGMOID_PARAMETERS_NAME).unlink()
    again = _trainer(tmp_path / "killed", *steps)
    with pytest.raises(ValueError, match=f"missing {SIGMOID_PARAMETERS_NAME}"):
        again.train(resume_from_checkpoint=str(checkpoint))
    with pytest.raises(FileNotFoundError, match=f"holds no {SIGMOID_PARAMETERS_NAME}"):
        again.model.load_weights(checkpoint)


def _encoder():
    from mmfast.train.default import default_backbone

    return Encoder.from_pretrained(default_backbone())


def test_encode_dim_is_the_prefix_renormalised():
    from PIL import Image

    encoder = _encoder()
    texts = ["a red circle", "<|image_1|> a picture", "two blue squares"]
    images = [None, Image.new("RGB", (32, 32)), None]
    full = encoder.encode(texts, images, show_progress=False)
    for dim in (1, 16, 63, 64):
        got = encoder.encode(texts, images, show_progress=False, dim=dim)
        manual = full[:, :dim] / full[:, :dim].norm(dim=-1, keepdim=True)
        torch.testing.assert_close(got, manual)
        assert got.shape == (3, dim)
    one = encoder.encode("a red circle", show_progress=False, dim=16)
    torch.testing.assert_close(one, full[0, :16] / full[0, :16].norm())
    for bad, error in ((0, "dim must be a positive integer"), (65, "dim 65 exceeds the embedding size 64"),
                       (16.0, "dim must be a positive integer")):  # fmt: skip
        with pytest.raises(ValueError, match=error):
            encoder.encode(texts, show_progress=False, dim=bad)


def test_mmfast_eval_dims_rows_equal_separate_evaluations_at_each_dim(tmp_path, monkeypatch, capsys, encode_calls):
    from mmfast.train.evaluate.default_sets import evaluate_default

    monkeypatch.chdir(tmp_path)  # the untrained default
    calls = encode_calls
    out = tmp_path / "eval"
    assert eval_main(["--task", "retrieval", "--dims", "32", "8", "--output", str(out), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    embedded = sum(calls)
    results = json.loads((out / "results.json").read_text())["dims"]
    assert list(results) == ["8", "32"]

    class AtDim:  # a separate evaluation: an encoder whose encode is Encoder.encode(dim=d)
        def __init__(self, encoder, dim):
            self.encoder, self.dim, self.encoder_config = encoder, dim, encoder.encoder_config

        def encode(self, texts, images=None, **kwargs):
            return self.encoder.encode(texts, images, **kwargs, dim=self.dim)

    encoder = _encoder()
    calls.clear()
    for dim in (8, 32):
        separate = evaluate_default(AtDim(encoder, dim), tasks=("retrieval",), show_progress=False)
        assert results[str(dim)] == json.loads(json.dumps(separate)), dim
    assert embedded == sum(calls) / 2  # --dims embedded each input once, for both sizes
    assert results["8"] != results["32"]
    (summary,) = [i for i, line in enumerate(printed.splitlines()) if line.startswith("By embedding size")]
    header, *rows = printed.splitlines()[summary + 1 : summary + 4]
    assert header.split()[:3] == ["dim", "flickr30k", "t2i_R@1"]
    assert [row.split()[0] for row in rows] == ["8", "32"]
    assert rows[0].split()[1] == f"{results['8']['retrieval']['flickr30k']['t2i_R@1']:.2f}"
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "dim,task,set,metric,value"
    assert any(row.startswith("32,retrieval,flickr30k,t2i_R@1,") for row in csv_rows)

    refused = {"65": "--dims 65 exceeds the embedding size 64", "0": "--dims must be", "8 8": "--dims: each size once"}
    for bad, error in refused.items():
        assert eval_main(["--task", "retrieval", "--dims", *bad.split(), "--output", str(out), "--no_progress"]) == 2
        assert error in capsys.readouterr().err
