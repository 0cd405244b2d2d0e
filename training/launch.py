"""Run `training.train` under `accelerate launch` as a subprocess that we own.

The subprocess gets its own process group (session) and is killed as a group on every exit
path that is not a clean finish: an exception, a timeout, a cancel (SIGTERM) of the caller.
Rank-0 output is streamed line by line to a callback (the Prefect task logs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

from training.recipe import LaunchConfig
from training.train import EXIT_WATCHDOG, TrainJob


class TrainingFailed(RuntimeError):
    """The training subprocess exited non-zero; the message holds its last output lines."""


def accelerate_config(launch: LaunchConfig) -> dict:
    """accelerate's config file for the recipe's launch settings.

    CPU multi-process must be MULTI_GPU plus ACCELERATE_USE_CPU (see `launch_env`): a MULTI_CPU
    config or `--cpu` silently runs a single process (NOTES.md).
    """
    distributed = launch.num_processes > 1
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if distributed else "NO",
        "num_processes": launch.num_processes,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": "no",
        "use_cpu": launch.backend == "cpu",
        "gpu_ids": "all",
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
    }


def launch_env(launch: LaunchConfig) -> dict[str, str]:
    env = dict(os.environ)
    if launch.backend == "cpu":
        if launch.num_processes > 1:  # gloo DDP on CPU; with one process it breaks PartialState
            env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.num_processes)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_command(config_file: Path, job_file: Path, launch: LaunchConfig) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if launch.num_processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(launch.num_processes)]
    if launch.backend == "cpu" and launch.num_processes == 1:
        cmd += ["--cpu"]
    return cmd + ["-m", "training.train", "--config", str(job_file)]


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Delete checkpoint directories that have no meta.json (a crash mid-save)."""
    removed = []
    for path in sorted((output_dir / "checkpoints").glob("samples_*")):
        if not (path / "meta.json").exists():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories with meta.json, ordered by samples seen."""
    found = [p for p in (output_dir / "checkpoints").glob("samples_*") if (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("samples_")))


def start_training(job: TrainJob) -> subprocess.Popen:
    """Write job.json and accelerate.yaml into the phase directory and start the launch in
    its own process group (session), so that all ranks can be killed at once."""
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    job_file = output_dir / "job.json"
    job_file.write_text(job.model_dump_json(indent=2))
    config_file = output_dir / "accelerate.yaml"
    config_file.write_text(yaml.safe_dump(accelerate_config(job.recipe.launch)))
    return subprocess.Popen(
        launch_command(config_file, job_file, job.recipe.launch),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=launch_env(job.recipe.launch),
        start_new_session=True,
    )


def run_training(
    job: TrainJob,
    on_line: Callable[[str], None] = print,
    timeout_s: float | None = None,
) -> list[Path]:
    """Launch one phase's training (resuming from its rolling state if there is one), stream
    its output, and return its complete checkpoints. Raises TrainingFailed."""
    proc = start_training(job)
    on_line("launch: " + " ".join(proc.args))
    tail: deque[str] = deque(maxlen=40)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            on_line(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=timeout_s)
        reader.join()
    except BaseException:  # timeout, cancel, KeyboardInterrupt: no rank may outlive us
        kill_group(proc)
        raise
    finally:
        remove_incomplete_checkpoints(Path(job.output_dir))
    if returncode != 0:
        what = "stopped by the watchdog" if returncode == EXIT_WATCHDOG else f"failed (exit {returncode})"
        raise TrainingFailed(f"training of phase {job.phase} {what}:\n" + "\n".join(tail))
    return complete_checkpoints(Path(job.output_dir))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
