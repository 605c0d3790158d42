"""One resolved run config (`RunConfig`): every loss override and the GradCache mini-batch reach the dry
run's plan, the start-of-run log and the loss actually called; the collator and the trainer read one
mini-batching; a row's hard negatives are counted one way; DDP searches for unused parameters only
where a step can leave some."""

import dataclasses
import logging
from dataclasses import dataclass

import pytest
import torch

import mmfast
from mmfast import ContrastiveLossOptions
from mmfast.train.arguments import LossArguments, parse_arguments
from mmfast.train.cli import train_main
from mmfast.train.collator import EmbeddingCollator
from mmfast.train.data import Example, Input
from mmfast.train.default import PROFILE
from mmfast.train.mini_batches import MiniBatching
from mmfast.train.plan import HardNegatives, describe_loss
from mmfast.train.recipes import get_recipe
from mmfast.train.run import build_encoder, build_trainer
from mmfast.train.run_config import resolve_loss
from mmfast.train.trainer import EmbeddingTrainer

# One value per overridable loss option, each away from the recipe's (unime-stage2: τ 0.02, β 0.1, top-8,
# α 0, not symmetric), and what the plan says of it. A new field of LossArguments fails the first assertion
# of the test below until it has a value here.
OVERRIDES = {
    "temperature": ("0.05", 0.05, "InfoNCE τ 0.05"),
    "hardness": ("3", 3.0, "hardness-weighted (α 3)"),
    "false_negative_margin": ("0.3", 0.3, "false-negative margin β 0.3"),
    "topk": ("5", 5, "top-5 negatives"),
    "symmetric": ("True", True, ", symmetric"),
    "matryoshka_dims": (("16", "64"), (16, 64), "Matryoshka dims 16 64"),
    "matryoshka_weights": (("2", "0.5"), (2.0, 0.5), "(weights 2 0.5;"),
}
# The options of `--loss sigmoid` (which takes none of the InfoNCE ones above): the initial logit scale and bias
# the model's learnable parameters start from, and the loss itself.
SIGMOID_OVERRIDES = {
    "loss": ("sigmoid", None, "sigmoid (SigLIP) loss"),
    "siglip_scale_init": ("5", 5.0, "learnable logit scale from 5 (log-scale 1.609)"),
    "siglip_bias_init": ("-3", -3.0, "bias from -3"),
}


def _tokens(overrides) -> list[str]:
    return [token for name, (value, _, _) in overrides.items()
            for token in (f"--{name}", *((value,) if isinstance(value, str) else value))]  # fmt: skip


MINI_BATCH = 3
ARGV = ["--recipe", "unime-stage2", "--per_device_train_batch_size", "8", "--max_steps", "1", "--report_to", "none",
        "--gradcache_mini_batch_size", str(MINI_BATCH), "--lora", "False", "--cpu_threads", "1",
        *_tokens(OVERRIDES)]  # fmt: skip


@pytest.mark.slow
def test_every_override_reaches_the_plan_the_log_and_the_loss_called(tmp_path, capsys, caplog, monkeypatch):
    assert set(OVERRIDES) | set(SIGMOID_OVERRIDES) == {f.name for f in dataclasses.fields(LossArguments)}
    argv = [*ARGV, "--output_dir", str(tmp_path)]
    mini_batch_line = f"GradCache mini-batch: {MINI_BATCH} (3 mini-batch(es) per device per step)"

    assert train_main(["--dry-run", *argv]) == 0
    planned = capsys.readouterr().out
    (recipe_line,) = [line for line in planned.splitlines() if line.startswith("recipe ")]
    for name, (_, _, described) in OVERRIDES.items():
        assert described in recipe_line, name
    assert "0.02" not in recipe_line and "β 0.1" not in recipe_line and "top-8" not in recipe_line
    assert mini_batch_line in planned

    with caplog.at_level(logging.WARNING, logger="mmfast.train.run"):
        trainer = build_trainer(parse_arguments(argv, profile=PROFILE))
    (logged,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe ")]
    assert logged.splitlines()[0].split(None, 1)[1] == recipe_line.split(None, 1)[1]  # the same words
    assert mini_batch_line in logged

    calls = []
    real = mmfast.contrastive_loss

    def spy(*tensors, **options):
        calls.append(options)
        return real(*tensors, **options)

    monkeypatch.setattr(mmfast, "contrastive_loss", spy)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["mini_batches"]) == 3  # the collator cut 8 rows by the run's mini-batch of 3
    trainer.current_gradient_accumulation_steps = 1
    assert torch.isfinite(trainer.training_step(trainer.model, batch))
    (called,) = calls  # GradCache: the loss is taken once, over the cached embeddings of every mini-batch
    for name, (_, value, _) in OVERRIDES.items():
        assert called[name] == value, name
    assert called["cross_device"] is False and called["backend"] == "auto"  # one process: nothing to gather

    # The collator and the trainer read one mini-batching; a collator cut otherwise is refused.
    assert trainer.data_collator.mini_batching == trainer.mini_batching == MiniBatching(rows=MINI_BATCH)
    other = EmbeddingCollator(trainer.data_collator.builder, mini_batching=MiniBatching(rows=MINI_BATCH + 1))
    with pytest.raises(ValueError, match="gradcache_mini_batch_size 4.*gradcache_mini_batch_size 3"):
        EmbeddingTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                         data_collator=other, objective=trainer.objective,
                         batch_sampler=trainer.batch_sampler)  # fmt: skip


@pytest.mark.slow
def test_the_sigmoid_loss_reaches_the_plan_the_log_and_the_loss_called_with_the_models_scale_and_bias(
    tmp_path, capsys, caplog, monkeypatch
):
    argv = [*ARGV[: ARGV.index("--temperature")], *_tokens(SIGMOID_OVERRIDES), "--output_dir", str(tmp_path)]
    assert train_main(["--dry-run", *argv]) == 0
    (recipe_line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("recipe ")]
    for name, (_, _, described) in SIGMOID_OVERRIDES.items():
        assert described in recipe_line, name
    assert "InfoNCE" not in recipe_line

    with caplog.at_level(logging.WARNING, logger="mmfast.train.run"):
        trainer = build_trainer(parse_arguments(argv, profile=PROFILE))
    (logged,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe ")]
    assert logged.splitlines()[0].split(None, 1)[1] == recipe_line.split(None, 1)[1]
    head = trainer.model.sigmoid_parameters
    names = {name for name, _ in trainer.model.named_parameters()}
    assert {"sigmoid_parameters.log_scale", "sigmoid_parameters.bias"} <= names

    calls = []
    real = mmfast.sigmoid_loss

    def spy(*tensors, **options):
        calls.append(options)
        return real(*tensors, **options)

    monkeypatch.setattr(mmfast, "sigmoid_loss", spy)
    monkeypatch.setattr(mmfast, "contrastive_loss", None)  # not called
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["mini_batches"]) == 3
    trainer.current_gradient_accumulation_steps = 1
    assert torch.isfinite(trainer.training_step(trainer.model, batch))
    (called,) = calls
    torch.testing.assert_close(called["logit_scale"], torch.tensor(5.0))
    torch.testing.assert_close(called["logit_bias"], torch.tensor(-3.0))
    assert called["logit_scale"].requires_grad and called["logit_bias"] is head.bias
    assert called["cross_device"] is False and "candidate_ids" in called
    assert head.log_scale.grad is not None and head.log_scale.grad.abs() > 0 and head.bias.grad.abs() > 0


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--matryoshka_dims", "32", "16"], "--matryoshka_dims must be strictly increasing"),
        (["--matryoshka_dims", "16", "0"], "--matryoshka_dims must be"),
        (
            ["--matryoshka_dims", "16", "32", "--matryoshka_weights", "1"],
            "--matryoshka_weights has 1 entries but matryoshka_dims has 2",
        ),
        (["--matryoshka_weights", "1"], "--matryoshka_weights needs matryoshka_dims"),
        (["--matryoshka_dims", "16", "32", "--matryoshka_weights", "1", "nan"], "--matryoshka_weights"),
        (["--recipe", "colpali", "--matryoshka_dims", "16"], "--matryoshka_dims: recipe colpali's late-interaction"),
        (["--recipe", "unime-stage1", "--matryoshka_dims", "16"], "--matryoshka_dims: recipe unime-stage1 distils"),
        (["--loss", "sigmoid", "--matryoshka_dims", "16"], "--matryoshka_dims: not an option of --loss sigmoid"),
        (["--loss", "sigmoid", "--temperature", "0.1"], "--temperature: not an option of --loss sigmoid"),
        (["--loss", "sigmoid", "--siglip_scale_init", "0"], "--siglip_scale_init must be a finite number > 0"),
        (["--loss", "sigmoid", "--siglip_bias_init", "inf"], "--siglip_bias_init must be a finite number"),
        (["--siglip_bias_init", "-5"], "--siglip_bias_init: only with --loss sigmoid"),
        (["--loss", "pairwise"], "--loss pairwise: recipe llave's loss is one of infonce, sigmoid"),
        (["--recipe", "colpali", "--loss", "sigmoid"], "--loss must be one of"),
        (["--loss", "sigmoid", "--fsdp", "full_shard"], "--loss sigmoid: .* not supported under FSDP"),
    ],
)
def test_bad_loss_values_are_refused_naming_the_argument(tmp_path, argv, error):
    with pytest.raises(ValueError, match=error):
        parse_arguments([*argv, "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_matryoshka_dims_beyond_the_embedding_are_refused_by_the_dry_run_and_the_run(tmp_path, capsys):
    argv = ["--matryoshka_dims", "16", "128", "--output_dir", str(tmp_path)]
    message = "--matryoshka_dims 16 128: the largest, 128, exceeds the model's embedding size 64"
    assert train_main(["--dry-run", *argv]) == 2
    assert f"error: {message}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        build_trainer(parse_arguments(argv, profile=PROFILE))
    assert train_main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_run_config_is_resolved_once_and_frozen(tmp_path):
    run = parse_arguments(["--recipe", "llave", "--temperature", "0.1", "--loss_backend", "cpu",
                           "--output_dir", str(tmp_path)], processes=4)  # fmt: skip
    assert run.recipe is get_recipe("llave") and run.processes == 4
    assert run.loss == dataclasses.replace(get_recipe("llave").loss, temperature=0.1, backend="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.loss = None
    with pytest.raises(ValueError, match="model_dtype must be one of"):
        parse_arguments(["--model_dtype", "float8", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="gradcache_mini_batch_size must be an integer >= 0"):
        parse_arguments(["--gradcache_mini_batch_size", "-1", "--output_dir", str(tmp_path)])


def test_a_loss_option_without_a_phrase_is_still_named_and_checked():
    @dataclass(frozen=True)
    class WithLater(ContrastiveLossOptions):  # as a later option would arrive (Matryoshka's dims did)
        later_option: tuple[int, ...] | None = None

    assert describe_loss(WithLater(later_option=(64, 32))).endswith(", query → target only, later_option (64, 32)")
    assert "later_option" not in describe_loss(WithLater())
    recipe = dataclasses.replace(get_recipe("vlm2vec"), loss=WithLater(cross_device=True))
    resolved = resolve_loss(recipe, {"later_option": (8,)}, backend="auto", processes=1)
    assert resolved.later_option == (8,) and resolved.cross_device is False
    with pytest.raises(ValueError, match="--later_option: recipe llave's loss has no such option"):
        resolve_loss(get_recipe("llave"), {"later_option": (8,)}, backend="auto", processes=1)


def test_hard_negatives_are_counted_per_row_as_the_collator_keeps_them():
    from mmfast.train.data_spec import TrainData
    from mmfast.train.run import hard_negatives
    from mmfast.train.sampling import mixture

    def row(i, negatives):
        return Example(Input(f"q{i}"), Input(f"p{i}"), tuple(Input(f"n{i}.{k}") for k in range(negatives)), "A", "a", i)

    rows = [row(0, 3), row(1, 1), row(2, 0), row(3, 5)]
    data = TrainData(dataset=None, mixture=mixture({"A": rows}), sources=())
    counted = hard_negatives(data, max_negatives=2)
    assert counted == HardNegatives.of([2, 1, 0, 2])  # each row capped, not the mean
    collated = EmbeddingCollator(None, max_negatives=2)(rows)
    assert len(collated["ids"]["candidate"]) == len(rows) + counted.in_rows(len(rows))[1]


@pytest.mark.slow
@pytest.mark.parametrize("freeze_vision_tower", [True, False])
def test_the_parameters_ddp_may_find_unused_are_those_a_step_leaves_without_gradient(tmp_path, freeze_vision_tower):
    run = parse_arguments(["--output_dir", str(tmp_path), "--freeze_vision_tower", str(freeze_vision_tower)],
                          profile=PROFILE)  # fmt: skip
    encoder = build_encoder(run)
    image = Input("<|image_1|> a red square", image="<given>")
    from PIL import Image

    picture = Image.new("RGB", (32, 32), (200, 20, 20))
    for images, items, pictures in ((True, [image, Input("a cat")], [picture, None]),
                                    (False, [Input("a cat"), Input("a dog")], [None, None])):  # fmt: skip
        encoder.zero_grad(set_to_none=True)
        encoder({"query": encoder.builder(items, pictures)})["query"].sum().backward()
        unwrapped = encoder.model
        without = sorted(n for n, p in unwrapped.named_parameters() if p.requires_grad and p.grad is None)
        assert without == sorted(encoder.parameters_without_gradient(images=images)), (images, without)
    # The embedded default: the LLaVE recipe freezes the vision tower, so a DDP step leaves nothing unused.
    assert (encoder.parameters_without_gradient(images=False) == []) == freeze_vision_tower


def test_unime_stage2_on_the_default_takes_its_default_run_loss_also_from_a_model_trained_there(tmp_path):
    """UniME's stage 2 starts from stage 1's output: a model trained from the default backbone (its saved
    encoder's base_model, followed back) on the default data still gets the recipe's default_run_loss (the
    margin without top-8); a model of one's own, or data of one's own, the published top-8."""
    import json

    backbone, stage1, foreign = tmp_path / "backbone", tmp_path / "runs" / "stage1", tmp_path / "foreign"
    for folder in (backbone, stage1, foreign):
        folder.mkdir(parents=True)
    (backbone / "mmfast_default.json").write_text("{}\n")
    (stage1 / "mmfast_encoder.json").write_text(json.dumps({"base_model": "../../backbone"}))
    (foreign / "mmfast_encoder.json").write_text(json.dumps({"base_model": "org/some-model"}))
    common = ["--recipe", "unime-stage2", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]

    def topk(*argv):
        return parse_arguments([*common, *argv], profile=PROFILE).loss.topk

    assert get_recipe("unime-stage2").loss.topk == 8
    assert topk() is None
    assert topk("--model_name_or_path", str(stage1)) is None
    assert topk("--model_name_or_path", str(stage1), "--data", str(tmp_path / "train.jsonl")) == 8
    assert topk("--model_name_or_path", str(foreign)) == 8
    assert topk("--model_name_or_path", "org/some-model") == 8
    assert topk("--topk", "4") == 4  # an override still wins
