"""The sweep flow: early termination by training dynamics, on the tiny model."""

import json

import pytest

from evaluation.dynamics import EarlyDynamics, early_dynamics, rank_runs, spearman


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
    metrics = [
        {"step": i, "samples_seen": 32 * i, "loss": float(i), "grad_norm": 100.0 if i == 1 else 1.0}
        for i in range(1, 11)
    ]
    assert early_dynamics("r", metrics, probe_samples=160).diverging  # loss rose from 1 to a median of 3
    d = early_dynamics("r", metrics, probe_samples=160)
    assert (d.steps, d.samples, d.grad_norm, d.loss, d.first_loss) == (5, 160, 1.0, 3.0, 1.0)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [5, 5]) is None


@pytest.mark.slow
def test_a_sweep_stops_the_bad_run_early_finishes_the_best_and_accounts_compute(tmp_path, prefect_server, assets):
    from flows.sweep import sweep

    knowledge_only = {
        "name": "phase05",
        "data": ["embedded://curriculum/phase05/train.jsonl"],
        "objective": {"lab_knowledge/acc": 1.0},
    }
    summary = sweep(
        recipe="demo",
        grid={
            "phases": [[knowledge_only]],
            "training.epochs": [1],
            "checkpointing.save_every_samples": [800],
            "evaluation.tasks": [["lab_knowledge"]],
            "evaluation.limit": [60],
            "training.learning_rate": [1e-3, 2e-3, 0.5],  # 0.5 is far too high
        },
        probe_samples=320,
        stop_fraction=0.34,
        storage_root=str(tmp_path),
        sweep_id="sw",
    )
    runs = {r["overrides"]["training.learning_rate"]: r for r in summary["runs"]}
    bad = runs[0.5]
    assert bad["status"] == "stopped"
    assert bad["samples_trained"] <= bad["samples_planned"] / 2
    assert bad["samples_planned"] == 1624  # phase05: 1,624 samples x 1 epoch
    assert bad["final_objective"] is None
    for lr in (1e-3, 2e-3):
        assert runs[lr]["status"] == "finished" and runs[lr]["samples_trained"] == 1624
    best = max((r for r in summary["runs"] if r["final_objective"] is not None), key=lambda r: r["final_objective"])
    assert summary["winner"] == best["run_id"] and summary["winner_survived"] is True
    assert summary["samples_saved"] == 1624 - bad["samples_trained"]
    assert summary["samples_trained"] == 1624 * 2 + bad["samples_trained"]
    assert summary["train_seconds_saved"] > 0
    written = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert written["samples_saved"] == summary["samples_saved"]
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
