"""Padding-free packing (the default with sdpa, flash_attention_2 and flex_attention): the
collation and the sampler's real-token cap, sdpa run per sample (training.attention) against a
block-diagonal mask built independently, and the same loss and gradient as padding, for one
forward and for a whole run of the real training script. The CUDA kernels: which one trains on
which device, the varlen boundaries handed to flash-attn (not installed here) checked against
transformers' own DataCollatorWithFlattening, and flex_attention's forward (no CPU backward in
this torch) against sdpa per sample on packed rows padded as training pads them."""

import json
import random

import pytest
import torch

from core.recipe import load_recipe
from tests.test_step_equivalence import B, random_data, tiny_model
from training import attention, kernels
from training.data import IGNORE_INDEX, TokenizedData
from training.job import TrainJob
from training.launch.local import run_training
from training.sampler import equalise_counts, micro_batches, padded_tokens, plan_steps
from training.step import collate, collate_packed, summed_token_loss


def test_packed_row_restarts_positions_and_masks_the_label_across_each_boundary():
    data = TokenizedData(
        ids=["a", "b", "c"],
        input_ids=[[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        labels=[[-100, 2, 3], [4, 5], [-100, -100, 8, 9]],
    )
    batch = collate_packed(data, [0, 1, 2])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: positions delimit samples
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # Each sample's first label would be predicted from the previous sample's last token.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, 8, 9]]
    # The shifted targets are exactly those of the padded batch: the same loss tokens.
    padded = collate(data, [0, 1, 2], pad_id=0)["labels"][:, 1:]
    assert (batch["labels"][0, 1:] != IGNORE_INDEX).sum() == (padded != IGNORE_INDEX).sum() == sum(data.loss_tokens())


def test_flex_rows_are_padded_to_a_multiple_at_the_end_as_one_more_sample():
    data = TokenizedData(
        ids=["a", "b", "c"],
        input_ids=[[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        labels=[[-100, 2, 3], [4, 5], [-100, -100, 8, 9]],
    )
    batch = collate_packed(data, [0, 1, 2], pad_id=0, row_multiple=4)  # 9 tokens -> 12
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]  # the pad is its own "sample"
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, 8, 9] + 3 * [IGNORE_INDEX]
    ]
    assert collate_packed(data, [0, 2], row_multiple=7)["input_ids"].shape == (1, 7)  # already a multiple
    lengths = [3, 2, 4]
    assert padded_tokens([0, 1, 2], lengths, True, row_multiple=128) == 128
    assert padded_tokens([0, 1, 2], lengths, True) == 9  # one row, unpadded (flash-attn varlen, sdpa per sample)


def test_flash_attention_kwargs_are_the_sample_boundaries():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    data = TokenizedData(ids=["a", "b", "c"], input_ids=ids, labels=ids)
    batch = collate_packed(data, [0, 1, 2], flash_kwargs=True)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == [0, 3, 5, 10]
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    assert type(batch["max_length_q"]) is int  # flash-attn takes Python ints: a tensor would cost a host sync
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    "asked, device, flash, expected",
    [
        ("sdpa", "cuda", True, "flash_attention_2"),
        ("sdpa", "cuda", False, "flex_attention"),
        ("flex_attention", "cuda", True, "flex_attention"),
        ("flash_attention_2", "cuda", True, "flash_attention_2"),
        ("sdpa", "cpu", False, "sdpa_per_sample"),
        ("flex_attention", "cpu", False, "sdpa_per_sample"),  # flex has no CPU backward
        ("flash_attention_2", "cpu", False, "flash_attention_2"),  # the load then fails, naming flash-attn
        ("eager", "cuda", True, "eager"),
    ],
)
def test_the_packed_kernel_per_device_is_never_the_per_sample_loop_on_cuda(asked, device, flash, expected):
    llama = {"model_type": "llama", "hidden_size": 64}
    assert kernels.training_kernel(asked, device, llama, flash_available=flash) == expected


def test_attention_softcapping_is_the_kernel_choice_hook():
    from transformers import Gemma2Config

    gemma2 = Gemma2Config()  # attn_logit_softcapping 50 by default
    assert kernels.training_kernel("sdpa", "cuda", gemma2, flash_available=True) == "flex_attention"
    assert kernels.training_kernel("sdpa", "cpu", gemma2) == "eager"
    assert kernels.training_kernel("sdpa", "cuda", {"attn_logit_softcapping": None}, flash_available=True) == (
        "flash_attention_2"
    )


@pytest.mark.slow  # compiles flex_attention for CPU (~30 s the first time, cached after)
@pytest.mark.parametrize("sliding_window", [None, 16])
def test_flex_attention_forward_equals_sdpa_per_sample_on_packed_rows(sliding_window):
    """transformers' flex_attention with its own packed BlockMask (built from the position_ids
    by masking_utils) against sdpa per sample, through a whole model: mixed lengths (short and
    over one 128-token block), the row padded to a multiple of 128 as training pads it, a
    sliding window included. Forward only: flex has no CPU backward in this torch."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
        sliding_window=sliding_window,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 500, (n,), generator=g).tolist() for n in (30, 7, 150, 22, 3, 61)]
    data = TokenizedData(ids=[str(i) for i in range(len(ids))], input_ids=ids, labels=ids)
    batch = collate_packed(data, list(range(len(ids))), row_multiple=kernels.FLEX_BLOCK)
    assert batch["input_ids"].shape[1] % kernels.FLEX_BLOCK == 0 and batch["input_ids"].shape[1] > sum(map(len, ids))
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        model.set_attn_implementation("flex_attention")
        flex = model(**inputs, use_cache=False).logits
        model.set_attn_implementation(attention.NAME)
        per_sample = model(**inputs, use_cache=False).logits
    assert torch.allclose(flex, per_sample, atol=1e-5), (flex - per_sample).abs().max()
    # and both keep samples apart: the third sample alone gives its own logits
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ids[2]]), use_cache=False).logits
    start = len(ids[0]) + len(ids[1])
    assert torch.allclose(flex[0, start : start + 150], alone[0], atol=1e-5)


def test_packed_micro_batches_cap_real_tokens_and_waste_nothing():
    rng = random.Random(0)
    lengths = [rng.randint(8, 300) for _ in range(400)]
    batches = micro_batches(list(range(400)), lengths, 1024, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert all(padded_tokens(b, lengths, True) <= 1024 for b in batches)
    assert len(batches) <= sum(lengths) / 1024 * 1.1 + 1  # first-fit decreasing: nearly full rows
    assert len(batches) < len(micro_batches(list(range(400)), lengths, 1024))  # fewer than padded


def test_sharded_plans_give_every_rank_the_same_number_of_micro_batches():
    rng = random.Random(1)
    lengths = [int(min(2048, max(32, rng.lognormvariate(5, 1)))) for _ in range(600)]
    plan = dict(world_size=4, max_tokens_per_micro_batch=2048)
    equal = plan_steps(lengths, 96, 1, seed=0, equal_micro_batches=True, **plan)
    free = plan_steps(lengths, 96, 1, seed=0, **plan)
    assert any(len({len(r) for r in step.micro_batches}) > 1 for step in free)  # the case arises
    for step in equal:
        most = max(len(per_rank) for per_rank in step.micro_batches)
        # Short only when out of samples to split (the loop then adds zero-weight fillers).
        assert all(len(per_rank) == most or all(len(mb) == 1 for mb in per_rank) for per_rank in step.micro_batches)
        assert sorted(i for r in step.micro_batches for mb in r for i in mb) == sorted(step.samples)
        assert all(padded_tokens(mb, lengths, False) <= 2048 for r in step.micro_batches for mb in r)


def test_equalising_splits_the_heaviest_micro_batch_and_leaves_a_rank_short_only_without_samples():
    lengths = [100, 90, 80, 70, 10, 10, 10]
    out = equalise_counts([[[0, 1, 2, 3]], [[4], [5], [6]]], lengths, packed=True)
    assert sorted(out[0]) == [[0], [1], [2, 3]]  # halves, then the heavier half (190 real tokens) again
    assert out[1] == [[4], [5], [6]]
    short = equalise_counts([[[0], [1], [2]], [[3, 4]]], lengths, packed=False)
    assert [len(r) for r in short] == [3, 2] and sorted(i for mb in short[1] for i in mb) == [3, 4]


def test_a_packed_forward_gives_the_padded_loss_and_gradient():
    data = random_data()
    grads, losses = [], []
    padded, one_row = collate(data, list(range(B)), pad_id=0), collate_packed(data, list(range(B)))
    row_padded = collate_packed(data, list(range(B)), row_multiple=128)  # padded at its end, as for flex_attention
    assert (row_padded["input_ids"][0, one_row["input_ids"].shape[1] :] == 0).all()
    for batch in (padded, one_row, row_padded):
        model = tiny_model()
        loss = summed_token_loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for k in (1, 2):
        assert losses[k] == pytest.approx(losses[0], rel=1e-5)
        assert (grads[k] - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_sdpa_per_sample_equals_attention_under_a_block_diagonal_mask(sliding_window):
    """Output and gradients of sdpa per sample (short samples grouped at rounded lengths with
    padded tails, long ones at their exact length) equal one sdpa call under the dense
    block-diagonal causal mask, grouped-query heads and a sliding window included."""
    import torch.nn.functional as F

    from training.attention import sdpa_per_sample

    lengths, heads, kv_heads, dim = [5, 1, 17, 3, 150, 2, 40, 150, 9, 131], 4, 2, 8  # short and long (> 128)
    width = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, width, dim, generator=g, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, width, dim, generator=g, requires_grad=True) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = sdpa_per_sample(module, q, k, v, None, position_ids=positions, sliding_window=sliding_window)

    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(width)
    mask = (sample[:, None] == sample[None, :]) & (i[None, :] <= i[:, None])
    if sliding_window:
        mask &= i[None, :] > i[:, None] - sliding_window
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask
    ).transpose(1, 2)
    assert out.shape == (1, width, heads, dim)
    assert torch.allclose(out, expected, atol=1e-6)
    weights = torch.randn(out.shape, generator=g)
    for got, want in zip(
        torch.autograd.grad((out * weights).sum(), (q, k, v)),
        torch.autograd.grad((expected * weights).sum(), (q, k, v)),
        strict=True,
    ):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", ["lab", "tulu", "tulu-plus", "demo"])
def test_the_presets_train_packed(name):
    recipe = load_recipe(name)
    kernel = kernels.training_kernel(recipe.model.attn_implementation, "cuda", {}, flash_available=False)
    assert recipe.training.packing and kernel in kernels.VARLEN_KERNELS


@pytest.mark.slow
def test_packed_training_through_the_real_script_equals_the_padded_run(tmp_path, assets, prepared_slice):
    """Per-step losses and gradient norms of a packed sdpa run equal the padded run's (steps 2-3
    also check that the updates agreed): packing changes how micro-batches are laid out, never the
    maths."""
    data_dir = prepared_slice("phase05", 96)
    runs = {}
    for name, packing in (("packed", True), ("padded", False)):
        recipe = load_recipe(
            "demo",
            {
                "training.packing": packing,
                "training.epochs": 1,
                "training.effective_batch_size": 32,
                "training.max_tokens_per_micro_batch": 512,  # several micro-batches per step
                "checkpointing.save_every_samples": None,
                "checkpointing.save_every_epoch": False,
                "checkpointing.state_every_steps": None,
            },
        )
        job = TrainJob(
            run_id=name,
            phase="p",
            recipe=recipe,
            model_path=str(assets.base_model_dir),
            parent_checkpoint="base",
            data_dir=data_dir,
            output_dir=str(tmp_path / name),
        )
        run_training(job, on_line=lambda _: None)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    packed, padded = runs["packed"], runs["padded"]
    # sdpa per sample: one row per micro-batch, no padding at all
    assert all(m["padding_efficiency"] == 1.0 for m in packed)
    assert all(m["padding_efficiency"] < 1.0 for m in padded)  # the padded run really padded
    for p, q in zip(packed, padded, strict=True):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-5)
        assert p["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5)
