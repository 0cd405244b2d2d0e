"""The batch plan: which samples each rank sees in each micro-batch of each optimizer step.

Every optimizer step consumes exactly `effective_batch_size` samples (the last step of the
run takes what is left), whatever the number of ranks. The sample stream is one seeded
permutation per epoch, concatenated, so `steps = ceil(samples * epochs / EBS)` and the plan is
a pure function of (lengths, EBS, epochs, seed, world size, token cap): every rank computes
the same plan, and resuming at step k needs nothing but k.

Within a step, samples go to ranks longest-first onto the rank with the fewest tokens so far
(longest-processing-time scheduling), then each rank's share is cut into length-grouped
micro-batches whose padded size (count x longest) stays under the token cap.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    index: int  # 1-based optimizer step
    samples: list[int]  # every sample index of the step, all ranks
    micro_batches: list[list[list[int]]]  # [rank][micro-batch] -> sample indices
    samples_seen: int  # after this step
    epoch: float  # samples_seen / dataset size


def sample_stream(num_samples: int, epochs: float, seed: int) -> list[int]:
    """Sample indices in training order: a fresh permutation per epoch; a fractional last
    epoch takes the head of its permutation."""
    total = round(num_samples * epochs)
    stream: list[int] = []
    epoch = 0
    while len(stream) < total:
        order = list(range(num_samples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        stream.extend(order[: total - len(stream)])
        epoch += 1
    return stream


def split_across_ranks(samples: list[int], lengths: list[int], world_size: int) -> list[list[int]]:
    """Longest-first onto the least-loaded rank, balancing tokens (each rank gets >= 1 sample
    when there are enough samples)."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(samples, key=lambda s: (-lengths[s], s)):
        rank = min(range(world_size), key=lambda r: (len(shares[r]) > 0, load[r], r))
        shares[rank].append(i)
        load[rank] += lengths[i]
    return shares


def micro_batches(samples: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Length-grouped micro-batches whose padded size stays within max_tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(samples, key=lambda s: (-lengths[s], s)):
        # Sorted longest first, so current[0] sets the padded length of the batch.
        if current and lengths[current[0]] * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def plan_steps(
    lengths: list[int],
    effective_batch_size: int,
    epochs: float,
    seed: int,
    world_size: int = 1,
    max_tokens_per_micro_batch: int = 8192,
) -> list[Step]:
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens_per_micro_batch]
    if too_long:
        raise ValueError(
            f"{len(too_long)} samples exceed max_tokens_per_micro_batch={max_tokens_per_micro_batch} "
            f"(longest {max(lengths[i] for i in too_long)} tokens): raise the cap or lower max_seq_len"
        )
    stream = sample_stream(len(lengths), epochs, seed)
    steps = []
    for k in range(math.ceil(len(stream) / effective_batch_size)):
        chunk = stream[k * effective_batch_size : (k + 1) * effective_batch_size]
        shares = split_across_ranks(chunk, lengths, world_size)
        seen = min((k + 1) * effective_batch_size, len(stream))
        steps.append(
            Step(
                index=k + 1,
                samples=chunk,
                micro_batches=[micro_batches(share, lengths, max_tokens_per_micro_batch) for share in shares],
                samples_seen=seen,
                epoch=seen / len(lengths),
            )
        )
    return steps


def save_points(steps: list[Step], num_samples: int, every_samples: int | None, every_epoch: bool) -> set[int]:
    """Step indices after which to save a checkpoint: the first step at or past each multiple
    of `every_samples` (whole steps only), each epoch end, and always the last step."""
    points = {steps[-1].index}
    previous = 0
    for step in steps:
        if every_samples and step.samples_seen // every_samples > previous // every_samples:
            points.add(step.index)
        if every_epoch and step.samples_seen // num_samples > previous // num_samples:
            points.add(step.index)
        previous = step.samples_seen
    return points
