"""The watchdog: a run whose loss or gradient norm goes bad stops with its reason, before the bad step lands."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import NoReturn

from accelerate import Accelerator

from core import records
from core.recipe import WatchdogConfig
from core.records import Stopped, WatchdogStop
from training.logs import RunLogs, log
from training.sampler import Step

EXIT_WATCHDOG = 3  # exit code of a run stopped by the watchdog (NaN/inf, a loss spike)


class Watchdog:
    """Stops a run whose loss or gradient norm is non-finite, or whose loss spikes above
    `loss_spike_factor` x the median of the last `window` steps."""

    def __init__(self, config: WatchdogConfig) -> None:
        self.config = config
        self.recent: list[float] = []

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            return f"non-finite {'loss' if not math.isfinite(loss) else 'grad_norm'} at step {step} (loss={loss}, grad_norm={grad_norm})"
        factor = self.config.loss_spike_factor
        if factor and len(self.recent) >= self.config.min_steps:
            median = statistics.median(self.recent[-self.config.window :])
            if loss > factor * median:
                return f"loss spike at step {step}: {loss:.4f} > {factor:g} x running median {median:.4f}"
        self.recent.append(loss)
        return None


def stop(accelerator: Accelerator, out: Path, logs: RunLogs, step: Step, reason: str) -> NoReturn:
    """End the run for the watchdog: the reason goes to metrics.jsonl and stopped.json."""
    logs.stopped(WatchdogStop(step=step.index, samples_seen=step.samples_seen, stopped=reason))
    if accelerator.is_main_process:
        stopped = Stopped(step=step.index, samples_seen=step.samples_seen, reason=reason)
        (out / records.STOPPED).write_text(records.dumps(stopped) + "\n")
    logs.close()
    log(accelerator, f"watchdog: {reason}")
    accelerator.end_training()  # closes the tracker runs
    sys.exit(EXIT_WATCHDOG)
