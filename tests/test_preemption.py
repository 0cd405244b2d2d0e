"""The rolling training state by time and on SIGTERM, in a real 2-rank DeepSpeed ZeRO-2 run on
CPU (gloo), as the presets run on GPUs.

One run writes the state every step by rank 0's clock; another gets a SIGTERM on rank 1 alone
mid-run (a preempted node), saves on both ranks at the same step, stops, and a relaunch resumes
it exactly: the same per-step losses as the uninterrupted run. Throughout, each rank's saves log
says how much its peak host memory rose during each save: rank 1 must not copy the model
(accelerate's get_state_dict copies it to CPU on every ZeRO-1/2 rank). The model is ~9M
parameters (35 MB in float32) so that 10% of it stands well above the noise of a save.
"""

import contextlib
import json
import shutil
import signal
import threading
from pathlib import Path

import psutil
import pytest
import torch

from core.recipe import load_recipe
from core.records import PREEMPTED
from tests.waiting import poll
from training.job import TrainJob
from training.launch.files import TrainingFailed
from training.launch.local import run_training

pytestmark = pytest.mark.slow

STEPS = 12
# glibc serves allocations below a moving threshold (up to 32 MB) from heap pages that stay
# resident after a free, so a copy could reuse them without raising the peak RSS. A fixed low
# threshold maps every tensor-sized allocation afresh: a copy of the model then shows (measured
# with accelerate's get_state_dict in the save: +35 MB on rank 1 for this 29 MB model).
PRECISE_RSS = ("MALLOC_MMAP_THRESHOLD_", "65536")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, assets) -> Path:
    """The lab's tokenizer on a wider random Llama (the lab model is too small to measure a copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets.base_model_dir)
    config.update({"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 2})
    config.head_dim = 64
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide-model")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in Path(assets.base_model_dir).iterdir():
        if "token" in name.name or name.name.endswith((".jinja", "generation_config.json")):
            shutil.copy(name, path)
    return path


def model_bytes(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def job_for(out: Path, model: Path, data_dir: str, **overrides) -> TrainJob:
    recipe = load_recipe(
        "demo",
        {
            "training.epochs": 1,
            "training.effective_batch_size": 8,
            "training.warmup_steps": 0,
            "checkpointing.save_every_samples": 48,
            "checkpointing.save_every_epoch": False,
            "launch.backend": "deepspeed",
            "launch.zero_stage": 2,
            "launch.num_processes": 2,
            **overrides,
        },
    )
    return TrainJob(
        run_id="p",
        phase="p",
        recipe=recipe,
        model_path=str(model),
        parent_checkpoint=str(model),
        data_dir=data_dir,
        output_dir=str(out),
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def saves(out: Path, rank: int) -> list[dict]:
    return read_jsonl(out / "saves" / f"rank{rank}.jsonl")


@pytest.fixture(scope="module")
def by_time(tmp_path_factory, model_dir, prepared_slice) -> Path:
    """The uninterrupted run, saving the state every step: rank 0's clock says a step is past due."""
    out = tmp_path_factory.mktemp("by-time")
    job = job_for(out, model_dir, prepared_slice("phase00", 8 * STEPS), **{"checkpointing.rolling_state_minutes": 1e-6})
    with pytest.MonkeyPatch.context() as env:
        env.setenv(*PRECISE_RSS)
        run_training(job, on_line=lambda _: None)
    return out


def test_state_by_time_is_written_by_every_rank_at_the_same_steps_without_a_copy_of_the_model(by_time, model_dir):
    states = [[s for s in saves(by_time, r) if s["what"] == "state"] for r in (0, 1)]
    assert [s["step"] for s in states[0]] == [s["step"] for s in states[1]] == list(range(1, STEPS))  # not the last
    assert all(s["reason"] == "time" for r in states for s in r)
    assert [s["step"] for s in saves(by_time, 1) if s["what"] == "checkpoint"] == [6, 12]  # every 48 samples
    limit = 0.1 * model_bytes(model_dir)
    growth = [s["host_peak_growth_bytes"] for s in saves(by_time, 1)]
    assert all(g is not None and g < limit for g in growth), (growth, limit)


def child_process(parent: psutil.Process, text: str, rank: str | None = None) -> psutil.Process:
    """A live descendant of `parent` whose command line contains `text` (and, given `rank`, whose
    RANK is that: torchrun sets it in each rank's environment). Zombies left by other tests'
    children are skipped: reading their command line raises."""

    def find() -> psutil.Process | None:
        for child in parent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if text in " ".join(child.cmdline()) and (rank is None or child.environ().get("RANK") == rank):
                    return child
        return None

    found = poll(find, timeout_s=120, interval_s=0.1)
    assert found, f"no process with {text!r} (rank {rank}) under {parent.pid}"
    return found


def test_sigterm_on_one_rank_saves_on_all_at_the_same_step_and_the_relaunch_resumes_exactly(
    tmp_path, model_dir, prepared_slice, by_time, monkeypatch
):
    monkeypatch.setenv(*PRECISE_RSS)
    out = tmp_path / "preempted"
    job = job_for(out, model_dir, prepared_slice("phase00", 8 * STEPS))  # every 30 min: only the SIGTERM saves
    lines: list[str] = []
    failure: list[BaseException] = []

    def first_launch() -> None:
        try:
            run_training(job, on_line=lines.append)
        except TrainingFailed as exc:
            failure.append(exc)

    launch = threading.Thread(target=first_launch)
    launch.start()
    metrics = out / "metrics.jsonl"
    poll(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, timeout_s=300, interval_s=0.02)
    launcher = child_process(psutil.Process(), "accelerate.commands.launch")
    child_process(launcher, "training.train", rank="1").send_signal(signal.SIGTERM)  # rank 0 is not told
    launch.join(timeout=300)

    assert failure and "preempted (SIGTERM)" in str(failure[0]), lines[-20:]
    stopped_at = json.loads((out / PREEMPTED).read_text())["step"]
    assert 3 <= stopped_at < STEPS and len(read_jsonl(metrics)) == stopped_at
    for rank in (0, 1):
        states = [s for s in saves(out, rank) if s["what"] == "state"]
        assert [(s["step"], s["reason"]) for s in states] == [(stopped_at, "sigterm")]
    limit = 0.1 * model_bytes(model_dir)
    assert all(s["host_peak_growth_bytes"] < limit for s in saves(out, 1)), saves(out, 1)

    resumed: list[str] = []
    run_training(job, on_line=resumed.append)
    assert f"resuming after step {stopped_at} from {out / 'state'}" in resumed
    assert not (out / PREEMPTED).exists()
    straight, interrupted = read_jsonl(by_time / "metrics.jsonl"), read_jsonl(metrics)
    assert [m["step"] for m in interrupted] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in interrupted] == pytest.approx([m["loss"] for m in straight], rel=1e-6)
    assert [m["grad_norm"] for m in interrupted] == pytest.approx([m["grad_norm"] for m in straight], rel=1e-6)
