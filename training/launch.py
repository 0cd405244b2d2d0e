"""Run `training.train` under `accelerate launch` as a subprocess that we own.

The subprocess gets its own process group (session) and is killed as a group on every exit
path that is not a clean finish: an exception, a timeout, a cancel (SIGTERM) of the caller.
Rank-0 output is streamed line by line to a callback (the Prefect task logs it); progress and
complete checkpoints are read from the run's files (metrics.jsonl, each checkpoint's meta.json).

Per phase directory the launcher writes `job.json` (the TrainJob), `accelerate.yaml` and, for
DeepSpeed, `deepspeed.json`: all generated from the recipe's `launch` section, so a run can
be relaunched by hand (or on every node under a scheduler) with the printed command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from training.plan import preemption_grace_seconds
from training.precision import autocast_mode
from training.recipe import LaunchConfig, Recipe
from training.train import PREEMPTED, STOPPED, TrainJob


class TrainingFailed(RuntimeError):
    """The training subprocess exited non-zero; the message holds its last output lines."""


class TrainingStopped(RuntimeError):
    """The caller asked the training to stop (its `stop` event); the training group was killed."""


def deepspeed_config(recipe: Recipe) -> dict:
    """DeepSpeed's JSON for the recipe.

    The micro-batches of a step vary in number and size, so DeepSpeed's own batch bookkeeping
    gets nominal values (1 sample per micro-batch, gradient_accumulation_steps 1) and the
    training loop marks each step's last micro-batch itself. Clipping is DeepSpeed's (it sees
    the sharded gradients); bf16/fp16 follow the model dtype, with fp32 master weights and AdamW
    state in the ZeRO optimizer, and (bf16) gradients accumulated in fp32 across micro-batches.
    """
    launch, dtype = recipe.launch, recipe.model.dtype
    pin = torch.cuda.is_available()  # pinned host memory speeds offload copies; CPU-only has nothing to pin for
    # overlap_comm: reduce while backward runs (DeepSpeed turns it on by default for ZeRO-3 only);
    # its buffers (~4.5x the buckets) are counted by `lab plan`.
    zero: dict = {
        "stage": launch.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": launch.overlap_comm,
        "reduce_bucket_size": launch.bucket_elements,
    }
    if launch.zero_stage == 2:
        zero["allgather_bucket_size"] = launch.bucket_elements
    if launch.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if launch.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if launch.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints as one consolidated file
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": launch.world_size,
        "gradient_clipping": recipe.training.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},  # dynamic loss scaling by default
        **({"data_types": {"grad_accum_dtype": "fp32"}} if dtype == "bfloat16" else {}),
        "zero_allow_untested_optimizer": True,  # torch's AdamW: correct, just not on DeepSpeed's list
        "steps_per_print": 2**31 - 1,  # the training loop logs
        "wall_clock_breakdown": False,
    }


def accelerate_config(
    launch: LaunchConfig, deepspeed_config_file: Path | None = None, mixed_precision: str = "no"
) -> dict:
    """accelerate's config file for the recipe's launch settings.

    CPU multi-process must be MULTI_GPU plus ACCELERATE_USE_CPU (see `launch_env`): a MULTI_CPU
    config or `--cpu` silently runs a single process (NOTES.md). DeepSpeed must not get either
    (it would silently be dropped); on CPU it runs over gloo all the same. Precision
    (`mixed_precision`, from training.precision.autocast_mode): cpu / ddp / fsdp autocast over
    fp32 weights; DeepSpeed takes it from its JSON (accelerate refuses a second source). FSDP
    loads the weights on rank 0 only and broadcasts them shard by shard (cpu_ram_efficient_loading).
    """
    distributed = launch.world_size > 1
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if distributed else "NO",
        "num_processes": launch.world_size,  # accelerate counts all machines' processes
        "num_machines": launch.num_machines,
        "machine_rank": launch.machine_rank,
        "use_cpu": launch.backend == "cpu",
        "gpu_ids": "all",
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
    }
    if launch.backend != "deepspeed":
        config["mixed_precision"] = mixed_precision
    if launch.num_machines > 1:
        config |= {"main_process_ip": launch.main_process_ip, "main_process_port": launch.main_process_port}
    if launch.backend == "deepspeed":
        assert deepspeed_config_file is not None, "deepspeed needs its JSON file"
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_config_file),
            "zero3_init_flag": launch.zero_stage == 3,  # from_pretrained loads straight into shards
            "deepspeed_multinode_launcher": "standard",  # one launch per node (a scheduler's job), not pdsh
        }
    if launch.backend == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's decoder layers (_no_split_modules)
            "fsdp_reshard_after_forward": True,  # full sharding (ZeRO-3-like)
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",  # rolling state per rank; checkpoints are gathered
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": True,  # one full copy on rank 0's host, not one per rank
            "fsdp_sync_module_states": True,
        }
    return config


def node_env(launch: LaunchConfig, grace_s: int) -> dict[str, str]:
    """The variables every node's launch needs on top of its own environment.

    torchrun (under accelerate launch) answers a SIGTERM by passing it to the ranks and kills
    them `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds later (default 30): that must cover a
    preempted rank's last step and save (`grace_s`, training.plan.preemption_grace_seconds).
    GPU backends get the caching allocator's expandable segments: packed micro-batches change
    shape every step, which otherwise fragments memory into blocks of the old sizes.
    """
    env = {"PYTHONUNBUFFERED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(grace_s)}
    if launch.backend == "cpu" and launch.world_size > 1:  # gloo DDP on CPU; with one process it breaks PartialState
        env["ACCELERATE_USE_CPU"] = "true"
    if launch.backend != "cpu":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def launch_env(launch: LaunchConfig, grace_s: int) -> dict[str, str]:
    env = {**os.environ, **node_env(launch, grace_s)}
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:  # the user's own allocator settings win
        env["PYTORCH_CUDA_ALLOC_CONF"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    if launch.backend == "cpu" or not torch.cuda.is_available():
        # Measured on 2 cores: 1 thread per rank trained 24x faster than 2 (oversubscription).
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


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
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


def launch_command(
    config_file: Path,
    job_file: Path,
    launch: LaunchConfig,
    python: str = sys.executable,
    node: tuple[str, str, str] | None = None,
) -> list[str]:
    """The accelerate launch of one node. Under a scheduler every node runs the same command:
    `node` is (machine rank, main process ip, port) as references the node's shell or kubelet
    expands, e.g. ("$SLURM_NODEID", "$MAIN_PROCESS_IP", "29500")."""
    machine_rank, main_ip, main_port = node or (launch.machine_rank, launch.main_process_ip, launch.main_process_port)
    cmd = [python, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if launch.world_size > 1:
        if launch.backend in ("cpu", "ddp"):  # DeepSpeed / FSDP come from the config file
            cmd += ["--multi_gpu"]
        cmd += ["--num_processes", str(launch.world_size)]
    if launch.num_machines > 1:
        cmd += [
            "--num_machines",
            str(launch.num_machines),
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            str(main_ip),
            "--main_process_port",
            str(main_port),
        ]
    elif launch.world_size > 1:  # a free port: several runs on one machine must not meet on 29500
        cmd += ["--main_process_port", str(free_port())]
    if launch.backend == "cpu" and launch.world_size == 1:
        cmd += ["--cpu"]
    return cmd + ["-m", "training.train", "--config", str(job_file)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def prune_checkpoints(output_dir: Path, keep: str | None, policy: str) -> list[Path]:
    """Disk: after a phase's selection, delete its complete checkpoints except the winner.

    `keep` is the winner's path or URI (only its `samples_<N>` name is compared), or None when
    the phase's starting model won and none of its checkpoints is kept. Policy "none" deletes
    nothing. A winner that is not among the checkpoints is an error, not a reason to delete all.
    """
    if policy == "none":
        return []
    checkpoints = complete_checkpoints(output_dir)
    name = keep.rstrip("/").rsplit("/", 1)[-1] if keep else None
    if name is not None and name not in {p.name for p in checkpoints}:
        raise ValueError(
            f"selected checkpoint {keep!r} is not a complete checkpoint under {output_dir}; nothing deleted"
        )
    return delete_checkpoints([p for p in checkpoints if p.name != name])


def keep_last_checkpoints(output_dir: Path, n: int | None) -> list[Path]:
    """Disk during training: delete all but the newest `n` complete checkpoints (None: keep all)."""
    return delete_checkpoints(complete_checkpoints(output_dir)[:-n] if n else [])


def delete_checkpoints(paths: list[Path]) -> list[Path]:
    """meta.json first: a checkpoint interrupted mid-delete reads as incomplete, never as whole."""
    for path in paths:
        (path / "meta.json").unlink()
        shutil.rmtree(path)
    return paths


def launch_files(
    job: TrainJob, python: str = sys.executable, node: tuple[str, str, str] | None = None
) -> tuple[list[str], dict[Path, str]]:
    """The launch command and the files it reads (path -> text): job.json, accelerate.yaml and,
    for DeepSpeed, deepspeed.json, all in the phase directory. `python` and `node`: see
    `launch_command` (a scheduler's nodes)."""
    output_dir = Path(job.output_dir)
    job_file, config_file = output_dir / "job.json", output_dir / "accelerate.yaml"
    files = {job_file: job.model_dump_json(indent=2)}
    recipe = training_recipe(job.recipe)  # the node's GPUs less those evaluation reserves
    ds_file = None
    if recipe.launch.backend == "deepspeed":
        ds_file = output_dir / "deepspeed.json"
        files[ds_file] = json.dumps(deepspeed_config(recipe), indent=2) + "\n"
    files[config_file] = yaml.safe_dump(accelerate_config(recipe.launch, ds_file, autocast_mode(recipe)))
    return launch_command(config_file, job_file, recipe.launch, python, node), files


def write_launch_files(
    job: TrainJob, python: str = sys.executable, node: tuple[str, str, str] | None = None
) -> list[str]:
    """Write the launch files into the phase directory; return the launch command."""
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    command, files = launch_files(job, python, node)
    for path, text in files.items():
        path.write_text(text)
    return command


def start_training(job: TrainJob) -> subprocess.Popen:
    """Start the launch in its own process group (session), so that all ranks can be killed
    at once. GPUs that `evaluation.devices` gives to evaluation are hidden from it."""
    env = launch_env(job.recipe.launch, preemption_grace_seconds(job.recipe, job.model_path))
    env.update(training_devices(job.recipe, visible_gpus()))
    return subprocess.Popen(
        write_launch_files(job),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


class RunFiles:
    """What a training run has written so far, read from its files (never from its output):
    new lines of metrics.jsonl (progress) and newly complete checkpoints (meta.json landed)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.metrics_offset = 0
        self.metrics_inode: int | None = None
        self.reported: set[str] = set()

    def new_metrics(self) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return []
        with f:
            inode = os.fstat(f.fileno()).st_ino
            f.seek(0, os.SEEK_END)
            # A resumed launch swaps in a new file (train.open_jsonl): read it from the start.
            if inode != self.metrics_inode or f.tell() < self.metrics_offset:
                self.metrics_inode, self.metrics_offset = inode, 0
            f.seek(self.metrics_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        self.metrics_offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def new_checkpoints(self) -> list[Path]:
        fresh = [p for p in complete_checkpoints(self.output_dir) if p.name not in self.reported]
        self.reported.update(p.name for p in fresh)
        return fresh

    def report(
        self,
        on_metrics: Callable[[dict], None] | None,
        on_checkpoint: Callable[[Path], None] | None,
    ) -> None:
        """Hand what is new since the last call to the callbacks: metrics first, then checkpoints."""
        for record in self.new_metrics():
            if on_metrics:
                on_metrics(record)
        for checkpoint in self.new_checkpoints():
            if on_checkpoint:
                on_checkpoint(checkpoint)


def run_training(
    job: TrainJob,
    on_line: Callable[[str], None] = print,
    timeout_s: float | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    poll_s: float = 0.5,
    stop: threading.Event | None = None,
) -> list[Path]:
    """Launch one phase's training (resuming from its rolling state if there is one), stream
    its output to `on_line`, and return its complete checkpoints. Raises TrainingFailed, or
    TrainingStopped when `stop` is set (checked every `poll_s`).

    Progress and checkpoints are read from the run's files every `poll_s`: `on_metrics` gets
    each new metrics.jsonl record, `on_checkpoint` each checkpoint whose meta.json landed
    (including ones an earlier launch left), once. Both run in the caller's thread; an exception
    from either kills the training group and propagates.

    Under a cluster scheduler (launch.scheduler) the phase is a cluster job instead
    (training/scheduler.py), with node 0's output streamed the same way."""
    if job.recipe.launch.scheduler != "local":
        return run_scheduled(job, on_line, on_metrics, on_checkpoint)
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
                files.report(on_metrics, on_checkpoint)
        reader.join()
        files.report(on_metrics, on_checkpoint)  # what the last poll missed
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


def run_scheduled(
    job: TrainJob,
    on_line: Callable[[str], None],
    on_metrics: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> list[Path]:
    """The phase as a cluster job; its files (metrics, checkpoints) are reported once it ended
    (the nodes write them to the shared phase directory)."""
    from training.scheduler import run_on_kubernetes, run_on_slurm

    scheduler = job.recipe.launch.scheduler
    forget_early_end(Path(job.output_dir))
    try:
        succeeded = (run_on_kubernetes if scheduler == "kubernetes" else run_on_slurm)(job, on_line)
    finally:
        remove_incomplete_checkpoints(Path(job.output_dir))
    RunFiles(Path(job.output_dir)).report(on_metrics, on_checkpoint)
    if not succeeded:
        what = ended_how(Path(job.output_dir), f"failed under {scheduler} (node 0's log above)")
        raise TrainingFailed(f"training of phase {job.phase} {what}")
    return complete_checkpoints(Path(job.output_dir))


def forget_early_end(output_dir: Path) -> None:
    """A watchdog stop or a preemption of an earlier launch: this one may get further."""
    for name in (STOPPED, PREEMPTED):
        (output_dir / name).unlink(missing_ok=True)


def ended_how(output_dir: Path, otherwise: str) -> str:
    """Why a training run ended early, from the files its ranks wrote."""
    if (output_dir / STOPPED).exists():
        return "stopped by the watchdog"
    if (output_dir / PREEMPTED).exists():
        step = json.loads((output_dir / PREEMPTED).read_text())["step"]
        return f"preempted (SIGTERM): the rolling state was saved after step {step}; a relaunch resumes there"
    return otherwise


def kill_group(proc: subprocess.Popen) -> None:
    """Stop the training group without a save: SIGINT (a SIGTERM would make the ranks save the
    rolling state first, as for a preemption), SIGKILL after 10 s. The run resumes from its last
    rolling state."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
