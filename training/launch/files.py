"""A training run's files while it runs (never its output): what the launcher reports to its caller.

New progress events (progress.jsonl, core.records.ProgressEvent), checkpoints whose meta.json
landed, and how a run that ended early ended (stopped.json, preempted.json).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from core import records
from core.records import Preempted, ProgressEvent
from training.launch.checkpoints import complete_checkpoints


class TrainingFailed(RuntimeError):
    """The training subprocess exited non-zero; the message holds its last output lines."""


class TrainingStopped(RuntimeError):
    """The caller asked the training to stop (its `stop` event); the training was killed."""


class RunFiles:
    """What a training run has written so far, read from its files (never from its output):
    new lines of progress.jsonl and newly complete checkpoints (meta.json landed)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.progress_offset = 0  # bytes of progress.jsonl read so far
        self.progress_lines = 0  # lines of it read so far: a bad line is named by its number
        self.progress_inode: int | None = None
        self.reported: set[str] = set()

    def new_progress(self) -> list[ProgressEvent]:
        path = self.output_dir / records.PROGRESS
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return []
        with f:
            inode = os.fstat(f.fileno()).st_ino
            f.seek(0, os.SEEK_END)
            # A resumed launch swaps in a new file (training.logs.open_jsonl): read it from the start.
            if inode != self.progress_inode or f.tell() < self.progress_offset:
                self.progress_inode, self.progress_offset, self.progress_lines = inode, 0, 0
            f.seek(self.progress_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        events = records.parse_lines(ProgressEvent, complete.decode(), str(path), first_line=self.progress_lines + 1)
        self.progress_offset += len(complete)
        self.progress_lines += complete.count(b"\n")
        return events

    def new_checkpoints(self) -> list[Path]:
        fresh = [p for p in complete_checkpoints(self.output_dir) if p.name not in self.reported]
        self.reported.update(p.name for p in fresh)
        return fresh

    def report(
        self,
        on_progress: Callable[[ProgressEvent], None] | None,
        on_checkpoint: Callable[[Path], None] | None,
    ) -> None:
        """Hand what is new since the last call to the callbacks: progress first, then checkpoints."""
        for event in self.new_progress():
            if on_progress:
                on_progress(event)
        for checkpoint in self.new_checkpoints():
            if on_checkpoint:
                on_checkpoint(checkpoint)


def forget_early_end(output_dir: Path) -> None:
    """A watchdog stop or a preemption of an earlier launch: this one may get further."""
    for name in (records.STOPPED, records.PREEMPTED):
        (output_dir / name).unlink(missing_ok=True)


def ended_how(output_dir: Path, otherwise: str) -> str:
    """Why a training run ended early, from the files its ranks wrote."""
    if (output_dir / records.STOPPED).exists():
        return "stopped by the watchdog"
    if (output_dir / records.PREEMPTED).exists():
        step = records.read(Preempted, output_dir / records.PREEMPTED).step
        return f"preempted (SIGTERM): the rolling state was saved after step {step}; a relaunch resumes there"
    return otherwise
