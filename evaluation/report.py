"""Run reports: the per-phase table (markdown + csv) and plots (PNG).

Samples on the x axis are cumulative over the run: a phase's curve starts where the previous
phases' samples end, as in the paper's figures, so phased and stacked runs share an axis.
"""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import pandas as pd
from pydantic import BaseModel, Field

from core import records, storage
from core.records import StepMetrics
from evaluation.selection import Selection


def read_metrics(phase_uri: str) -> list[StepMetrics]:
    """The phase's optimizer steps from its metrics.jsonl (a watchdog's closing line is left out:
    stopped.json has the verdict)."""
    uri = storage.join(phase_uri, records.METRICS)
    if not storage.exists(uri):
        return []
    lines = records.parse_lines(records.MetricsLine, storage.read_text(uri), uri)
    return [m for m in lines if isinstance(m, StepMetrics)]


def training_seconds(metrics: list[StepMetrics]) -> float:
    """Training wall time from the cumulative wall_s of metrics.jsonl (a resume restarts it)."""
    total, previous = 0.0, 0.0
    for m in metrics:
        total += m.wall_s - previous if m.wall_s >= previous else m.wall_s
        previous = m.wall_s
    return total


class PhaseSummary(BaseModel):
    """A row of a run's summary: the base model, or a phase's selected model."""

    phase: str = Field(description="The phase, or base for the recipe's base model.")
    selected: str = Field(description="The selected model's name: samples_<N>, avg_last<k> or base.")
    samples: int = Field(description="Into its phase.")
    run_samples: int = Field(description="Cumulative over the run's phases.")
    objective: float | None = None
    start_objective: float | None = Field(None, description="The phase's start model's objective.")
    gate: str = Field("", description="pass or FAIL (empty for the base model).")
    train_wall_s: float | None = None
    metrics: dict[str, float] = Field(description="Every evaluated metric, suite/metric -> value.")

    def row(self) -> dict[str, Any]:
        """The table row: the metrics as columns of their own."""
        return {**self.model_dump(exclude={"metrics"}), **self.metrics}


def phase_rows(run_uri: str, phases: list[str]) -> tuple[list[PhaseSummary], list[dict], list[dict]]:
    """(summary rows, per-step rows, per-checkpoint rows) with cumulative samples."""
    summary, steps, checkpoints = [], [], []
    offset = 0
    for phase in phases:
        phase_uri = storage.join(run_uri, phase)
        selection = Selection.model_validate(storage.read_json(storage.join(phase_uri, "selection.json")))
        metrics = read_metrics(phase_uri)
        for m in metrics:
            steps.append({"phase": phase, "run_samples": offset + m.samples_seen, **m.model_dump()})
        # A later phase's start is the previous phase's winner, already counted there.
        for c in [selection.start, *selection.candidates] if phase == phases[0] else selection.candidates:
            checkpoints.append({"phase": phase, "checkpoint": c.name, "run_samples": offset + c.samples, **c.metrics})
        if phase == phases[0]:  # the base model, for "did training move the metrics?"
            s = selection.start
            summary.append(
                PhaseSummary(
                    phase="base",
                    selected=s.name,
                    samples=0,
                    run_samples=0,
                    metrics={k: round(v, 4) for k, v in s.metrics.items()},
                )
            )
        w = selection.winner
        summary.append(
            PhaseSummary(
                phase=phase,
                selected=w.name,
                samples=w.samples,
                run_samples=offset + w.samples,
                objective=round(w.objective, 4),
                start_objective=round(selection.start.objective, 4),
                gate="pass" if selection.gate.passed else "FAIL",
                train_wall_s=round(training_seconds(metrics), 2),
                metrics={k: round(v, 4) for k, v in w.metrics.items()},
            )
        )
        offset += metrics[-1].samples_seen if metrics else 0
    return summary, steps, checkpoints


TIDY_COLUMNS = ["run", "phase", "checkpoint", "samples", "suite", "task", "metric", "value", "stderr"]


def results_table(run_uri: str, phases: list[str]) -> pd.DataFrame:
    """Every evaluation result of a run as one tidy table (one row per metric value)."""
    run = run_uri.rstrip("/").rsplit("/", 1)[-1]
    fs, _ = storage.filesystem(run_uri)
    rows = []
    for phase in phases:
        for path in sorted(fs.glob(storage.filesystem(storage.join(run_uri, phase, "eval", "*", "*.json"))[1])):
            # lm_eval.json, mt_bench.json: every suite's file carries a flat "metrics" dict
            checkpoint, suite = path.split("/")[-2], path.rsplit("/", 1)[-1].removesuffix(".json")
            with fs.open(path) as f:
                result = json.load(f)
            for key, value in result["metrics"].items():
                task, metric = key.split("/", 1)
                samples = int(checkpoint.removeprefix("samples_")) if checkpoint.startswith("samples_") else 0
                rows.append(
                    dict(
                        run=run,
                        phase=phase,
                        checkpoint=checkpoint,
                        samples=samples,
                        suite=suite,
                        task=task,
                        metric=metric,
                        value=value,
                        stderr=result.get("stderr", {}).get(key),
                    )
                )
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def save_png(fig: plt.Figure, uri: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fs, path = storage.filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())


def plot_training(steps: pd.DataFrame, title: str, uri: str) -> None:
    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for phase, rows in steps.groupby("phase", sort=False):
        ax_loss.plot(rows["run_samples"], rows["loss"], label=phase)
        ax_grad.plot(rows["run_samples"], rows["grad_norm"], label=phase)
    ax_loss.set_ylabel("loss (token mean)")
    ax_grad.set_ylabel("grad norm (before clip)")
    ax_grad.set_xlabel("samples seen (cumulative)")
    ax_loss.set_title(title)
    ax_loss.legend()
    save_png(fig, uri)


def plot_scores(checkpoints: pd.DataFrame, metrics: list[str], title: str, uri: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for metric in metrics:
        if metric in checkpoints:
            ax.plot(checkpoints["run_samples"], checkpoints[metric], marker="o", label=metric)
    ax.set_xlabel("samples seen (cumulative)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    save_png(fig, uri)


def write_table(out_uri: str, name: str, rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """<out>/<name>.csv and <name>.md of a table."""
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    storage.write_text(storage.join(out_uri, f"{name}.csv"), table.to_csv(index=False))
    storage.write_text(storage.join(out_uri, f"{name}.md"), table.to_markdown(index=False) + "\n")
    return table


def plot_sweep(metrics: dict[str, list[StepMetrics]], stopped: set[str], uri: str) -> None:
    """Grad norm and loss of every run of a sweep (first phase); stopped runs dashed."""
    fig, (ax_grad, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run_id, steps in metrics.items():
        style = "--" if run_id in stopped else "-"
        x = [m.samples_seen for m in steps]
        ax_grad.plot(x, [m.grad_norm for m in steps], style, label=run_id)
        ax_loss.plot(x, [m.loss for m in steps], style, label=run_id)
    ax_grad.set_yscale("log")
    ax_grad.set_title("grad norm (dashed: stopped early)")
    ax_loss.set_title("loss")
    for ax in (ax_grad, ax_loss):
        ax.set_xlabel("samples seen")
    ax_loss.legend(fontsize=7)
    save_png(fig, uri)


def write_run_report(
    run_uri: str, phases: list[str], metrics: list[str]
) -> tuple[list[PhaseSummary], pd.DataFrame, pd.DataFrame]:
    """Write <run>/report/: summary.{md,csv}, checkpoints.csv, results.parquet (tidy),
    training.png, scores.png. Return (summary, its table, tidy results)."""
    summary, steps, checkpoints = phase_rows(run_uri, phases)
    report = storage.join(run_uri, "report")
    table = write_table(report, "summary", [s.row() for s in summary])
    storage.write_text(storage.join(report, "checkpoints.csv"), pd.DataFrame(checkpoints).to_csv(index=False))
    tidy = results_table(run_uri, phases)
    fs, path = storage.filesystem(storage.join(report, "results.parquet"))
    with fs.open(path, "wb") as f:
        tidy.to_parquet(f, index=False)
    name = run_uri.rstrip("/").rsplit("/", 1)[-1]
    if steps:
        plot_training(pd.DataFrame(steps), f"{name}: training dynamics", storage.join(report, "training.png"))
    plot_scores(pd.DataFrame(checkpoints), metrics, f"{name}: score per checkpoint", storage.join(report, "scores.png"))
    return summary, table, tidy


def sample_efficiency(curves: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per run and metric: the best checkpoint score and the cumulative samples needed to
    first reach it (the paper's Table 2 'samples to peak')."""
    rows = []
    for label, run in curves.groupby("run", sort=False):
        for metric in metrics:
            best = run[metric].max()
            first = run[run[metric] == best]["run_samples"].min()
            rows.append({"run": label, "metric": metric, "best": round(float(best), 4), "samples_to_peak": int(first)})
    return pd.DataFrame(rows)


def write_comparison(
    out_uri: str, runs: dict[str, str], phases: dict[str, list[str]], metrics: list[str]
) -> pd.DataFrame:
    """Compare runs (e.g. phased vs stacked): one row per run's phase, and overlaid score curves."""
    rows, curves = [], []
    for label, run_uri in runs.items():
        summary, _, checkpoints = phase_rows(run_uri, phases[label])
        rows += [{"run": label, **s.row()} for s in summary]
        curves += [{"run": label, **c} for c in checkpoints]
    table = write_table(out_uri, "comparison", rows)
    frame = pd.DataFrame(curves)
    write_table(out_uri, "sample_efficiency", sample_efficiency(frame, metrics))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        for label, rows_of_run in frame.groupby("run", sort=False):
            if metric in rows_of_run:
                ax.plot(rows_of_run["run_samples"], rows_of_run[metric], marker="o", label=label)
        ax.set_title(metric)
        ax.set_xlabel("samples seen (cumulative)")
        ax.legend()
    save_png(fig, storage.join(out_uri, "comparison.png"))
    return table
