"""The sentence-transformers comparison in benchmarks/train.py compares like with like: on the same tiny
text-only backbone and rows, its CachedMultipleNegativesRankingLoss and mmfast's e5v step (GradCache +
fused loss) give the same embeddings, the same loss and the same parameter gradients."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import train as train_benchmark  # noqa: E402

pytestmark = pytest.mark.slow
ROWS, MINI_BATCH = 9, 4


def test_sentence_transformers_cached_mnrl_matches_mmfast(tmp_path):
    backbone = train_benchmark.text_backbone(tmp_path)
    trainer = train_benchmark.text_trainer(backbone, ROWS, MINI_BATCH, str(tmp_path / "out"))
    examples = [trainer.train_dataset[i] for i in range(ROWS)]
    assert all(len(e.negatives) == 1 and e.query.image is None for e in examples)
    st_model, st_step = train_benchmark.sentence_transformers_step(backbone, MINI_BATCH, examples)

    texts = [e.query.text for e in examples]
    want = trainer.model.encode(texts, show_progress=False)
    got = st_model.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    inputs = trainer.data_collator(examples)
    assert len(inputs["mini_batches"]) == 3
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(trainer.model, inputs)
    st_loss = st_step()
    torch.testing.assert_close(st_loss, loss, rtol=1e-5, atol=1e-5)

    # The same weights under two names: "model.model.layers.0..." (mmfast, a causal LM) and
    # "0.model.layers.0..." (sentence-transformers, the bare decoder).
    ours = {n.removeprefix("model.model."): p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    theirs = {n.removeprefix("0.model."): p.grad for n, p in st_model.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, grad in ours.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(theirs[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
