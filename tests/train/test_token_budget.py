"""GradCache mini-batches by tokens (`--gradcache_mini_batch_tokens`): rows packed in order under the budget
(every side, padded, image tokens included, counted before the forward), a row over it alone and logged, and
the step exactly the one-graph step over the same rows."""

import itertools
import logging
from dataclasses import replace

import pytest
import torch

from mmfast.train.arguments import parse_arguments
from mmfast.train.data import Input
from mmfast.train.default import PROFILE
from mmfast.train.grad_cache import full_batch_step, grad_cache_step
from mmfast.train.mini_batches import pack_by_tokens, padded_tokens
from mmfast.train.plan import BatchPlan
from tests.train.test_trainer import _trainer


def test_padded_tokens_counts_every_side_at_its_longest():
    # queries 3 and 5 -> 2 × 5; targets 4 and 2 -> 2 × 4; negatives 7, 1, 2 -> 3 × 7.
    assert padded_tokens([(3, 4, 7, 1), (5, 2, 2)]) == 10 + 8 + 21
    assert padded_tokens([(3, 4)]) == 7


@pytest.mark.parametrize("budget", [7, 20, 33, 64, 1000])
@pytest.mark.parametrize("max_rows", [0, 1, 3])
def test_packing_keeps_order_respects_the_budget_and_fills_greedily(budget, max_rows):
    g = torch.Generator().manual_seed(budget)
    lengths = [tuple(torch.randint(1, 12, (2 + int(torch.randint(0, 3, (1,), generator=g)),), generator=g).tolist())
               for _ in range(23)]  # fmt: skip
    bounds, oversized = pack_by_tokens(lengths, budget, max_rows)
    assert [a for a, _ in bounds] == [0] + [b for _, b in bounds[:-1]] and bounds[-1][1] == 23  # contiguous, in order
    assert oversized == [i for i, row in enumerate(lengths) if padded_tokens([row]) > budget]
    for a, b in bounds:
        rows = lengths[a:b]
        if b - a == 1 and a in oversized:
            continue
        assert padded_tokens(rows) <= budget and not any(i in oversized for i in range(a, b))
        assert not max_rows or b - a <= max_rows
        # Greedy: the next row (if it is not an oversized one) would have broken a bound.
        if b < 23 and b not in oversized:
            assert padded_tokens(lengths[a : b + 1]) > budget or b - a == max_rows


def test_a_row_over_the_budget_gets_its_own_mini_batch():
    bounds, oversized = pack_by_tokens([(2, 2), (2, 2), (30, 2), (2, 2)], budget=10)
    assert bounds == [(0, 2), (2, 3), (3, 4)] and oversized == [2]


@pytest.fixture(scope="module")
def token_trainer(tmp_path_factory):
    return _trainer(tmp_path_factory.mktemp("tokens"), "--gradcache_mini_batch_tokens", "90",
                    "--per_device_train_batch_size", "9", "--max_steps", "1", "--lora", "True",
                    "--lora_dropout", "0.3")  # fmt: skip


def _examples(trainer):
    """Nine rows (text queries, image targets, some hard negatives), the fifth with a query far over 90 tokens."""
    examples = [trainer.train_dataset[i * 97] for i in range(9)]
    long_query = Input(" ".join(itertools.repeat("a small red circle in the upper left corner", 20)))
    examples[4] = replace(examples[4], query=long_query)
    return examples


def test_mini_batches_hold_at_most_the_budget_and_the_long_row_is_alone(token_trainer):
    batch = token_trainer.data_collator(_examples(token_trainer))
    mini_batches = batch["mini_batches"]
    assert 2 < len(mini_batches) < 9  # packed: neither one row each nor all in one
    assert any(side.image for row in mini_batches.rows for side in row)
    ((source, row, tokens),) = batch["oversized"]
    assert row == _examples(token_trainer)[4].row and tokens > 90
    for (start, stop), mini_batch in zip(mini_batches.bounds, mini_batches, strict=True):
        # The count made before the forward is what the forward gets: every side's padded input_ids.
        built = sum(inputs["input_ids"].numel() for inputs in mini_batch.values())
        if start == 4:
            assert stop == 5 and built == tokens
        else:
            assert built <= 90, (start, stop, built)


def test_token_budget_grad_cache_equals_one_graph(token_trainer):
    """Exact like the row-count version: the same loss and gradients as one graph over the same rows."""
    encoder = token_trainer.model
    encoder.train()
    batch = token_trainer.data_collator(_examples(token_trainer))
    mini_batches = batch["mini_batches"]

    def grads_of(step):
        encoder.zero_grad()
        torch.manual_seed(11)
        loss, _ = step(encoder, mini_batches, lambda e: token_trainer.objective(e, None, batch["ids"]))
        return loss, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    ref_loss, ref = grads_of(full_batch_step)
    got_loss, got = grads_of(grad_cache_step)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert ref and got.keys() == ref.keys()
    for name, grad in ref.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_the_trainer_logs_the_long_row_and_steps(token_trainer, caplog):
    batch = token_trainer.data_collator(_examples(token_trainer))
    token_trainer.current_gradient_accumulation_steps = 1
    with caplog.at_level(logging.WARNING, logger="mmfast.train.trainer"):
        loss = token_trainer.training_step(token_trainer.model, batch)
    assert torch.isfinite(loss)
    ((source, row, tokens),) = batch["oversized"]
    assert f"{source}, row {row}: {tokens} tokens, more than gradcache_mini_batch_tokens 90" in caplog.text


def test_the_token_budget_is_checked_and_shown(tmp_path):
    with pytest.raises(ValueError, match="gradcache_mini_batch_tokens must be an integer >= 0"):
        _trainer(tmp_path, "--gradcache_mini_batch_tokens", "-5")
    trainer = _trainer(tmp_path, "--gradcache_mini_batch_tokens", "512", "--gradcache_mini_batch_size", "16")
    assert trainer.mini_batching.grad_cache and trainer.data_collator.mini_batching is trainer.mini_batching
    run = parse_arguments(["--output_dir", str(tmp_path), "--gradcache_mini_batch_tokens", "512",
                           "--gradcache_mini_batch_size", "16"], profile=PROFILE)  # fmt: skip
    described = "\n".join(BatchPlan.of(run, None).lines())
    assert "GradCache mini-batches: at most 512 tokens and 16 rows each" in described


def test_a_skipped_row_leaves_counts_ids_and_the_long_row_aligned(token_trainer, tmp_path):
    """An unreadable image drops its row before packing: the token counts, content ids and the oversized
    row's name stay with the rows that remain."""
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    examples = _examples(token_trainer)
    examples[1] = replace(examples[1], query=Input("<|image_1|> a picture", str(corrupt)))
    batch = token_trainer.data_collator(examples)
    assert batch["report"].total == 1 and batch["rows"] == 8
    assert batch["ids"]["query"].shape == (8,)
    ((_, row, _),) = batch["oversized"]
    assert row == examples[4].row
    mini_batches = batch["mini_batches"]
    assert examples[4].query in [
        mini_batches.rows[start][0] for start, stop in mini_batches.bounds if stop - start == 1
    ]
