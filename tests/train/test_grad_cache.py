"""GradCache against one graph over the same mini-batches: same loss, same parameter gradients.

The model has dropout, so equality needs GradCache's RNG replay: the reference forwards the same
mini-batches in the same order (drawing the same masks) and backpropagates once.
"""

from dataclasses import replace

import pytest
import torch

from mmfast import ContrastiveLossOptions, DistillationLossOptions, SigmoidLossOptions
from mmfast.train.encoder import SigmoidParameters
from mmfast.train.grad_cache import concatenate, full_batch_step, grad_cache_step, split_like
from mmfast.train.losses import Objective


class ToyEncoder(torch.nn.Module):
    """Maps {side: [n, F] features} to {side: [n, D] unit embeddings}, with dropout in between."""

    def __init__(self, features=11, dim=7, p=0.3):
        super().__init__()
        self.inner = torch.nn.Linear(features, 13)
        self.dropout = torch.nn.Dropout(p)
        self.outer = torch.nn.Linear(13, dim)

    def forward(self, sides):
        out = {}
        for side, x in sides.items():
            out[side] = torch.nn.functional.normalize(self.outer(self.dropout(torch.tanh(self.inner(x)))), dim=-1)
        return out


def _mini_batches(batch, negatives_per_row, chunks, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, t = torch.randn(batch, 11, generator=g), torch.randn(batch, 11, generator=g)
    n = torch.randn(batch * negatives_per_row, 11, generator=g)
    bounds = torch.linspace(0, batch, chunks + 1).round().long().tolist()
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = {"query": q[lo:hi], "target": t[lo:hi]}
        if negatives_per_row:
            part["negatives"] = n[lo * negatives_per_row : hi * negatives_per_row]
        out.append(part)
    return out


def _step(step, model, mini_batches, objective, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    loss, embeddings = step(model, mini_batches, objective)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss, embeddings, grads, torch.get_rng_state()


@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize(
    "options",
    [
        ContrastiveLossOptions(),
        ContrastiveLossOptions(hardness=9.0, symmetric=True),
        ContrastiveLossOptions(false_negative_margin=0.1, topk=3),
        ContrastiveLossOptions(hardness=9.0, symmetric=True, matryoshka_dims=(2, 5, 7), matryoshka_weights=(0.5, 1, 2)),
    ],
    ids=["infonce", "llave", "unime", "matryoshka"],
)
@pytest.mark.parametrize("negatives_per_row", [0, 2])
def test_grad_cache_equals_one_graph(chunks, options, negatives_per_row):
    torch.manual_seed(0)
    model = ToyEncoder().double()
    mini_batches = [{k: v.double() for k, v in mb.items()} for mb in _mini_batches(9, negatives_per_row, chunks)]
    objective = Objective(replace(options, backend="cpu"))
    ref = _step(full_batch_step, model, mini_batches, objective, seed=5)
    got = _step(grad_cache_step, model, mini_batches, objective, seed=5)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    for side in ref[1]:
        torch.testing.assert_close(got[1][side], ref[1][side], rtol=1e-12, atol=1e-12)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-10, atol=1e-12, msg=name)
    # The step leaves the RNG where the one-graph step leaves it, so later steps draw the same masks.
    assert torch.equal(got[3], ref[3])


def test_grad_cache_without_replay_would_differ():
    """The parity above depends on the dropout masks: a GradCache whose second pass draws fresh
    masks gives different gradients, so the test can fail."""
    torch.manual_seed(0)
    model = ToyEncoder().double()
    mini_batches = [{k: v.double() for k, v in mb.items()} for mb in _mini_batches(9, 0, 2)]
    objective = Objective(ContrastiveLossOptions(backend="cpu"))
    ref = _step(full_batch_step, model, mini_batches, objective, seed=5)
    calls = []

    def forward_fresh_masks(sides):
        calls.append(1)
        if len(calls) > len(mini_batches):
            torch.manual_seed(1000 + len(calls))
        return model(sides)

    model.zero_grad()
    torch.manual_seed(5)
    grad_cache_step(forward_fresh_masks, mini_batches, objective)
    differs = any(not torch.allclose(p.grad, ref[2][n]) for n, p in model.named_parameters())
    assert differs


def test_grad_cache_distillation():
    torch.manual_seed(0)
    model = ToyEncoder().double()
    mini_batches = [{k: v.double() for k, v in mb.items()} for mb in _mini_batches(7, 0, 3)]
    teacher = {"query": torch.randn(7, 5, dtype=torch.float64), "target": torch.randn(7, 5, dtype=torch.float64)}
    objective = Objective(DistillationLossOptions(backend="cpu"))

    def loss_fn(embeddings):
        return objective(embeddings, teacher)

    ref = _step(full_batch_step, model, mini_batches, loss_fn, seed=3)
    got = _step(grad_cache_step, model, mini_batches, loss_fn, seed=3)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-10, atol=1e-12, msg=name)


def test_no_sync_wraps_every_mini_batch_but_the_last():
    model = ToyEncoder()
    mini_batches = _mini_batches(8, 1, 4)
    entered = []

    class Recorder:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    backward_calls = []

    def backward(surrogate):
        backward_calls.append(len(entered))
        surrogate.backward()

    grad_cache_step(model, mini_batches, Objective(ContrastiveLossOptions()), backward=backward, no_sync=Recorder)
    # Three of four backward passes ran inside no_sync; the last one outside it.
    assert backward_calls == [1, 2, 3, 3]


def test_split_like_round_trips_ragged_sides():
    parts = [{"query": torch.randn(2, 3), "negatives": torch.randn(4, 3)}, {"query": torch.randn(3, 3)}]
    whole = concatenate(parts)
    assert whole["query"].shape == (5, 3) and whole["negatives"].shape == (4, 3)
    back = split_like(whole, parts)
    for part, piece in zip(parts, back, strict=True):
        assert piece.keys() == part.keys()
        for side in part:
            assert torch.equal(piece[side], part[side])


def test_empty_mini_batch_list_is_an_error():
    with pytest.raises(ValueError, match="at least one mini-batch"):
        grad_cache_step(ToyEncoder(), [], Objective(ContrastiveLossOptions()))


def test_objective_rejects_bad_options_and_missing_teacher():
    with pytest.raises(TypeError, match="options must be"):
        Objective({"temperature": 0.02})
    with pytest.raises(ValueError, match="teacher"):
        Objective(DistillationLossOptions())({"query": torch.randn(2, 3), "target": torch.randn(2, 3)})


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("negatives_per_row", [0, 2])
def test_grad_cache_with_duplicate_ids_equals_one_graph(chunks, negatives_per_row):
    """The collator's batch-level ids reach the loss once, over the concatenated mini-batches, so
    GradCache masks the same candidates as one graph (and masking does change the loss)."""
    torch.manual_seed(0)
    model = ToyEncoder().double()
    mini_batches = [{k: v.double() for k, v in mb.items()} for mb in _mini_batches(9, negatives_per_row, chunks)]
    g = torch.Generator().manual_seed(1)
    ids = {"candidate": torch.randint(0, 3, (9 + 9 * negatives_per_row,), generator=g),
           "query": torch.randint(0, 4, (9,), generator=g)}  # fmt: skip
    options = ContrastiveLossOptions(hardness=9.0, symmetric=True, backend="cpu")
    masked, plain = Objective(options), Objective(options, mask_duplicates=False)
    ref = _step(full_batch_step, model, mini_batches, lambda e: masked(e, None, ids), seed=5)
    got = _step(grad_cache_step, model, mini_batches, lambda e: masked(e, None, ids), seed=5)
    unmasked = _step(full_batch_step, model, mini_batches, lambda e: plain(e, None, ids), seed=5)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.allclose(ref[0], unmasked[0])
    assert masked.masked_candidates(ids, 9) > 0 and plain.masked_candidates(ids, 9) == 0


@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize("negatives_per_row", [0, 2])
def test_grad_cache_sigmoid_equals_one_graph_scale_and_bias_included(chunks, negatives_per_row):
    """The sigmoid loss reads the model's logit scale and bias: GradCache gives them the gradient one graph
    gives them (through the last mini-batch's surrogate), with duplicate positives among the candidates."""
    torch.manual_seed(0)
    model = ToyEncoder().double()
    head = SigmoidParameters(10.0, -10.0).double()
    mini_batches = [{k: v.double() for k, v in mb.items()} for mb in _mini_batches(9, negatives_per_row, chunks)]
    ids = {"candidate": torch.randint(0, 4, (9 + 9 * negatives_per_row,), generator=torch.Generator().manual_seed(2))}
    objective = Objective(SigmoidLossOptions(backend="cpu"))

    def loss_fn(embeddings):
        return objective(embeddings, None, ids, head)

    def step(kind):
        model.zero_grad()
        head.zero_grad()
        torch.manual_seed(5)
        if kind == "one graph":
            loss, _ = full_batch_step(model, mini_batches, loss_fn)
        else:
            loss, _ = grad_cache_step(model, mini_batches, loss_fn, loss_parameters=tuple(head.parameters()))
        return loss, {n: p.grad.clone() for n, p in [*model.named_parameters(), *head.named_parameters()]}

    ref_loss, ref = step("one graph")
    got_loss, got = step("grad cache")
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert ref["log_scale"].abs() > 0 and ref["bias"].abs() > 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    # Without its loss_parameters GradCache would leave the scale and bias untrained: the test can fail.
    model.zero_grad()
    head.zero_grad()
    grad_cache_step(model, mini_batches, loss_fn)
    assert head.log_scale.grad is None and head.bias.grad is None


def test_the_sigmoid_objective_needs_the_scale_and_bias():
    with pytest.raises(ValueError, match="logit scale and bias"):
        Objective(SigmoidLossOptions())({"query": torch.randn(2, 3), "target": torch.randn(2, 3)})
