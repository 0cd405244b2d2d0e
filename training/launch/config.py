"""The launch files of a phase, generated from the recipe's `launch` section, and the launch command.

Per phase directory: `job.json` (the TrainJob), `accelerate.yaml` and, for DeepSpeed,
`deepspeed.json`, so a run can be relaunched by hand (or on every node under a scheduler) with
the printed command.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import yaml

from core.recipe import LaunchConfig, Recipe
from training.job import TrainJob
from training.launch.devices import cuda_device_count, training_recipe
from training.precision import autocast_mode


def deepspeed_config(recipe: Recipe) -> dict:
    """DeepSpeed's JSON for the recipe.

    The micro-batches of a step vary in number and size, so DeepSpeed's own batch bookkeeping
    gets nominal values (1 sample per micro-batch, gradient_accumulation_steps 1) and the
    training loop marks each step's last micro-batch itself. Clipping is DeepSpeed's (it sees
    the sharded gradients); bf16/fp16 follow the model dtype, with fp32 master weights and AdamW
    state in the ZeRO optimizer, and (bf16) gradients accumulated in fp32 across micro-batches.
    """
    launch, dtype = recipe.launch, recipe.model.dtype
    pin = cuda_device_count() > 0  # pinned host memory speeds offload copies; CPU-only has nothing to pin for
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
