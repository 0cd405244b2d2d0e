"""The real training script under `accelerate launch` on the tiny embedded model."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import get_scheduler

from core import records
from core.recipe import load_recipe
from core.records import FINISHED, StateProgress
from tests.waiting import poll
from training.job import TrainJob
from training.launch.files import TrainingFailed
from training.launch.local import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(prepared_slice) -> str:
    return prepared_slice("phase00", 200)


def job_for(tmp_path: Path, assets, data_dir: str, **overrides) -> TrainJob:
    recipe = load_recipe("demo", {"training.epochs": 1, "checkpointing.save_every_samples": 64, **overrides})
    model = str(assets.base_model_dir)
    return TrainJob(
        run_id="t",
        phase="phase00",
        recipe=recipe,
        model_path=model,
        parent_checkpoint=model,
        data_dir=data_dir,
        output_dir=str(tmp_path / "phase00"),
    )


def read_metrics(job: TrainJob) -> list[dict]:
    return [json.loads(line) for line in (Path(job.output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_metrics_and_complete_checkpoints(tmp_path, assets, small_data):
    from transformers import AutoModelForCausalLM

    job = job_for(tmp_path, assets, small_data, **{"training.epochs": 2})
    lines: list[str] = []
    checkpoints = run_training(job, on_line=lines.append)

    metrics = read_metrics(job)
    ebs = job.recipe.training.effective_batch_size
    assert len(metrics) == math.ceil(200 * 2 / ebs)
    assert {
        "step",
        "epoch",
        "samples_seen",
        "tokens_seen",
        "loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "padding_efficiency",
        "micro_batches",
        "wall_s",
    } <= set(metrics[0])
    assert metrics[-1]["samples_seen"] == 400
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert any(line.startswith("batch arithmetic: 200 samples x 2.0 epochs") for line in lines)
    # every 64 samples (whole steps of 32), the step that crosses the epoch end at 200, and the end
    assert [p.name for p in checkpoints] == [
        "samples_64",
        "samples_128",
        "samples_192",
        "samples_224",
        "samples_256",
        "samples_320",
        "samples_384",
        "samples_400",
    ]
    for path in checkpoints:
        meta = json.loads((path / "meta.json").read_text())
        assert meta["samples_seen"] == int(path.name.split("_")[1]) and meta["phase"] == "phase00"
        assert meta["parent_checkpoint"] == job.parent_checkpoint and meta["recipe"]["name"] == "demo"
        assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(checkpoints[-1])


@pytest.mark.parametrize(("schedule", "warmup"), [("constant", 0), ("cosine", 0), ("linear", 3)])
def test_logged_lr_follows_the_schedule(tmp_path, assets, small_data, schedule, warmup):
    job = job_for(
        tmp_path,
        assets,
        small_data,
        **{
            "training.schedule": schedule,
            "training.warmup_steps": warmup,
            "checkpointing.save_every_samples": None,
            "checkpointing.save_every_epoch": False,
        },
    )
    run_training(job, on_line=lambda _: None)
    lrs = [m["lr"] for m in read_metrics(job)]
    peak, total = job.recipe.training.learning_rate, math.ceil(200 / job.recipe.training.effective_batch_size)

    # The reference: transformers' own schedules. Their warmup runs step k of W at k/W (step 0 at
    # rate 0); ours at (k+1)/W, reaching the peak on its last step: those steps are written out.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[schedule]
    reference = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    expected[:warmup] = [peak / 3, 2 * peak / 3, peak][:warmup]

    assert len(lrs) == total
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_a_failing_subprocess_raises_with_its_own_error_and_leaves_no_incomplete_checkpoint(
    tmp_path, assets, small_data
):
    job = job_for(tmp_path, assets, small_data).model_copy(update={"model_path": str(tmp_path / "no-such-model")})
    with pytest.raises(TrainingFailed) as err:
        run_training(job, on_line=lambda _: None)
    assert "no-such-model" in str(err.value) and "Traceback" in str(err.value)

    # A crash mid-save: a checkpoint dir without meta.json is removed after the failure.
    broken = tmp_path / "broken"
    shutil.copytree(assets.base_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    stale = Path(job.output_dir) / "checkpoints" / "samples_32"
    stale.mkdir(parents=True)
    with pytest.raises(TrainingFailed, match="safetensors|header|Error"):
        run_training(job.model_copy(update={"model_path": str(broken)}), on_line=lambda _: None)
    assert not stale.exists()


def test_two_cpu_ranks_are_really_distributed_and_match_one_rank(tmp_path, assets, small_data):
    one = job_for(
        tmp_path / "one",
        assets,
        small_data,
        **{"checkpointing.save_every_samples": None, "checkpointing.save_every_epoch": False},
    )
    two = job_for(
        tmp_path / "two",
        assets,
        small_data,
        **{
            "launch.num_processes": 2,
            "checkpointing.save_every_samples": None,
            "checkpointing.save_every_epoch": False,
        },
    )
    run_training(one, on_line=lambda _: None)
    lines: list[str] = []
    run_training(two, on_line=lines.append)
    assert any(line.endswith("world_size=2 rank=0") for line in lines)  # a shared pipe: see test_distributed
    loss_one = [m["loss"] for m in read_metrics(one)]
    loss_two = [m["loss"] for m in read_metrics(two)]
    # Same samples per step, token-mean loss over both ranks: the same numbers up to float order.
    assert loss_two == pytest.approx(loss_one, rel=1e-5)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, assets, small_data):
    import os
    import signal

    from training.launch.local import start_training

    settings = {
        "training.epochs": 2,
        "training.effective_batch_size": 16,
        "checkpointing.save_every_samples": None,
        "checkpointing.state_every_steps": 4,
    }
    straight = job_for(tmp_path / "straight", assets, small_data, **settings)
    run_training(straight, on_line=lambda _: None)

    job = job_for(tmp_path / "killed", assets, small_data, **settings)
    proc = start_training(job)
    metrics = Path(job.output_dir) / "metrics.jsonl"
    assert poll(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 10, timeout_s=120, interval_s=0.02
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = metrics.read_text().splitlines()
    assert 10 <= len(before) < 25, "killed mid-run"
    saved = records.read(StateProgress, Path(job.output_dir) / "state" / "progress.json").step
    assert saved % 4 == 0 and 8 <= saved <= len(before)

    run_training(job, on_line=lambda _: None)
    # Resumed after the saved step: the steps up to it are kept as they were (their times too), not retrained.
    assert metrics.read_text().splitlines()[:saved] == before[:saved]

    a, b = read_metrics(straight), read_metrics(job)
    assert [m["step"] for m in b] == list(range(1, 26))
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-6)
    assert [m["lr"] for m in b] == [m["lr"] for m in a]
    ids = [
        json.loads(line)["ids"] for line in (Path(job.output_dir) / "samples" / "rank0.jsonl").read_text().splitlines()
    ]
    flat = [i for step in ids for i in step]
    assert len(flat) == 400
    assert sorted(flat[:200]) == sorted(flat[200:]) and len(set(flat[:200])) == 200  # each epoch: every sample once
    # Finished: said by finished.json; the rolling state stays until the caller records the phase.
    assert json.loads((Path(job.output_dir) / FINISHED).read_text()) == {"steps": 25, "samples_seen": 400}
    assert (Path(job.output_dir) / "state" / "progress.json").exists()


def test_watchdog_stops_a_diverging_run_with_its_reason(tmp_path, assets, small_data):
    job = job_for(
        tmp_path,
        assets,
        small_data,
        **{
            "training.learning_rate": 5.0,
            "training.warmup_steps": 0,
            "training.max_grad_norm": None,
            "watchdog.min_steps": 1,
            "watchdog.loss_spike_factor": 1.5,
        },
    )
    with pytest.raises(TrainingFailed, match="stopped by the watchdog") as err:
        run_training(job, on_line=lambda _: None)
    stopped = json.loads((Path(job.output_dir) / "stopped.json").read_text())
    assert "loss spike" in stopped["reason"] or "non-finite" in stopped["reason"]
    assert stopped["reason"] in str(err.value)
    assert read_metrics(job)[-1]["stopped"] == stopped["reason"]


def test_stacked_length_split_recipe_trains_each_sample_once_per_epoch(tmp_path, assets, tokenizer):
    """Paper A.6.1 stacked: one file, its short half then its long half (+1% replay) as two phases.
    Stacked, every row of the file is trained exactly once per epoch, over both ranks."""
    from itertools import islice

    from core.recipe import resolve
    from training.data import phase_conversations, prepare

    source = tmp_path / "all.jsonl"
    with open(assets.train_file("phase00")) as f:
        source.write_text("".join(islice(f, 96)))
    file_ids = [json.loads(line)["id"] for line in source.read_text().splitlines()]
    split = {"data": [str(source)], "objective": {"lab_instruction/rule_acc": 1.0}}
    recipe = resolve(
        "demo",
        "stacked",
        {
            "phases": [
                {"name": "short", "length_split": "short", **split},
                {"name": "long", "length_split": "long", "replay": 0.01, **split},
            ],
            "training.epochs": 2,
            "training.effective_batch_size": 16,
            "launch.num_processes": 2,
            "checkpointing.save_every_samples": None,
            "checkpointing.save_every_epoch": False,
        },
    )
    conversations, replay_pool, files = phase_conversations(recipe.phases, 0)
    stats = prepare(conversations, tokenizer, str(tmp_path / "prepared"), 256, replay_pool=replay_pool, files=files)
    assert stats.samples == 96 and stats.replayed == 0

    job = TrainJob(
        run_id="t",
        phase="stacked",
        recipe=recipe,
        model_path=str(assets.base_model_dir),
        parent_checkpoint=str(assets.base_model_dir),
        data_dir=str(tmp_path / "prepared"),
        output_dir=str(tmp_path / "stacked"),
    )
    run_training(job, on_line=lambda _: None)
    trained: dict[int, list[str]] = {}  # step -> ids, both ranks
    for rank in (0, 1):
        for line in (tmp_path / "stacked" / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            trained.setdefault(record["step"], []).extend(record["ids"])
    assert sorted(trained) == list(range(1, 13))  # 96 samples x 2 epochs / 16 per step
    for epoch in (0, 1):  # 6 steps of 16 samples = one epoch: every row of the file, once
        ids = [i for step in range(6 * epoch + 1, 6 * epoch + 7) for i in trained[step]]
        assert sorted(ids) == sorted(file_ids)


def test_validation_loss_of_the_held_out_slice_at_the_start_and_every_checkpoint(tmp_path, assets, tokenizer):
    """prepare holds out a slice; the trainer scores each held-out sample's mean token loss on the
    start model and at each checkpoint. Checked against the saved checkpoint run through the
    transformers model's own loss (labels shifted inside it, mean over the labelled tokens)."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM

    from training.data import load_phase, load_tokenized, prepare

    source = tmp_path / "train.jsonl"
    source.write_text("".join(assets.train_file("phase00").read_text().splitlines(keepends=True)[:200]))
    stats = prepare(load_phase([str(source)])[0], tokenizer, str(tmp_path / "data"), 256, validation_samples=20)
    assert len(stats.validation_ids) == 20 and stats.samples == 180
    held_out = load_tokenized(str(tmp_path / "data"), "validation.parquet")
    ids = [json.loads(line)["id"] for line in source.read_text().splitlines()]
    first_by_hash = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:20]
    assert sorted(held_out.ids) == sorted(first_by_hash) == sorted(stats.validation_ids)  # a fixed slice
    assert not set(held_out.ids) & set(load_tokenized(str(tmp_path / "data")).ids)

    job = job_for(tmp_path, assets, str(tmp_path / "data"))
    checkpoints = run_training(job, on_line=lambda _: None)
    out = Path(job.output_dir) / "validation"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{name}.items.parquet" for name in ["start", *(c.name for c in checkpoints)]
    )
    for checkpoint in checkpoints:  # the mean, in the checkpoint's meta.json
        per_item = pd.read_parquet(out / f"{checkpoint.name}.items.parquet")
        meta = records.read(records.CheckpointMeta, checkpoint / records.META)
        assert meta.validation_loss == pytest.approx(per_item["value"].mean())
    last = pd.read_parquet(out / f"{checkpoints[-1].name}.items.parquet").set_index("item")["value"]
    model = AutoModelForCausalLM.from_pretrained(checkpoints[-1]).eval()
    with torch.no_grad():
        for i, sample in enumerate(held_out.ids):
            ids = torch.as_tensor(held_out.input_ids[i], dtype=torch.long)[None]
            labels = torch.as_tensor(held_out.labels[i], dtype=torch.long)[None]
            assert last[sample] == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), rel=1e-4)
    start = pd.read_parquet(out / "start.items.parquet")["value"].mean()
    assert last.mean() < start  # training lowered the held-out loss
