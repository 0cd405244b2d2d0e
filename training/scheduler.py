"""Multi-node phases under a cluster scheduler (`launch.scheduler: kubernetes | slurm`).

A phase is one cluster job of `num_machines` nodes x `num_processes` GPUs. Every node runs the
same `accelerate launch` as a local run (training.launch); only its node rank and the
address of node 0 come from the scheduler:
- Kubernetes: one Kubeflow Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1) on the
  `torch-distributed` runtime, which sets PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT
  on every node; the kubelet expands `$(VAR)` in the container's command. Applied with the
  kubernetes client, followed to completion while node 0's log streams to the caller, and
  deleted when the caller is interrupted (a cancelled flow run).
- Slurm: an sbatch script; `srun` starts one task per node, whose shell expands $SLURM_NODEID
  and $MAIN_PROCESS_IP (the first host of the allocation). Submitted with `sbatch --wait`,
  node 0's output followed from its file, `scancel`led when the caller is interrupted.
The launch files (job.json, accelerate.yaml) are written once into the phase directory, which
every node must see at the same path: the storage root lives on shared storage.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.records import ProgressEvent
from training.job import TrainJob
from training.launch.checkpoints import complete_checkpoints, remove_incomplete_checkpoints
from training.launch.config import launch_command, node_env, write_launch_files
from training.launch.files import RunFiles, TrainingFailed, TrainingStopped, ended_how, forget_early_end

REPO = Path(__file__).resolve().parents[1]  # every node runs from a checkout at the same path
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
# (machine rank, main process ip, main process port) as the node's environment gives them.
KUBERNETES_NODE = ("$(PET_NODE_RANK)", "$(PET_MASTER_ADDR)", "$(PET_MASTER_PORT)")
SLURM_RANK, SLURM_MAIN_IP = "$SLURM_NODEID", "$MAIN_PROCESS_IP"


def run_scheduled(
    job: TrainJob,
    on_line: Callable[[str], None],
    on_progress: Callable[[ProgressEvent], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    stop: threading.Event | None = None,
) -> list[Path]:
    """The phase as a cluster job (launch.scheduler: kubernetes | slurm), node 0's output streamed
    to `on_line`; returns its complete checkpoints. Raises TrainingFailed, or TrainingStopped when
    `stop` is set (checked at every poll; the job is deleted / scancelled). The nodes write the
    run's files to the shared phase directory: `on_progress` gets each new progress event as the
    job is polled, `on_checkpoint` each complete checkpoint once the job ended."""
    scheduler = job.recipe.launch.scheduler
    output_dir = Path(job.output_dir)
    forget_early_end(output_dir)
    files = RunFiles(output_dir)
    run = run_on_kubernetes if scheduler == "kubernetes" else run_on_slurm

    def on_poll() -> None:
        if stop is not None and stop.is_set():
            raise TrainingStopped(f"training of phase {job.phase} stopped by its run")
        files.report(on_progress, None)

    try:
        succeeded = run(job, on_line, on_poll=on_poll)
    finally:
        remove_incomplete_checkpoints(output_dir)
    files.report(on_progress, on_checkpoint)
    if not succeeded:
        what = ended_how(output_dir, f"failed under {scheduler} (node 0's log above)")
        raise TrainingFailed(f"training of phase {job.phase} {what}")
    return complete_checkpoints(output_dir)


def job_name(job: TrainJob) -> str:
    """A DNS-1123 name for the phase's cluster job: lowercase letters, digits and '-', short
    enough for the JobSet and pod names derived from it."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{job.run_id}-{job.phase}".lower()).strip("-")
    return name[:40].rstrip("-")


def node_gpus(job: TrainJob) -> int:
    return 0 if job.recipe.launch.backend == "cpu" else job.recipe.launch.num_processes


def render_trainjob(job: TrainJob) -> dict:
    """The phase's TrainJob: N nodes x G GPUs, each running the launch with its node rank."""
    launch = job.recipe.launch
    k8s = launch.kubernetes
    if k8s is None:
        raise ValueError("launch.kubernetes: required for scheduler: kubernetes")
    out = Path(job.output_dir)
    if not out.is_relative_to(k8s.mount_path):
        raise ValueError(
            f"launch.kubernetes.mount_path: the phase directory {out} is not under {k8s.mount_path}; "
            "put the storage root on the shared volume so that every node sees it"
        )
    command = launch_command(out / "accelerate.yaml", out / "job.json", launch, "python", KUBERNETES_NODE)
    gpus = node_gpus(job)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": job_name(job),
            "namespace": k8s.namespace,
            "labels": {"app.kubernetes.io/part-of": "recipe-lab", "recipe-lab/phase": job_name(job)},
        },
        "spec": {
            "runtimeRef": {"name": k8s.runtime},
            "trainer": {
                "image": k8s.image,
                "command": command,
                "numNodes": launch.num_machines,
                "numProcPerNode": launch.num_processes,
                "resourcesPerNode": {"requests": {k8s.gpu_resource: gpus}, "limits": {k8s.gpu_resource: gpus}}
                if gpus
                else {},
                "env": [{"name": k, "value": v} for k, v in node_env(launch, job.grace_s).items()],
            },
            "podSpecOverrides": [
                {
                    "targetJobs": [{"name": "node"}],
                    "volumes": [{"name": "storage", "persistentVolumeClaim": {"claimName": k8s.volume_claim}}],
                    "containers": [
                        {"name": "node", "volumeMounts": [{"name": "storage", "mountPath": k8s.mount_path}]}
                    ],
                }
            ],
        },
    }


def render_sbatch(job: TrainJob, python: str = "python") -> str:
    """The phase's sbatch script: N nodes, G GPUs each, srun running the launch once per node."""
    launch = job.recipe.launch
    out = Path(job.output_dir)
    command = launch_command(
        out / "accelerate.yaml",
        out / "job.json",
        launch,
        python,
        (SLURM_RANK, SLURM_MAIN_IP, str(launch.main_process_port)),
    )
    # Quote every word but the node's references: the task's shell expands those, per node.
    node_line = " ".join(word if word in (SLURM_RANK, SLURM_MAIN_IP) else shlex.quote(word) for word in command)
    grace = job.grace_s
    options = [
        f"--job-name={job_name(job)}",
        f"--nodes={launch.num_machines}",
        "--ntasks-per-node=1",  # one launcher per node; accelerate starts the node's ranks
        *([f"--gpus-per-node={node_gpus(job)}"] if node_gpus(job) else []),
        f"--time={launch.slurm.time}",
        f"--signal=TERM@{grace}",  # SIGTERM this long before the time limit: the ranks save the rolling state
        *([f"--partition={launch.slurm.partition}"] if launch.slurm.partition else []),
        f"--output={out / 'slurm-%j.log'}",
        *launch.slurm.sbatch_options,
    ]
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in node_env(launch, grace).items())
    return (
        "#!/bin/bash\n"
        + "".join(f"#SBATCH {option}\n" for option in options)
        + "set -euo pipefail\n"
        + 'export MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        + exports
        + f"cd {shlex.quote(str(REPO))}\n"
        + f"srun --kill-on-bad-exit=1 --output={shlex.quote(str(out / 'node-%t.log'))} bash -c {shlex.quote(node_line)}\n"
    )


def run_on_kubernetes(
    job: TrainJob,
    on_line: Callable[[str], None],
    api_client=None,
    poll_s: float = 5.0,
    on_poll: Callable[[], None] = lambda: None,
) -> bool:
    """Apply the phase's TrainJob, stream node 0's log, wait for its end; True if it completed.
    `on_poll` runs at every wait and log line. Deleted on any interruption (cancel, timeout,
    error, `on_poll`'s) so that no node outlives the caller."""
    from kubernetes import client, config, watch

    write_launch_files(job, "python", KUBERNETES_NODE)
    body = render_trainjob(job)
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    if api_client is None:
        config.load_config()  # kubeconfig, or the pod's service account in a cluster
    objects, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    on_line(f"kubernetes: TrainJob {namespace}/{name}: {job.recipe.launch.num_machines} nodes x {node_gpus(job)} GPUs")
    try:
        selector = f"trainer.kubeflow.org/trainjob-name={name},batch.kubernetes.io/job-completion-index=0"
        pod = None
        while pod is None:
            pods = core.list_namespaced_pod(namespace, label_selector=selector).items
            pod = next((p.metadata.name for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")), None)
            if pod is None:
                on_poll()
                time.sleep(poll_s)
        for line in watch.Watch().stream(core.read_namespaced_pod_log, name=pod, namespace=namespace, container="node"):
            on_line(line)
            on_poll()
        while True:
            status = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status", {})
            done = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
            if "Complete" in done or "Failed" in done:
                if "Failed" in done:
                    on_line(f"kubernetes: TrainJob {name} failed: {done['Failed'].get('message', '')}")
                return "Complete" in done
            on_poll()
            time.sleep(poll_s)
    except BaseException:
        objects.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body=client.V1DeleteOptions(propagation_policy="Foreground")
        )
        on_line(f"kubernetes: deleted TrainJob {namespace}/{name}")
        raise


def run_on_slurm(
    job: TrainJob, on_line: Callable[[str], None], poll_s: float = 2.0, on_poll: Callable[[], None] = lambda: None
) -> bool:
    """Submit the phase's sbatch script and wait for it (`sbatch --wait`), following node 0's
    output file; True if the job succeeded. `on_poll` runs at every poll; scancel on any
    interruption (`on_poll`'s too)."""
    write_launch_files(job)
    script = Path(job.output_dir) / "job.sbatch"
    script.write_text(render_sbatch(job, python="python"))
    proc = subprocess.Popen(["sbatch", "--wait", "--parsable", str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip().split(";")[0]  # --parsable prints the id at submission
    on_line(f"slurm: job {job_id} ({script})")
    node0, position = Path(job.output_dir) / "node-0.log", 0
    try:
        while True:
            exited = proc.poll() is not None  # read once more after the exit: the last lines
            if node0.exists():
                with open(node0) as f:
                    f.seek(position)
                    for line in f:
                        on_line(line.rstrip("\n"))
                    position = f.tell()
            if exited:
                return proc.returncode == 0
            on_poll()
            time.sleep(poll_s)
    except BaseException:
        subprocess.run(["scancel", job_id], check=False)
        on_line(f"slurm: cancelled job {job_id}")
        raise


def node_launches(job: TrainJob) -> str:
    """What starts the phase on its nodes, as `lab plan` prints it: the TrainJob (YAML), the
    sbatch script, or (local) the command each machine runs by hand."""
    import yaml

    launch = job.recipe.launch
    if launch.scheduler == "kubernetes":
        return yaml.safe_dump(render_trainjob(job), sort_keys=False) + (
            f"# preemption: the runtime {launch.kubernetes.runtime!r} must give its pods "
            f"terminationGracePeriodSeconds >= {job.grace_s} (TrainJob overrides cannot set it)\n"
        )
    if launch.scheduler == "slurm":
        return render_sbatch(job)
    out = Path(job.output_dir)
    return "\n".join(
        f"# machine {rank}:\n"
        + " ".join(
            launch_command(
                out / "accelerate.yaml",
                out / "job.json",
                launch,
                node=(str(rank), str(launch.main_process_ip), str(launch.main_process_port)),
            )
        )
        for rank in range(launch.num_machines)
    )
