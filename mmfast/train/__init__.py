"""mmfast.train: the reference trainer and evaluator for multimodal embedding models.

Built on `transformers.Trainer` and `peft`; the losses are mmfast's fused ops. This package is the
only part of mmfast that imports transformers: `import mmfast` never does.

    from mmfast.train import Encoder, build_trainer, parse_arguments
    run = parse_arguments(["--recipe", "llave", "--output_dir", "out"])   # one resolved RunConfig
    trainer = build_trainer(run)
    fit(trainer)                     # trainer.train(), then the encoder is saved into output_dir
    print(dry_run(["--config", "run.yaml"]).format())   # a config checked without weights

The evaluators live in `mmfast.train.evaluate`; `evaluate_default` runs them on the embedded
default's held-out sets.
"""

from .arguments import DataArguments, ModelArguments, TrainingArguments, parse_arguments
from .dry_run import dry_run
from .encoder import Encoder, EncoderConfig
from .evaluate.default_sets import evaluate_default
from .recipes import RECIPES, Recipe, get_recipe
from .run import build_encoder, build_trainer, fit
from .run_config import RunConfig
from .trainer import EmbeddingTrainer

__all__ = [
    "RECIPES",
    "DataArguments",
    "EmbeddingTrainer",
    "Encoder",
    "EncoderConfig",
    "ModelArguments",
    "Recipe",
    "RunConfig",
    "TrainingArguments",
    "build_encoder",
    "build_trainer",
    "dry_run",
    "evaluate_default",
    "fit",
    "get_recipe",
    "parse_arguments",
]
