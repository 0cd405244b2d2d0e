"""The maths of one optimizer step (paper A.6.10): the split into micro-batches and ranks
never changes the gradient, and the real training script matches a plain PyTorch loop."""

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from training.data import IGNORE_INDEX, TokenizedData, load_tokenized
from training.sampler import sample_stream
from training.step import backward_step, collate

B = 8


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).float()


def random_data() -> TokenizedData:
    g = torch.Generator().manual_seed(1)
    input_ids, labels = [], []
    for _i in range(B):
        n = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        prompt = n // 2  # loss on the second half only, like an answer after a prompt
        input_ids.append(ids)
        labels.append([IGNORE_INDEX] * prompt + ids[prompt:])
    return TokenizedData(ids=[str(i) for i in range(B)], input_ids=input_ids, labels=labels)


def step_tokens(data: TokenizedData) -> int:
    return sum(data.loss_tokens())


def grads_of(split: list[list[int]], world_size: int = 1, model=None) -> dict[str, torch.Tensor]:
    data = random_data()
    model = model or tiny_model()
    backward_step(model, [collate(data, mb, 0) for mb in split], step_tokens(data), world_size)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def ddp_rank(rank: int, port: int, splits: list[list[list[int]]], out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(tiny_model())
    grads = grads_of(splits[rank], world_size=2, model=model)
    if rank == 0:
        torch.save({n.removeprefix("module."): g for n, g in grads.items()}, out)
    dist.barrier()
    # No teardown: freeing DDP's gloo process group joined gloo's worker thread while holding the
    # GIL that thread was waiting for, and a rank hung forever (seen once in a full CPU run).
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    scale = max(g.abs().max().item() for g in a.values())
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= 1e-6 * scale, f"max abs diff {worst:.3e} > 1e-6 x max|g| ({scale:.3e})"


def sgd_step(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model = tiny_model()
    for n, p in model.named_parameters():
        p.grad = grads[n]
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_micro_batch_k_micro_batches_and_two_ranks_give_the_same_gradient(tmp_path):
    one = grads_of([list(range(B))])
    k = grads_of([[0, 1], [2, 3], [4, 5], [6, 7]])
    out = str(tmp_path / "ddp.pt")
    # Two real DDP ranks over gloo, k/2 micro-batches each, unequal token counts per rank.
    mp.spawn(ddp_rank, args=(free_port(), [[[0, 1], [2, 3]], [[4, 5], [6, 7]]], out), nprocs=2, join=True)
    two_ranks = torch.load(out)

    assert_same(one, k)
    assert_same(one, two_ranks)
    after_one, after_k, after_two = sgd_step(one), sgd_step(k), sgd_step(two_ranks)
    assert_same(after_one, after_k)
    assert_same(after_one, after_two)


def test_a_mean_of_micro_batch_means_would_differ():
    """The check above can fail: averaging per-micro-batch means is a different gradient."""
    data = random_data()
    model = tiny_model()
    for mb in ([0, 1], [2, 3, 4, 5, 6, 7]):
        batch = collate(data, mb, 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        (loss / 2).backward()
    wrong = {n: p.grad for n, p in model.named_parameters()}
    with pytest.raises(AssertionError):
        assert_same(grads_of([list(range(B))]), wrong)


@pytest.mark.slow
def test_training_script_matches_a_plain_pytorch_loop(tmp_path, assets, tokenizer, prepared_slice):
    from core.recipe import load_recipe
    from training.job import TrainJob
    from training.launch.local import run_training

    data_dir = prepared_slice("phase05", 96)
    recipe = load_recipe(
        "demo",
        {
            "training.epochs": 1,
            "training.effective_batch_size": 32,
            "training.warmup_steps": 2,
            "training.max_tokens_per_micro_batch": 256,  # several micro-batches per step
            "checkpointing.save_every_samples": None,
            "checkpointing.save_every_epoch": False,
        },
    )
    job = TrainJob(
        run_id="ref",
        phase="p",
        recipe=recipe,
        model_path=str(assets.base_model_dir),
        parent_checkpoint="base",
        data_dir=data_dir,
        output_dir=str(tmp_path / "out"),
    )
    run_training(job, on_line=lambda _: None)
    ours = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["micro_batches"] > 1 for m in ours)

    # The reference: one padded batch per step, mean over loss tokens, AdamW, linear warmup.
    cfg = recipe.training
    data = load_tokenized(data_dir)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(assets.base_model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    stream = sample_stream(len(data), cfg.epochs, cfg.seed)
    reference = []
    for k in range(math.ceil(len(stream) / 32)):
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * min(1.0, (k + 1) / 2)
        batch = collate(data, stream[k * 32 : (k + 1) * 32], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        reference.append((loss.item(), grad_norm.item()))

    assert len(ours) == len(reference) == 3
    for m, (loss, grad_norm) in zip(ours, reference, strict=False):
        assert m["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-5)
        assert m["grad_norm"] == pytest.approx(grad_norm, rel=1e-5, abs=1e-5)
