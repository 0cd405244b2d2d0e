"""The GPUs this machine has, and how training and evaluation share them (`evaluation.devices`).

Found without importing torch where there is no NVIDIA driver (a CPU machine): the orchestrating
process loads torch only to count the GPUs of a machine that has some.
"""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path

from core.recipe import LaunchConfig, Recipe


def device_env(devices: str, visible: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(training's, evaluation's) environment updates for `evaluation.devices`.

    'cpu:N': evaluation gets N threads and no GPU; training is unchanged. 'cuda:I,J': evaluation
    gets those of the `visible` GPUs (indices into it), training the others.
    """
    kind, _, value = devices.partition(":")
    if kind == "cpu":
        return {}, {"OMP_NUM_THREADS": value, "CUDA_VISIBLE_DEVICES": ""}
    taken = [int(i) for i in value.split(",")]
    if max(taken) >= len(visible):
        raise ValueError(f"evaluation.devices {devices!r}: only {len(visible)} GPUs visible ({visible})")
    evaluation = [visible[i] for i in taken]
    training = [gpu for gpu in visible if gpu not in evaluation]
    if not training:
        raise ValueError(f"evaluation.devices {devices!r} takes every visible GPU ({visible}); none is left to train")
    return {"CUDA_VISIBLE_DEVICES": ",".join(training)}, {"CUDA_VISIBLE_DEVICES": ",".join(evaluation)}


def training_launch(recipe: Recipe) -> LaunchConfig:
    """The launch training runs. launch.num_processes counts the node's GPUs; those that
    evaluation.devices reserves ('cuda:7' of eight) train no rank, so training runs the others
    (7): accelerate's num_processes and DeepSpeed's batch follow, and the effective batch, split
    across the ranks by the sampler, stays exact."""
    devices, launch = recipe.evaluation.devices, recipe.launch
    if not devices or not devices.startswith("cuda:"):
        return launch
    reserved = [int(i) for i in devices.removeprefix("cuda:").split(",")]
    if max(reserved) >= launch.num_processes:
        raise ValueError(
            f"evaluation.devices {devices!r}: the node has launch.num_processes {launch.num_processes} GPUs "
            f"(cuda:0 to cuda:{launch.num_processes - 1})"
        )
    if len(set(reserved)) >= launch.num_processes:
        raise ValueError(f"evaluation.devices {devices!r} takes every GPU of the node; none is left to train")
    return launch.model_copy(update={"num_processes": launch.num_processes - len(set(reserved))})


def training_recipe(recipe: Recipe) -> Recipe:
    """The recipe with the launch training runs (`training_launch`)."""
    return recipe.model_copy(update={"launch": training_launch(recipe)})


def training_devices(recipe: Recipe, visible: list[str]) -> dict[str, str]:
    """The training launch's environment update: with GPUs reserved for evaluation, the others of
    the node's `visible` GPUs, as many as it has ranks."""
    devices = recipe.evaluation.devices
    if not devices or not devices.startswith("cuda:"):
        return {}
    ranks = training_launch(recipe).num_processes
    training = device_env(devices, visible[: recipe.launch.num_processes])[0]["CUDA_VISIBLE_DEVICES"].split(",")
    return {"CUDA_VISIBLE_DEVICES": ",".join(training[:ranks])}


def training_slots(recipe: Recipe, visible: list[str]) -> list[dict[str, str]]:
    """What training leaves free when it ends, as environment updates for one evaluation worker
    per local rank: its GPU when it trained on GPUs, else one CPU thread each."""
    ranks = training_launch(recipe).num_processes
    if visible:
        gpus = training_devices(recipe, visible).get("CUDA_VISIBLE_DEVICES", ",".join(visible[:ranks]))
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus.split(",")]
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return [{"OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}] * ranks


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (CUDA_VISIBLE_DEVICES, else all)."""
    count = cuda_device_count()
    if not count:
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(count)]


def cuda_device_count() -> int:
    """torch's count of the CUDA devices this process sees; 0 without an NVIDIA driver (not asked)."""
    if not nvidia_driver():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@cache
def nvidia_driver() -> bool:
    """Whether an NVIDIA driver is installed: its /proc entry (also mounted into GPU containers) or its nvidia-smi."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None
