"""`lab` on a terminal: training's step lines drive a progress bar per training task instead of
scrolling; every other line still prints; off a terminal nothing changes."""

import io
import logging
import subprocess
import sys

from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import PrefectConsoleHandler

from flows.progress import show_training_bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_step_lines_drive_a_bar_and_other_lines_print_above_it(monkeypatch):
    ensure_logging_setup()  # before the root's handlers are swapped for one writing to `terminal`
    terminal = Terminal()
    console = PrefectConsoleHandler(stream=terminal)
    monkeypatch.setattr(logging.getLogger(), "handlers", [console])
    assert show_training_bars(terminal) is not None

    task_log = logging.LoggerAdapter(logging.getLogger("test.train"), {"task_run_name": "train-r1-phase00"})
    task_log.logger.setLevel(logging.INFO)
    task_log.info("launch: accelerate launch ...")
    for step in range(1, 6):
        task_log.info(f"step {step}/5 samples {32 * step} loss {3.0 / step:.4f} grad_norm 1.000 lr 0.001")
        if step == 3:
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
    logging.getLogger("test.train").warning("step 1/5 samples 32 loss 3.0000")
    assert "step 1/5 samples 32" in stream.getvalue()


def test_the_bars_survive_prefect_configuring_its_logging_later():
    """`lab` installs the bars before any flow module imports Prefect in full."""
    script = """
import io, logging
class Terminal(io.StringIO):
    def isatty(self):
        return True
from flows.progress import show_training_bars
assert show_training_bars(Terminal()) is not None
import flows.finetune  # what `lab run` imports next
print(sorted(type(f).__name__ for h in logging.getLogger().handlers for f in h.filters))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['StepBars']"
