"""Multi-node phases: a real two-machine rendezvous on localhost, and the cluster jobs that run
the same launch on every node (Kubernetes TrainJob against an API double, Slurm sbatch)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from core.recipe import RecipeError, load_recipe
from tests.k8s_double import KubernetesDouble
from tests.stack import free_port
from training.job import TrainJob
from training.launch.config import launch_command, write_launch_files
from training.launch.local import launch_env, run_training
from training.scheduler import render_sbatch, render_trainjob, run_on_kubernetes


def cluster(scheduler: str, mount_path: str = "/shared", **launch) -> dict:
    """4 nodes x 8 GPUs, DeepSpeed ZeRO-3, under `scheduler`."""
    return {
        "launch.backend": "deepspeed",
        "launch.zero_stage": 3,
        "launch.num_processes": 8,
        "launch.num_machines": 4,
        "launch.scheduler": scheduler,
        "launch.kubernetes": {
            "image": "registry.example/recipe-lab:1.0",
            "volume_claim": "lab-runs",
            "mount_path": mount_path,
        },
        **launch,
    }


def job_for(
    out: str, launch: dict, recipe: str = "lab", data_dir: str = "/shared/runs/r/data/phase00", **training
) -> TrainJob:
    cfg = load_recipe(recipe, {**launch, **training})
    return TrainJob(
        run_id="r",
        phase="phase00",
        recipe=cfg,
        model_path="/models/base",
        parent_checkpoint="/models/base",
        data_dir=data_dir,
        output_dir=out,
    )


def test_kubernetes_trainjob_wires_nodes_gpus_node_rank_and_the_exact_launch():
    job = job_for("/shared/runs/r/phase00", cluster("kubernetes"))
    trainjob = render_trainjob(job)
    assert (trainjob["apiVersion"], trainjob["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert trainjob["metadata"] == {
        "name": "r-phase00",
        "namespace": "default",
        "labels": {"app.kubernetes.io/part-of": "recipe-lab", "recipe-lab/phase": "r-phase00"},
    }
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {"requests": {"nvidia.com/gpu": 8}, "limits": {"nvidia.com/gpu": 8}}
    assert trainer["image"] == "registry.example/recipe-lab:1.0"
    # 4 nodes x 8 GPUs = 32 processes; the node rank and node 0's address from the runtime's PET_* variables
    assert trainer["command"] == [
        "python", "-m", "accelerate.commands.launch", "--config_file", "/shared/runs/r/phase00/accelerate.yaml",
        "--num_processes", "32", "--num_machines", "4", "--machine_rank", "$(PET_NODE_RANK)",
        "--main_process_ip", "$(PET_MASTER_ADDR)", "--main_process_port", "$(PET_MASTER_PORT)",
        "-m", "training.train", "--config", "/shared/runs/r/phase00/job.json",
    ]  # fmt: skip
    override = trainjob["spec"]["podSpecOverrides"][0]
    assert override["volumes"] == [{"name": "storage", "persistentVolumeClaim": {"claimName": "lab-runs"}}]
    assert override["containers"][0]["volumeMounts"] == [{"name": "storage", "mountPath": "/shared"}]

    with pytest.raises(ValueError, match="launch.kubernetes.mount_path"):
        render_trainjob(job.model_copy(update={"output_dir": "/elsewhere/r/phase00"}))
    with pytest.raises(RecipeError, match="needs a kubernetes section"):
        load_recipe("lab", {"launch.scheduler": "kubernetes"})


def test_slurm_script_runs_the_launch_once_per_node_with_its_node_rank(tmp_path):
    job = job_for(str(tmp_path / "phase00"), cluster("slurm", **{"launch.slurm": {"partition": "gpu"}}))
    script = render_sbatch(job)
    sbatch = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu"} <= set(sbatch)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    words = shlex.split(srun)
    assert words[:2] == ["srun", "--kill-on-bad-exit=1"] and words[-3:-1] == ["bash", "-c"]
    # What node 2 of the allocation runs: its shell expands the references (real bash, no srun here).
    env = {"PATH": os.environ["PATH"], "SLURM_NODEID": "2", "MAIN_PROCESS_IP": "10.0.0.7"}
    argv = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + words[-1]], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    out = tmp_path / "phase00"
    assert argv == [
        "python", "-m", "accelerate.commands.launch", "--config_file", f"{out}/accelerate.yaml",
        "--num_processes", "32", "--num_machines", "4", "--machine_rank", "2",
        "--main_process_ip", "10.0.0.7", "--main_process_port", "29500",
        "-m", "training.train", "--config", f"{out}/job.json",
    ]  # fmt: skip
    assert 'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script


LOG = ["world_size=32 rank=0", "step 1/2 samples 3840 loss 1.2000", "step 2/2 samples 7680 loss 1.1000"]


def test_kubernetes_trainjob_is_applied_followed_with_node0_logs_and_completes(tmp_path):
    job = job_for(
        str(tmp_path / "phase00"),
        cluster("kubernetes", mount_path=str(tmp_path)),
    )
    lines: list[str] = []
    with KubernetesDouble(LOG, outcome="Complete") as api:
        assert run_on_kubernetes(job, lines.append, api_client=api.client(), poll_s=0.05) is True
    assert api.trainjobs["r-phase00"]["spec"] == render_trainjob(job)["spec"]  # what the client sent, as rendered
    assert [line for line in lines if not line.startswith("kubernetes:")] == LOG
    assert not api.deleted
    # the launch files every node reads were written on the shared volume
    assert json.loads((tmp_path / "phase00" / "job.json").read_text())["phase"] == "phase00"
    assert (tmp_path / "phase00" / "accelerate.yaml").exists()

    with KubernetesDouble(LOG, outcome="Failed") as api:
        assert run_on_kubernetes(job, lines.append, api_client=api.client(), poll_s=0.05) is False


def test_a_cancelled_phase_deletes_its_trainjob(tmp_path):
    job = job_for(
        str(tmp_path / "phase00"),
        cluster("kubernetes", mount_path=str(tmp_path)),
    )

    class Cancelled(BaseException):
        """Like the TerminationSignal a cancelled flow run's SIGTERM raises in the task."""

    def cancel_on_first_step(line: str) -> None:
        if line.startswith("step 1/"):
            raise Cancelled

    with KubernetesDouble(LOG, hold_log=True) as api, pytest.raises(Cancelled):
        run_on_kubernetes(job, cancel_on_first_step, api_client=api.client(), poll_s=0.05)
    assert [name for name, _ in api.deleted] == ["r-phase00"]
    assert api.deleted[0][1]["propagationPolicy"] == "Foreground"  # the nodes' pods go with it


def test_a_stopped_phase_deletes_its_trainjob(tmp_path, monkeypatch):
    """run_scheduled's `stop` (set by a phase's evaluation that failed for good) ends a cluster phase
    too: checked at the next poll, the TrainJob is deleted and TrainingStopped raised."""
    import functools
    import threading

    from training import scheduler
    from training.launch.files import TrainingStopped

    job = job_for(str(tmp_path / "phase00"), cluster("kubernetes", mount_path=str(tmp_path)))
    stop = threading.Event()

    def stop_on_first_step(line: str) -> None:
        if line.startswith("step 1/"):
            stop.set()

    with KubernetesDouble(LOG, hold_log=True) as api, pytest.raises(TrainingStopped, match="phase00"):
        on_double = functools.partial(scheduler.run_on_kubernetes, api_client=api.client(), poll_s=0.05)
        monkeypatch.setattr(scheduler, "run_on_kubernetes", on_double)
        scheduler.run_scheduled(job, stop_on_first_step, stop=stop)
    assert [name for name, _ in api.deleted] == ["r-phase00"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_machines_rendezvous_on_localhost_train_with_world_size_2_and_match_one_machine(
    tmp_path, assets, prepared_slice
):
    data = prepared_slice("phase00", 96)
    settings = {
        "training.epochs": 1,
        "training.effective_batch_size": 16,
        "training.warmup_steps": 0,
        "training.max_tokens_per_micro_batch": 64,
        "checkpointing.save_every_samples": None,
        "checkpointing.state_every_steps": None,
    }
    base = str(assets.base_model_dir)
    one = job_for(str(tmp_path / "one"), {}, "demo", data, **settings).model_copy(
        update={"model_path": base, "parent_checkpoint": base}
    )
    run_training(one, on_line=lambda _: None)

    port = free_port()
    two = job_for(
        str(tmp_path / "two"),
        {"launch.num_machines": 2, "launch.main_process_ip": "127.0.0.1", "launch.main_process_port": port},
        "demo",
        data,
        **settings,
    ).model_copy(update={"model_path": base, "parent_checkpoint": base})
    write_launch_files(two)  # once, on the storage both machines share; each machine runs the launch
    out = Path(two.output_dir)
    machines = []
    for rank in (0, 1):
        command = launch_command(
            out / "accelerate.yaml", out / "job.json", two.recipe.launch, node=(str(rank), "127.0.0.1", str(port))
        )
        assert command[command.index("--machine_rank") + 1] == str(rank)
        log = open(tmp_path / f"machine{rank}.log", "w")
        env = launch_env(two.recipe.launch, grace_s=60)
        machines.append(
            subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    try:
        # One deadline for both, under pytest-timeout's limit: a hang fails with both machines' logs.
        deadline = time.monotonic() + 300
        codes = [m.wait(timeout=max(0.0, deadline - time.monotonic())) for m in machines]
    except subprocess.TimeoutExpired:
        codes = [m.poll() for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                os.killpg(m.pid, 9)
    logs = [(tmp_path / f"machine{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs
    assert "world_size=2 rank=0" in logs[0] and "world_size=2 rank=1" in logs[1]

    ranks = [read_jsonl(out / "samples" / f"rank{r}.jsonl") for r in (0, 1)]
    for step0, step1 in zip(*ranks, strict=True):
        assert step0["ids"] and step1["ids"] and not set(step0["ids"]) & set(step1["ids"])
    assert sum(len(s["ids"]) for r in ranks for s in r) == 96
    reference = read_jsonl(Path(one.output_dir) / "metrics.jsonl")
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [m["step"] for m in reference] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in reference], rel=1e-4)
    assert [m["grad_norm"] for m in metrics] == pytest.approx([m["grad_norm"] for m in reference], rel=1e-4)


def test_lab_plan_prints_the_phase_on_its_nodes(assets):
    from training.lab_plan import plan_recipe

    recipe = load_recipe(
        "demo", cluster("kubernetes", **{"launch.backend": "ddp", "launch.num_processes": 2, "launch.num_machines": 3})
    )
    _, text = plan_recipe(recipe)
    nodes = text.split("-- the phase on 3 node(s), scheduler kubernetes\n")[1]
    trainjob = yaml.safe_load(nodes)
    assert trainjob["kind"] == "TrainJob" and trainjob["spec"]["trainer"]["numNodes"] == 3
    assert trainjob["spec"]["trainer"]["command"][-1] == "/shared/STORAGE_ROOT/RUN_ID/phase00/job.json"
    local = load_recipe("demo", {"launch.num_machines": 2, "launch.main_process_ip": "10.0.0.1"})
    _, text = plan_recipe(local)
    assert "# machine 1:\n" in text and "--machine_rank 1 --main_process_ip 10.0.0.1" in text
