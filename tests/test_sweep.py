"""The sweep flow: successive halving over rungs with pluggable pruners, on the tiny model."""

import json
from itertools import islice
from pathlib import Path

import pytest

from core.recipe import resolve
from core.records import StepMetrics
from evaluation.dynamics import EarlyDynamics, early_dynamics, rank_runs
from evaluation.pruning import RungResult, keep_count, loss_slope, rank, survivors, validate


def step(samples: int, loss: float, grad_norm: float = 1.0) -> StepMetrics:
    """A metrics.jsonl step; the fields the sweep does not read are zero."""
    zeros = {name: 0 for name in StepMetrics.model_fields} | {"mfu": None}
    return StepMetrics.model_validate(
        zeros | {"step": samples // 32, "samples_seen": samples, "loss": loss, "grad_norm": grad_norm}
    )


def dyn(run_id, grad_norm, loss, first_loss=10.0):
    return EarlyDynamics(run_id=run_id, grad_norm=grad_norm, loss=loss, steps=5, samples=100, first_loss=first_loss)


def test_rank_prefers_low_grad_norm_then_high_loss_among_learning_runs():
    ranked = rank_runs(
        [dyn("a", 2.0, 1.0), dyn("b", 1.0, 0.5), dyn("c", 1.01, 0.9), dyn("rising", 0.5, 30.0), dyn("flat", 0.4, 10.0)]
    )
    # b and c share a grad-norm bucket (within 5%): the higher loss wins. Runs whose loss did not
    # fall below their first step's are diverging and rank last, however low their grad norm.
    assert [d.run_id for d in ranked] == ["c", "b", "a", "flat", "rising"]


def test_early_window_uses_medians_up_to_the_probe():
    metrics = [step(32 * i, loss=float(i), grad_norm=100.0 if i == 1 else 1.0) for i in range(1, 11)]
    assert early_dynamics("r", metrics, probe_samples=160).diverging  # loss rose from 1 to a median of 3
    d = early_dynamics("r", metrics, probe_samples=160)
    assert (d.steps, d.samples, d.grad_norm, d.loss, d.first_loss) == (5, 160, 1.0, 3.0, 1.0)


def test_loss_slope_is_per_thousand_samples_over_the_rung_window():
    # loss = 5 - 0.002 * samples: -2 per 1,000 samples; the steps at or before 64 are outside the window
    metrics = [step(s, loss=100.0 if s == 32 else 5 - 0.002 * s) for s in (32, 64, 96, 128, 160)]
    assert loss_slope(metrics, since_samples=64, until_samples=160) == pytest.approx(-2.0)
    assert loss_slope(metrics, since_samples=128, until_samples=160) is None  # one step
    assert loss_slope([*metrics, step(192, loss=float("nan"))], 64, 192) == float("inf")


def result(run_id, *, score=None, slope=None, grad_norm=1.0, loss=5.0, stopped="", samples=100):
    return RungResult(
        run_id=run_id,
        rung=100,
        samples=samples,
        stopped=stopped,
        dynamics=None if stopped else dyn(run_id, grad_norm, loss),
        loss_slope=slope,
        eval_score=score,
    )


def test_each_pruner_ranks_by_its_own_signal_and_the_watchdog_stopped_go_last():
    results = [
        result("a", score=0.2, slope=-1.0, grad_norm=3.0),
        result("b", score=0.5, slope=-3.0, grad_norm=2.0),
        result("nan", stopped="non-finite loss at step 2"),
        result("c", score=0.4, slope=-2.0, grad_norm=1.0),
    ]
    assert rank("eval", results) == ["b", "c", "a", "nan"]
    assert rank("loss_slope", results) == ["b", "c", "a", "nan"]
    assert rank("dynamics", results) == ["c", "b", "a", "nan"]
    assert [keep_count(n, 2) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    # 4 runs at the rung, eta 2: the best 2 go on; with eta 1.5, 3 slots but the stopped run never goes on
    assert survivors("eval", results, 2) == ["b", "c"]
    assert survivors("eval", results, 1.5) == ["b", "c", "a"]


def test_validation_replays_each_pruners_halving_against_the_final_scores():
    rung1 = [result("a", score=0.1, slope=-3.0), result("b", score=0.2, slope=-2.0), result("c", score=0.3, slope=-1.0)]
    rung2 = [result(r.run_id, score=r.eval_score, slope=r.loss_slope, samples=200) for r in rung1]
    finals = {"a": 0.3, "b": 0.5, "c": 0.9}  # c wins; eval ranks c, b, a (right), loss_slope a, b, c (reversed)
    planned = {"a": 1000, "b": 1000, "c": 1000}
    by_eval = validate("eval", [rung1, rung2], 2, finals, planned)
    # rung 1 keeps ceil(3/2) = 2 (c, b; a stopped at 100 samples), rung 2 keeps ceil(2/2) = 1 (c; b stopped at 200)
    assert by_eval.survivors == ["c"] and by_eval.stopped_at == {"a": 100, "b": 200}
    assert by_eval.winner_survived is True and by_eval.spearman_first_rung == pytest.approx(1.0)
    assert by_eval.samples_saved == (1000 - 100) + (1000 - 200)
    by_slope = validate("loss_slope", [rung1, rung2], 2, finals, planned)
    assert by_slope.survivors == ["a"] and by_slope.winner_survived is False
    assert by_slope.spearman_first_rung == pytest.approx(-1.0)


def test_smoke_keeps_the_values_the_user_set():
    cfg = resolve("demo", None, {"training.learning_rate": 0.5, "training.epochs": 2}, smoke_run=True)
    assert cfg.training.learning_rate == 0.5 and cfg.training.epochs == 2
    assert cfg.training.effective_batch_size == 32  # what the user did not set is still shrunk
    assert resolve("demo", None, {}, smoke_run=True).training.learning_rate == 2e-3


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_halving_stops_the_diverging_run_at_the_first_rung_and_resumes_the_others_exactly(
    tmp_path, prefect_server, assets
):
    from flows.sweep import SweepResult, sweep
    from training.job import TrainJob
    from training.launch.local import run_training

    data = tmp_path / "phase05-320.jsonl"
    with open(assets.train_file("phase05")) as f:
        data.write_text("".join(islice(f, 320)))
    grid = {
        "phases": [[{"name": "p", "data": [str(data)], "objective": {"lab_knowledge/acc": 1.0}}]],
        "evaluation.tasks": [["lab_knowledge"]],
        "evaluation.limit": [20],
        "training.learning_rate": [1e-3, 2e-3, 0.5],  # 0.5 diverges
    }
    # Under smoke: EBS 32, 1 epoch. The validation slice (training.validation_samples 128, at most a
    # tenth of the phase) holds out 32 of the 320 rows -> 288 trained, 9 steps of 32 samples; the
    # rung pauses after step 4.
    trained = 320 - 320 // 10
    summary = sweep(
        recipe="demo",
        grid=grid,
        rungs=[128],
        eta=2,
        pruner="dynamics",
        storage_root=str(tmp_path),
        smoke=True,
        sweep_id="sh",
    )
    runs = {r.overrides["training.learning_rate"]: r for r in summary.runs}
    bad = runs[0.5]
    assert (bad.status, bad.stopped_at_rung, bad.samples_trained) == ("stopped", 128, 128)
    assert bad.final_objective is None and bad.rung_ranks == [3]
    assert summary.samples_planned == 3 * trained
    assert summary.samples_trained == 2 * trained + 128
    assert summary.samples_saved == trained - 128

    for lr in (1e-3, 2e-3):
        run = runs[lr]
        assert run.status == "finished" and run.samples_trained == trained and run.final_objective is not None
        phase = tmp_path / run.run_id / "p"
        metrics = read_jsonl(phase / "metrics.jsonl")
        # smoke kept the grid's learning rate: after the 2 warmup steps every step runs at it
        assert [m["lr"] for m in metrics[2:]] == [lr] * (trained // 32 - 2)
        # paused at the rung (a checkpoint there too), then resumed: the same steps as one uninterrupted run
        assert (phase / "checkpoints" / "samples_128" / "meta.json").exists()
        if lr != 2e-3:
            continue
        cfg = resolve(
            "demo",
            None,
            {k: v[0] for k, v in grid.items() if k != "training.learning_rate"} | {"training.learning_rate": lr},
            True,
        )
        straight = TrainJob(
            run_id="straight",
            phase="p",
            recipe=cfg,
            model_path=str(assets.base_model_dir),
            parent_checkpoint=str(assets.base_model_dir),
            data_dir=str(tmp_path / run.run_id / "data" / "p"),
            output_dir=str(tmp_path / f"straight-{lr}"),
        )
        run_training(straight, on_line=lambda _: None)
        reference = read_jsonl(Path(straight.output_dir) / "metrics.jsonl")
        assert [m["loss"] for m in metrics] == [m["loss"] for m in reference]
        assert [m["grad_norm"] for m in metrics] == [m["grad_norm"] for m in reference]
    # Re-running the sweep with the same id picks it up: nothing is trained again, the same summary.
    before = {r.run_id: (tmp_path / r.run_id / "p" / "metrics.jsonl").read_text() for r in summary.runs}
    again = sweep(
        recipe="demo",
        grid=grid,
        rungs=[128],
        eta=2,
        pruner="dynamics",
        storage_root=str(tmp_path),
        smoke=True,
        sweep_id="sh",
    )
    assert again.runs == summary.runs
    assert before == {r: (tmp_path / r / "p" / "metrics.jsonl").read_text() for r in before}
    written = json.loads((tmp_path / "sh" / "sweep.json").read_text())
    assert SweepResult.model_validate(written) == summary
    assert (tmp_path / "sh" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
