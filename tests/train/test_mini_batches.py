"""Mini-batches built when they are encoded: a GradCache step holds one mini-batch's inputs at a time, builds
each one once per pass, gives the result of prebuilt mini-batches, and a batch crosses a process boundary as
rows (no tensors, no processor)."""

import gc
import pickle
import weakref

import pytest
import torch

from mmfast import ContrastiveLossOptions
from mmfast.train.data import Input
from mmfast.train.grad_cache import full_batch_step, grad_cache_step
from mmfast.train.losses import Objective
from mmfast.train.mini_batches import MiniBatches
from tests.train.test_grad_cache import ToyEncoder
from tests.train.test_trainer import _losses, _trainer


class Alive(dict):
    """A dict that can be weakly referenced, so its end is seen."""


class FeatureBuilder:
    """Inputs -> {"x": [n, 11] features}, a fixed function of each text; records what is alive."""

    def __init__(self):
        self.calls, self.alive, self.most_alive = 0, set(), 0

    def __call__(self, sides, images):
        self.calls += 1
        seeds = [sum(map(ord, side.text)) for side in sides]
        x = torch.stack([torch.randn(11, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in seeds])  # fmt: skip
        inputs = Alive(x=x)
        self.alive.add(self.calls)
        weakref.finalize(inputs, self.alive.discard, self.calls)
        self.most_alive = max(self.most_alive, len(self.alive))
        return inputs


class FeatureEncoder(ToyEncoder):
    def forward(self, sides):
        return super().forward({side: inputs["x"] for side, inputs in sides.items()})


def _rows(count, negatives_every=3):
    return [
        (Input(f"query {i}"), Input(f"target {i}"), *([Input(f"negative {i}")] if i % negatives_every == 0 else ()))
        for i in range(count)
    ]


@pytest.mark.parametrize("mini_batch", [1, 4, 13])
def test_grad_cache_builds_each_mini_batch_when_encoded_and_holds_one_at_a_time(mini_batch):
    torch.manual_seed(0)
    model = FeatureEncoder().double()
    rows = _rows(13)
    bounds = [(start, min(start + mini_batch, 13)) for start in range(0, 13, mini_batch)]
    builder = FeatureBuilder()
    lazy = MiniBatches(builder, rows, bounds)
    prebuilt = list(MiniBatches(FeatureBuilder(), rows, bounds))
    objective = Objective(ContrastiveLossOptions(hardness=9.0, symmetric=True, backend="cpu"))

    def grads_of(step, mini_batches):
        model.zero_grad()
        torch.manual_seed(5)
        loss, _ = step(model, mini_batches, objective)
        gc.collect()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads_of(full_batch_step, prebuilt)
    loss, got = grads_of(grad_cache_step, lazy)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    sides_built = sum(2 + any(len(row) > 2 for row in rows[a:b]) for a, b in bounds)
    assert builder.calls == 2 * sides_built  # each mini-batch built once per pass
    # One mini-batch's inputs alive at a time (its query, target and negatives).
    assert builder.most_alive <= 3
    assert not builder.alive  # nothing kept after the step


def test_mini_batches_cross_a_process_boundary_as_rows(tmp_path):
    trainer = _trainer(tmp_path, "--max_steps", "1", "--gradcache_mini_batch_size", "3")
    examples = [trainer.train_dataset[i * 97] for i in range(8)]
    batch = trainer.data_collator(examples)
    mini_batches = batch["mini_batches"]
    assert len(mini_batches) == 3 and any(side.image for row in mini_batches.rows for side in row)
    sent = pickle.loads(pickle.dumps(mini_batches))
    assert sent.builder is None and sent.rows == mini_batches.rows and sent.bounds == mini_batches.bounds
    # Rows and bounds only: a few hundred bytes a row, no pixel values, no processor.
    assert len(pickle.dumps(mini_batches)) < 400 * len(examples)
    with pytest.raises(RuntimeError, match="without their builder"):
        sent[0]
    rebuilt, original = sent.bound(trainer.data_collator.builder)[2], mini_batches[2]
    assert rebuilt.keys() == original.keys()
    for side in original:
        for key, value in original[side].items():
            assert torch.equal(rebuilt[side][key], value), (side, key)
    with pytest.raises(TypeError, match="one at a time"):
        mini_batches[0:2]


def test_data_loader_workers_give_the_same_training(tmp_path):
    """A worker process collates (the batch crosses as rows, the trainer binds its builder): the same
    losses as collating in the trainer's own process."""
    common = ("--max_steps", "2", "--gradcache_mini_batch_size", "5", "--save_steps", "10")
    inline = _trainer(tmp_path / "inline", *common)
    inline.train()
    workers = _trainer(tmp_path / "workers", *common, "--dataloader_num_workers", "1")
    workers.train()
    assert _losses(workers) == _losses(inline) and sorted(_losses(inline)) == [1, 2]
