"""The batch arithmetic and the schedules, as pure functions (no model)."""

import math
import random

import pytest
import torch

from training.sampler import plan_steps, sample_stream, save_points
from training.setup import lr_multiplier


@pytest.mark.parametrize(
    ("n", "epochs", "ebs"), [(100, 1, 32), (100, 3, 32), (1000, 2.5, 128), (7, 1, 10), (64, 2, 64)]
)
def test_steps_equal_ceil_samples_times_epochs_over_ebs(n, epochs, ebs):
    steps = plan_steps([10] * n, ebs, epochs, seed=0)
    assert len(steps) == math.ceil(n * epochs / ebs)
    assert all(len(s.samples) == ebs for s in steps[:-1])
    assert steps[-1].samples_seen == round(n * epochs)


def test_each_epoch_sees_every_sample_once_in_a_new_order():
    stream = sample_stream(50, 3, seed=1)
    epochs = [stream[i * 50 : (i + 1) * 50] for i in range(3)]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert stream == sample_stream(50, 3, seed=1)


def test_micro_batches_respect_the_token_cap_and_cover_the_step():
    rng = random.Random(0)
    lengths = [rng.randint(8, 300) for _ in range(500)]
    for world in (1, 2, 4):
        for step in plan_steps(lengths, 64, 1, seed=0, world_size=world, max_tokens_per_micro_batch=1024):
            seen = [i for per_rank in step.micro_batches for mb in per_rank for i in mb]
            assert sorted(seen) == sorted(step.samples)  # every sample exactly once
            for per_rank in step.micro_batches:
                assert per_rank, "every rank gets samples"
                for mb in per_rank:
                    assert len(mb) * max(lengths[i] for i in mb) <= 1024
            loads = [sum(lengths[i] for mb in r for i in mb) for r in step.micro_batches]
            assert max(loads) - min(loads) <= max(lengths)  # LPT balance bound


def test_a_sample_over_the_cap_is_an_error_before_training():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=100"):
        plan_steps([50, 150], 2, 1, seed=0, max_tokens_per_micro_batch=100)


def test_save_points_round_to_whole_steps():
    steps = plan_steps([5] * 100, 30, 2, seed=0)  # samples_seen: 30, 60, ..., 200
    points = save_points(steps, 100, every_samples=50, every_epoch=False)
    assert [steps[p - 1].samples_seen for p in sorted(points)] == [60, 120, 150, 200]
    with_epochs = save_points(steps, 100, every_samples=None, every_epoch=True)
    assert [steps[p - 1].samples_seen for p in sorted(with_epochs)] == [120, 200]


def test_warmup_zero_starts_at_peak_and_schedules_differ():
    total = 20
    constant = [lr_multiplier(s, total, 0, "constant") for s in range(total)]
    linear = [lr_multiplier(s, total, 0, "linear") for s in range(total)]
    cosine = [lr_multiplier(s, total, 0, "cosine") for s in range(total)]
    assert constant == [1.0] * total
    assert linear[0] == cosine[0] == 1.0
    assert linear[10] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.5)
    assert cosine[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert all(a > b for a, b in zip(linear, linear[1:], strict=False))


def test_warmup_is_linear_to_the_peak():
    values = [lr_multiplier(s, 100, 4, "constant") for s in range(6)]
    assert values == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("schedule", "theirs"), [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")]
)
def test_the_schedules_are_transformers_own_after_warmup_and_one_step_ahead_during_it(schedule, theirs):
    """Why training.setup.make_scheduler is not transformers' get_scheduler: transformers runs warmup
    step k of W at k/W, so its first step trains at rate 0; ours runs it at (k+1)/W. After warmup they agree."""
    from transformers import get_scheduler

    total, warmup = 20, 4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(theirs, optimizer, num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]
    ours = [lr_multiplier(s, total, warmup, schedule) for s in range(total)]
    assert [reference(s) for s in range(warmup)] == [0.0, 0.25, 0.5, 0.75]  # transformers: step 0 at rate 0
    assert ours[:warmup] == [reference(s + 1) for s in range(warmup)] == [0.25, 0.5, 0.75, 1.0]
    assert ours[warmup:] == pytest.approx([reference(s) for s in range(warmup, total)], abs=1e-12)
