"""`lab` on a terminal: the log records that carry training's progress events drive a progress bar
per training task instead of scrolling; every other line still prints; off a terminal nothing changes."""

import io
import logging
import subprocess
import sys

from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.logging.loggers import PrefectLogAdapter

from core.records import ProgressEvent
from flows.progress import show_training_bars


def step(k: int, total: int = 5) -> ProgressEvent:
    return ProgressEvent(
        step=k, total_steps=total, samples_seen=32 * k, epoch=k / total, loss=3.0 / k, grad_norm=1.0, lr=1e-3
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_records_drive_a_bar_and_other_lines_print_above_it(monkeypatch):
    ensure_logging_setup()  # before the root's handlers are swapped for one writing to `terminal`
    terminal = Terminal()
    console = PrefectConsoleHandler(stream=terminal)
    monkeypatch.setattr(logging.getLogger(), "handlers", [console])
    assert show_training_bars(terminal) is not None

    # Prefect's adapter (what get_run_logger returns) keeps a call's own `extra` beside its task_run_name.
    task_log = PrefectLogAdapter(logging.getLogger("test.train"), {"task_run_name": "train-r1-phase00"})
    task_log.logger.setLevel(logging.INFO)
    task_log.info("launch: accelerate launch ...")
    for k in range(1, 6):
        task_log.info(step(k).line(), extra={"progress": step(k)})  # as the train task logs them
        if k == 3:
            task_log.info("checkpoint samples_96")

    out = terminal.getvalue()
    assert "launch: accelerate launch" in out and "checkpoint samples_96" in out
    assert "step 1/5" not in out  # no scrolling step lines on the console
    final = out.split("\r")[-1]  # the last redraw of the bar
    assert "train-r1-phase00: 100%" in final and "5/5" in final and "samples 160 loss 0.6000" in final
    checkpoint_at = out.index("checkpoint samples_96")
    assert (
        out.index("train-r1-phase00") < checkpoint_at < out.rindex("train-r1-phase00")
    )  # above the bar, which went on


def test_off_a_terminal_nothing_changes(monkeypatch):
    ensure_logging_setup()
    stream = io.StringIO()
    console = PrefectConsoleHandler(stream=stream)
    monkeypatch.setattr(logging.getLogger(), "handlers", [console])
    assert show_training_bars(stream) is None
    logging.getLogger("test.train").warning(step(1).line(), extra={"progress": step(1)})
    assert "step 1/5 samples 32 loss 3.0000" in stream.getvalue()


def test_the_bars_survive_prefect_configuring_its_logging_later():
    """`lab` installs the bars before any flow module imports Prefect in full."""
    script = """
import io, logging
class Terminal(io.StringIO):
    def isatty(self):
        return True
from core.records import ProgressEvent
from flows.progress import show_training_bars


def step(k: int, total: int = 5) -> ProgressEvent:
    return ProgressEvent(step=k, total_steps=total, samples_seen=32 * k, epoch=k / total, loss=3.0 / k, grad_norm=1.0, lr=1e-3)
assert show_training_bars(Terminal()) is not None
import flows.finetune  # what `lab run` imports next
print(sorted(type(f).__name__ for h in logging.getLogger().handlers for f in h.filters))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['StepBars']"
