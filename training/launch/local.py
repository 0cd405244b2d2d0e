"""A local launch: `training.train` under `accelerate launch` as a subprocess that we own.

The subprocess gets its own process group (session) and is killed as a group on every exit
path that is not a clean finish: an exception, a timeout, a cancel (SIGTERM) of the caller.
Rank-0 output is streamed line by line to a callback (the Prefect task logs it, for people);
progress and complete checkpoints are read from the run's files (training.launch.files).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import psutil

from core.recipe import LaunchConfig
from core.records import ProgressEvent
from training.job import TrainJob
from training.launch.checkpoints import complete_checkpoints, remove_incomplete_checkpoints
from training.launch.config import node_env, write_launch_files
from training.launch.devices import cuda_device_count, training_devices, visible_gpus
from training.launch.files import RunFiles, TrainingFailed, TrainingStopped, ended_how, forget_early_end


def launch_env(launch: LaunchConfig, grace_s: int) -> dict[str, str]:
    env = {**os.environ, **node_env(launch, grace_s)}
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:  # the user's own allocator settings win
        env["PYTORCH_CUDA_ALLOC_CONF"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    if launch.backend == "cpu" or not cuda_device_count():
        # Measured on 2 cores: 1 thread per rank trained 24x faster than 2 (oversubscription).
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_training(job: TrainJob) -> subprocess.Popen:
    """Start the launch in its own process group (session), so that all ranks can be killed
    at once. GPUs that `evaluation.devices` gives to evaluation are hidden from it."""
    env = launch_env(job.recipe.launch, job.grace_s)
    env.update(training_devices(job.recipe, visible_gpus()))
    return subprocess.Popen(
        write_launch_files(job),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def run_training(
    job: TrainJob,
    on_line: Callable[[str], None] = print,
    timeout_s: float | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    poll_s: float = 0.5,
    stop: threading.Event | None = None,
) -> list[Path]:
    """Launch one phase's training (resuming from its rolling state if there is one), stream
    its output to `on_line`, and return its complete checkpoints. Raises TrainingFailed, or
    TrainingStopped when `stop` is set (checked every `poll_s`).

    Progress and checkpoints are read from the run's files every `poll_s`: `on_progress` gets
    each new progress.jsonl event, `on_checkpoint` each checkpoint whose meta.json landed
    (including ones an earlier launch left), once. Both run in the caller's thread; an exception
    from either kills the training group and propagates. (Under a cluster scheduler the phase is
    a cluster job instead: training.scheduler.run_scheduled.)"""
    forget_early_end(Path(job.output_dir))
    proc = start_training(job)
    on_line("launch: " + " ".join(proc.args))
    tail: deque[str] = deque(maxlen=40)
    # The first traceback is a rank's own error; with several ranks the launcher's long echo of
    # it can push it out of the tail, so it is kept apart: (line number where it starts, lines).
    lines_read, first_error_at = 0, -1
    first_error: list[str] = []

    def pump() -> None:
        nonlocal lines_read, first_error_at
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if first_error_at < 0 and "Traceback (most recent call last)" in line:  # also "[rank1]: Traceback ..."
                first_error_at = lines_read
            if first_error_at >= 0 and len(first_error) < 40:
                first_error.append(line)
            lines_read += 1
            tail.append(line)
            on_line(line)

    files = RunFiles(Path(job.output_dir))
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                returncode = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                if stop is not None and stop.is_set():
                    raise TrainingStopped(f"training of phase {job.phase} stopped by its run") from None
                files.report(on_progress, on_checkpoint)
        reader.join()
        files.report(on_progress, on_checkpoint)  # what the last poll missed
    except BaseException:  # timeout, cancel, a callback's error, KeyboardInterrupt: no rank may outlive us
        kill_group(proc)
        raise
    finally:
        remove_incomplete_checkpoints(Path(job.output_dir))
    if returncode != 0:
        # stopped.json / preempted.json, not the exit code: accelerate's launchers turn a rank's exit code into 1.
        what = ended_how(Path(job.output_dir), f"failed (exit {returncode})")
        scrolled_out = 0 <= first_error_at < lines_read - len(tail)
        shown = [*first_error, "...", *tail] if scrolled_out else list(tail)
        raise TrainingFailed(f"training of phase {job.phase} {what}:\n" + "\n".join(shown))
    return complete_checkpoints(Path(job.output_dir))


def kill_group(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """Stop the training group without a save: SIGINT (a SIGTERM would make the ranks save the
    rolling state first, as for a preemption), SIGKILL after `timeout_s`. Returns once the ranks
    are gone too, not only the launcher: it can exit before them, and a caller that goes on (a
    failed phase, a rerun) must not find them still writing. The run resumes from its last
    rolling state."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    if not group_ended(proc, timeout_s):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        group_ended(proc, timeout_s)


def group_ended(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to `timeout_s` until no process of the launcher's group is running; whether none is."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)
    while any(p.info["status"] != psutil.STATUS_ZOMBIE for p in group_members(proc.pid)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # the ranks are not our children: there is no wait() to block on
    return proc.poll() is not None


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):  # gone meanwhile
            if os.getpgid(p.pid) == pgid:
                members.append(p)
    return members
