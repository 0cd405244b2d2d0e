"""Progress bars for `lab` on a terminal.

The train task logs a line per optimizer step of training (the Prefect UI and API keep them
all), carrying the step's typed record (`extra={"progress": core.records.ProgressEvent}`, read
from the run's progress.jsonl). On a terminal that is a wall of scrolling lines, so `lab`
routes the records that carry one, on the console only, into one tqdm bar per training task
(named `train-<run>-<phase>`) with the latest loss; every other log line is printed above the bars.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from tqdm import tqdm

from core.records import ProgressEvent


class StepBars(logging.Filter):
    """A console-handler filter: records carrying a ProgressEvent update a bar and are not printed."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.bars: dict[str, tqdm] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "progress", None)
        if not isinstance(event, ProgressEvent):
            return True
        name = getattr(record, "task_run_name", None) or record.name
        bar = self.bars.get(name)
        if bar is None:
            bar = self.bars[name] = tqdm(
                total=event.total_steps, desc=name, unit="step", file=self.stream, dynamic_ncols=True
            )
        bar.set_postfix_str(f"samples {event.samples_seen} loss {event.loss:.4f}", refresh=False)
        bar.update(event.step - bar.n)  # a resumed launch starts past 0
        if event.step == event.total_steps:
            bar.close()
            del self.bars[name]
        return False


def show_training_bars(stream: TextIO = sys.stderr) -> StepBars | None:
    """Put training progress into bars on Prefect's console handler, when `stream` is a terminal."""
    if not stream.isatty():
        return None
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # else Prefect creates its console handler later, when a flow module imports it
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    if not consoles:  # a user's own logging config: leave it alone
        return None
    bars = StepBars(stream)
    for handler in consoles:
        handler.addFilter(bars)
        emit = handler.emit
        # Other lines are written with the bars cleared, then the bars are redrawn below them.
        handler.emit = lambda record, emit=emit: _above_bars(emit, record, stream)
    return bars


def _above_bars(emit, record: logging.LogRecord, stream: TextIO) -> None:
    with tqdm.external_write_mode(file=stream):
        emit(record)
