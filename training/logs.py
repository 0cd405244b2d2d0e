"""What a run writes as it goes: its per-step files, the lines people read, and the measures in them.

Per step: metrics.jsonl (core.records.StepMetrics) and progress.jsonl (ProgressEvent, what the
launcher reports to its caller) on rank 0; samples/rank<r>.jsonl (SamplesLine) and
saves/rank<r>.jsonl (SaveLine, training.checkpoint.recorded_save) on every rank. Programs read
these files; rank 0's stdout is for people only (nothing parses it).
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from accelerate import Accelerator

from core import records
from core.records import ProgressEvent, SamplesLine, StepMetrics, WatchdogStop

# Dense bf16 peak FLOP/s per GPU (no sparsity), matched in order against the device name.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]


class RunLogs:
    """The run's per-step files, opened after a resume's load: the steps after `done_steps` are
    dropped first (a resumed run redoes them; a fresh run keeps nothing)."""

    def __init__(self, out: Path, rank: int, main_process: bool, done_steps: int) -> None:
        self.metrics = open_jsonl(out / records.METRICS, records.MetricsLine, done_steps) if main_process else None
        self.progress = open_jsonl(out / records.PROGRESS, ProgressEvent, done_steps) if main_process else None
        # Each rank records the sample ids it trained on: proof of no repeats or gaps, and of disjoint ranks.
        self.samples = open_jsonl(out / "samples" / f"rank{rank}.jsonl", SamplesLine, done_steps)
        self.saves = open_jsonl(out / "saves" / f"rank{rank}.jsonl", records.SaveLine, done_steps)

    def step(self, metrics: StepMetrics, progress: ProgressEvent, ids: list[str]) -> None:
        """One step: its sample ids (every rank), its metrics and progress (rank 0)."""
        append(self.samples, SamplesLine(step=metrics.step, ids=ids))
        if self.metrics and self.progress:
            append(self.metrics, metrics)
            append(self.progress, progress)

    def stopped(self, line: WatchdogStop) -> None:
        if self.metrics:
            append(self.metrics, line)

    def close(self) -> None:
        for f in (self.samples, self.saves, self.metrics, self.progress):
            if f:
                f.close()


def append(f: TextIO, record: records.Record) -> None:
    f.write(records.dumps(record) + "\n")
    f.flush()


def open_jsonl(path: Path, kind: Any, keep_through_step: int) -> TextIO:
    """Append to a per-step JSONL log of `kind` records, first dropping the steps after
    `keep_through_step` (a resumed run redoes them; a fresh run keeps nothing).

    The kept lines go to a new file swapped in by rename: a kill cannot lose them, and a reader
    tailing the log (training.launch.files.RunFiles) sees a new file instead of a rewrite under its offset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if keep_through_step and path.exists():
        kept = [line for line in records.read_lines(kind, path) if line.step <= keep_through_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(records.dumps(line) + "\n" for line in kept))
    os.replace(tmp, path)
    return open(path, "a")


def log(accelerator: Accelerator, message: str) -> None:
    """A line for people on rank 0's stdout."""
    if accelerator.is_main_process:
        write_line(message)


def write_line(message: str) -> None:
    """One write per line: the ranks share an unbuffered pipe (PYTHONUNBUFFERED), where print's
    separate write of "\n" lets another rank's output land inside another's line."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank so far: allocated tensors on a GPU, the process's peak RSS on CPU.

    VmHWM (Linux), not ru_maxrss: ru_maxrss survives exec, so a process started from a big
    parent would report the parent's size at fork time.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if Path("/proc/self/status").exists():
        return max(host_memory_bytes("VmHWM"), _host_peak_before_reset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def peak_bf16_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of this GPU, for MFU; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# The process's peak RSS before the last reset_host_peak(): peak_memory_bytes reports the run's peak.
_host_peak_before_reset = 0


def host_memory_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status (Linux; 0 elsewhere)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    line = next(line for line in status.read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def reset_host_peak() -> bool:
    """Restart the peak RSS (VmHWM) from the current RSS, keeping the run's peak for
    peak_memory_bytes; False where the kernel does not allow it."""
    global _host_peak_before_reset
    peak = host_memory_bytes("VmHWM")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (proc(5))
    except OSError:
        return False
    _host_peak_before_reset = max(_host_peak_before_reset, peak)
    return True
