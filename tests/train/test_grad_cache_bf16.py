"""GradCache × gradient checkpointing × LoRA dropout × bf16 autocast, through the Trainer's own step.

`--bf16` on the CPU: accelerate wraps the prepared model's forward in `torch.autocast("cpu",
bfloat16)` (the Trainer adds no autocast of its own), so both GradCache passes (the no-grad pass and
the replay from the saved RNG state) and the checkpointed recomputation run under the same autocast,
and the cached-embedding backward goes through graphs recorded in bf16.

Measured (default backbone, LLaVE recipe, batch 8 in mini-batches of 4, LoRA dropout 0.3, lora_B
perturbed so every LoRA weight gets a gradient; relative L2 error over all trainable gradients):
the bf16 full-batch step is 1.9e-2 from the fp32 full-batch step, the bf16 GradCache step 1.9e-2
(per parameter at most 1.002× the full-batch error), and GradCache is 3.2e-3 from the bf16
full-batch step: the full batch accumulates the weight gradient of autocast's cached bf16 weight copy
in bf16 across mini-batches, GradCache adds each mini-batch's in fp32. A replay outside autocast
(an fp32 re-run against the bf16 pass's cached gradients) is 1.2e-2 from the bf16 full batch, which
the test tells apart (the bound is 0.35 × 1.9e-2 = 6.7e-3).
"""

import pytest
import torch

from mmfast.train.grad_cache import full_batch_step, grad_cache_step
from tests.train.test_trainer import _trainer

pytestmark = pytest.mark.slow
ROWS, MINI_BATCH = 8, 4


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[name].flatten() for name in sorted(grads)])


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    trainer = _trainer(tmp_path_factory.mktemp("bf16"), "--bf16", "True", "--lora", "True", "--lora_dropout", "0.3",
                       "--gradient_checkpointing", "True", "--gradcache_mini_batch_size", str(MINI_BATCH),
                       "--per_device_train_batch_size", str(ROWS), "--max_steps", "1")  # fmt: skip
    assert trainer.accelerator.mixed_precision == "bf16"
    encoder = trainer.model
    encoder.activation_checkpointing_enable()
    torch.manual_seed(0)
    with torch.no_grad():
        # LoRA starts with B = 0, which would leave every A without a gradient: perturb, as if trained.
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    inputs = trainer.data_collator([trainer.train_dataset[i * 97] for i in range(ROWS)])
    assert len(inputs["mini_batches"]) == ROWS // MINI_BATCH
    encoder.train()

    def grads_of(step):
        encoder.zero_grad()
        torch.manual_seed(11)
        loss = step()
        return loss, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    def full_batch():
        return full_batch_step(encoder, inputs["mini_batches"], trainer.objective)[0]

    def full_batch_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return full_batch()

    fp32 = grads_of(full_batch)
    bf16 = grads_of(full_batch_bf16)
    # The fp32 forward, kept before accelerate patches the model's forward with its autocast.
    plain_forward = encoder.forward
    model = trainer.accelerator.prepare(encoder)
    trainer.current_gradient_accumulation_steps = 1
    grad_cache = grads_of(lambda: trainer.training_step(model, inputs))
    return {"trainer": trainer, "encoder": encoder, "model": model, "inputs": inputs, "grads_of": grads_of,
            "plain_forward": plain_forward, "fp32": fp32, "bf16": bf16, "grad_cache": grad_cache}  # fmt: skip


def test_the_trainers_grad_cache_step_runs_under_autocast(setting):
    (fp32_loss, _), (bf16_loss, _), (loss, _) = setting["fp32"], setting["bf16"], setting["grad_cache"]
    # bf16 moves the loss, and the Trainer's GradCache step lands on the bf16 full-batch loss exactly.
    assert abs(bf16_loss.item() - fp32_loss.item()) > 1e-3
    torch.testing.assert_close(loss, bf16_loss, rtol=1e-6, atol=1e-6)


def test_bf16_grad_cache_within_twice_the_full_batch_bf16_error(setting):
    fp32, bf16, grad_cache = setting["fp32"][1], setting["bf16"][1], setting["grad_cache"][1]
    assert fp32.keys() == bf16.keys() == grad_cache.keys()
    assert any("lora_A" in name for name in fp32) and any("lora_B" in name for name in fp32)
    full_batch_error = _relative_error(_flat(bf16), _flat(fp32))
    assert 1e-3 < full_batch_error < 0.1  # bf16 for real, and still a sane bf16 error
    assert _relative_error(_flat(grad_cache), _flat(fp32)) <= 2 * full_batch_error
    for name in fp32:
        assert _relative_error(grad_cache[name], fp32[name]) <= 2 * _relative_error(bf16[name], fp32[name]), name
    # Closer to the bf16 full batch than bf16 is to fp32: the replay ran in bf16 too.
    assert _relative_error(_flat(grad_cache), _flat(bf16)) < 0.35 * full_batch_error


def test_a_replay_outside_autocast_would_be_told_apart(setting):
    """Control: the first pass under autocast, the replay in fp32; the last assertion above fails for it."""
    encoder, inputs, trainer = setting["encoder"], setting["inputs"], setting["trainer"]
    autocast_forward, plain_forward = setting["model"].forward, setting["plain_forward"]
    calls = []

    def forward(mini_batch):
        calls.append(1)
        return (autocast_forward if len(calls) <= len(inputs["mini_batches"]) else plain_forward)(mini_batch)

    _, mixed = setting["grads_of"](lambda: grad_cache_step(forward, inputs["mini_batches"], trainer.objective)[0])
    bf16, fp32 = _flat(setting["bf16"][1]), _flat(setting["fp32"][1])
    assert len(calls) == 2 * len(inputs["mini_batches"]) and encoder.training
    assert _relative_error(_flat(mixed), bf16) > 0.35 * _relative_error(bf16, fp32)
